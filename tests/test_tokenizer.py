"""The gateway tokenizer against Hugging Face transformers, and chat template rendering."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from gateway.chat_template import ChatTemplateError, flatten_content, render_chat_template
from gateway.tokenizer import Tokenizer, load_tokenizer
from ipc.model_folder import ModelLoadError

TEXTS = [
    "Hello world!",
    "Once upon a time, there was a little girl named Lily.",
    "  two leading spaces,\ttabs\nand newlines\n\n",
    "Ünïcödé 你好世界 🎉🦀 ∑∫ — “quotes”",
    "<s> looks special but is text </s>",
    "",
]
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "And"}, {"type": "text", "text": "Spain?"}],
    },
]


def _hf_tokenizer(path: Path, **kwargs: Any) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)


def test_llama3_known_ids(llama3_tokenizer_path: Path) -> None:
    tok = load_tokenizer(str(llama3_tokenizer_path))
    assert tok.encode("Hello world!") == [128000, 9906, 1917, 0]
    assert tok.encode("Hello world!", add_special_tokens=False) == [9906, 1917, 0]
    assert tok.bos_token_id == 128000 and 128009 in tok.eos_token_ids
    assert tok.vocab_size == 128256
    assert tok.is_special(128009) and not tok.is_special(9906)
    assert tok.convert_ids_to_tokens([9906, 1917]) == ["Hello", "Ġworld"]
    assert tok.decode([128000, 9906, 1917, 0]) == "Hello world!"
    assert tok.decode([128000, 9906], skip_special_tokens=False) == "<|begin_of_text|>Hello"


def test_token_bytes(llama3_tokenizer_path: Path, stories_path: Path) -> None:
    for path in (llama3_tokenizer_path, stories_path):
        tok = load_tokenizer(str(path))
        for text in ["Hello world!", " 你好 🦀\n\t", "Ünïcödé"]:
            ids = tok.encode(text, add_special_tokens=False)
            joined = b"".join(tok.token_bytes(i) for i in ids)
            # SentencePiece prepends a space ("▁") to the text; byte-level BPE does not
            assert joined.decode() == (text if path == llama3_tokenizer_path else " " + text)
        assert tok.token_bytes(tok.bos_token_id or 0) == tok.bos_token.encode()


def test_lone_surrogates_are_replaced(llama3_tokenizer_path: Path) -> None:
    tok = load_tokenizer(str(llama3_tokenizer_path))
    assert tok.decode(tok.encode("a\ud800b", add_special_tokens=False)) == "a?b"


def test_chat_prompt_has_one_bos(llama3_tokenizer_path: Path) -> None:
    tok = load_tokenizer(str(llama3_tokenizer_path))
    text = tok.apply_chat_template([{"role": "user", "content": " Hi "}])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert tok.encode(text).count(128000) == 2  # what encode_chat avoids


@pytest.mark.golden
def test_stories_matches_transformers(stories_path: Path) -> None:
    hf = _hf_tokenizer(stories_path)
    tok = load_tokenizer(str(stories_path))
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2} and tok.chat_template is None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert ids[0] == 1  # BOS from tokenizer.json's post-processor
        assert tok.encode(text, add_special_tokens=False) == hf.encode(
            text, add_special_tokens=False
        )
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


@pytest.mark.golden
def test_llama3_matches_transformers(llama3_tokenizer_path: Path) -> None:
    hf = _hf_tokenizer(llama3_tokenizer_path)
    tok = load_tokenizer(str(llama3_tokenizer_path))
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text), text
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    for add in (True, False):
        assert tok.apply_chat_template(messages, add) == hf.apply_chat_template(
            messages, add_generation_prompt=add, tokenize=False
        )
        expected = hf.apply_chat_template(messages, add_generation_prompt=add, tokenize=True)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert tok.encode_chat(messages, add) == list(expected)


@pytest.mark.golden
def test_smollm2_gguf_matches_transformers(smollm2_path: Path) -> None:
    hf = _hf_tokenizer(smollm2_path.parent, gguf_file=smollm2_path.name)
    tok = load_tokenizer(str(smollm2_path))
    assert tok.vocab_size == 49152 and tok.eos_token_ids == {2} and tok.bos_token_id == 1
    for text in [*TEXTS, "<|im_start|>user\nHi<|im_end|>\n"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text), text  # add_bos_token is false in this file
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert tok.encode("<|im_start|>") == [1] and tok.is_special(1)
    flat = flatten_content(MESSAGES)
    for add in (True, False):
        assert tok.apply_chat_template(MESSAGES, add) == hf.apply_chat_template(
            flat, add_generation_prompt=add, tokenize=False
        )


def test_smollm2_splits_digits(smollm2_path: Path) -> None:
    """SmolLM2's vocabulary (StarCoder's) splits digits one by one, as its tokenizer.json
    and llama.cpp ("smollm" pre-tokenizer) do; transformers' GGUF converter does not."""
    tok = load_tokenizer(str(smollm2_path))
    ids = tok.encode("year 2024")
    assert tok.convert_ids_to_tokens(ids) == ["year", "Ġ", "2", "0", "2", "4"]
    assert tok.decode(ids) == "year 2024"


def test_folder_template_sources(tmp_path: Path, stories_path: Path) -> None:
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(stories_path / "tokenizer.json", folder / "tokenizer.json")
    config = {
        "bos_token": {"content": "<s>"},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
        ],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    tok = load_tokenizer(str(folder))
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2, 7} and tok.eos_token == "</s>"
    assert tok.apply_chat_template([{"role": "user", "content": "Hey"}]) == "<s>Hey"
    (folder / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert load_tokenizer(str(folder)).apply_chat_template(MESSAGES) == "J4"


def test_no_chat_template_is_a_clear_error(stories_path: Path) -> None:
    tok = load_tokenizer(str(stories_path))
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert issubclass(ChatTemplateError, ValueError)


def test_missing_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json not found"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json: cannot load tokenizer"):
        load_tokenizer(str(tmp_path))


def test_template_environment() -> None:
    source = (
        "{% for m in messages %}\n"
        "  {{ m.role }}={{ m.content | tojson }}\n"
        "{% endfor %}"
        "{% generation %}G{% endgeneration %}"
        "{% for i in range(3) %}{% if i == 1 %}{% break %}{% endif %}{{ i }}{% endfor %}"
        "{{ bos_token }}|{{ eos_token }}|{{ strftime_now('%Y') | length }}|{{ flag }}"
    )
    out = render_chat_template(
        source,
        [{"role": "user", "content": "<a> & é"}],
        bos_token="<s>",
        eos_token="</s>",
        flag="x",
    )
    # trim_blocks/lstrip_blocks drop the block-tag lines (not the indent of an expression);
    # tojson escapes neither HTML nor unicode
    assert out == '  user="<a> & é"\nG0<s>|</s>|4|x'


def test_template_errors() -> None:
    with pytest.raises(ChatTemplateError, match="chat template raised: roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        render_chat_template("{% for %}", [])
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat_template("{{ messages[5]['content'] }}", [])
    with pytest.raises(ChatTemplateError, match="'image_url' is not supported"):
        render_chat_template("", [{"role": "user", "content": [{"type": "image_url"}]}])
    # the sandbox forbids reaching into Python internals
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__ }}{{ ''.__class__.mro() }}", [])


def test_content_parts_flattened() -> None:
    out = render_chat_template("{{ messages[3]['content'] }}", MESSAGES)
    assert out == "And\nSpain?"
    assert MESSAGES[3]["content"][0] == {"type": "text", "text": "And"}  # input untouched


def test_repr_and_name(stories_path: Path) -> None:
    tok = load_tokenizer(str(stories_path))
    assert isinstance(tok, Tokenizer) and tok.name == "stories260K"
    assert "vocab_size=512" in repr(tok)

"""Finding a model's files and streaming its weights; errors name the file at fault."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ipc.model_folder import ModelLoadError, open_model
from worker.weights import iter_weights


def _hf_folder(tmp_path: Path, stories_path: Path) -> Path:
    """A writable copy of the stories260K config and tokenizer files (no weights)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        shutil.copy(stories_path / name, folder / name)
    return folder


def test_stories_folder(stories_path: Path) -> None:
    files = open_model(str(stories_path))
    assert files.format == "safetensors"
    assert files.path == str(stories_path) and files.tokenizer_path == str(stories_path)
    assert files.config["hidden_size"] == 64 and files.config["num_key_value_heads"] == 4
    assert files.generation_config["eos_token_id"] == 2
    expected = load_file(str(stories_path / "model.safetensors"))
    seen = []
    for name, tensor in iter_weights(files):
        assert tensor.device.type == "cpu"
        assert torch.equal(tensor, expected[name]), name
        seen.append(name)
    assert sorted(seen) == sorted(expected)


def test_sharded_checkpoint_with_index(tmp_path: Path, stories_path: Path) -> None:
    folder = _hf_folder(tmp_path, stories_path)
    weights = load_file(str(stories_path / "model.safetensors"))
    names = sorted(weights)
    shards = {
        "model-00001-of-00002.safetensors": names[:10],
        "model-00002-of-00002.safetensors": names[10:],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, str(folder / shard))
        weight_map.update(dict.fromkeys(shard_names, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    got = dict(iter_weights(open_model(str(folder))))
    assert set(got) == set(weights)
    assert all(torch.equal(got[n], weights[n]) for n in names)

    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors not found"):
        open_model(str(folder))


def test_any_safetensors_files_without_index(tmp_path: Path, stories_path: Path) -> None:
    folder = _hf_folder(tmp_path, stories_path)
    save_file({"a": torch.ones(2)}, str(folder / "part-b.safetensors"))
    save_file({"b": torch.zeros(3)}, str(folder / "part-a.safetensors"))
    files = open_model(str(folder))
    assert [Path(f).name for f in files.weight_files] == [
        "part-a.safetensors",
        "part-b.safetensors",
    ]
    assert [name for name, _ in iter_weights(files)] == ["b", "a"]


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.json not found: not a model folder"):
        open_model(str(tmp_path))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="nowhere not found"):
        open_model(str(tmp_path / "nowhere"))


def test_corrupt_json_names_the_file(tmp_path: Path, stories_path: Path) -> None:
    folder = _hf_folder(tmp_path, stories_path)
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"generation_config\.json: cannot read JSON"):
        open_model(str(folder), load_format="dummy")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=r"config\.json: expected a JSON object"):
        open_model(str(folder), load_format="dummy")


def test_corrupt_safetensors_names_the_file(tmp_path: Path, stories_path: Path) -> None:
    folder = _hf_folder(tmp_path, stories_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    files = open_model(str(folder))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read safetensors"):
        list(iter_weights(files))


def test_bin_only_checkpoint_is_refused(tmp_path: Path, stories_path: Path) -> None:
    folder = _hf_folder(tmp_path, stories_path)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="only safetensors and GGUF"):
        open_model(str(folder))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights"):
        open_model(str(folder))


def test_dummy_needs_only_config(tmp_path: Path, stories_path: Path) -> None:
    folder = _hf_folder(tmp_path, stories_path)  # no weights at all
    files = open_model(str(folder), load_format="dummy")
    assert files.config["vocab_size"] == 512
    assert list(iter_weights(files)) == []


def test_bad_load_format(stories_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="load_format must be one of"):
        open_model(str(stories_path), load_format="pt")
    with pytest.raises(ModelLoadError, match=r"no \.gguf file found"):
        open_model(str(stories_path), load_format="gguf")


def _tiny_gguf(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in (
        (w.add_block_count, 1),
        (w.add_embedding_length, 4),
        (w.add_feed_forward_length, 8),
        (w.add_head_count, 2),
        (w.add_context_length, 16),
        (w.add_vocab_size, 3),
    ):
        add(value)
    w.add_tensor("token_embd.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_and_folders(tmp_path: Path) -> None:
    _tiny_gguf(tmp_path / "a.gguf")
    files = open_model(str(tmp_path))  # a folder with exactly one .gguf is that file
    assert files.format == "gguf" and files.path == str(tmp_path / "a.gguf")
    assert files.config["vocab_size"] == 3 and files.config["tie_word_embeddings"] is True
    [(name, tensor)] = list(iter_weights(files))
    assert name == "model.embed_tokens.weight"
    assert torch.equal(tensor, torch.arange(12.0).reshape(3, 4))
    with pytest.raises(ModelLoadError, match="this is a GGUF file"):
        open_model(str(tmp_path / "a.gguf"), load_format="safetensors")

    _tiny_gguf(tmp_path / "b.gguf")
    with pytest.raises(ModelLoadError, match=r"holds 2 \.gguf files"):
        open_model(str(tmp_path))
    assert open_model(str(tmp_path / "b.gguf")).path == str(tmp_path / "b.gguf")


def test_hf_folder_with_a_gguf_prefers_safetensors(tmp_path: Path, stories_path: Path) -> None:
    folder = _hf_folder(tmp_path, stories_path)
    shutil.copy(stories_path / "model.safetensors", folder / "model.safetensors")
    _tiny_gguf(folder / "extra.gguf")
    assert open_model(str(folder)).format == "safetensors"
    assert open_model(str(folder), load_format="gguf").format == "gguf"


def test_truncated_gguf(tmp_path: Path) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelLoadError, match=r"bad\.gguf: cannot read GGUF file"):
        open_model(str(tmp_path / "bad.gguf"))

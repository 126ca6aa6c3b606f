"""Speculative decoding benchmark: the cost of verification, and W6 end to end.

(a) Cost: one target step verifying k = 2, 4, 8 proposals per request against one plain
    decode step, batch 1 and 8, at a fixed context (Llama-3-8B shape, dummy weights, on a
    GPU; a tiny shape on CPU). The step is the engine's whole step body: host inputs,
    forward (CUDA graphs where the runner uses them, i.e. plain decode), sampling or
    rejection sampling. Proposals are n-gram style (point-mass q), so the draft's own
    cost is not in it.
(b) W6: batch 1, 64 greedy output tokens, prompts whose answer copies the prompt; plain
    decoding against n-gram speculation (and a draft model with --draft-model). Reports
    accepted tokens per verification step, tokens per step and end-to-end speedup.

The speedup the two imply for a big target: with acceptance a tokens per step (so 1 + a
tokens per target step) and a verification step costing c plain steps, ~ (1 + a) / c.

    PYTHONPATH=. python scripts/bench_spec_decode.py --output-json bench_spec.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import torch

from ipc.messages import EngineRequest, SamplingParams
from worker.config import EngineConfig
from worker.engine import EngineCore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = os.path.join(os.path.dirname(REPO), "shared", "models", "stories260K")
LLAMA3_8B = os.path.join(REPO, "scripts", "configs", "llama-3-8b")

# Texts to be copied back, each longer than the 64 output tokens (about 90-110 tokens), so
# the whole measured answer is a copy. With an instruct model they are wrapped in "repeat
# exactly"; with a base model the prompt is the text twice and the start of a third copy.
TEXTS = [
    "Lily went to the park with her mom on a sunny morning. She saw a big brown dog and a red "
    "ball near the old tree. The dog ran to the ball, picked it up and brought it to Lily. She "
    "laughed and threw the ball again, and the dog ran after it. After a while they sat on a "
    "bench and shared an apple. Then they walked home slowly and ate some cake with grandpa.",
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. All that glitters is not gold. Actions speak louder than words. The early "
    "bird catches the worm, but the second mouse gets the cheese. Where there is smoke there is "
    "fire. Do not count your chickens before they hatch. Practice makes perfect.",
    "To make tea, first fill the kettle with fresh water and bring it to a boil. Warm the pot "
    "with a little hot water and pour it away. Put one tea bag in each cup, pour the boiling "
    "water over it and wait three to five minutes, depending on how strong you like it. Then "
    "take out the bag, add milk or lemon if you like, and stir in a spoon of honey.",
    "Tom had a little wooden boat with a white sail. Every day after school he sailed it on the "
    "pond near his house. One windy afternoon the string slipped from his hand and the boat "
    "drifted far away toward the reeds. Tom was sad and called for help. A friendly duck swam "
    "over, pushed the boat back to the shore with its beak, and Tom thanked it with bread.",
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- (a) cost of one verification step ---------------------------------------------------------
def step_times(
    engine: EngineCore, batch: int, context: int, ks: list[int], iters: int
) -> dict[str, float]:
    """Median seconds of one step with k proposals per request (k = 0: plain decode)."""
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=max(ks) + 64, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(10, min(vocab, 32000), (context,), generator=g).tolist()
        engine.add_request(EngineRequest(f"cost-{batch}-{i}", prompt, params))
    while any(r.num_computed_tokens < r.num_tokens - 1 for r in engine.scheduler.requests.values()):
        engine.step()  # prefill and a first token; the loop below sets the proposals
    running = list(engine.scheduler.running)
    out: dict[str, float] = {}
    for k in [0, *ks]:
        for r in running:
            r.spec_token_ids = torch.randint(10, min(vocab, 1000), (k,), generator=g).tolist()
        sched = engine.scheduler.schedule()  # state is not updated: the same step re-runs
        times = []
        for it in range(iters + 3):
            sync(engine.device)
            t0 = time.perf_counter()
            engine.runner.execute(sched)
            sync(engine.device)
            if it >= 3:
                times.append(time.perf_counter() - t0)
        out[f"k{k}"] = statistics.median(times)
    engine.abort_requests([r.request_id for r in running])
    return out


def bench_cost(args: argparse.Namespace) -> dict[str, Any]:
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    model = args.cost_model or (LLAMA3_8B if on_gpu else STORIES)
    args.context = args.context or (512 if on_gpu else 128)
    engine = EngineCore(
        EngineConfig(
            model=model,
            load_format="dummy",
            device=args.device,
            dtype=args.dtype,
            max_model_len=args.context + 256,
            # KV lookahead and verification graphs for k; the proposals are set below.
            speculative_method="ngram",
            num_speculative_tokens=max(args.ks),
            max_num_seqs=max(args.batch_sizes),
            kv_cache_memory_gb=0.5,
        )
    )
    rows = []
    for batch in args.batch_sizes:
        times = step_times(engine, batch, args.context, args.ks, args.iters)
        for k in args.ks:
            rows.append(
                {
                    "batch": batch,
                    "k": k,
                    "plain_ms": times["k0"] * 1e3,
                    "verify_ms": times[f"k{k}"] * 1e3,
                    "ratio": times[f"k{k}"] / times["k0"],
                }
            )
    return {"model": model, "device": str(engine.device), "context": args.context, "rows": rows}


# ---- (b) W6 -------------------------------------------------------------------------------------
def w6_prompts(engine: EngineCore, tokenizer_path: str, instruct: bool) -> list[list[int]]:
    from gateway.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    prompts = []
    for text in TEXTS:
        if instruct:
            msgs = [{"role": "user", "content": f"Repeat the following text exactly:\n\n{text}"}]
            chat = tok.apply_chat_template(msgs, add_generation_prompt=True)  # type: ignore[arg-type]
            prompts.append(tok.encode(chat, add_special_tokens=False))
        else:
            first = text.split(". ")[0]
            prompts.append(tok.encode(f"{text}\n{text}\n{first}"))
    return prompts


def run_w6(engine: EngineCore, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
    """Batch 1: one request at a time, 64 greedy tokens each; wall time of each."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    s0 = engine.stats()
    times, outputs = [], []
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"w6-{time.monotonic_ns()}-{i}", prompt, params))
        tokens: list[int] = []
        sync(engine.device)
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
        sync(engine.device)
        times.append(time.perf_counter() - t0)
        outputs.append(tokens)
    s1 = engine.stats()
    steps = s1.spec_steps - s0.spec_steps
    accepted = s1.spec_accepted - s0.spec_accepted
    proposed = s1.spec_proposed - s0.spec_proposed
    return {
        "seconds": sum(times),
        "tok_per_s": len(prompts) * max_tokens / sum(times),
        "spec_steps": steps,
        "proposed": proposed,
        "accepted": accepted,
        "accepted_per_step": accepted / steps if steps else 0.0,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "outputs": outputs,
    }


def bench_w6(args: argparse.Namespace) -> dict[str, Any]:
    model = args.w6_model or STORIES
    instruct = model.endswith(".gguf") or "instruct" in model.lower()
    base = dict(model=model, device=args.device, dtype=args.dtype, max_model_len=512)
    cases: dict[str, dict[str, Any]] = {"plain": {}}
    for k in args.w6_k:
        cases[f"ngram-k{k}"] = dict(speculative_method="ngram", num_speculative_tokens=k)
        if args.draft_model:
            cases[f"draft-k{k}"] = dict(
                speculative_model=args.draft_model, num_speculative_tokens=k
            )
    results: dict[str, Any] = {"model": model, "ks": args.w6_k, "cases": {}}
    prompts: list[list[int]] = []
    for name, spec in cases.items():
        engine = EngineCore(EngineConfig(**base, **spec))  # type: ignore[arg-type]
        if not prompts:
            tok = args.tokenizer or engine.files.tokenizer_path or model
            prompts = w6_prompts(engine, tok, instruct)
        run_w6(engine, prompts[:1], args.max_tokens)  # warm-up
        results["cases"][name] = [
            run_w6(engine, prompts, args.max_tokens) for _ in range(args.w6_runs)
        ]
        # Untimed: top-5 logprobs at every position, to tell near-ties from real differences.
        results.setdefault("top5", {})[name] = run_top5(engine, prompts, args.max_tokens)
        if name == "plain":
            # Context for "identical": plain greedy decoding of the same prompts batched
            # together, against one at a time (16-bit GEMM and attention rounding depends
            # on the batch shape, as it does on the verification shape).
            results["plain_batched_outputs"] = run_batched(engine, prompts, args.max_tokens)
        if args.w6_profile and name != "plain":
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.runcall(run_w6, engine, prompts, args.max_tokens)
            with open(f"{args.w6_profile}.{name}.txt", "w") as f:
                pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)
        engine.shutdown()  # its GPU memory now, before the next case's engine sizes its KV
        del engine
    plain = min(r["seconds"] for r in results["cases"]["plain"])
    ref = results["cases"]["plain"][0]["outputs"]
    results["plain_batched_same_tokens"] = same_prefix(results.pop("plain_batched_outputs"), ref)
    for name in cases:
        runs = results["cases"][name]
        results[f"{name}_speedup"] = plain / min(r["seconds"] for r in runs)
        results[f"{name}_identical"] = all(r["outputs"] == ref for r in runs)
        # Per prompt: how many leading tokens equal plain decoding's.
        results[f"{name}_same_tokens"] = same_prefix(runs[0]["outputs"], ref)
        results[f"{name}_divergences"] = divergences(results["top5"], name)
        for r in runs:
            r.pop("outputs")
    results.pop("top5")
    return results


def run_batched(engine: EngineCore, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"w6b-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(EngineRequest(rid, prompt, params))
    tokens: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return [tokens[rid] for rid in ids]


def run_top5(
    engine: EngineCore, prompts: list[list[int]], max_tokens: int
) -> list[tuple[list[int], list[dict[int, float]]]]:
    """Each prompt's greedy tokens and top-5 logprobs at each position, one at a time."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
    result = []
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"w6t-{time.monotonic_ns()}-{i}", prompt, params))
        tokens: list[int] = []
        lps: list[dict[int, float]] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
                for x in out.new_logprobs or []:
                    lps.append(dict(zip(x.token_ids, x.logprobs, strict=True)))
        result.append((tokens, lps))
    return result


def divergences(top5: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """Where a case's greedy tokens first leave plain decoding's: the position, both
    tokens, and the gap between their logprobs under each run's own distribution there
    (a near-tie when both gaps are small)."""
    found = []
    for i, ((a, alp), (b, blp)) in enumerate(zip(top5[name], top5["plain"], strict=True)):
        n = same_prefix([a], [b])[0]
        if n < min(len(a), len(b)):
            ta, tb = a[n], b[n]
            found.append(
                {
                    "prompt": i,
                    "position": n,
                    "plain_token": tb,
                    "case_token": ta,
                    "plain_gap": blp[n][tb] - blp[n].get(ta, float("-inf")),
                    "case_gap": alp[n][ta] - alp[n].get(tb, float("-inf")),
                }
            )
    return found


def same_prefix(outputs: list[list[int]], ref: list[list[int]]) -> list[int]:
    counts = []
    for a, b in zip(outputs, ref, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        counts.append(n)
    return counts


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--cost-model",
        default=None,
        help="default: Llama-3-8B shape on GPU, stories260K shape on CPU",
    )
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--context", type=int, default=None, help="512 on GPU, 128 on CPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--w6-model", default=None, help="stories260K (default) or a SmolLM2 .gguf")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--draft-model", default=None, help="also run W6 with this draft model")
    p.add_argument("--w6-k", type=int, nargs="+", default=[4])
    p.add_argument("--w6-runs", type=int, default=3, help="timed runs per case (best counts)")
    p.add_argument(
        "--w6-profile", default=None, help="cProfile each speculative case to PREFIX.<case>.txt"
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-w6", action="store_true")
    p.add_argument("--output-json", default="bench_spec_decode.json")
    args = p.parse_args()

    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        report["card"] = torch.cuda.get_device_name()
    if not args.skip_cost:
        report["cost"] = bench_cost(args)
    if not args.skip_w6:
        report["w6"] = bench_w6(args)
    with open(args.output_json, "w") as f:
        json.dump(report, f, indent=2)

    if "cost" in report:
        print(f"verification cost ({report['cost']['model']}, context {args.context}):")
        for r in report["cost"]["rows"]:
            print(
                f"  batch {r['batch']:2d} k {r['k']}: {r['verify_ms']:.2f} ms vs plain {r['plain_ms']:.2f} ms = {r['ratio']:.2f}x"
            )
    if "w6" in report:
        w6 = report["w6"]
        print(f"W6 ({w6['model']}):")
        for name, runs in w6["cases"].items():
            r = max(runs, key=lambda r: r["tok_per_s"])  # the best run, as the speedup uses
            print(
                f"  {name:9s} {r['tok_per_s']:8.1f} tok/s  accepted/step {r['accepted_per_step']:.2f}  "
                f"speedup {w6[f'{name}_speedup']:.2f}x  same tokens {w6[f'{name}_same_tokens']}"
            )
        for name in w6["cases"]:
            for d in w6.get(f"{name}_divergences", []):
                print(
                    f"  {name} prompt {d['prompt']} leaves plain at token {d['position']}: "
                    f"logprob gap {d['plain_gap']:.4f} (plain), {d['case_gap']:.4f} ({name})"
                )
        print(
            f"  plain, the prompts batched together: same tokens {w6['plain_batched_same_tokens']}"
        )
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()

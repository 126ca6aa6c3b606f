"""Host time of one step's sampling at batch 256: the sampling batch built, then sampled.

A decode batch of B requests with mixed params (a third penalized, half seeded, some
greedy, some top-p / top-k), prompts of --prompt-len tokens and outputs that grow by one
token a step from random starting lengths. Each step either keeps its rows (steady
decode) or, with --churn N, replaces N requests (a finish and an admission each).

    --mode lists   SamplingBatch of the requests' params and token lists (the per-step
                   rebuild; runs on any commit, so PYTHONPATH=<old checkout> measures before)
    --mode rows    worker/sampling_rows.py: params kept per row, penalty counts per slot

On CPU with a small vocabulary the sampler's tensor math is small, so the time is
mostly the host's: list walking, tensor building, launches. Prints the median CPU time
per step (time.process_time, one torch thread: other processes on the machine count less).

    python scripts/bench_sampling_batch.py --mode lists --mode rows
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from ipc.messages import SamplingParams
from worker.request import Request
from worker.sampler import Sampler, SamplingBatch

EOS = 2


def mixed_params(rng: random.Random) -> SamplingParams:
    kind = rng.random()
    penalized = rng.random() < 1 / 3
    return SamplingParams(
        temperature=0.0 if kind < 0.25 else 0.8,
        top_p=0.9 if 0.25 <= kind < 0.6 else 1.0,
        top_k=50 if kind >= 0.8 else 0,
        seed=rng.randrange(2**31) if rng.random() < 0.5 else None,
        repetition_penalty=1.1 if penalized else 1.0,
        frequency_penalty=0.3 if penalized and rng.random() < 0.5 else 0.0,
        presence_penalty=0.2 if penalized and rng.random() < 0.5 else 0.0,
        max_tokens=100_000,
    )


def make_request(rng: random.Random, rid: str, vocab: int, prompt_len: int) -> Request:
    req = Request(
        rid, [rng.randrange(vocab) for _ in range(prompt_len)], mixed_params(rng), frozenset({EOS})
    )
    for _ in range(rng.randrange(256)):
        req.append_token(rng.randrange(vocab))
    return req


def run(mode: str, churn: int, args: argparse.Namespace) -> list[float]:
    rng = random.Random(0)
    reqs = [make_request(rng, f"r{i}", args.vocab, args.prompt_len) for i in range(args.batch)]
    sampler = Sampler(args.vocab, {EOS})
    rows = None
    if mode == "rows":
        from worker.sampling_rows import SamplingRows

        rows = SamplingRows(args.vocab, {EOS}, torch.device("cpu"))
    logits = torch.randn(args.batch, args.vocab)
    times = []
    for step in range(args.warmup + args.steps):
        for _ in range(churn):
            reqs[rng.randrange(len(reqs))] = make_request(
                rng, f"s{step}.{rng.random()}", args.vocab, args.prompt_len
            )
        t0 = time.process_time()
        if rows is not None:
            batch = rows.batch(reqs)
        else:
            batch = SamplingBatch(
                params=[r.params for r in reqs],
                prompt_token_ids=[r.prompt_token_ids for r in reqs],
                output_token_ids=[r.output_token_ids for r in reqs],
            )
        tokens = sampler(logits, batch).token_ids.tolist()
        if step >= args.warmup:
            times.append(time.process_time() - t0)
        for r, t in zip(reqs, tokens, strict=True):
            r.append_token(t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", action="append", choices=["lists", "rows"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--churn", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    torch.set_num_threads(1)
    for churn in args.churn:
        for mode in args.mode or ["lists", "rows"]:
            t = run(mode, churn, args)
            print(
                f"mode {mode:5s} batch {args.batch} vocab {args.vocab} prompt {args.prompt_len} "
                f"churn {churn}/step: median {statistics.median(t) * 1e3:.3f} ms/step "
                f"(min {min(t) * 1e3:.3f})"
            )


if __name__ == "__main__":
    main()

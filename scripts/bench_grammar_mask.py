"""Per-step cost of structured output's mask work, on the CPU: `headrace bench structured`'s
schema, Llama-3's 128k vocabulary, a batch of constrained requests advancing together.

Part 1, the pieces, timed one by one each step (random allowed tokens, as dummy weights
sample them):
  alloc      torch.full(-1) of a fresh [B, W] mask (the synchronous path) vs fill_(-1)
  fill       one matcher at a time vs xgrammar's BatchGrammarMatcher (its threads)
  accept     accept_token per request (a Python loop) vs batch_accept_token (one call)
  apply      logits[~allowed] = -inf on a [B, V] float32 CPU tensor: the torch ops a GPU runs,
             and xgrammar's CPU loop (what a CPU engine runs); the GPU's cost differs
  gil        the share of a Python thread's work that goes on while another thread runs
             a batch fill / accepts (1.0: that call releases the GIL throughout)
Part 2, the whole step as the engine runs it, main-thread milliseconds per step:
  sync       accept on the main thread, then grammar_bitmask (the path before the overlap)
  overlap    StepMasks: prefetch after the tokens, then bitmask at sampling time, with the
             main thread meanwhile idle for --gpu-ms (waiting on the GPU, GIL released) or
             busy in Python for --busy-ms (building the next step, GIL held; StepMasks
             eager, as under async scheduling)

Usage: python scripts/bench_grammar_mask.py [--batch 64] [--steps 64] [--output-json F]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from headrace.bench.structured import SCHEMA
from ipc.messages import GrammarKind, GuidedDecoding
from worker.grammar_masks import StepMasks
from worker.structured import GrammarBackend, RequestGrammar, apply_bitmask_torch, grammar_bitmask

LLAMA3_STOP_IDS = [128001, 128008, 128009]


@dataclass
class FakeRequest:
    """What StepMasks reads of a request."""

    request_id: str
    grammar: RequestGrammar | None
    is_finished: bool = False


@dataclass
class Timings:
    """Wall time and this thread's CPU time per call: on a shared machine the CPU time of
    single-threaded work stays close to its cost on an idle one, the wall time does not."""

    ms: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)

    def time(self, name: str, f: Callable[..., Any], *args: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        out = f(*args)
        self.ms.setdefault(name, []).append(1000 * (time.perf_counter() - t))
        self.cpu_ms.setdefault(name, []).append(1000 * (time.thread_time() - c))
        return out

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            k: {
                "mean": statistics.fmean(v),
                "median": statistics.median(v),
                "p90": sorted(v)[int(0.9 * (len(v) - 1))],
                "cpu_median": statistics.median(self.cpu_ms[k]),
            }
            for k, v in self.ms.items()
        }


def random_allowed(row: np.ndarray, vocab: int, rng: random.Random) -> int:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
    allowed = np.flatnonzero(bits)
    return int(allowed[rng.randrange(len(allowed))])


def _spin(stop: threading.Event) -> int:
    n = 0
    while not stop.is_set():
        n += 1
    return n


def gil_share(job: Callable[[], object], reps: int = 20) -> float:
    """Python work this thread does while `job` runs `reps` times on another, over the same
    work done alone for as long: ~1.0 when the job runs without the GIL."""
    stop = threading.Event()

    def run_job() -> None:
        for _ in range(reps):
            job()
        stop.set()

    th = threading.Thread(target=run_job)
    t = time.perf_counter()
    th.start()
    n_with = _spin(stop)
    th.join()
    dt = time.perf_counter() - t
    stop = threading.Event()
    timer = threading.Timer(dt, stop.set)
    t = time.perf_counter()
    timer.start()
    n_alone = _spin(stop)
    return (n_with / dt) / (n_alone / (time.perf_counter() - t))


def busy_python(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


class Batch:
    """B constrained requests on one compiled grammar, advanced with random allowed tokens."""

    def __init__(self, compiled: Any, n: int, vocab: int, seed: int) -> None:
        self.reqs = [FakeRequest(f"r{i}", RequestGrammar(compiled)) for i in range(n)]
        self.vocab = vocab
        self.rng = random.Random(seed)

    def matchers(self) -> list[Any]:
        return [r.grammar.matcher for r in self.reqs if r.grammar is not None]

    def sample(self, mask: torch.Tensor) -> list[int]:
        rows = mask.numpy()
        return [random_allowed(rows[i], self.vocab, self.rng) for i in range(len(self.reqs))]


def bench_pieces(compiled: Any, args: argparse.Namespace, t: Timings) -> dict[str, float]:
    import xgrammar as xgr

    B, V = args.batch, args.vocab_size
    W = (V + 31) // 32
    batch = Batch(compiled, B, V, 0)
    ms = batch.matchers()
    fillers = {n: xgr.BatchGrammarMatcher(n) for n in args.threads}
    mask = torch.full((B, W), -1, dtype=torch.int32)
    logits = torch.randn(B, V)
    rows = list(range(B))

    def accept_one_by_one(tokens: list[int]) -> None:
        for m, x in zip(ms, tokens, strict=True):
            m.accept_token(x)

    def fill_one_by_one() -> None:
        for i, m in enumerate(ms):
            m.fill_next_token_bitmask(mask, i)

    for step in range(args.steps):
        t.time("alloc_torch_full", lambda: torch.full((B, W), -1, dtype=torch.int32))
        t.time("alloc_prealloc_fill", lambda: mask.fill_(-1))
        t.time("fill_one_by_one", fill_one_by_one)
        for n, f in fillers.items():
            t.time(f"fill_batch_{n}t", f.batch_fill_next_token_bitmask, ms, mask, rows)
        if step % 16 == 0:
            x = logits.clone()
            t.time("apply_torch_cpu", apply_bitmask_torch, x, mask)
            x = logits.clone()
            t.time("apply_xgrammar_cpu", xgr.apply_token_bitmask_inplace, x, mask)
        tokens = batch.sample(mask)
        if step % 2:
            t.time("accept_loop", accept_one_by_one, tokens)
        else:
            ok = t.time("accept_batch", xgr.BatchGrammarMatcher.batch_accept_token, ms, tokens)
            assert all(ok)
    f = fillers[max(args.threads)]
    tok = batch.sample(mask)

    def accept_and_back() -> None:
        xgr.BatchGrammarMatcher.batch_accept_token(ms, tok)
        xgr.BatchGrammarMatcher.batch_rollback(ms, 1)

    def loop_and_back() -> None:
        for m, x in zip(ms, tok, strict=True):
            m.accept_token(x)
        for m in ms:
            m.rollback(1)

    return {
        f"fill_batch_{max(args.threads)}t": gil_share(
            lambda: f.batch_fill_next_token_bitmask(ms, mask, rows)
        ),
        "accept_batch": gil_share(accept_and_back),
        "accept_loop": gil_share(loop_and_back),
    }


def bench_step(compiled: Any, args: argparse.Namespace, t: Timings) -> dict[str, Any]:
    """The engine's step, both ways, on one batch each (same token process)."""
    B, V = args.batch, args.vocab_size
    cpu = torch.device("cpu")
    sync = Batch(compiled, B, V, 1)

    def sync_step(tokens: list[int]) -> torch.Tensor | None:
        for r, x in zip(sync.reqs, tokens, strict=False):  # no tokens before the first step
            assert r.grammar is not None and r.grammar.accept([x])
        return grammar_bitmask([(r.grammar, []) for r in sync.reqs], V, cpu)

    tokens: list[int] = []
    for _ in range(args.steps):
        mask = t.time("sync_accept_then_fill", sync_step, tokens)
        tokens = sync.sample(mask)
    modes: dict[str, Callable[[], None]] = {
        "idle": lambda: time.sleep(args.gpu_ms / 1000),
        "busy": lambda: busy_python(args.busy_ms),
    }
    stats: dict[str, Any] = {}
    for mode, pause in modes.items():
        overlap = Batch(compiled, B, V, 1)
        masks = StepMasks(V, cpu, eager=mode == "busy")
        tokens = []
        for _ in range(args.steps):
            updates = (
                [(r, [x]) for r, x in zip(overlap.reqs, tokens, strict=True)] if tokens else []
            )
            t.time(f"overlap_{mode}_prefetch", masks.prefetch, updates)
            pause()
            rows: list[tuple[FakeRequest, list[int]]] = [(r, []) for r in overlap.reqs]
            mask = t.time(f"overlap_{mode}_bitmask", masks.bitmask, rows)
            tokens = overlap.sample(mask)
        masks.close()
        stats[mode] = masks.stats.per_step()
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    models = os.environ.get("HEADRACE_SHARED_MODELS", "/work/shared/models")
    ap.add_argument("--tokenizer", default=os.path.join(models, "llama3-tokenizer"))
    ap.add_argument("--vocab-size", type=int, default=128256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--gpu-ms", type=float, default=4.0, help="idle main thread per step")
    ap.add_argument("--busy-ms", type=float, default=1.0, help="busy main thread per step")
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads for torch")
    ap.add_argument("--output-json")
    args = ap.parse_args()
    # Small host tensor ops (1 MB fills, clones) gain nothing from intra-op threads, and on a
    # busy machine their barriers wait for descheduled threads for milliseconds.
    torch.set_num_threads(args.torch_threads)

    backend = GrammarBackend(args.tokenizer, args.vocab_size, LLAMA3_STOP_IDS)
    t0 = time.perf_counter()
    spec = GuidedDecoding(GrammarKind.JSON_SCHEMA, json.dumps(SCHEMA))
    compiled = backend.submit(spec).result()
    compile_s = time.perf_counter() - t0
    t = Timings()
    gil = bench_pieces(compiled, args, t)
    stats = bench_step(compiled, args, t)
    backend.close()
    result = {
        "batch": args.batch,
        "vocab": args.vocab_size,
        "steps": args.steps,
        "cpus": os.cpu_count(),
        "compile_s": compile_s,
        "ms_per_step": t.summary(),
        "gil_share": gil,
        "overlap_stats": stats,
        "mask_bytes": args.batch * ((args.vocab_size + 31) // 32) * 4,
    }
    print(f"{'ms per step':28s} {'median':>8s} {'mean':>8s} {'p90':>8s} {'thread cpu':>10s}")
    for k, v in result["ms_per_step"].items():
        print(
            f"{k:28s} {v['median']:8.3f} {v['mean']:8.3f} {v['p90']:8.3f} {v['cpu_median']:10.3f}"
        )
    for k, share in gil.items():
        print(f"gil share while {k} runs (1.0 = released): {share:.2f}")
    for mode, s in stats.items():
        print(
            f"overlap {mode}: job {s['job_ms_per_step']:.3f} ms, main thread waited "
            f"{s['wait_ms_per_step']:.3f} ms, assembled {s['assemble_ms_per_step']:.3f} ms per step"
        )
    print(f"mask {result['mask_bytes'] / 1e6:.2f} MB per step; grammar compile {compile_s:.1f} s")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

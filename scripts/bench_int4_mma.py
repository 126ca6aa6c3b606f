"""The tensor-core int4 decode GEMV (HEADRACE_INT4_GEMV=mma) against the old one (gemv_m*)
and cuBLAS bf16 on Llama-3 shapes, one line per shape: M = 1 with L2 flushed, as events
around eager calls and as CUDA-graph replays (no Python launch cost), every mma variant and
the rule's pick, then M = 2, 4, 8. Fractions are of the measured copy bandwidth.

    python scripts/bench_int4_mma.py [--shapes 8b.qkv 8b.o 8b.gate_up 8b.down] [--output-json F]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from headrace.bench import gpu_timing
from scripts.int4_bench import random_weight

DEVICE = "cuda"  # tests/test_bench_int4.py runs this on CPU


def _bench_int4() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench_int4", Path(__file__).with_name("bench_int4.py")
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


B4 = _bench_int4()  # SHAPES, DEVICE, timed, copy_bandwidth
SHAPES: dict[str, tuple[int, int]] = B4.SHAPES
EIGHT_B = [name for name in SHAPES if name.startswith("8b.")]


def graphed(fn: Any) -> Any:
    return gpu_timing.graphed(fn)


def with_impl(impl: str, fn: Any) -> Any:
    """fn run with HEADRACE_INT4_GEMV=impl (set at call time: graphs capture it then)."""

    def run() -> object:
        ig.GEMV_IMPL = impl
        return fn()

    return run


def shape_row(name: str, group_size: int, bw: float) -> dict:
    n, k = SHAPES[name]
    w = random_weight(n, k, group_size, B4.DEVICE)
    q_bytes = w.qw.numel() * 4 + w.scales.numel() * 2 + w.zeros.numel()
    x = torch.randn(8, k, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty(8, n, dtype=torch.bfloat16, device=DEVICE)
    wb = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE)
    calls = {
        "old": with_impl("old", partial(ig.int4_linear, x[:1], w, out=y[:1])),
        "mma": with_impl("mma", partial(ig.int4_linear, x[:1], w, out=y[:1])),
        "cublas_bf16": partial(torch.nn.functional.linear, x[:1], wb),
    }
    us = {lb: B4.timed(fn) * 1e6 for lb, fn in calls.items()}
    graph_us = {lb: B4.timed(graphed(fn)) * 1e6 for lb, fn in calls.items()}
    read = {"old": q_bytes, "mma": q_bytes, "cublas_bf16": n * k * 2}
    variants = {
        mg.label(v): B4.timed(partial(mg.gemv, x[:1], w, y[:1], v)) * 1e6 for v in mg.VARIANTS
    }
    rows_us = {
        f"m{m}_{impl}": B4.timed(with_impl(impl, partial(ig.int4_linear, x[:m], w, out=y[:m])))
        * 1e6
        for m in (2, 4, 8)
        for impl in ("old", "mma")
    }
    ig.GEMV_IMPL = "mma"
    return dict(
        shape=name,
        n=n,
        k=k,
        us=us,
        frac_copy={lb: read[lb] / (t * 1e-6) / bw for lb, t in us.items()},
        graph_us=graph_us,
        graph_frac_copy={lb: read[lb] / (t * 1e-6) / bw for lb, t in graph_us.items()},
        mma_rule=mg.label(mg.choose(n, k, mg._sms(x.device))),
        mma_variants_us=variants,
        mma_best=min(variants, key=variants.__getitem__),
        rows_us=rows_us,
    )


def summary(r: dict) -> str:
    f, g, gf, best = r["frac_copy"], r["graph_us"], r["graph_frac_copy"], r["mma_best"]
    rows = r["rows_us"]
    return " | ".join(
        [
            f"{r['shape']:11s}",
            f"old {r['us']['old']:5.1f}us {f['old']:4.0%}",
            f"mma[{r['mma_rule']}] {r['us']['mma']:5.1f}us {f['mma']:4.0%}",
            f"best mma[{best}] {r['mma_variants_us'][best]:5.1f}us",
            f"cuBLAS bf16 {r['us']['cublas_bf16']:5.1f}us {f['cublas_bf16']:4.0%}",
            f"graphs old/mma/cuBLAS {g['old']:.1f}/{g['mma']:.1f}/{g['cublas_bf16']:.1f}us"
            f" ({gf['old']:.0%}/{gf['mma']:.0%}/{gf['cublas_bf16']:.0%})",
            "M=2/4/8 old "
            + "/".join(f"{rows[f'm{m}_old']:.1f}" for m in (2, 4, 8))
            + " mma "
            + "/".join(f"{rows[f'm{m}_mma']:.1f}" for m in (2, 4, 8))
            + "us",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=EIGHT_B, choices=list(SHAPES))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    bw = B4.copy_bandwidth()
    print(f"int4 GEMV, copy bandwidth {bw / 1e12:.2f} TB/s, group {args.group_size}, L2 flushed")
    rows = []
    for name in args.shapes:
        rows.append(shape_row(name, args.group_size, bw))
        print(summary(rows[-1]), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(copy_bandwidth=bw, group_size=args.group_size, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

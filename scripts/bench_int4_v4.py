"""Round 4 of the int4 decode GEMV (HEADRACE_INT4_GEMV=v4, the stream layout) against round 3
(HEADRACE_INT4_GEMV=mma, the default) and cuBLAS bf16 on the Llama-3 8B and 70B shapes, one
line a shape: M = 1 with L2 flushed, as CUDA events around eager calls (Python's launch
cost included when the GPU waits for it) and as CUDA-graph replays (what decode runs), TB/s
and % of the measured copy bandwidth by graph replays; M = 8 by graphs. Then, per shape, the
measurements that decide each kernel's variant rule: every variant by events and by graphs,
the rule's pick against the fastest by graphs, and the verdict `decide` gives (the rule
stands unless another variant is more than DECIDE_MARGIN faster in graph replays).

    python scripts/bench_int4_v4.py [--shapes 8b.o ...] [--output-json F]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch

from cuda import int4_gemm as ig
from cuda import int4_mma_gemv as mg
from cuda import int4_v4_gemv as v4
from headrace.bench import gpu_timing
from scripts.int4_bench import random_weight

DEVICE = "cuda"  # tests/test_bench_int4_v4.py runs this on CPU
SHAPES = gpu_timing.LLAMA_LINEAR_SHAPES
timed = gpu_timing.mean_time  # (fn, iters=50): mean seconds, L2 flushed before each call
copy_bandwidth = gpu_timing.copy_bandwidth
graphed = gpu_timing.graphed
DECIDE_MARGIN = 0.05


def both(fn: Callable[[], object]) -> tuple[float, float]:
    """(events us, graph replays us) of fn."""
    return timed(fn) * 1e6, timed(graphed(fn)) * 1e6


def decide(rule: str, by_graph: dict[str, float]) -> str:
    """The verdict on a rule's pick from every variant's graph-replay time."""
    best = min(by_graph, key=by_graph.__getitem__)
    gain = 1 - by_graph[best] / by_graph[rule]
    if best == rule or gain <= DECIDE_MARGIN:
        return f"rule stands ({rule}; best {best} {gain:.0%} faster)"
    return f"rule loses: {best} {gain:.0%} faster than {rule} by graphs"


def variants(gemv: Callable, vs: tuple, label: Callable, x: torch.Tensor, w, y) -> dict:  # type: ignore[no-untyped-def]
    return {label(v): both(partial(gemv, x, w, y, v)) for v in vs}


def shape_row(name: str, group_size: int, bw: float) -> dict:
    n, k = SHAPES[name]
    w = random_weight(n, k, group_size, DEVICE)
    ws = w.as_stream()
    q_bytes = w.qw.numel() * 4 + w.scales.numel() * 2 + w.zeros.numel()
    x = torch.randn(8, k, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty(8, n, dtype=torch.bfloat16, device=DEVICE)
    wb = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE)
    ig.GEMV_IMPL = "mma"  # rows weights: round 3; stream weights: round 4 (int4_linear)
    calls = {
        "mma": partial(ig.int4_linear, x[:1], w, out=y[:1]),
        "v4": partial(ig.int4_linear, x[:1], ws, out=y[:1]),
        "cublas_bf16": partial(torch.nn.functional.linear, x[:1], wb),
    }
    m1 = {lb: both(fn) for lb, fn in calls.items()}
    read = {"mma": q_bytes, "v4": q_bytes, "cublas_bf16": n * k * 2}
    m8 = {
        "mma": timed(graphed(partial(ig.int4_linear, x, w, out=y))) * 1e6,
        "v4": timed(graphed(partial(ig.int4_linear, x, ws, out=y))) * 1e6,
    }
    sms = mg._sms(x.device)
    mma_v = variants(mg.gemv, mg.VARIANTS, mg.label, x[:1], w, y[:1])
    v4_v = variants(v4.gemv, v4.VARIANTS, v4.label, x[:1], ws, y[:1])
    mma_rule, v4_rule = mg.label(mg.choose(n, k, sms)), v4.label(v4.choose(n, k, sms))
    return dict(
        shape=name,
        n=n,
        k=k,
        events_us={lb: t[0] for lb, t in m1.items()},
        graph_us={lb: t[1] for lb, t in m1.items()},
        graph_tb_s={lb: read[lb] / (t[1] * 1e-6) / 1e12 for lb, t in m1.items()},
        graph_frac_copy={lb: read[lb] / (t[1] * 1e-6) / bw for lb, t in m1.items()},
        m8_graph_us=m8,
        mma_rule=mma_rule,
        mma_variants_us=mma_v,
        mma_rule_why=mg.explain(n, k, sms),
        mma_verdict=decide(mma_rule, {lb: t[1] for lb, t in mma_v.items()}),
        v4_rule=v4_rule,
        v4_rule_why=v4.explain(n, k, sms),
        v4_variants_us=v4_v,
        v4_verdict=decide(v4_rule, {lb: t[1] for lb, t in v4_v.items()}),
    )


def summary(r: dict) -> list[str]:
    e, g, tb, f = r["events_us"], r["graph_us"], r["graph_tb_s"], r["graph_frac_copy"]

    def cell(lb: str, tag: str) -> str:
        return f"{tag} {e[lb]:6.1f}/{g[lb]:6.1f}us {tb[lb]:4.2f}TB/s {f[lb]:4.0%}"

    head = " | ".join(
        [
            f"{r['shape']:11s} M=1 events/graphs",
            cell("mma", f"r3[{r['mma_rule']}]"),
            cell("v4", f"r4[{r['v4_rule']}]"),
            cell("cublas_bf16", "cuBLAS bf16"),
            f"M=8 graphs r3/r4 {r['m8_graph_us']['mma']:.1f}/{r['m8_graph_us']['v4']:.1f}us",
        ]
    )

    def listing(key: str) -> str:
        return "  ".join(f"{lb} {t[0]:.1f}/{t[1]:.1f}" for lb, t in r[key].items())

    return [
        head,
        f"    r3 variants events/graphs us: {listing('mma_variants_us')} -> {r['mma_verdict']}",
        f"    r4 variants events/graphs us: {listing('v4_variants_us')} -> {r['v4_verdict']}",
        f"    rules: r3 {r['mma_rule_why']}; r4 {r['v4_rule_why']}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"int4 GEMV r3 vs r4, copy bandwidth {bw / 1e12:.2f} TB/s, group {args.group_size}")
    rows = []
    for name in args.shapes:
        rows.append(shape_row(name, args.group_size, bw))
        print("\n".join(summary(rows[-1])), flush=True)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(copy_bandwidth=bw, group_size=args.group_size, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

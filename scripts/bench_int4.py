"""W4A16 decode GEMV bandwidth on Llama-3-8B / 70B linear shapes, in one run: the old rows
kernel (gemv_m*), the tensor-core rows GEMV (cuda/int4_mma_gemv.cu, the default: the rule's
pick and every variant; also timed as CUDA-graph replays, without Python's launch cost, beside
old and cuBLAS), every split-K variant (cuda/int4_gemv.cu) with its best split and with
the fewest splits, the rule's pick, the tiles layout (gemv_tiles, tensor cores) and cuBLAS
bf16 on the same shape, each as TB/s and % of the device copy bandwidth, L2 flushed before
every call; then the best variant per shape (what cuda/int4_gemv.choose should pick), the
8-row GEMVs, and dequantize+GEMM prefill TFLOP/s against cuBLAS bf16."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial

import torch

from cuda import int4_gemm as ig
from cuda import int4_gemv as sk
from cuda import int4_mma_gemv as mg
from headrace.bench import gpu_timing
from scripts.int4_bench import random_weight

DEVICE = "cuda"  # tests/test_bench_int4.py runs the script's logic on CPU
SHAPES = gpu_timing.LLAMA_LINEAR_SHAPES  # name: (N, K)
timed = gpu_timing.mean_time  # (fn, iters=50): mean seconds, L2 flushed before each call
copy_bandwidth = gpu_timing.copy_bandwidth


NOT_SPLIT = ("old", "rule", "tiles", "mma")  # labels of row["us"] that are not split-K variants


def graphed(fn: Callable[[], object]) -> Callable[[], object]:
    return gpu_timing.graphed(fn)


def mma_rows(row: dict, w: ig.Int4Weight, x1: torch.Tensor, y1: torch.Tensor) -> None:
    """The tensor-core GEMV's variants at M = 1, and old vs mma at 2 and 4 rows (8: --rows8)."""
    if not mg.supported(w.out_features, w.in_features, w.group_size):
        return
    v = {mg.label(a): timed(partial(mg.gemv, x1, w, y1, a)) * 1e6 for a in mg.VARIANTS}
    rule = mg.label(mg.choose(w.out_features, w.in_features, mg._sms(x1.device)))
    row |= dict(mma_variants_us=v, mma_rule=rule, mma_best=min(v, key=v.__getitem__))
    k, n = w.in_features, w.out_features
    for m in (2, 4):
        xm = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
        ym = torch.empty(m, n, dtype=torch.bfloat16, device=DEVICE)
        for impl in ("old", "mma"):
            ig.GEMV_IMPL = impl
            row[f"m{m}_{impl}_us"] = timed(partial(ig.int4_linear, xm, w, out=ym)) * 1e6


def split_plans(n: int, k: int, m: int) -> dict[str, sk.Plan]:
    """Every variant for m rows, with the rule's best split for it and the fewest."""
    sms = sk._sms(torch.device(DEVICE))
    plans: dict[str, sk.Plan] = {}
    for rows, wk in sk.VARIANTS[sk.m_template(m)]:
        for plan in (sk.choose(n, k, m, sms, ((rows, wk),)), sk.split_plan(n, k, m, rows, wk)):
            plans[f"r{rows}_w{wk}_s{plan.splits}"] = plan
    return plans


def gemv_row(name: str, n: int, k: int, args: argparse.Namespace, bw: float) -> dict:
    """Decode (M = 1) times of every implementation on one shape, in us and % of copy bw."""
    w = random_weight(n, k, args.group_size, DEVICE)
    q_bytes = w.qw.numel() * 4 + w.scales.numel() * 2 + w.zeros.numel()
    x1 = torch.randn(1, k, dtype=torch.bfloat16, device=DEVICE)
    y1 = torch.empty(1, n, dtype=torch.bfloat16, device=DEVICE)
    times: dict[str, float] = {}
    ig.GEMV_IMPL = "old"
    times["old"] = timed(lambda: ig.int4_linear(x1, w, out=y1))
    old_graph = timed(graphed(lambda: ig.int4_linear(x1, w, out=y1)))
    ig.GEMV_IMPL = "mma"
    times["mma"] = timed(lambda: ig.int4_linear(x1, w, out=y1))
    mma_graph = timed(graphed(lambda: ig.int4_linear(x1, w, out=y1)))
    ig.GEMV_IMPL = "split"
    times["rule"] = timed(lambda: ig.int4_linear(x1, w, out=y1))
    for label, plan in split_plans(n, k, 1).items():
        times[label] = timed(lambda p=plan: sk.gemv(x1, w, y1, p))  # type: ignore[misc]
    wt = w.as_tiles()
    times["tiles"] = timed(lambda: ig.int4_linear(x1, wt, out=y1))
    wb = torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE)
    t_bf16 = timed(lambda: torch.nn.functional.linear(x1, wb))
    graph_us = dict(old=old_graph, mma=mma_graph)
    graph_us["cublas_bf16"] = timed(graphed(lambda: torch.nn.functional.linear(x1, wb)))
    variants = {lb: t for lb, t in times.items() if lb not in NOT_SPLIT}
    best = min(variants, key=variants.__getitem__)
    rule = sk.choose(n, k, 1, sk._sms(x1.device))
    row = dict(
        shape=name,
        n=n,
        k=k,
        us={lb: t * 1e6 for lb, t in times.items()},
        tb_s={lb: q_bytes / t / 1e12 for lb, t in times.items()},
        frac_copy={lb: q_bytes / t / bw for lb, t in times.items()},
        rule_pick=f"r{rule.rows}_w{rule.wk}_s{rule.splits}",
        best_variant=best,
        cublas_bf16_us=t_bf16 * 1e6,
        cublas_bf16_frac_copy=n * k * 2 / t_bf16 / bw,
        graph_us={lb: t * 1e6 for lb, t in graph_us.items()},
        graph_frac_copy={
            lb: (n * k * 2 if lb == "cublas_bf16" else q_bytes) / t / bw
            for lb, t in graph_us.items()
        },
    )
    mma_rows(row, w, x1, y1)
    if args.rows8:
        x8 = torch.randn(8, k, dtype=torch.bfloat16, device=DEVICE)
        y8 = torch.empty(8, n, dtype=torch.bfloat16, device=DEVICE)
        for impl in ("old", "split", "mma"):
            ig.GEMV_IMPL = impl
            row[f"m8_{impl}_us"] = timed(lambda: ig.int4_linear(x8, w, out=y8)) * 1e6
        row["m8_tiles_us"] = timed(lambda: ig.int4_linear(x8, wt, out=y8)) * 1e6
    if args.prefill_tokens:
        xp = torch.randn(args.prefill_tokens, k, dtype=torch.bfloat16, device=DEVICE)
        scratch = torch.empty(n, k, dtype=torch.bfloat16, device=DEVICE)
        flops = 2 * args.prefill_tokens * n * k
        t_pre = timed(lambda: ig.int4_linear(xp, w, scratch=scratch), 10)
        t_ref = timed(lambda: torch.nn.functional.linear(xp, wb), 10)
        row["prefill_tflops"] = flops / t_pre / 1e12
        row["cublas_bf16_prefill_tflops"] = flops / t_ref / 1e12
    return row


def summary(row: dict) -> str:
    f = row["frac_copy"]
    best = row["best_variant"]
    g, gf = row["graph_us"], row["graph_frac_copy"]
    parts = [
        f"{row['shape']:12s}",
        f"old {row['us']['old']:6.1f}us {f['old']:4.0%}",
        f"mma {row['us']['mma']:6.1f}us {f['mma']:4.0%}",
        f"rule[{row['rule_pick']}] {row['us']['rule']:6.1f}us {f['rule']:4.0%}",
        f"best[{best}] {row['us'][best]:6.1f}us {f[best]:4.0%}",
        f"tiles {row['us']['tiles']:6.1f}us {f['tiles']:4.0%}",
        f"cuBLAS bf16 {row['cublas_bf16_us']:6.1f}us {row['cublas_bf16_frac_copy']:4.0%}",
    ]
    graphs = [
        "  graphs",
        *(f"graph {lb} {g[lb]:6.1f}us {gf[lb]:4.0%}" for lb in ("old", "mma", "cublas_bf16")),
    ]
    if "mma_best" in row:
        best = row["mma_best"]
        graphs.append(
            f"mma rule[{row['mma_rule']}] best[{best}] {row['mma_variants_us'][best]:6.1f}us"
        )
    return " | ".join(parts) + "\n" + " | ".join(graphs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="0: no prefill GEMMs")
    ap.add_argument("--no-rows8", dest="rows8", action="store_false")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--output-json")
    args = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; group size {args.group_size}; M = 1 unless said")
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        row = gemv_row(name, n, k, args, bw)
        rows.append(row)
        print(summary(row), flush=True)
        variants = "  ".join(
            f"{lb} {us:.1f}" for lb, us in row["us"].items() if lb not in NOT_SPLIT
        )
        print(f"    variants (us): {variants}")
        mma_v = "  ".join(f"{lb} {us:.1f}" for lb, us in row.get("mma_variants_us", {}).items())
        print(f"    mma variants (us): {mma_v}")
        extra = {
            key: round(v, 1)
            for key, v in row.items()
            if key.startswith(("m2_", "m4_", "m8_", "prefill"))
        }
        extra |= {key: round(v, 1) for key, v in row.items() if key.startswith("cublas_bf16_pre")}
        print(f"    {json.dumps(extra)}")
    print(
        "best variant per shape (M = 1): "
        + ", ".join(f"{r['shape']} {r['best_variant']}" for r in rows)
    )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(dict(copy_bandwidth=bw, group_size=args.group_size, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

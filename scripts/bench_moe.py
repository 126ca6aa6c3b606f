"""Micro-benchmark of one Mixtral-8x7B MoE layer (H 4096, I 14336, 8 experts, top-2, bf16)
at decode batch sizes, each piece inside a CUDA graph: where a decode step's MoE time goes.

Per batch T (random tokens, so random routing):
    layer      SparseMoE.forward: router, counting sort, two grouped GEMMs, gathers, sum
    routing    the router GEMM, top-k/softmax and the counting sort alone
    gate_up    torch._grouped_mm of the sorted rows with the stacked [E, 2I, H] weights
    down       torch._grouped_mm with [E, H, I]
    dense      one cuBLAS F.linear pair per routed expert, its rows known on the host:
               the weights a fused MoE kernel has to read, read by plain GEMMs
    floor      bytes of the experts the batch touches / device copy bandwidth
Times are medians of CUDA-event timings (L2 flushed before each run). x32 layers gives the
MoE share of a decode step (Mixtral W1's TPOT was 14.41 ms, its floor 6.04 ms).

    PYTHONPATH=. python scripts/bench_moe.py --out bench_moe.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cuda.fused_ops import silu_and_mul
from headrace.bench.offline import measure_copy_bandwidth
from scripts.bench_kernels import graphed, time_op
from worker.model_config import ModelConfig
from worker.models.moe import SparseMoE, route, sort_by_expert

CONFIG = Path(__file__).parent / "configs" / "mixtral-8x7b" / "config.json"


def build_layer() -> SparseMoE:
    mc = ModelConfig.from_hf(json.loads(CONFIG.read_text()), source=str(CONFIG))
    with torch.device("meta"):
        layer = SparseMoE(mc)
    layer = layer.to(torch.bfloat16).to_empty(device="cuda")
    for p in layer.parameters():
        p.data.normal_(0.0, 0.02)
    return layer


def dense_experts(layer: SparseMoE, x: torch.Tensor, ids: torch.Tensor) -> Any:
    """A closure running each routed expert's rows through two F.linear (weights unscaled:
    this times the reads, not the math)."""
    routed = ids.cpu()
    groups = []
    for e in sorted(set(routed.flatten().tolist())):
        rows = (routed == e).any(dim=1).nonzero().flatten().to(x.device)
        groups.append((e, rows))

    def run() -> None:
        for e, rows in groups:
            h = silu_and_mul(F.linear(x.index_select(0, rows), layer.w_gate_up[e]))
            F.linear(h, layer.w_down[e])

    return run, len(groups)


def bench_batch(layer: SparseMoE, t: int, bandwidth: float) -> dict[str, Any]:
    h = layer.w_gate_up.shape[2]
    x = torch.randn(t, h, dtype=torch.bfloat16, device="cuda")
    k, num_experts = layer.top_k, layer.w_gate_up.shape[0]
    _, ids = route(layer.gate(x), k)
    dest, ends = sort_by_expert(ids, num_experts)
    src = torch.empty_like(dest)
    src[dest] = torch.arange(t * k, device=x.device) // k
    xs = x.index_select(0, src)
    mid = silu_and_mul(torch._grouped_mm(xs, layer.w_gate_up.transpose(1, 2), offs=ends))
    dense, touched = dense_experts(layer, x, ids)
    parts = {
        "layer": lambda: layer(x),
        "routing": lambda: sort_by_expert(route(layer.gate(x), k)[1], num_experts),
        "gate_up": lambda: torch._grouped_mm(xs, layer.w_gate_up.transpose(1, 2), offs=ends),
        "down": lambda: torch._grouped_mm(mid, layer.w_down.transpose(1, 2), offs=ends),
        "dense": dense,
    }
    us = {name: 1e6 * time_op(graphed(fn)) for name, fn in parts.items()}
    expert_bytes = (layer.w_gate_up[0].numel() + layer.w_down[0].numel()) * 2
    floor_us = 1e6 * touched * expert_bytes / bandwidth
    return {
        "tokens": t,
        "experts_touched": touched,
        "us": us,
        "floor_us": floor_us,
        "fraction_of_floor": {name: floor_us / v for name, v in us.items()},
        "layer_x32_ms": 32 * us["layer"] / 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    bandwidth = measure_copy_bandwidth()
    layer = build_layer()
    rows = []
    with torch.inference_mode():
        for t in args.batches:
            r = bench_batch(layer, t, bandwidth)
            rows.append(r)
            parts = ", ".join(f"{n} {v:.1f}" for n, v in r["us"].items())
            print(
                f"T={t:3d} ({r['experts_touched']} experts, floor {r['floor_us']:.1f} us): {parts} us;"
                f" layer {100 * r['fraction_of_floor']['layer']:.0f}% of floor,"
                f" dense {100 * r['fraction_of_floor']['dense']:.0f}%; x32 {r['layer_x32_ms']:.2f} ms"
            )
    result = {
        "card": torch.cuda.get_device_name(),
        "bandwidth_TBps": bandwidth / 1e12,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

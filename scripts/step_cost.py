"""A roofline estimate of one engine step's GPU time (Llama-3-8B shape on an H200), for
comparing schedules on the CPU (scripts/sim_async_schedule.py --cost).

    step = max(weights / bandwidth, linear FLOPs / GEMM rate)       q/k/v, o, gate_up, down
         + max(lm_head / bandwidth, lm_head FLOPs / GEMM rate)      the sampled rows only
         + decode rows' KV bytes / (bandwidth x decode efficiency)
         + prefill rows' attention FLOPs / attention rate
         + a fixed cost (small kernels; an eager mixed step also waits on the host)

The constants come from BENCHMARKS.md's H200 measurements (named beside each); what was not
measured is marked as an assumption. It is a model for ranking schedules, not a benchmark:
every number it prints is an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.scheduler import SchedulerOutput

COPY_BW = 4.25e12  # bytes/s, the H200's device-to-device copy bandwidth
LINEAR_PARAMS = 6.98e9  # Llama-3-8B: 32 x (q/k/v 25.2M + o 16.8M + gate_up 117.4M + down 58.7M)
HEAD_PARAMS = 128256 * 4096
LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128
BF16_GEMM_FLOPS = 700e12  # the W3 timeline's 16k-token mixed steps (9c1ad0d)


@dataclass(frozen=True)
class StepCost:
    weight_bytes_per_param: float
    kv_bytes_per_elem: float
    gemm_flops: float  # dense GEMM rate at large M, FLOP/s
    decode_efficiency: float  # decode attention, fraction of copy bandwidth
    prefill_attn_flops: float  # prefill attention rate, FLOP/s
    step_fixed_s: float  # small kernels and launches of a graph-replayed decode step
    mixed_host_s: float  # host gap of an eager step with prefill chunks

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * LAYERS * KV_HEADS * HEAD_DIM * self.kv_bytes_per_elem

    def step_seconds(self, out: SchedulerOutput) -> float:
        tokens = out.num_batched_tokens
        sampled = sum(sr.samples for sr in out.scheduled)
        linear = max(
            LINEAR_PARAMS * self.weight_bytes_per_param / COPY_BW,
            2 * LINEAR_PARAMS * tokens / self.gemm_flops,
        )
        # The LM head stays 16-bit under FP8 weights (as vLLM keeps it): bf16's GEMM rate.
        head = max(HEAD_PARAMS * 2 / COPY_BW, 2 * HEAD_PARAMS * sampled / BF16_GEMM_FLOPS)
        kv_bytes = 0.0
        attn_flops = 0.0
        prefill = False
        for sr in out.scheduled:
            n, start = sr.num_new_tokens, sr.start
            if n == 1:
                kv_bytes += (start + 1) * self.kv_bytes_per_token
            else:
                prefill = True
                # Causal: new token i sees start + i + 1 keys; QK^T and PV are 2 FLOPs each.
                keys = n * start + n * (n + 1) / 2
                attn_flops += 4 * LAYERS * Q_HEADS * HEAD_DIM * keys
        attention = kv_bytes / (COPY_BW * self.decode_efficiency)
        attention += attn_flops / self.prefill_attn_flops
        fixed = self.step_fixed_s + (self.mixed_host_s if prefill else 0.0)
        return linear + head + attention + fixed


COSTS = {
    # bf16 GEMMs ~700 TFLOP/s (the W3 timeline's 16k-token mixed steps, 9c1ad0d); decode
    # attention 90% at 64 x 4k (cc98fa0); prefill attention ~320 TFLOP/s (the first tile
    # kernel at 8k, 52e44f0); ~0.75 ms of small kernels a step (the e1522b4 b1 kernel
    # table); 17 ms of host gap per eager mixed step (the W3 timeline).
    "bf16": StepCost(2.0, 2.0, BF16_GEMM_FLOPS, 0.90, 320e12, 0.75e-3, 17e-3),
    # FP8 weights + FP8 KV: decode attention 71.8% at 64 x 4k (cc98fa0); prefill attention
    # with an FP8 cache runs the older kernel (~150 TFLOP/s, 52e44f0's old-kernel rows). The
    # FP8 GEMM rate was not measured at these shapes: 1,100 TFLOP/s is an assumption (about
    # 56% of the H200's dense FP8 peak), the number to replace once bench_fp8_linear runs.
    "fp8": StepCost(1.0, 1.0, 1100e12, 0.718, 150e12, 0.75e-3, 17e-3),
}

#!/usr/bin/env bash
# One GPU call: GPU tests, profile, and the offline benchmarks with their baselines.
# Usage on the device machine: bash scripts/gpu_bench.sh "<which: tests profile w1 w3 w2 w5>"
# FP8 (issue 13): profile_fp8 fp8tests w1fp8 (bf16 then fp8 W1, each with its floor) w2fp8 (fp8 weights
# + fp8 KV) w3fp8 (bf16, then fp8 + fp8 KV) w1_70b w2_70b (Llama-3-70B shape, fp8 dummy).
# fp8perf (<= 250 s): FP8 GEMV + fused SiLU-quant GPU tests, scripts/bench_fp8_gemv.py (new / old / cuBLAS bf16 /
# _scaled_mm, TB/s), W1 fp8 with the new GEMV then HEADRACE_FP8_GEMV=old (same call).
# KV compression (issue 20): kvcomp (W2-shaped requests, SnapKV 4x vs none in the same KV
# memory: blocks per request, concurrency, output tok/s, compression cost; GPU tests in `tests`).
# Int4 (issue 14): int4tests (GPU int4 kernel + model tests) int4kernels (scripts/bench_int4.py)
# w1awq (bf16 then AWQ W1 on the 8B shape, each with its floor; AWQ's line adds the int4 floor
# at 4.25 TB/s and the fraction) w2awq (8B AWQ W2, 500 requests) w1_70b_awq w2_70b_awq (70B);
# w1awq_tiles (8B and 70B AWQ W1 with HEADRACE_INT4_LAYOUT=tiles: the tensor-core GEMV).
# int4perf (<= 280 s): int4 GPU tests, bench_int4 (old vs split-K variants vs tiles vs cuBLAS), W1 AWQ
# with the split-K GEMV and with HEADRACE_INT4_GEMV=old.
# int4w1 (<= 90 s): the tensor-core rows GEMV (HEADRACE_INT4_GEMV=mma, the default):
# scripts/bench_int4_mma.py on the 8B shapes (old vs mma vs cuBLAS, graphs too), W1 AWQ 8B old vs mma.
# int4r4 (<= 150 s): round 4 (HEADRACE_INT4_GEMV=v4, the stream layout): its GPU tests
# (tests/gpu/test_gpu_int4_v4.py), scripts/bench_int4_v4.py (8B + 70B shapes: r3 vs r4 vs cuBLAS
# bf16, events and graphs, every variant of both with the rules' verdicts, 8B o included), W1 AWQ 8B
# with HEADRACE_INT4_GEMV=mma, =v4, and =v4 with HEADRACE_PDL=1.
# int4skinny (<= 140 s, expected ~100): the skinny W4A16 GEMM for decode batches of 9..256 rows (rows and stream
# layouts, HEADRACE_INT4_SKINNY_MIN/_MAX/_STREAM): warm its modules, tests/gpu/test_gpu_int4_skinny.py (<= 60 s),
# scripts/bench_int4_skinny.py (<= 60 s: 8B + 70B shapes x M 16..512 in their default layouts, today vs skinny
# vs cuBLAS bf16, graphs).
# int4tiled (<= 140 s, expected ~80): the tiled W4A16 GEMM for 33..512 rows (rows layout, HEADRACE_INT4_TILED_MAX):
# warm its module (+ the skinny's), tests/gpu/test_gpu_int4_tiled.py (<= 60 s), scripts/bench_int4_tiled.py (<= 60 s:
# 8B + 70B shapes x M 33..512, today vs skinny vs tiled vs cuBLAS bf16, graphs; tiled's forced splits at M = 64).
# Issue 15: models15 (Mixtral-8x7B W1 + W2-shaped, Falcon-7B W1 + W3, each with HF; <= 540 s), moe.
# Structured output (issue 16): structured (free vs JSON schema at batch 64, sync and async).
# Host path (issue 12): hostpath (<= 200 s: the step timeline at batch 1 and 256, context 1k;
# W1 with its timeline, with the persistent input batch and with HEADRACE_INPUT_BATCH=rebuild);
# hostpath_base (HEADRACE_BASE_TREE=checkout of 3d6250b: its batch-1 timeline, 40 s).
# Async scheduling (issue 12, overlap): async (tests/gpu/test_gpu_async.py, then W3 offline with 300
# requests, --no-async-scheduling then the default (async), side by side; <= 280 s in all).
# Prefill attention (issue 11): prefill (tests/gpu/test_gpu_prefill_attention.py, then old kernel /
# round 2's default / torch SDPA flash TFLOP/s at causal 2k-16k; <= 200 s).
# Prefill attention round 2 (issues 11, 13): prefill3 (<= 175 s: warm the prefill modules in parallel,
# tests/gpu/test_gpu_prefill_v2.py, then scripts/bench_prefill.py --round2: TFLOP/s of the old kernel
# vs each round-2 config (HEADRACE_PREFILL_KERNEL=v2_*) vs torch SDPA flash at causal
# 1x2k-16k, 4x2k and 8 x 512 on 4k, then FP8 KV: the older kernel vs round 2 (HEADRACE_PREFILL_FP8=new);
# one line a shape).
# Prefill flat grid (issue 12, W3 mixed steps): prefillgrid (<= 60 s: warm the prefill + tiny-engine modules,
# tests/gpu/test_gpu_prefill_grid.py, scripts/bench_prefill_grid.py: us per call, z vs HEADRACE_PREFILL_GRID=flat
# on the W3 mixed step (bf16, FP8 KV), 1x16k and 4x2k; one line a shape).
# Prefill vs SDPA, alternated (issue 11): prefill_alt (<= 60 s: scripts/bench_prefill.py --alternate 5,
# the default kernel and torch's flash SDPA timed in turn 5 times on each causal shape, bf16 and fp16;
# one line a shape with the median ratio and its range).
# Decode attention (issue 11): decode (tests/gpu/test_gpu_decode_attention.py, then `headrace bench
# kernels --fp8`: old vs new decode kernel as % of copy bandwidth, prefill rows; <= 150 s).
# Serving gap (issue 12): w4gap (<= 300 s: offline W3 with prefix caching off, then headrace serve with
# the same engine args + bench serve --request-rate inf on the same 1000 W3 requests, greedy; both output
# tok/s and the gap; scripts/w4gap.sh, logs $OUT/w4gap_*). HEADRACE_SAMPLING_BATCH=rebuild: old sampling rows.
# Decode attention round 2 (issue 11): decode2 (<= 90 s: warm the decode modules in parallel, then
# scripts/bench_decode.py, also the first table of bench_kernels.py --parts decode: old vs new (+ each
# HEADRACE_DECODE_CONFIG variant) at the issue's cells, bf16 and FP8 KV, one line a cell; batch 1 at ctx
# 128 / 256 / 1k in a graph of 32 calls with a 128k bound). Its GPU tests (tests/gpu/test_gpu_decode_round2.py,
# test_gpu_decode_attention.py) run in the GPU suite.
# Issue 11 batch-1 step: step1 (GPU tests of the GEMV, rotary + KV write, argmax and greedy
# graphs; GEMV vs cuBLAS on the 8B/70B shapes; W1 with HEADRACE_GEMV=cublas, then default; <= 300 s).
# Issue 11 batch-1 step, round 2: w1step (<= 150 s: tests/gpu/test_gpu_gemv_step.py, bench_gemv on the 8B
# shapes (cuBLAS / round 1 / round 2 + variants, then the fused pairs), W1 with HEADRACE_GEMV=cublas
# HEADRACE_STEP_FUSION=0, with the defaults, without the SiLU fusion (HEADRACE_GEMV_FUSION=norm,residual),
# with gate/up on the GEMV too (HEADRACE_GEMV_MAX_MIB=256: norm + gate/up + SiLU in one launch) and with
# HEADRACE_PDL=1 side by side, the batch-1 kernel table).
# Decode attention round 3 (issues 11/13): decode3 (<= 150 s: warm the decode modules, the GPU tests of
# HEADRACE_DECODE_PLAN=v3 and HEADRACE_DECODE_FP8_MATH=f16, scripts/bench_decode3.py: old / v2 (default) /
# w2s3 / w4s2 / w4s3 / w4s4 / v3 (FP8: + f16, v3+f16) as % of copy bandwidth, one line a cell, FP8 at 256 x 1k,
# 512 x 2k, 1024 x 1.5k and the issue's cells, batch 1 at 128 / 200 / 1k in a 128k-bound graph, bf16's cells;
# then W1 with the default, HEADRACE_DECODE_CONFIG=w4s2 and HEADRACE_DECODE_PLAN=v3, same call).
# Large batches (issues 13/12): w2batch (FP8 linear micro-benchmark, W2 FP8 + FP8 KV at
# --max-num-seqs 256 and at the new default side by side, the batch-512 fp8 step profile; <= 280 s)
# and w2batch_bf16 (bf16 W2, 500 requests: 256, default, default + HEADRACE_ADMISSION=reserve; <= 280 s):
# scripts/gpu_w2batch.sh. Also there: w2_1000_bf16 (bf16 W2, 1000 requests, default vs
# HEADRACE_ADMISSION=reserve; <= 270 s) and w2_fp8_timeline (W2 FP8 + FP8 KV with --profile; <= 130 s).
# Step inputs on the device (issue 12): stepinputs (<= 130 s: tests/gpu/test_gpu_device_inputs.py and
# test_gpu_step_inputs.py, then the batch-1 step timeline with the default host builder and with
# HEADRACE_STEP_INPUTS=numba), stepinputs_b256 (<= 150 s: the same timelines at batch 256, context 1k) and
# stepinputs_w1 (<= 85 s: W1 default, then numba), one line per cell.
# argmax16 (<= 150 s): tests/gpu/test_gpu_argmax16.py (fp32/bf16/fp16 argmax_rows vs torch, the greedy
# tails vs the fp32 sampler), scripts/bench_argmax.py (v1 / old .float() + argmax vs new 16-bit argmax).
# Rotary kernels (one block a token's heads, 16-byte pairs): rotary (<= 200 s, expected ~120: warm fused_ops,
# tests/gpu/test_gpu_rotary.py + the rotary cases of test_gpu_fused_ops.py / test_gpu_step_kernels.py, then
# scripts/bench_rotary.py on this tree and, with HEADRACE_BASE_TREE=<a tree holding the old cuda/>, on that one: us
# per call (graphs, L2 flushed and warm) and GB/s of rotary and rotary_write_kv, 8B / 70B heads x T 1..16384).
# FP8 norm + quant fusion (issue 13): normquant (<= 200 s, expected ~170: warm norm_quant + fused_ops (<= 10 s),
# tests/gpu/test_gpu_norm_quant.py (<= 45 s), scripts/bench_norm_quant.py (<= 25 s: add_rms_norm +
# quantize_per_token vs add_rms_norm_quant, T 1..16384 x H 4096 / 8192, graphs, flushed and warm L2), then the
# W2 FP8 step profile (batch 880, context 1500, fp8 + fp8 KV, 10 steps; <= 60 s each) without and with
# HEADRACE_FP8_NORM_QUANT=1: wall / GPU ms a step and the norm, quant and silu-quant kernel rows).
source scripts/gpu_env.sh
which="${1:-tests profile w1 w3}"
cat "$OUT/gpu.txt"
# The step timeline at batch $1 (each run within $2 s, $3 decode steps): default, then numba.
stepinputs_timeline() {
  for mode in host numba; do
    HEADRACE_STEP_INPUTS=$mode timeout $2 python scripts/timeline_step.py --batch $1 --steps $3 \
        --out "$OUT/stepinputs_b$1_$mode.json" > "$OUT/stepinputs_b$1_$mode.log" 2>&1
    echo "batch $1 $mode (rc $?): $(grep -A3 '^step timeline' "$OUT/stepinputs_b$1_$mode.log" | grep 'decode/graph')"
  done
}
for step in $which; do
  case $step in
    w2batch|w2batch_bf16|w2_1000_bf16|w2_fp8_timeline) bash scripts/gpu_w2batch.sh "$step" ;;
    tests) timeout 420 python -m pytest -m gpu tests/gpu -q -p no:cacheprovider -x > "$OUT/gpu_tests.log" 2>&1; tail -4 "$OUT/gpu_tests.log" ;;
    profile) timeout 200 python scripts/profile_step.py --batch 1 --out "$OUT/profile_b1.json" > "$OUT/profile_b1.log" 2>&1; head -14 "$OUT/profile_b1.log"
             timeout 200 python scripts/profile_step.py --batch 256 --context 1024 --out "$OUT/profile_b256.json" > "$OUT/profile_b256.log" 2>&1; head -14 "$OUT/profile_b256.log" ;;
    w1) timeout 300 python -m headrace bench latency --hf-requests 1 --hf-batch-size 1 --hf-time-limit 40 --output-json "$OUT/w1.json" > "$OUT/w1.log" 2>&1; tail -1 "$OUT/w1.log" ;;
    w3) timeout 560 python -m headrace bench throughput --workload W3 --hf-requests 64 --hf-batch-size 64 --hf-time-limit 150 --output-json "$OUT/w3.json" > "$OUT/w3.log" 2>&1; tail -1 "$OUT/w3.log" ;;
    w3q) for c in enable no-enable enable no-enable; do timeout 300 python -m headrace bench throughput --workload W3 --num-requests 300 --$c-prefix-caching --output-json "$OUT/w3q_$c.json" > "$OUT/w3q_$c.log" 2>&1; tail -1 "$OUT/w3q_$c.log"; done ;;
    w5) for c in enable no-enable; do timeout 300 python -m headrace bench throughput --workload W5 --$c-prefix-caching --output-json "$OUT/w5_$c.json" > "$OUT/w5_$c.log" 2>&1; tail -1 "$OUT/w5_$c.log"; done ;;
    w2) timeout 560 python -m headrace bench throughput --workload W2 --hf-requests 64 --hf-batch-size 64 --hf-time-limit 100 --output-json "$OUT/w2.json" > "$OUT/w2.log" 2>&1; tail -1 "$OUT/w2.log" ;;
    profile_fp8) for b in "1 128" "256 1024"; do set -- $b; timeout 200 python scripts/profile_step.py --batch $1 --context $2 --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/profile_fp8_b$1.json" > "$OUT/profile_fp8_b$1.log" 2>&1; head -14 "$OUT/profile_fp8_b$1.log"; done ;;
    fp8tests) timeout 500 python -m pytest -m gpu tests/gpu/test_gpu_fp8.py tests/gpu/test_gpu_kernels.py -q -p no:cacheprovider > "$OUT/gpu_fp8_tests.log" 2>&1; tail -15 "$OUT/gpu_fp8_tests.log" ;;
    w1fp8) for q in "" "--quantization fp8"; do n=w1${q:+_fp8}; timeout 280 python -m headrace bench latency $q --output-json "$OUT/$n.json" > "$OUT/$n.log" 2>&1; tail -1 "$OUT/$n.log"; done ;;
    fp8perf) timeout 60 python -m pytest -m gpu tests/gpu/test_gpu_fp8_gemv.py tests/gpu/test_gpu_fp8_fused.py "tests/gpu/test_gpu_fp8.py::test_fp8_linear_matches_reference" -q -p no:cacheprovider > "$OUT/fp8perf_tests.log" 2>&1; tail -3 "$OUT/fp8perf_tests.log"
             timeout 35 python scripts/bench_fp8_gemv.py --output-json "$OUT/bench_fp8_gemv.json" > "$OUT/bench_fp8_gemv.log" 2>&1; cat "$OUT/bench_fp8_gemv.log"
             for g in new old; do HEADRACE_FP8_GEMV=$g timeout $([ $g = new ] && echo 85 || echo 70) python -m headrace bench latency --quantization fp8 --max-num-seqs 1 --max-model-len 4096 --output-json "$OUT/w1_fp8_gemv_$g.json" > "$OUT/w1_fp8_gemv_$g.log" 2>&1; echo "GEMV $g (rc $?): $(tail -1 "$OUT/w1_fp8_gemv_$g.log")"; done ;;
    w2fp8) timeout 560 python -m headrace bench throughput --workload W2 --quantization fp8 --kv-cache-dtype fp8 --output-json "$OUT/w2_fp8.json" > "$OUT/w2_fp8.log" 2>&1; tail -1 "$OUT/w2_fp8.log" ;;
    w3fp8) for q in "" "--quantization fp8 --kv-cache-dtype fp8"; do n=w3$(echo "$q" | tr -d ' -' | sed 's/quantizationfp8/_fp8/;s/kvcachedtypefp8/_kv8/'); timeout 280 python -m headrace bench throughput --workload W3 $q --output-json "$OUT/$n.json" > "$OUT/$n.log" 2>&1; tail -1 "$OUT/$n.log"; done ;;
    w1_70b) timeout 560 python -m headrace bench latency --model scripts/configs/llama-3-70b --quantization fp8 --max-model-len 4096 --output-json "$OUT/w1_70b_fp8.json" > "$OUT/w1_70b_fp8.log" 2>&1; tail -1 "$OUT/w1_70b_fp8.log" ;;
    w2_70b) timeout 560 python -m headrace bench throughput --model scripts/configs/llama-3-70b --workload W2 --num-requests 200 --quantization fp8 --kv-cache-dtype fp8 --max-model-len 4096 --output-json "$OUT/w2_70b_fp8.json" > "$OUT/w2_70b_fp8.log" 2>&1; tail -1 "$OUT/w2_70b_fp8.log" ;;
    prefill) timeout 130 python -m pytest -m gpu tests/gpu/test_gpu_prefill_attention.py -q -p no:cacheprovider > "$OUT/gpu_prefill_tests.log" 2>&1; tail -6 "$OUT/gpu_prefill_tests.log"
             timeout 70 python scripts/bench_kernels.py --parts prefill --out "$OUT/bench_prefill.json" > "$OUT/bench_prefill.log" 2>&1; cat "$OUT/bench_prefill.log" ;;
    kvcomp) timeout 280 python scripts/bench_kv_compression.py --output-json "$OUT/kvcomp.json" > "$OUT/kvcomp.log" 2>&1; tail -3 "$OUT/kvcomp.log" ;;
    int4tests) timeout 400 python -m pytest -m gpu tests/gpu/test_gpu_int4.py tests/gpu/test_gpu_int4_models.py -q -p no:cacheprovider > "$OUT/gpu_int4_tests.log" 2>&1; tail -15 "$OUT/gpu_int4_tests.log" ;;
    int4kernels) timeout 200 python scripts/bench_int4.py --output-json "$OUT/int4_kernels.json" > "$OUT/int4_kernels.log" 2>&1; cat "$OUT/int4_kernels.log" ;;
    w1awq) for q in "" "--quantization awq"; do n=w1${q:+_awq}; timeout 280 python -m headrace bench latency $q --output-json "$OUT/$n.json" > "$OUT/$n.log" 2>&1; tail -1 "$OUT/$n.log"; done ;;
    w1awq_tiles) for m in scripts/configs/llama-3-8b scripts/configs/llama-3-70b; do n=w1_awq_tiles_$(basename $m); HEADRACE_INT4_LAYOUT=tiles timeout 280 python -m headrace bench latency --model $m --quantization awq --max-model-len 4096 --output-json "$OUT/$n.json" > "$OUT/$n.log" 2>&1; tail -1 "$OUT/$n.log"; done ;;
    w2awq) timeout 280 python -m headrace bench throughput --workload W2 --num-requests 500 --quantization awq --output-json "$OUT/w2_awq.json" > "$OUT/w2_awq.log" 2>&1; tail -1 "$OUT/w2_awq.log" ;;
    w1_70b_awq) timeout 280 python -m headrace bench latency --model scripts/configs/llama-3-70b --quantization awq --max-model-len 4096 --output-json "$OUT/w1_70b_awq.json" > "$OUT/w1_70b_awq.log" 2>&1; tail -1 "$OUT/w1_70b_awq.log" ;;
    w2_70b_awq) timeout 280 python -m headrace bench throughput --model scripts/configs/llama-3-70b --workload W2 --num-requests 150 --quantization awq --max-model-len 4096 --output-json "$OUT/w2_70b_awq.json" > "$OUT/w2_70b_awq.log" 2>&1; tail -1 "$OUT/w2_70b_awq.log" ;;
    # Issue 14, the decode GEMV, <= 280 s in all: warm the NVRTC cache in parallel (a fresh machine
    # compiles nothing twice), the int4 GPU kernel tests, scripts/bench_int4.py (old, every split-K variant,
    # tiles, cuBLAS bf16 on the 8B/70B shapes; best variant per shape), then W1 AWQ on the 8B shape with
    # the split-K GEMV (default) and with HEADRACE_INT4_GEMV=old. Two files (the device returns few):
    # $OUT/int4perf.log (every log, in order) and $OUT/int4perf_bench.json.
    int4perf)
      log="$OUT/int4perf.log"; : > "$log"
      run4() { local secs=$1; shift; echo "== $* (timeout $secs s)" >> "$log"; local t0=$SECONDS
               timeout "$secs" "$@" > "$OUT/.int4perf_part" 2>&1; local rc=$?; cat "$OUT/.int4perf_part" >> "$log"
               echo "== rc $rc, $((SECONDS - t0)) s" >> "$log"; echo "[$(echo "$*" | cut -c1-70) ... rc $rc, $((SECONDS - t0)) s]"; }
      run4 60 python scripts/warm_kernels.py; tail -1 "$OUT/.int4perf_part"
      run4 70 python -m pytest -m gpu tests/gpu/test_gpu_int4.py -q -p no:cacheprovider; tail -4 "$OUT/.int4perf_part"
      run4 45 python scripts/bench_int4.py --output-json "$OUT/int4perf_bench.json"; grep -v '^    ' "$OUT/.int4perf_part"
      for g in split old; do  # 55 + 50 s: the first run also compiles what warm_kernels did not
        HEADRACE_INT4_GEMV=$g run4 $([ $g = split ] && echo 55 || echo 50) python -m headrace bench latency --quantization awq
        echo "W1 AWQ, GEMV $g: $(grep '^W1' "$OUT/.int4perf_part" | tail -1)"; done
      rm -f "$OUT/.int4perf_part" ;;
    # Issue 14 round 3 (int4w1), <= 90 s: warm the NVRTC cache, scripts/bench_int4_mma.py on the 8B
    # shapes (one line a shape: old vs mma vs cuBLAS bf16 at M = 1, events and graph replays, every
    # mma variant, M = 2/4/8), then W1 AWQ 8B with HEADRACE_INT4_GEMV=old and =mma, each with its
    # int4 floor. The GPU tests (tests/gpu/test_gpu_int4_mma.py) run in the whole GPU suite.
    int4w1)
      timeout 20 python scripts/warm_kernels.py --jobs 16 > "$OUT/int4w1_warm.log" 2>&1; echo "warm rc $?: $(tail -1 "$OUT/int4w1_warm.log")"
      timeout 25 python scripts/bench_int4_mma.py --output-json "$OUT/int4w1_bench.json" > "$OUT/int4w1_bench.log" 2>&1; echo "bench_int4_mma rc $?"; tail -5 "$OUT/int4w1_bench.log"
      for g in old mma; do
        HEADRACE_INT4_GEMV=$g timeout 22 python -m headrace bench latency --quantization awq --output-json "$OUT/w1_awq_gemv_$g.json" > "$OUT/w1_awq_gemv_$g.log" 2>&1
        echo "W1 AWQ 8B, GEMV $g (rc $?): $(grep '^W1:' "$OUT/w1_awq_gemv_$g.log" | tail -1)"; done ;;
    # Issue 14 round 4 (int4r4), <= 150 s: warm the NVRTC cache, the v4 GPU tests, one line a shape
    # (plus the variant listings) from scripts/bench_int4_v4.py, then W1 AWQ 8B mma vs v4 (vs v4 + PDL).
    int4r4)
      timeout 20 python scripts/warm_kernels.py --jobs 16 > "$OUT/int4r4_warm.log" 2>&1; echo "warm rc $?: $(tail -1 "$OUT/int4r4_warm.log")"
      timeout 36 python -m pytest -m gpu tests/gpu/test_gpu_int4_v4.py -q -p no:cacheprovider -x > "$OUT/int4r4_tests.log" 2>&1; echo "v4 GPU tests rc $?: $(tail -1 "$OUT/int4r4_tests.log")"
      timeout 28 python scripts/bench_int4_v4.py --output-json "$OUT/int4r4_bench.json" > "$OUT/int4r4_bench.log" 2>&1; echo "bench_int4_v4 rc $?"; cat "$OUT/int4r4_bench.log"
      for g in mma v4 v4_pdl; do  # v4_pdl: HEADRACE_INT4_GEMV=v4 HEADRACE_PDL=1
        HEADRACE_INT4_GEMV=${g%_pdl} HEADRACE_PDL=$([ $g = v4_pdl ] && echo 1 || echo 0) timeout 22 python -m headrace bench latency --quantization awq --output-json "$OUT/w1_awq_r4_$g.json" > "$OUT/w1_awq_r4_$g.log" 2>&1
        echo "W1 AWQ 8B, GEMV $g (rc $?): $(grep '^W1:' "$OUT/w1_awq_r4_$g.log" | tail -1)"; done ;;
    # Issue 14, the skinny GEMM (int4skinny), <= 140 s: warm its modules, its GPU tests, then one line a
    # shape x M from scripts/bench_int4_skinny.py (today's path vs the skinny kernel vs cuBLAS bf16).
    int4skinny)
      t0=$SECONDS; timeout 20 python scripts/warm_kernels.py --jobs 16 --only int4_mma_gemv int4_v4_gemv int4_gemm > "$OUT/int4skinny_warm.log" 2>&1
      echo "warm int4_mma_gemv + int4_v4_gemv + int4_gemm (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/int4skinny_warm.log")"
      t0=$SECONDS; timeout 60 python -m pytest -m gpu tests/gpu/test_gpu_int4_skinny.py -q -p no:cacheprovider --maxfail=10 > "$OUT/int4skinny_tests.log" 2>&1
      echo "skinny GPU tests (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/int4skinny_tests.log")"; grep -m8 "^FAILED\|^E  " "$OUT/int4skinny_tests.log"
      t0=$SECONDS; PYTHONUNBUFFERED=1 timeout 60 python scripts/bench_int4_skinny.py --output-json "$OUT/int4skinny_bench.json" > "$OUT/int4skinny_bench.log" 2>&1
      echo "bench_int4_skinny (rc $?, $((SECONDS - t0)) s):"; cat "$OUT/int4skinny_bench.log" ;;
    # Issue 14, the tiled GEMM (int4tiled), <= 140 s: warm its module, its GPU tests, then one line a shape
    # x M from scripts/bench_int4_tiled.py (today's path vs skinny vs tiled vs cuBLAS bf16).
    int4tiled)
      t0=$SECONDS; timeout 20 python scripts/warm_kernels.py --jobs 16 --only int4_tiled_gemm int4_mma_gemv int4_v4_gemv int4_gemm > "$OUT/int4tiled_warm.log" 2>&1
      echo "warm int4_tiled_gemm + int4_mma_gemv + int4_v4_gemv + int4_gemm (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/int4tiled_warm.log")"
      t0=$SECONDS; timeout 60 python -m pytest -m gpu tests/gpu/test_gpu_int4_tiled.py -q -p no:cacheprovider --maxfail=10 > "$OUT/int4tiled_tests.log" 2>&1
      echo "tiled GPU tests (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/int4tiled_tests.log")"; grep -m8 "^FAILED\|^E  " "$OUT/int4tiled_tests.log"
      t0=$SECONDS; PYTHONUNBUFFERED=1 timeout 60 python scripts/bench_int4_tiled.py --output-json "$OUT/int4tiled_bench.json" > "$OUT/int4tiled_bench.log" 2>&1
      echo "bench_int4_tiled (rc $?, $((SECONDS - t0)) s):"; cat "$OUT/int4tiled_bench.log" ;;
    # Issue 15's models with HF generate() beside them, 525 s of timeouts in all: Mixtral-8x7B W1 and
    # W2-shaped (128 requests), Falcon-7B W1 and W3 (300 requests; HF batch 16: Falcon's MQA sends HF's
    # SDPA to the math kernel, ~3 GB of fp32 [71, T, T] scores per 2k-token prompt). Each log's last
    # "W?:" line is its summary; the engine's line and JSON come out before HF starts.
    models15)
      m=scripts/configs/mixtral-8x7b; f=scripts/configs/falcon-7b; b="python -m headrace bench"
      run15() { local name=$1 secs=$2; shift 2; timeout "$secs" $b "$@" --load-format dummy \
                  --output-json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
                echo "$name (rc $?): $(grep '^W[0-9]:' "$OUT/$name.log" | tail -1)"; grep -m1 'HF generate baseline failed' "$OUT/$name.log"; }
      run15 m15_mixtral_w1 120 latency --model $m --hf-requests 1 --hf-batch-size 1 --hf-time-limit 30
      run15 m15_mixtral_w2 180 throughput --model $m --workload W2 --num-requests 128 --max-num-seqs 128 \
        --hf-requests 8 --hf-batch-size 8 --hf-time-limit 40
      run15 m15_falcon_w1 75 latency --model $f --hf-requests 1 --hf-batch-size 1 --hf-time-limit 20
      run15 m15_falcon_w3 150 throughput --model $f --workload W3 --num-requests 300 \
        --hf-requests 64 --hf-batch-size 16 --hf-time-limit 40 ;;
    # One Mixtral MoE layer at decode batches 1-64 in CUDA graphs: whole layer, routing, each grouped GEMM,
    # dense per-expert GEMMs, against the touched experts' bytes (issue 15: "measure which").
    moe) timeout 150 python scripts/bench_moe.py --out "$OUT/bench_moe.json" > "$OUT/bench_moe.log" 2>&1; tail -8 "$OUT/bench_moe.log" ;;
    # Structured output (issue 16): batch 64, free vs JSON-schema decode on the Llama-3-8B shape
    # (dummy weights), sync then --async-scheduling: both TPOTs, the overhead, the mask work per
    # step (waited-at-sampling ~0 means the overlap works); then the CPU mask micro-benchmark.
    structured) for m in "--no-async-scheduling" "--async-scheduling"; do n=structured; [ "$m" = "--async-scheduling" ] && n=structured_async
                  timeout 125 python -m headrace bench structured $m --output-json "$OUT/$n.json" > "$OUT/$n.log" 2>&1; tail -2 "$OUT/$n.log"; done
                timeout 45 python scripts/bench_grammar_mask.py --threads 1 8 --steps 48 --output-json "$OUT/structured_mask_cpu.json" > "$OUT/structured_mask_cpu.log" 2>&1; tail -20 "$OUT/structured_mask_cpu.log" ;;
    async) t0=$SECONDS; timeout 40 python scripts/warm_kernels.py > "$OUT/async_warm.log" 2>&1; echo "warm kernels (rc $?, $((SECONDS - t0)) s)"
           t0=$SECONDS; timeout 85 python -m pytest -m gpu tests/gpu/test_gpu_async.py -q -s -p no:cacheprovider > "$OUT/gpu_async_tests.log" 2>&1
           echo "gpu async tests (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/gpu_async_tests.log")"; grep "near-tie\|^FAILED" "$OUT/gpu_async_tests.log"
           for m in sync async; do flag=""; [ $m = sync ] && flag=--no-async-scheduling; t0=$SECONDS
             timeout $([ $m = sync ] && echo 80 || echo 75) python -m headrace bench throughput --workload W3 --num-requests 300 $flag --output-json "$OUT/w3_$m.json" > "$OUT/w3_$m.log" 2>&1
             echo "W3 300 $m (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/w3_$m.log")"; done ;;
    # Host path (issue 12): per step kind, host phases / GPU busy / idle gap (worker/step_timeline.py)
    # at batch 1 and 256, context 1k; then W1 with the persistent input batch and with the old
    # rebuild-every-step builder, side by side (<= 200 s of timeouts).
    hostpath)
      for b in "1 35" "256 85"; do set -- $b; timeout $2 python scripts/timeline_step.py --batch $1 --steps 150 \
          --out "$OUT/hostpath_timeline_b$1.json" > "$OUT/hostpath_timeline_b$1.log" 2>&1
        echo "rc $?: $(grep -A3 '^step timeline' "$OUT/hostpath_timeline_b$1.log")"; done
      for ib in persistent rebuild; do HEADRACE_INPUT_BATCH=$ib timeout 40 python -m headrace bench latency \
          --profile --no-roofline --output-json "$OUT/hostpath_w1_$ib.json" > "$OUT/hostpath_w1_$ib.log" 2>&1
        echo "W1 HEADRACE_INPUT_BATCH=$ib (rc $?): $(tail -1 "$OUT/hostpath_w1_$ib.log")"
        grep -A3 "^step kind" "$OUT/hostpath_w1_$ib.log"; done ;;
    # The same batch-1 timeline on another checkout (HEADRACE_BASE_TREE=/path/to/3d6250b): the W1
    # regression's host phases and gap, old beside new (the timeline module is copied in).
    hostpath_base)
      cp worker/step_timeline.py "$HEADRACE_BASE_TREE/worker/" && cp scripts/timeline_step.py "$HEADRACE_BASE_TREE/scripts/"
      (cd "$HEADRACE_BASE_TREE" && PYTHONPATH=. timeout 40 python scripts/timeline_step.py --batch 1 --steps 150 \
          --out "$OUT/hostpath_base_timeline_b1.json" > "$OUT/hostpath_base_timeline_b1.log" 2>&1)
      echo "base rc $?: $(grep -A3 '^step timeline' "$OUT/hostpath_base_timeline_b1.log")" ;;
    decode) timeout 90 python -m pytest -m gpu tests/gpu/test_gpu_decode_attention.py -q -p no:cacheprovider --maxfail=10 > "$OUT/gpu_decode_tests.log" 2>&1
            echo "decode tests (rc $?): $(tail -1 "$OUT/gpu_decode_tests.log")"; grep -m5 "^FAILED\|Error" "$OUT/gpu_decode_tests.log"
            timeout 60 python -m headrace bench kernels --fp8 --output-json "$OUT/bench_kernels.json" > "$OUT/bench_kernels.log" 2>&1
            echo "bench kernels (rc $?):"; cat "$OUT/bench_kernels.log" ;;
    # W4 sweep (issue 18): headrace serve on the Llama-3-8B shape (dummy weights), bench serve at 4 rates.
    w4sweep) python -m headrace serve --model scripts/configs/llama-3-8b --load-format dummy \
               --tokenizer "$HEADRACE_SHARED_MODELS/llama3-tokenizer" --served-model-name llama-3-8b-dummy \
               --max-model-len 4096 --port 8300 > "$OUT/w4_serve.log" 2>&1 & serve_pid=$!
             for _ in $(seq 300); do curl -sf http://127.0.0.1:8300/health > /dev/null && break; sleep 1; done
             grep "start-up took" "$OUT/w4_serve.log"
             timeout 480 python -m headrace bench serve --base-url http://127.0.0.1:8300 --num-prompts 200 \
               --request-rate 4 16 64 inf --result-json "$OUT/w4_sweep.json" --plot "$OUT/w4_sweep.png" \
               --no-progress > "$OUT/w4_sweep.log" 2>&1; cat "$OUT/w4_sweep.log"
             kill "$serve_pid"; wait "$serve_pid" ;;
    w4gap) timeout 310 bash scripts/w4gap.sh ;;
    prefill_alt) timeout 60 python scripts/bench_prefill.py --alternate 5 --out "$OUT/prefill_alt.json" > "$OUT/prefill_alt.log" 2>&1
                 echo "bench_prefill --alternate 5 (rc $?):"; cat "$OUT/prefill_alt.log" ;;
    prefill3) t0=$SECONDS; timeout 25 python scripts/warm_kernels.py --jobs 16 --only prefill_attention_v2 paged_attention > "$OUT/prefill3_warm.log" 2>&1
              echo "warm prefill modules (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/prefill3_warm.log")"
              t0=$SECONDS; timeout 110 python -m pytest -m gpu tests/gpu/test_gpu_prefill_v2.py -q -p no:cacheprovider --maxfail=10 > "$OUT/prefill3_tests.log" 2>&1
              echo "prefill3 tests (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/prefill3_tests.log")"; grep -m8 "^FAILED\|^E  " "$OUT/prefill3_tests.log"
              t0=$SECONDS; timeout 40 python scripts/bench_prefill.py --round2 --out "$OUT/prefill3_bench.json" > "$OUT/prefill3_bench.log" 2>&1
              echo "bench_prefill --round2 (rc $?, $((SECONDS - t0)) s):"; cat "$OUT/prefill3_bench.log" ;;
    prefillgrid) t0=$SECONDS; timeout 15 python scripts/warm_kernels.py --jobs 16 --only prefill_attention_v2 decode_attention paged_attention write_kv layer_ops fused_ops gemv_step > "$OUT/prefillgrid_warm.log" 2>&1
              echo "warm prefill + tiny-engine modules (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/prefillgrid_warm.log")"
              t0=$SECONDS; timeout 35 python -m pytest -m gpu tests/gpu/test_gpu_prefill_grid.py -q -p no:cacheprovider --maxfail=10 > "$OUT/prefillgrid_tests.log" 2>&1
              echo "prefillgrid tests (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/prefillgrid_tests.log")"; grep -m8 "^FAILED\|^E  " "$OUT/prefillgrid_tests.log"
              t0=$SECONDS; timeout 15 python scripts/bench_prefill_grid.py --out "$OUT/prefillgrid_bench.json" > "$OUT/prefillgrid_bench.log" 2>&1
              echo "bench_prefill_grid (rc $?, $((SECONDS - t0)) s):"; cat "$OUT/prefillgrid_bench.log" ;;
    decode2) t0=$SECONDS; timeout 25 python scripts/warm_kernels.py --only decode > "$OUT/decode2_warm.log" 2>&1
             echo "warm decode modules (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/decode2_warm.log")"
             t0=$SECONDS; timeout 65 python scripts/bench_decode.py --out "$OUT/decode2_bench.json" > "$OUT/decode2_bench.log" 2>&1
             echo "bench_decode (rc $?, $((SECONDS - t0)) s):"; grep -v "^  " "$OUT/decode2_bench.log"; grep -m5 "failed" "$OUT/decode2_bench.log" ;;
    decode3) t0=$SECONDS; timeout 25 python scripts/warm_kernels.py --jobs 16 --only decode > "$OUT/decode3_warm.log" 2>&1
             echo "warm decode modules (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/decode3_warm.log")"
             t0=$SECONDS; timeout 30 python -m pytest -m gpu tests/gpu/test_gpu_decode_round2.py -k "fp8_half or plan_v3 or batch1" -q -p no:cacheprovider --maxfail=5 > "$OUT/decode3_tests.log" 2>&1
             echo "decode3 tests (rc $?, $((SECONDS - t0)) s): $(tail -1 "$OUT/decode3_tests.log")"; grep -m5 "^FAILED\|^E  " "$OUT/decode3_tests.log"
             t0=$SECONDS; timeout 45 python scripts/bench_decode3.py --out "$OUT/decode3_bench.json" > "$OUT/decode3_bench.log" 2>&1
             echo "bench_decode3 (rc $?, $((SECONDS - t0)) s):"; grep -v "^  " "$OUT/decode3_bench.log"; grep -m5 "failed" "$OUT/decode3_bench.log"
             for c in default w4s2 v3; do case $c in default) e="HR=1" ;; w4s2) e="HEADRACE_DECODE_CONFIG=w4s2" ;; *) e="HEADRACE_DECODE_PLAN=v3" ;; esac
               env $e timeout 16 python -m headrace bench latency --output-json "$OUT/decode3_w1_$c.json" > "$OUT/decode3_w1_$c.log" 2>&1
               echo "W1 decode $c ($e; rc $?): $(grep '^W1' "$OUT/decode3_w1_$c.log" | tail -1)"; done ;;
    step1) timeout 115 python -m pytest -m gpu tests/gpu/test_gpu_step_kernels.py -q -p no:cacheprovider > "$OUT/step1_tests.log" 2>&1; tail -4 "$OUT/step1_tests.log"
           timeout 45 python scripts/bench_gemv.py --output-json "$OUT/step1_gemv.json" > "$OUT/step1_gemv.log" 2>&1; cat "$OUT/step1_gemv.log"
           for g in cublas auto; do HEADRACE_GEMV=$g timeout 70 python -m headrace bench latency --output-json "$OUT/step1_w1_$g.json" > "$OUT/step1_w1_$g.log" 2>&1
             echo "HEADRACE_GEMV=$g (rc $?): $(grep '^W1' "$OUT/step1_w1_$g.log" | tail -1)"; done ;;
    w1step) timeout 8 python scripts/warm_kernels.py --jobs 16 --only gemv_step gemv fused_ops > "$OUT/w1step_warm.log" 2>&1
            timeout 28 python -m pytest -m gpu tests/gpu/test_gpu_gemv_step.py -q -p no:cacheprovider --maxfail=10 > "$OUT/w1step_tests.log" 2>&1
            echo "w1step tests (rc $?): $(tail -1 "$OUT/w1step_tests.log")"; grep -m8 "^FAILED\|^E  " "$OUT/w1step_tests.log"
            timeout 16 python scripts/bench_gemv.py --shapes 8b --iters 20 --output-json "$OUT/w1step_gemv.json" > "$OUT/w1step_gemv.log" 2>&1; echo "bench_gemv rc $?"; cat "$OUT/w1step_gemv.log"
            for c in old new no_silu gate_up_gemv pdl; do case $c in old) e="HEADRACE_GEMV=cublas HEADRACE_STEP_FUSION=0" ;; new) e="HR=1" ;;
              pdl) e="HEADRACE_PDL=1" ;; gate_up_gemv) e="HEADRACE_GEMV_MAX_MIB=256" ;; *) e="HEADRACE_GEMV_FUSION=norm,residual" ;; esac
              env $e timeout $([ $c = old ] || [ $c = new ] && echo 18 || echo 15) python -m headrace bench latency --output-json "$OUT/w1step_w1_$c.json" > "$OUT/w1step_w1_$c.log" 2>&1
              echo "W1 $c ($e; rc $?): $(grep '^W1' "$OUT/w1step_w1_$c.log" | tail -1)"; done
            timeout 17 python scripts/profile_step.py --batch 1 --context 128 --out "$OUT/w1step_profile_b1.json" > "$OUT/w1step_profile_b1.log" 2>&1
            echo "profile rc $?"; grep -E "wall_ms_per_step|gpu_ms_per_step" "$OUT/w1step_profile_b1.log"
            grep -E "^ +[A-Za-z_].* [0-9]+ *$" "$OUT/w1step_profile_b1.log" | grep -v "aten::\|cuda[A-Z]\|Memcpy\|Memset" | head -16 | cut -c1-60,150-300 ;;
    stepinputs)
      timeout 60 python -m pytest -m gpu tests/gpu/test_gpu_device_inputs.py tests/gpu/test_gpu_step_inputs.py -q \
          -p no:cacheprovider > "$OUT/stepinputs_tests.log" 2>&1
      echo "stepinputs tests (rc $?): $(tail -1 "$OUT/stepinputs_tests.log")"; grep -m5 "^FAILED\|Error" "$OUT/stepinputs_tests.log"
      stepinputs_timeline 1 35 100 ;;
    stepinputs_b256) stepinputs_timeline 256 75 90 ;;
    stepinputs_w1)
      for mode in host numba; do HEADRACE_STEP_INPUTS=$mode timeout 42 python -m headrace bench latency \
          --profile --no-roofline --output-json "$OUT/stepinputs_w1_$mode.json" > "$OUT/stepinputs_w1_$mode.log" 2>&1
        echo "W1 HEADRACE_STEP_INPUTS=$mode (rc $?): $(tail -1 "$OUT/stepinputs_w1_$mode.log")"
        grep -A3 "^step kind" "$OUT/stepinputs_w1_$mode.log"; done ;;
    argmax16)
      timeout 100 python -m pytest -m gpu tests/gpu/test_gpu_argmax16.py -q -p no:cacheprovider > "$OUT/argmax16_tests.log" 2>&1
      echo "argmax16 tests (rc $?): $(tail -1 "$OUT/argmax16_tests.log")"; grep -m5 "^FAILED\|Error" "$OUT/argmax16_tests.log"
      timeout 45 python scripts/bench_argmax.py --output-json "$OUT/bench_argmax.json" > "$OUT/bench_argmax.log" 2>&1; cat "$OUT/bench_argmax.log" ;;
    rotary)
      timeout 30 python scripts/warm_kernels.py --jobs 16 --only fused_ops > "$OUT/rotary_warm.log" 2>&1
      timeout 100 python -m pytest -m gpu tests/gpu/test_gpu_rotary.py tests/gpu/test_gpu_fused_ops.py \
          tests/gpu/test_gpu_step_kernels.py -k "rotary" -q -p no:cacheprovider --maxfail=10 > "$OUT/rotary_tests.log" 2>&1
      echo "rotary tests (rc $?): $(tail -1 "$OUT/rotary_tests.log")"; grep -m8 "^FAILED\|^E  " "$OUT/rotary_tests.log"
      timeout 40 python scripts/bench_rotary.py --output-json "$OUT/rotary_new.json" > "$OUT/rotary_new.log" 2>&1
      echo "bench_rotary new (rc $?):"; cat "$OUT/rotary_new.log"
      if [ -n "$HEADRACE_BASE_TREE" ]; then
        PYTHONPATH="$HEADRACE_BASE_TREE" timeout 40 python scripts/bench_rotary.py --output-json "$OUT/rotary_old.json" \
            > "$OUT/rotary_old.log" 2>&1
        echo "bench_rotary old (rc $?):"; cat "$OUT/rotary_old.log"
      fi ;;
    normquant)
      timeout 10 python scripts/warm_kernels.py --jobs 8 --only norm_quant fused_ops > "$OUT/normquant_warm.log" 2>&1
      timeout 45 python -m pytest -m gpu tests/gpu/test_gpu_norm_quant.py -q -p no:cacheprovider --maxfail=10 > "$OUT/normquant_tests.log" 2>&1
      echo "normquant tests (rc $?): $(tail -1 "$OUT/normquant_tests.log")"; grep -m8 "^FAILED\|^E  " "$OUT/normquant_tests.log"
      timeout 25 python scripts/bench_norm_quant.py --iters 20 --output-json "$OUT/bench_norm_quant.json" > "$OUT/bench_norm_quant.log" 2>&1
      echo "bench_norm_quant (rc $?):"; cat "$OUT/bench_norm_quant.log"
      for nq in 0 1; do
        HEADRACE_FP8_NORM_QUANT=$nq timeout 60 python scripts/profile_step.py --batch 880 --context 1500 --steps 10 \
            --quantization fp8 --kv-cache-dtype fp8 --max-model-len 4096 --out "$OUT/profile_fp8_b880_nq$nq.json" \
            > "$OUT/profile_fp8_b880_nq$nq.log" 2>&1
        echo "W2 FP8 step, HEADRACE_FP8_NORM_QUANT=$nq (rc $?):"; grep -E '"(wall|gpu)_ms_per_step"|graph_replayed' "$OUT/profile_fp8_b880_nq$nq.log"
        grep -E "add_rms_norm|quant_fp8_per_token|silu_mul_quant" "$OUT/profile_fp8_b880_nq$nq.log" | cut -c1-220
      done ;;
  esac
done

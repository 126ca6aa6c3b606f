#!/usr/bin/env bash
# Issue 12's serving gap in one call: offline W3 with prefix caching off, then `headrace serve`
# with the same engine args and `headrace bench serve --request-rate inf` on the same 1000 W3
# requests (bench serve --workload W3: the offline run's lengths; greedy, as offline samples;
# prompts are seeded random ids, no shared prefix), then both output tok/s and the gap.
# Both sides run with the step timeline (offline --profile, the server's worker with
# HEADRACE_STEP_TIMELINE), so their overheads match, and it prints where the gap is: the
# worker's busy period over HTTP against the offline run, the client's and gateway's CPU.
# Logs and JSON under $OUT (w4gap_*). Meant for gpu_bench.sh's `w4gap` step (<= 300 s with the
# defaults: its timeouts add up to 295 s); the environment shrinks it for a CPU check (tests/test_w4gap_script.py):
#   W4GAP_MODEL (scripts/configs/llama-3-8b)  W4GAP_TOKENIZER ($HEADRACE_SHARED_MODELS/llama3-tokenizer)
#   W4GAP_N (1000 requests)  W4GAP_ENGINE (more engine args for both, e.g. "--device cpu")
#   W4GAP_PORT (8310)  W4GAP_OFFLINE_S (120)  W4GAP_READY_S (60)  W4GAP_SERVE_S (95)
#   W4GAP_TEMPERATURE (0)
set -u
out="${OUT:-/tmp}"
model="${W4GAP_MODEL:-scripts/configs/llama-3-8b}"
tokenizer="${W4GAP_TOKENIZER:-${HEADRACE_SHARED_MODELS:-}/llama3-tokenizer}"
n="${W4GAP_N:-1000}"
port="${W4GAP_PORT:-8310}"
temp="${W4GAP_TEMPERATURE:-0}"
# shellcheck disable=SC2206  # W4GAP_ENGINE is a list of words on purpose
engine=(--model "$model" --load-format dummy --max-model-len 4096 --no-enable-prefix-caching ${W4GAP_ENGINE:-})

t0=$SECONDS
timeout "${W4GAP_OFFLINE_S:-120}" python -m headrace bench throughput "${engine[@]}" --workload W3 \
  --num-requests "$n" --no-roofline --profile --output-json "$out/w4gap_offline.json" > "$out/w4gap_offline.log" 2>&1
echo "offline W3 $n requests (rc $?, $((SECONDS - t0)) s): $(tail -1 "$out/w4gap_offline.log")"

t0=$SECONDS
# HEADRACE_STEP_TIMELINE: the worker's report of its busy period (worker/serve_timeline.py).
rm -f "$out/w4gap_worker_timeline.json"
HEADRACE_STEP_TIMELINE="$out/w4gap_worker_timeline.json" python -m headrace serve "${engine[@]}" \
  --tokenizer "$tokenizer" --served-model-name w4gap --port "$port" > "$out/w4gap_serve.log" 2>&1 &
serve_pid=$!
trap 'kill "$serve_pid" 2> /dev/null' EXIT  # never leave the server behind
python - "$port" "${W4GAP_READY_S:-60}" "$serve_pid" <<'EOF'
import os, sys, time, urllib.request
port, limit, pid = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
end = time.monotonic() + limit
while time.monotonic() < end:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited before it was ready")
    time.sleep(0.5)
sys.exit(f"the server was not ready within {limit:.0f} s")
EOF
ready=$?
echo "serve ready (rc $ready, $((SECONDS - t0)) s)"
if [ "$ready" = 0 ]; then
  bench=(python -m headrace bench serve --base-url "http://127.0.0.1:$port" --model w4gap
         --temperature "$temp" --request-rate inf --plot "" --no-progress)
  # Warm-up (first requests through the gateway, detokenizer, every step kind), not measured.
  timeout 20 "${bench[@]}" --num-prompts 8 --input-len 64 512 --output-len 16 64 \
    --result-json "$out/w4gap_warmup.json" > "$out/w4gap_warmup.log" 2>&1
  t0=$SECONDS
  timeout "${W4GAP_SERVE_S:-95}" "${bench[@]}" --workload W3 --num-prompts "$n" --measure-pid "$serve_pid" \
    --result-json "$out/w4gap_serve.json" > "$out/w4gap_bench.log" 2>&1
  echo "bench serve inf $n requests (rc $?, $((SECONDS - t0)) s)"
fi
kill "$serve_pid" 2> /dev/null
wait "$serve_pid" 2> /dev/null
grep -m1 "start-up took" "$out/w4gap_serve.log"

python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError) as e:
        print(f"{name}: {e}")
        return None
off, srv = load("w4gap_offline.json"), load("w4gap_serve.json")
a = off["headrace"][-1]["output_tok_s"] if off and off.get("headrace") else None
run = (srv.get("runs") or [srv])[-1] if srv else None
b = run["output_throughput"] if run else None
fail = f", {run['completed']} completed / {run['failed']} failed" if run else ""
print(f"W4 gap: offline W3 {a and round(a, 1)} output tok/s, HTTP inf {b and round(b, 1)} output tok/s{fail}", end="")
print(f": {100 * (a - b) / a:.1f}% below offline (target <= 3%)" if a and b else "")
# Where the gap is: the worker's busy period (the same engine's steps, over HTTP), the
# client's and the gateway's (headrace serve's process) CPU seconds against the run's length.
if off and off.get("headrace"):
    r = off["headrace"][-1]
    print(f"offline: {r['output_tokens']} tokens in {r['elapsed_s']:.2f} s, {r['steps']} steps")
tl = load("w4gap_worker_timeline.json")
if tl:
    loop = ", ".join(f"{k} {v:.2f}" for k, v in tl["loop_s"].items())
    rate = tl["output_tok_s"] and round(tl["output_tok_s"], 1)
    steps = sum(row["steps"] for row in tl.get("timeline", {}).values())
    print(f"worker busy period: {tl['requests']} requests, {tl['output_tokens']} tokens in "
          f"{tl['span_s']:.2f} s ({rate} tok/s), {steps} steps, arrivals over "
          f"{tl['arrivals_s']:.2f} s; loop s: {loop}")
if run:
    gw = run.get("measured_pid_cpu_s")
    print(f"HTTP run {run['duration']:.2f} s: client CPU {run.get('client_cpu_s', 0):.2f} s, "
          f"gateway process CPU {gw if gw is None else round(gw, 2)} s")
EOF

"""KV cache compression on a GPU: W2-shaped requests with and without SnapKV in the same
KV memory (gpu_bench.sh step `kvcomp`).

One engine (Llama-3-8B shape, dummy weights, CUDA graphs), a fixed KV cache
(`--kv-cache-memory-gb`), and two rounds of the same request shape: without compression,
then with SnapKV at `--budget` through the request field. Per round: KV blocks per request
(at the end of its prefill and at its end), the most requests running at once, output
tok/s, and the compression step's cost per request (device-synchronized around it).
Random token ids; generation ignores EOS, so every request yields --output-len tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

from ipc.messages import EngineRequest, KVCompression, SamplingParams
from worker.config import EngineConfig
from worker.engine import EngineCore


def run_round(
    engine: EngineCore, n: int, prompt_len: int, output_len: int, comp: KVCompression, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    vocab = min(engine.model_config.vocab_size, 128000)
    stats = engine.runner.kv_compressor.stats
    before = (stats.requests, stats.seconds)
    for i in range(n):
        prompt = [rng.randrange(10, vocab) for _ in range(prompt_len)]
        params = SamplingParams(
            temperature=0, max_tokens=output_len, ignore_eos=True, kv_compression=comp
        )
        engine.add_request(EngineRequest(f"{comp.method}{i}", prompt, params))
    peak_running, out_tokens, after_prefill, at_end = 0, 0, [], []
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        outs = engine.step()
        peak_running = max(peak_running, engine.scheduler.num_running)
        for o in outs:
            out_tokens += len(o.new_token_ids)
            req = engine.scheduler.requests.get(o.request_id)  # None once finished
            if req is None:
                continue
            blocks = len(engine.kv.block_table(o.request_id))
            if req.num_output_tokens == 1:  # its prefill (and compression) just ran
                after_prefill.append(blocks)
            elif req.num_output_tokens == output_len - 1:
                at_end.append(blocks)
    elapsed = time.perf_counter() - t0
    done = stats.requests - before[0]
    return {
        "method": comp.method,
        "requests": n,
        "elapsed_s": elapsed,
        "output_tok_s": out_tokens / elapsed,
        "peak_running": peak_running,
        "blocks_after_prefill": sum(after_prefill) / max(len(after_prefill), 1),
        "blocks_at_end": sum(at_end) / max(len(at_end), 1),
        "compressed": done,
        "compress_ms_per_request": 1e3 * (stats.seconds - before[1]) / done if done else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="scripts/configs/llama-3-8b")
    p.add_argument("--num-requests", type=int, default=192)
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=1000)
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--kv-cache-memory-gb", type=float, default=16.0)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    engine = EngineCore(
        EngineConfig(
            model=args.model,
            load_format="dummy",
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            kv_cache_memory_gb=args.kv_cache_memory_gb,
            enable_prefix_caching=False,
            kv_compression_min_prompt_len=0,
        )
    )
    engine.runner.kv_compressor.timed = True
    # Warm up both paths (kernels, the compression's first calls) on a few requests.
    for comp in (KVCompression("none"), KVCompression("snapkv", args.budget)):
        run_round(engine, 4, args.prompt_len, 8, comp, seed=99)
    rounds = [
        run_round(engine, args.num_requests, args.prompt_len, args.output_len, comp, seed=i)
        for i, comp in enumerate([KVCompression("none"), KVCompression("snapkv", args.budget)])
    ]
    blocks = engine.kv.num_blocks
    for r in rounds:
        r["max_concurrent_in_memory"] = int(blocks // max(r["blocks_at_end"], 1))
        print(
            f"{r['method']:>7}: {r['output_tok_s']:.0f} output tok/s, peak running "
            f"{r['peak_running']}, blocks/request {r['blocks_after_prefill']:.1f} after prefill "
            f"-> {r['blocks_at_end']:.1f} at the end ({blocks} blocks: "
            f"{r['max_concurrent_in_memory']} such requests fit), compression "
            f"{r['compress_ms_per_request'] or 0:.2f} ms/request",
            flush=True,
        )
    if args.output_json:
        out = {"num_kv_blocks": blocks, "budget": args.budget, "rounds": rounds}
        Path(args.output_json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

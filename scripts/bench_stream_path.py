"""CPU per streamed token between a worker's outputs and the SSE bytes, in one process.

What the gateway does for each token of each stream, without HTTP or sockets: decode
the step's EngineOutputs frame (msgpack, one RequestOutput per request), apply each
output to its SequenceState (incremental detokenization, timings), render the
completion chunk as an SSE event (msgspec JSON) and, when a request finishes, observe
its metrics (headrace's and vLLM's histograms). --streams requests decode --tokens
tokens each, one token per step, of English text in the Llama 3 tokenizer. Prints CPU
microseconds per token (time.process_time, so other processes on a shared machine
count less than in wall time), per part and in all.

    python scripts/bench_stream_path.py --streams 1024 --tokens 128
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec

from gateway.metrics import Metrics
from gateway.protocol import CompletionChoice, CompletionResponse
from gateway.sequence import SequenceState
from gateway.sse import event
from gateway.tokenizer import load_tokenizer
from ipc.messages import EngineOutputs, FinishReason, RequestOutput, SamplingParams

REPO = Path(__file__).resolve().parent.parent
TEXT = (
    "The mill stood by the river, and a channel of cold water ran from the weir to its "
    "wheel. Every morning the miller opened the gate, the water rushed through the "
    "headrace, and the stones began to turn. Farmers brought grain from the valley; "
    "children watched the wheel spin and counted the buckets as they rose and fell. "
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--tokenizer", default=str(REPO.parent / "shared/models/llama3-tokenizer"))
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    ids = (tok.encode(TEXT * 8, add_special_tokens=False) * 4)[: args.tokens]
    prompt = tok.encode("Tell me what the miller saw on the day the river froze.")
    params = SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    seqs = [SequenceState(tok, prompt, params) for _ in range(args.streams)]
    rids = [f"cmpl-{i:032x}-0-0" for i in range(args.streams)]
    metrics = Metrics(SimpleNamespace(workers=[]))  # type: ignore[arg-type]
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineOutputs)
    frames = []
    for step, t in enumerate(ids):
        last = step == len(ids) - 1
        outs = [
            RequestOutput(rid, [t], finish_reason=FinishReason.LENGTH if last else None)
            for rid in rids
        ]
        frames.append(encoder.encode(EngineOutputs(outs)))
    parts = dict(decode=0.0, update=0.0, render=0.0, metrics=0.0)
    sse_bytes = 0
    for frame in frames:
        t0 = time.process_time()
        batch = decoder.decode(frame)
        t1 = time.process_time()
        deltas = [seq.update(out) for seq, out in zip(seqs, batch.outputs, strict=True)]
        t2 = time.process_time()
        for i, d in enumerate(deltas):
            choice = CompletionChoice(0, d.text, finish_reason=seqs[i].finish_reason)
            sse_bytes += len(event(CompletionResponse(rids[i], 0, "m", [choice])))
        t3 = time.process_time()
        for seq in seqs:
            if seq.finished and seq.finished_at is not None:
                metrics.observe("m", seq)
        t4 = time.process_time()
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            parts[k] += dt
    n = args.streams * len(ids)
    text = seqs[0].text
    assert text == tok.decode(ids), "the streamed text must be the whole decode"
    per = {k: 1e6 * v / n for k, v in parts.items()}
    print(
        f"{args.streams} streams x {len(ids)} tokens: {sum(per.values()):.2f} us CPU/token "
        + " ".join(f"{k} {v:.2f}" for k, v in per.items())
        + f" ({sse_bytes / n:.0f} SSE bytes/token)"
    )


if __name__ == "__main__":
    main()

"""The Hugging Face transformers `generate()` baseline of the offline benchmarks.

Static batches of left-padded prompts, greedy, no EOS stop (`min_new_tokens`), the same
seeded prompts as the engine's run. The whole baseline keeps to `--hf-time-limit`:

- each batch runs `generate(max_time=<what is left of the limit>)`, which stops decoding
  after the step that crosses it (transformers checks between decode steps; a prefill is
  not interrupted), so one long batch (8 x 1000 tokens of Mixtral take minutes) cannot run
  past the limit;
- useful tokens are, per request, min(its output length, the tokens the batch generated):
  what a request asked for and got, not the padding rows of requests that ended earlier;
  the rate is useful tokens over the wall time of all batches (prefills included). A cut
  batch measures the early part of long outputs (shorter contexts), which `truncated`
  and `generated_per_batch` say;
- a batch that runs out of GPU memory is retried at half the batch size (the prefill,
  where eager attention's [B, H, T, T] scores peak, fails within a second);
- attention is SDPA where the model supports it (eager materialises [B, H, T, T]).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from typing import Any

import torch

METHOD = (
    "static left-padded batches; generate(max_time=time left) cuts a batch that would pass "
    "--hf-time-limit; useful tokens per request = min(asked, generated); tok/s = useful "
    "tokens / wall time of all batches incl. prefill; OOM halves the batch and retries it"
)


def load_hf_model(model_path: str, device: torch.device) -> Any:
    """The benchmark's model as transformers builds it (random weights), SDPA if it can."""
    import transformers

    from ipc.model_folder import open_model

    cfg_dict = open_model(model_path, "dummy").config
    cfg = transformers.AutoConfig.for_model(
        **{k: v for k, v in cfg_dict.items() if k != "architectures"}
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                cfg, dtype=dtype, attn_implementation="sdpa"
            )
        except ValueError:  # the architecture has no SDPA path
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def generate_batch(
    model: Any, prompts: list[list[int]], max_new: int, max_time: float, device: torch.device
) -> int:
    """Greedy-generate `max_new` tokens for each prompt (left-padded) unless `max_time`
    seconds pass first; returns how many tokens each row got."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            max_time=max_time,
            do_sample=False,
            pad_token_id=0,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return int(out.shape[1]) - width


def hf_baseline(
    args: argparse.Namespace, prompt_lens: list[int], output_lens: list[int]
) -> dict[str, Any]:
    """transformers generate() on static batches of the workload's first requests, within
    args.hf_time_limit seconds (loading the model is not counted)."""
    from headrace.bench.offline import _token_ids

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = time.perf_counter()
    model = load_hf_model(args.model, device)
    info = {
        "load_s": time.perf_counter() - t,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "dtype": str(model.dtype).removeprefix("torch."),
        "time_limit_s": args.hf_time_limit,
        "method": METHOD,
    }
    rng = random.Random(args.workload_seed + 1)
    n = min(args.hf_requests, len(prompt_lens))
    prompts = [_token_ids(rng, prompt_lens[i], model.config.vocab_size) for i in range(n)]
    generate_batch(model, [prompts[0][:8]], 2, 60.0, device)  # warm-up: kernels, workspaces
    try:
        run = run_batches(
            model, prompts, output_lens[:n], args.hf_batch_size, args.hf_time_limit, device
        )
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return run | info


def run_batches(
    model: Any,
    prompts: list[list[int]],
    output_lens: list[int],
    batch_size: int,
    time_limit: float,
    device: torch.device,
) -> dict[str, Any]:
    """Batches in order until the requests or the time run out (at least one batch)."""
    bs = min(batch_size, len(prompts))
    useful = done = oom_retries = 0
    generated: list[int] = []  # tokens per row, per batch
    asked: list[int] = []  # the batch's longest output length
    t0 = time.perf_counter()
    while done < len(prompts):
        left = time_limit - (time.perf_counter() - t0)
        if left <= 0 and generated:
            break
        batch, outs = prompts[done : done + bs], output_lens[done : done + bs]
        try:
            got = generate_batch(model, batch, max(outs), max(left, 0.0), device)
        except torch.OutOfMemoryError:
            if bs == 1:
                raise
            oom_retries += 1
            bs //= 2
            gc.collect()
            torch.cuda.empty_cache()
            continue
        generated.append(got)
        asked.append(max(outs))
        useful += sum(min(o, got) for o in outs)
        done += len(batch)
    elapsed = time.perf_counter() - t0
    return {
        "requests": done,
        "batch_size": bs,
        "oom_retries": oom_retries,
        "elapsed_s": elapsed,
        "useful_output_tokens": useful,
        "useful_output_tok_s": useful / elapsed,
        "generated_per_batch": generated,
        "truncated": any(g < a for g, a in zip(generated, asked, strict=True)),
    }

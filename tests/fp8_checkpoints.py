"""Tiny FP8 checkpoints for the tests: a random Llama, quantized in the published formats.

`random_llama` writes an fp32 Hugging Face folder; `write_fp8` quantizes its linear layers
into a compressed-tensors or vLLM "fp8" folder and also writes the same model with the
dequantized weights in fp32 (the reference the FP8 model must match).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from worker.quant.fp8 import (
    dequantize_weight,
    quantize_weight_per_channel,
    quantize_weight_per_tensor,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TINY: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
    torch_dtype="float32",
)


def random_llama(path: Path, tokenizer_src: Path, seed: int = 0, std: float = 0.05) -> Path:
    c = TINY
    g = torch.Generator().manual_seed(seed)
    h, i, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
    shapes |= {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(c["vocab_size"], h, generator=g),
        "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=g),
        # A larger head: peaked next-token distributions, so greedy picks are not near-ties.
        "lm_head.weight": 0.5 * torch.randn(c["vocab_size"], h, generator=g),
    }
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for name, shape in shapes.items():
            kind = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            # Outlier channels, as real models have, so per-channel scales matter.
            w = std * torch.randn(shape, generator=g)
            w[: shape[0] // 8] *= 4
            t[f"{p}.{kind}.{name}.weight"] = w
        t[f"{p}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
        t[f"{p}.post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    return write_folder(path, dict(c), t, tokenizer_src)


def write_folder(
    path: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer_src: Path
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / f, path / f)
    return path


def _is_linear(name: str) -> bool:
    return any(f".{n}.weight" in name for n in LINEARS)


def write_fp8(
    base: Path,
    dest: Path,
    fmt: str,  # "compressed-tensors" or "fp8"
    strategy: str = "channel",  # compressed-tensors only; vLLM fp8 is per tensor
    activation: str = "dynamic",  # or "static" (writes input_scale)
    kv_scale: float | None = None,  # writes self_attn.k_scale / v_scale
) -> tuple[Path, Path]:
    """(fp8 folder, dequantized fp32 folder) built from the fp32 folder `base`."""
    config = json.loads((base / "config.json").read_text())
    tensors = load_file(str(base / "model.safetensors"))
    tok = base
    amax = calibrate(base) if activation == "static" else {}
    fp8: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not _is_linear(name):
            fp8[name] = deq[name] = w
            continue
        module = name.removesuffix(".weight")
        if fmt == "fp8" or strategy == "tensor":
            wq, s = quantize_weight_per_tensor(w)
            scale = s.reshape(()) if fmt == "fp8" else s.reshape(1)
        else:
            wq, s = quantize_weight_per_channel(w)
            scale = s.reshape(-1, 1)
        fp8[name] = wq
        fp8[f"{module}.weight_scale"] = scale
        if activation == "static":
            fp8[f"{module}.input_scale"] = torch.tensor([amax[module] / 448.0])
        deq[name] = dequantize_weight(wq, s)
    if kv_scale is not None:
        for layer in range(config["num_hidden_layers"]):
            for kv in "kv":
                fp8[f"model.layers.{layer}.self_attn.{kv}_scale"] = torch.tensor(kv_scale)
    qconfig = _qconfig(fmt, strategy, activation, kv_scale is not None)
    fp8_dir = write_folder(dest / fmt, config | {"quantization_config": qconfig}, fp8, tok)
    deq_dir = write_folder(dest / f"{fmt}-dequantized", config, deq, tok)
    return fp8_dir, deq_dir


def calibrate(base: Path) -> dict[str, float]:
    """Largest |input| of each linear module (HF name) over a few sequences: the static
    input_scale a calibration tool would write is this over 448."""
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    eng = EngineCore(EngineConfig(model=str(base), num_gpu_blocks=64, device="cpu"))
    seen: dict[str, float] = {}
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    hooks = []
    for name, module in eng.runner.model.named_modules():
        leaf = name.rpartition(".")[2]
        if not isinstance(module, torch.nn.Linear) or leaf == "lm_head":
            continue
        hf = ["model." + name.replace(leaf, n) for n in fused.get(leaf, (leaf,))]

        def hook(_m: Any, args: Any, hf: list[str] = hf) -> None:
            for n in hf:
                seen[n] = max(seen.get(n, 0.0), float(args[0].abs().max()))

        hooks.append(module.register_forward_pre_hook(hook))
    g = torch.Generator().manual_seed(123)
    for _ in range(4):
        model_logits_of(eng, torch.randint(3, 512, (40,), generator=g).tolist())
    for h in hooks:
        h.remove()
    return seen


def _qconfig(fmt: str, strategy: str, activation: str, kv: bool) -> dict[str, Any]:
    if fmt == "fp8":
        return {"quant_method": "fp8", "activation_scheme": activation}
    acts = {"num_bits": 8, "type": "float", "symmetric": True}
    acts |= (
        {"strategy": "token", "dynamic": True}
        if activation == "dynamic"
        else {"strategy": "tensor", "dynamic": False}
    )
    kv_scheme = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": strategy,
                    "symmetric": True,
                    "dynamic": False,
                },
                "input_activations": acts,
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": kv_scheme if kv else None,
        "quantization_status": "compressed",
    }


def model_logits(
    path: Path | str, tokens: list[int], prefill_only: bool = False, **engine_args: Any
) -> torch.Tensor:
    """Logits [T, V] of one sequence, run through the engine's model and paged KV cache:
    the first half as a prefill, the rest one token at a time (decode reads the cache)."""
    from worker.config import EngineConfig
    from worker.engine import EngineCore

    args = dict(num_gpu_blocks=64, block_size=16, device="cpu") | engine_args
    return model_logits_of(EngineCore(EngineConfig(model=str(path), **args)), tokens, prefill_only)


def model_logits_of(eng: Any, tokens: list[int], prefill_only: bool = False) -> torch.Tensor:
    from worker.attention import AttentionMetadata

    model, caches = eng.runner.model, eng.runner.kv_caches
    dev = eng.device
    table = torch.arange(64, dtype=torch.int32, device=dev)[None]
    out = []
    half = len(tokens) if prefill_only else max(1, len(tokens) // 2)
    chunks = [(0, half)] + [(t, t + 1) for t in range(half, len(tokens))]
    with torch.inference_mode():
        for a, b in chunks:
            md = AttentionMetadata(
                query_start_loc=torch.tensor([0, b - a], dtype=torch.int32, device=dev),
                seq_lens=torch.tensor([b], dtype=torch.int32, device=dev),
                block_tables=table,
                slot_mapping=torch.arange(a, b, device=dev),
                max_query_len=b - a,
                max_seq_len=b,
            )
            ids = torch.tensor(tokens[a:b], device=dev)
            hidden = model(ids, torch.arange(a, b, device=dev), caches, md)
            out.append(model.compute_logits(hidden).cpu())
    return torch.cat(out)

"""The checkpoint names of a 4-bit (AWQ / GPTQ) model: each `X.weight` target whose layer is
an Int4Linear becomes X.qweight, X.qzeros, X.scales (and GPTQ's X.g_idx, required with
desc_act) at the same rows; worker/quant/int4_load.py assembles them.

Layers the checkpoint keeps 16-bit (the LM head, embeddings, norms, Mixtral's router,
modules_to_not_convert) keep their `X.weight`. Modules the model keeps 16-bit although the
checkpoint quantized them (CausalLM.int4_dequantized: Mixtral's stacked experts) are
dequantized on load into their parameter.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from worker.models.weights import Target
from worker.quant.int4 import Int4Config
from worker.quant.int4_linear import Int4Linear
from worker.quant.int4_repack import PARTS


def int4_targets(
    model: nn.Module,
    targets: dict[str, Target],
    cfg: Int4Config,
    dequantized: Callable[[str], bool] = lambda src: False,
) -> dict[str, Target]:
    """targets with the 4-bit layers' weights renamed to their parts.

    dequantized(src): the checkpoint module is 4-bit in the file but lands in a 16-bit
    parameter of the model.
    """
    out: dict[str, Target] = {}
    for name, t in targets.items():
        if t.kind != "param" or not name.endswith(".weight"):
            out[name] = t
            continue
        src = name.removesuffix(".weight")
        layer = _layer(model, t.param)
        if isinstance(layer, Int4Linear):
            out.update(
                _parts(src, Target(t.param.removesuffix(".weight"), t.index, t.rows, "int4"), cfg)
            )
            if layer.bias is None:  # some GPTQ writers save a zero bias for every layer
                out[f"{src}.bias"] = Target(
                    t.param.removesuffix(".weight"), kind="int4", optional=True
                )
        elif dequantized(src) and not cfg.is_ignored(src):
            out.update(_parts(src, Target(t.param, t.index, t.rows, "int4_dequant"), cfg))
        else:
            out[name] = t
    return out


def _parts(src: str, t: Target, cfg: Int4Config) -> dict[str, Target]:
    return {
        f"{src}.{part}": Target(
            t.param, t.index, t.rows, t.kind, optional=part == "g_idx" and not cfg.desc_act
        )
        for part in PARTS[cfg.method]
    }


def _layer(model: nn.Module, param: str) -> nn.Module | None:
    if not param.endswith(".weight"):
        return None
    try:
        return model.get_submodule(param.removesuffix(".weight"))
    except AttributeError:
        return None

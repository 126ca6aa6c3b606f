"""KV compression's flags and request field: validated with the field named, carried from
the HTTP body to the worker's SamplingParams, resolved against the worker's flags."""

from __future__ import annotations

import argparse

import msgspec
import pytest

from ipc.messages import KVCompression, SamplingParams
from worker.config import EngineConfig
from worker.kv_compression import resolve_settings


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"kv_compression": "h2o"}, "kv_compression must be one of"),
        ({"kv_compression_budget": 0}, "kv_compression_budget"),
        ({"kv_compression_budget": 1.5}, "kv_compression_budget"),
        ({"kv_compression_budget": 32}, "kv_compression_budget"),  # not above the window
        ({"kv_compression_budget": float("nan")}, "kv_compression_budget"),
        ({"kv_compression_window": 0}, "kv_compression_window"),
        ({"kv_compression_min_prompt_len": -1}, "kv_compression_min_prompt_len"),
    ],
)
def test_engine_config_names_the_bad_field(changes, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**({"model": "m", "kv_compression": "snapkv"} | changes)).validate()


def test_cli_flags_build_the_config():
    from headrace.engine_args import add_engine_args, engine_config_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args(
        ["--model", "m", "--kv-compression", "pyramidkv", "--kv-compression-budget", "512"]
        + ["--kv-compression-window", "16", "--kv-compression-min-prompt-len", "1024"]
    )
    c = engine_config_from_args(args)
    assert (c.kv_compression, c.kv_compression_budget) == ("pyramidkv", 512)
    assert (c.kv_compression_window, c.kv_compression_min_prompt_len) == (16, 1024)
    assert engine_config_from_args(p.parse_args(["--model", "m"])).kv_compression is None
    with pytest.raises(ValueError, match="invalid engine flag: kv_compression_budget"):
        engine_config_from_args(p.parse_args(["--model", "m", "--kv-compression-budget", "2.5"]))


def test_request_field_resolves_over_the_flags():
    off = EngineConfig(model="m")
    on = EngineConfig(model="m", kv_compression="snapkv", kv_compression_budget=0.125)
    assert resolve_settings(off, None) is None
    assert resolve_settings(on, KVCompression("none")) is None
    s = resolve_settings(on, None)
    assert s is not None and (s.method, s.budget, s.window) == ("snapkv", 0.125, 64)
    s = resolve_settings(off, KVCompression("pyramidkv", 300, 8))
    assert s is not None and (s.method, s.budget, s.window) == ("pyramidkv", 300, 8)
    with pytest.raises(ValueError, match=r"kv_compression\.budget"):
        resolve_settings(on, KVCompression("snapkv", 20))  # not above the flag's window


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (KVCompression("h2o"), "kv_compression.method"),
        (KVCompression("snapkv", budget=-1), "kv_compression.budget"),
        (KVCompression("snapkv", window=-3), "kv_compression.window"),
    ],
)
def test_sampling_params_validate_the_field(body, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(kv_compression=body).validate()


def test_params_cross_the_wire():
    p = SamplingParams(max_tokens=3, kv_compression=KVCompression("snapkv", 0.25, 16))
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams)
    assert back.kv_compression == KVCompression("snapkv", 0.25, 16)


def test_gateway_carries_the_body_field():
    from gateway.errors import BadRequest
    from gateway.protocol import CompletionRequest
    from gateway.sampling_params import build_params

    def params(field: object) -> SamplingParams:
        body = {"model": "m", "prompt": "x", "kv_compression": field}
        req = msgspec.json.decode(msgspec.json.encode(body), type=CompletionRequest)
        return build_params(req, 8, None, 20)

    assert params("snapkv").kv_compression == KVCompression("snapkv")
    got = params({"method": "pyramidkv", "budget": 0.125, "window": 16}).kv_compression
    assert got == KVCompression("pyramidkv", 0.125, 16)
    assert params(None).kv_compression is None
    with pytest.raises(BadRequest) as e:
        params("nope")
    assert e.value.param == "kv_compression.method"


def test_sliding_window_models_refuse_at_start_up(tmp_path, stories_path):
    import json
    import shutil

    from worker.engine import EngineCore

    for f in stories_path.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg |= {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 64}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = EngineConfig(model=str(tmp_path), device="cpu", load_format="dummy")
    EngineCore(config)  # fine uncompressed
    with pytest.raises(ValueError, match="sliding-window attention"):
        EngineCore(config.replace(kv_compression="snapkv"))

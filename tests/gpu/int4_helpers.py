"""What the int4 GPU tests share (test_gpu_int4.py, test_gpu_int4_mma.py,
test_gpu_int4_v4.py, test_gpu_int4_models.py): random weights, the error bound against the
fp32 reference, weights as the loader stores AWQ / GPTQ checkpoints, and the graph check."""

from __future__ import annotations

from collections.abc import Callable

import torch

from cuda import int4_gemm as ig


def random_weight(
    n: int, k: int, group_size: int, perm: bool, seed: int, on_gpu: bool = False
) -> ig.Int4Weight:
    """Uniform nibbles, scales in [0.001, 0.021), zeros 0..15 (on_gpu: 0..16, GPTQ's stored
    zero + 1, and made on the GPU: any int32 is 8 valid nibbles, so big shapes take ms)."""
    groups = k // group_size
    if on_gpu:
        g = torch.Generator(device="cuda").manual_seed(seed)
        qw = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), generator=g, device="cuda").int()
        return ig.Int4Weight(
            qw=qw,
            scales=(torch.rand(n, groups, generator=g, device="cuda") * 0.02 + 0.001).half(),
            zeros=torch.randint(0, 17, (n, groups), generator=g, device="cuda").to(torch.uint8),
            group_size=group_size,
            perm=torch.randperm(k, generator=g, device="cuda") if perm else None,
        )
    g = torch.Generator().manual_seed(seed)
    w = ig.Int4Weight(
        qw=ig.pack_rows(torch.randint(0, 16, (n, k), generator=g)),
        scales=(torch.rand(n, groups, generator=g) * 0.02 + 0.001).half(),
        zeros=torch.randint(0, 16, (n, groups), generator=g).to(torch.uint8),
        group_size=group_size,
        perm=torch.randperm(k, generator=g) if perm else None,
    )
    return w.to(torch.device("cuda"))


def gpu_weight(n: int, k: int, group_size: int, perm: bool, seed: int) -> ig.Int4Weight:
    return random_weight(n, k, group_size, perm, seed, on_gpu=True)


def check(y: torch.Tensor, x: torch.Tensor, w: ig.Int4Weight) -> None:
    """No unwritten (NaN-poisoned) element, and an error against the fp32 reference at most
    twice that of the reference computed in the activation dtype."""
    ref = ig.int4_linear_ref(x.float(), w)  # fp32 reference
    low = ig.int4_linear_ref(x, w).float()  # the same in the activation dtype
    assert not torch.isnan(y).any(), "an output element was not written"
    err, base = (y.float() - ref).abs().max().item(), (low - ref).abs().max().item()
    assert err <= 2 * base + 1e-3 * ref.abs().max().item(), (err, base)


def check_linear_poisoned(x: torch.Tensor, w: ig.Int4Weight, n: int) -> None:
    """int4_linear(x, w) into the first M rows of a NaN-poisoned [M + 3, n] buffer: checked
    against the reference (`check`), and the rows past M untouched."""
    m = x.shape[0]
    out = torch.full((m + 3, n), float("nan"), device="cuda", dtype=x.dtype)
    y = ig.int4_linear(x, w, out=out[:m])
    torch.cuda.synchronize()
    check(y, x, w)
    assert torch.isnan(out[m:]).all(), "a row past M was written"


LOADER_FORMATS = [
    ("awq", dict(group_size=128)),
    ("awq", dict(group_size=64)),
    ("gptq", dict(group_size=128, sym=True)),
    ("gptq", dict(group_size=32, sym=False)),
    ("gptq", dict(group_size=64, sym=False, desc_act=True)),
    ("gptq", dict(group_size=-1, sym=True)),
]


def loader_weight(method: str, kwargs: dict, n: int = 768, k: int = 1024) -> tuple:
    """(Int4Weight on the GPU, the encoded fp32 weight [n, k]): AWQ / GPTQ tensors packed
    from the formats' definitions (tests/int4_checkpoints.py), repacked by the loader's
    to_rows (desc_act: a perm)."""
    from tests.int4_checkpoints import quantized_pair
    from worker.quant.int4 import Int4Config
    from worker.quant.int4_repack import to_rows

    g = torch.Generator().manual_seed(len(method) + kwargs["group_size"])
    parts, w_deq = quantized_pair(torch.randn(n, k, generator=g) * 0.02, method, seed=5, **kwargs)
    qc = {"quant_method": method, "bits": 4, "group_size": kwargs["group_size"]}
    qc |= {"sym": kwargs.get("sym", False), "desc_act": kwargs.get("desc_act", False)}
    w = to_rows(parts, Int4Config.from_hf(qc), "layer").to(torch.device("cuda"))
    assert (w.perm is not None) == kwargs.get("desc_act", False)
    return w, w_deq.cuda()


def assert_graph_replays_eager(
    run: Callable[[torch.Tensor], None], x: torch.Tensor, y: torch.Tensor, w: ig.Int4Weight
) -> None:
    """run(y) writes y from x: eager twice (deterministic), then captured in a graph and
    replayed twice into a poisoned y, equal bit for bit; then a new x through the replay."""
    run(y)
    eager = y.clone()
    run(y)
    torch.cuda.synchronize()
    assert torch.equal(y, eager), "the kernel is deterministic"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(y)
    for _ in range(2):
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    check(y, x, w)

"""Run-time compilation of CUDA C++ kernels with NVRTC, an on-disk cubin cache, and launches.

    source + arch + options --NVRTC--> cubin --cache--> ~/.cache/headrace/kernels/<sha256>.cubin
                                         |
                                cuda.core ObjectCode.from_cubin -> Kernel -> launch()

Kernels are declared `extern "C"` so their names need no mangling maps (NVRTC's
name_expressions mapping is not stored in a cubin). Template parameters are passed as
preprocessor macros, one compiled module per combination.

Launches go on torch's *current* stream through `TorchStream`, an object that speaks
cuda.core's `__cuda_stream__` protocol, so they are ordered with torch's own work and can be
captured into a CUDA graph. Nothing here synchronizes the host.

`compile_cubin` needs only NVRTC (no GPU): the CPU tests use it to compile every kernel.
`read_source` reads a .cu file with our own headers (`#include "x.cuh"`) pasted in.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_DIR = Path(
    os.environ.get("HEADRACE_KERNEL_CACHE", Path.home() / ".cache" / "headrace" / "kernels")
)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries the compiler log."""


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#include[ \t]+"([^"]+)"[^\n]*$', re.MULTILINE)


@functools.cache
def read_source(path: Path) -> str:
    """The text of kernel source `path`, each `#include "name"` of a file beside it replaced
    by that file's text (once per module, as `#pragma once` would).

    Pasting instead of passing NVRTC an include path keeps the cubin cache key honest: the
    key hashes the source text, so an edited header is a new key, not a stale cubin.
    """
    seen: set[Path] = set()

    def expand(file: Path) -> str:
        seen.add(file)

        def paste(m: re.Match[str]) -> str:
            header = file.with_name(m.group(1))
            return "" if header in seen else expand(header)

        return _LOCAL_INCLUDE.sub(paste, file.read_text())

    return expand(path)


def nvrtc_available() -> str | None:
    """None if NVRTC and cuda.core can be used, else the reason they cannot."""
    try:
        import cuda.core
        import cuda.pathfinder
        from cuda.bindings import nvrtc

        err, _, _ = nvrtc.nvrtcVersion()
        if int(err) != 0:
            return f"nvrtcVersion failed: {err}"
        cuda.pathfinder.find_nvidia_header_directory("cudart")
    except Exception as exc:  # ImportError, missing libnvrtc.so, missing headers
        return f"NVRTC / cuda.core not usable: {exc!r}"
    return None


def _nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def _include_dirs() -> list[str]:
    import cuda.pathfinder

    cudart = cuda.pathfinder.find_nvidia_header_directory("cudart")
    if cudart is None:
        raise KernelCompileError("CUDA headers (cuda_bf16.h) not found by cuda.pathfinder")
    return [cudart]


def _defines_list(defines: Mapping[str, int | str]) -> list[tuple[str, str]]:
    return [(k, str(v)) for k, v in sorted(defines.items())]


def cache_key(
    source: str, arch: str, defines: Mapping[str, int | str], options: Sequence[str] = ()
) -> str:
    """Hash of everything that changes the cubin: source, arch, macros, options, NVRTC."""
    h = hashlib.sha256()
    for part in (source, arch, repr(_defines_list(defines)), repr(list(options)), _nvrtc_version()):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def compile_cubin(
    source: str,
    *,
    arch: str = "sm_90",
    defines: Mapping[str, int | str] | None = None,
    name: str = "headrace_kernel",
    verbose_ptxas: bool = False,
    use_cache: bool = True,
) -> tuple[bytes, str]:
    """Compile CUDA C++ `source` to a cubin for `arch`; returns (cubin, compiler log).

    The cubin is cached on disk under CACHE_DIR keyed by `cache_key`; a hit returns an empty
    log. Raises KernelCompileError with NVRTC's log on failure.
    """
    from cuda.core import Program, ProgramOptions

    defines = dict(defines or {})
    key = cache_key(source, arch, defines, ["ptxas-v"] if verbose_ptxas else [])
    path = CACHE_DIR / f"{name}-{key[:32]}.cubin"
    if use_cache and path.exists():
        return path.read_bytes(), ""
    opts = ProgramOptions(
        name=name,
        arch=arch,
        std="c++17",
        include_path=_include_dirs(),
        define_macro=_defines_list(defines) or None,
        ptxas_options="-v" if verbose_ptxas else None,
    )
    log = io.StringIO()
    try:
        obj = Program(source, "c++", opts).compile("cubin", logs=log)
    except Exception as exc:
        raise KernelCompileError(f"{name} ({arch}, {defines}): {exc}\n{log.getvalue()}") from exc
    cubin = bytes(obj.code)
    if use_cache:
        _atomic_write(path, cubin)
    return cubin, log.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a recompile next time


class TorchStream:
    """cuda.core stream protocol for torch's current stream (capturable in CUDA graphs)."""

    __slots__ = ("handle",)

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.handle)


_streams: dict[int, Any] = {}


def current_stream() -> Any:
    """torch's current stream as a cuda.core Stream, cached by raw handle.

    Converting a foreign stream on every launch costs tens of microseconds (and a
    deprecation warning in cuda.core 1.2), so each handle is wrapped once. The wrapper
    borrows the handle; it owns nothing.
    """
    import torch

    handle = torch.cuda.current_stream().cuda_stream
    stream = _streams.get(handle)
    if stream is None:
        from cuda.core import Stream

        from_handle = getattr(Stream, "from_handle", None)
        if from_handle is not None:
            stream = from_handle(handle)
        else:  # older cuda.core: the stream protocol
            stream = Stream._init(obj=TorchStream(handle))
        if len(_streams) > 1024:
            _streams.clear()
        _streams[handle] = stream
    return stream


@dataclass
class Module:
    """A loaded cubin: kernels by their extern "C" name."""

    object_code: Any
    kernels: dict[str, Any]

    def kernel(self, kernel_name: str) -> Any:
        k = self.kernels.get(kernel_name)
        if k is None:
            k = self.object_code.get_kernel(kernel_name)
            self.kernels[kernel_name] = k
        return k


_modules: dict[tuple[str, str, tuple[tuple[str, str], ...], int], Module] = {}
_lock = threading.Lock()


def device_arch(device_index: int | None = None) -> str:
    import torch

    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm_{major}{minor}"


def device_index(device: Any) -> int:
    """A torch.device's CUDA index (its own, else the current device's)."""
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


_sm_counts: dict[int, int] = {}


def num_sms(device: Any) -> int:
    """The SM count of a torch.device's GPU, read once per device (launch-size rules)."""
    import torch

    idx = device_index(device)
    n = _sm_counts.get(idx)
    if n is None:
        n = _sm_counts[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def load_module(
    source: str, *, defines: Mapping[str, int | str] | None = None, name: str = "headrace_kernel"
) -> Module:
    """Compile (or fetch from cache) and load `source` for the current torch device."""
    import torch

    dev = torch.cuda.current_device()
    defines = dict(defines or {})
    key = (name, source, tuple(_defines_list(defines)), dev)
    mod = _modules.get(key)
    if mod is not None:
        return mod
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            from cuda.core import Device, ObjectCode

            Device(dev).set_current()  # the primary context, the one torch uses
            cubin, _ = compile_cubin(source, arch=device_arch(dev), defines=defines, name=name)
            mod = Module(ObjectCode.from_cubin(cubin, name=name), {})
            _modules[key] = mod
    return mod


_configs: dict[tuple[tuple[int, ...], int, int, bool], Any] = {}


def blocks_per_sm(kernel: Any, block: int, shmem: int = 0) -> int:
    """Resident blocks of `kernel` per multiprocessor (occupancy), at least 1."""
    try:
        n = int(kernel.occupancy.max_active_blocks_per_multiprocessor(block, shmem))
    except Exception:  # a cuda.core without the occupancy API
        n = 2
    return max(n, 1)


_smem_opted: set[tuple[int, int]] = set()


def allow_shared_memory(kernel: Any, nbytes: int, device_index: int) -> None:
    """Opt `kernel` in to `nbytes` of dynamic shared memory (past 48 KiB a launch fails
    without it) and the largest shared-memory carveout, once per kernel and device."""
    key = (id(kernel), device_index)
    if key in _smem_opted:
        return
    from cuda.bindings import driver

    attr = driver.CUfunction_attribute
    handle = getattr(kernel, "handle", None) or kernel._handle
    err, device = driver.cuDeviceGet(device_index)
    for which, value in (
        (attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes),
        (attr.CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, 100),
    ):
        if err == driver.CUresult.CUDA_SUCCESS:
            if isinstance(handle, driver.CUfunction):  # cuda.core loading through cuModule
                (err,) = driver.cuFuncSetAttribute(handle, which, value)
            else:  # a CUkernel from cuLibraryGetKernel
                (err,) = driver.cuKernelSetAttribute(which, value, handle, device)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"setting {which.name} = {value} failed: {err}")
    _smem_opted.add(key)


@functools.cache
def pdl_supported() -> bool:
    """Whether this cuda.core's LaunchConfig can ask for Programmatic Dependent Launch."""
    from cuda.core import LaunchConfig

    return hasattr(LaunchConfig, "programmatic_stream_serialization")


def launch(
    kernel: Any, grid: tuple[int, ...], block: int, *args: Any, shmem: int = 0, pdl: bool = False
) -> None:
    """Launch on torch's current stream. Pointers as Python ints, scalars as numpy scalars.

    pdl: Programmatic Dependent Launch (sm_90): the kernel may start before the previous one
    in the stream has finished, so it must run `griddepcontrol.wait` before it reads what
    that one wrote (cuda/gemv_step.cu does). A cuda.core without the option launches plainly.
    """
    from cuda.core import LaunchConfig
    from cuda.core import launch as cc_launch

    cfg_key = (grid, block, shmem, pdl)
    cfg = _configs.get(cfg_key)
    if cfg is None:
        extra = {"programmatic_stream_serialization": True} if pdl and pdl_supported() else {}
        cfg = LaunchConfig(grid=grid, block=block, shmem_size=shmem, **extra)
        if len(_configs) > 4096:
            _configs.clear()
        _configs[cfg_key] = cfg
    cc_launch(current_stream(), cfg, kernel, *args)

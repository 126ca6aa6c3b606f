"""The parameter lists of our CUDA kernels, read from their source, for the CPU tests that
check launch arguments (tests/test_fused_ops.py, test_layer_ops.py, test_cuda_launch_args.py).
"""

from __future__ import annotations

import re

import numpy as np

_KERNEL = re.compile(
    r'extern "C" __global__ void (?:__launch_bounds__\([\w, ]+\) )?(\w+)\(([^)]*)\)'
)
_SCALARS: dict[str, type] = {"long": np.int64, "int": np.int32, "float": np.float32}


def kernel_parameters(source: str) -> dict[str, list[tuple[str, type]]]:
    """Kernel name -> [(parameter name, the Python type it is launched with)]: pointers as
    int, `long long` as np.int64, int as np.int32, float as np.float32. Parameter-list
    macros (`#define HR_..._ARGS`) are expanded first."""
    for macro in re.findall(r"#define (HR_\w+_ARGS)", source):
        body = re.search(rf"#define {macro}((?:.*\\\n)*.*)", source)
        assert body is not None
        source = source.replace(macro, body.group(1).replace("\\\n", " "))
    kernels = {}
    for name, params in _KERNEL.findall(source):
        typed = []
        for p in params.split(","):
            words = p.replace("*", " * ").split()
            typed.append((words[-1], int if "*" in words else _SCALARS[words[0]]))
        kernels[name] = typed
    return kernels


def launch_types(source: str) -> dict[str, list[type]]:
    """Kernel name -> the Python type of each argument, in order."""
    return {k: [t for _, t in params] for k, params in kernel_parameters(source).items()}

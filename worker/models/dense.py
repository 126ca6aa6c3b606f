"""DenseLinear: nn.Linear whose decode-sized CUDA calls may run our GEMV (cuda/gemv.py).

The weight, bias, state-dict names and every isinstance(m, nn.Linear) check stay those of
nn.Linear; only forward changes: an [M <= 8, K] CUDA input whose shape the GEMV rule picks
(`cuda.gemv.use_gemv`, HEADRACE_GEMV) runs the GEMV, everything else F.linear as before.
"""

from __future__ import annotations

import torch
from torch import nn

from cuda.gemv import linear


class DenseLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N]
        return linear(x, self.weight, self.bias)

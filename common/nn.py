"""Network building blocks shared by the model packages (ddim, ldm) and understood by the quantization core."""
from __future__ import annotations

import torch
import torch.nn as nn


class MatMul(nn.Module):
    """Batched matmul as a module, [N, a, b] @ [N, b, c] -> [N, a, c]: the hook point where both operands of an
    attention product (QKᵀ, softmax·V) are quantized from outside. It has no parameters."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)

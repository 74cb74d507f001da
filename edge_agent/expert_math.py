"""Mixtral's expert FFN (SwiGLU) on the box: `w2(silu(w1 x) * w3 x)`. Imports only torch.

Shape legend: T = tokens of this expert, D = hidden size, F = expert FFN (intermediate) size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExpertWeights:
    """One expert of one layer. w1 and w3 are fused (as transformers' `gate_up_proj`) so one
    matmul computes both."""

    gate_up: torch.Tensor  # [2F, D]: rows 0..F-1 are w1, F..2F-1 are w3
    down: torch.Tensor  # [D, F]: w2

    @classmethod
    def from_w123(cls, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> "ExpertWeights":
        assert w1.shape == w3.shape and w2.shape == (w1.shape[1], w1.shape[0]), (
            f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, w3 {tuple(w3.shape)} do not form an expert")
        return cls(gate_up=torch.cat([w1, w3], dim=0).contiguous(), down=w2.contiguous())

    @property
    def hidden_size(self) -> int:
        return self.down.shape[0]

    @property
    def ffn_size(self) -> int:
        return self.down.shape[1]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The reference form: x [T, D], w1/w3 [F, D], w2 [D, F] -> [T, D]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def expert_forward(x: torch.Tensor, weights: ExpertWeights,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, D] -> [T, D], in the weights' dtype and device. `out` [T, D] receives the result
    and may be x itself: x is consumed by the first projection before the second writes."""
    gate, up = F.linear(x, weights.gate_up).chunk(2, dim=-1)  # [T, F] each
    if out is None:
        return F.linear(F.silu(gate) * up, weights.down)  # [T, D]
    return torch.matmul(F.silu(gate) * up, weights.down.t(), out=out)


def flops_per_token(hidden_size: int, ffn_size: int) -> int:
    """Multiply-adds x2 of the three projections (the paper's Eq. 4 without the activation)."""
    return 2 * 3 * hidden_size * ffn_size

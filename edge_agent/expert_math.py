"""One routed expert's FFN on the box, in the op order of transformers' own experts modules (so
float32 results on a CPU match them bit for bit). Imports only torch.

Two kinds (the manifest's `expert_kind`):
  swiglu   Mixtral, Qwen-MoE, OLMoE, DeepSeek, Phi-MoE, Granite: down(act(gate x) * up x)
  gpt_oss  GPT-OSS: clamped gate/up with biases, gate * sigmoid(alpha * gate) * (up + 1)

Shape legend: T = tokens of this expert, D = hidden size, F = expert FFN (intermediate) size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

SWIGLU, GPT_OSS = "swiglu", "gpt_oss"

# config.hidden_act -> the function transformers' ACT2FN applies (activations.py)
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True)
class ExpertWeights:
    """One expert of one layer, laid out as its family's transformers module holds expert e.

    swiglu:  gate_up [2F, D] (gate rows, then up rows: one matmul computes both), down [D, F].
    gpt_oss: gate_up [D, 2F] (x @ W; gate and up interleaved on the last axis), down [F, D],
             plus gate_up_bias [2F], down_bias [D], alpha and limit.
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    activation: str = "silu"  # swiglu: config.hidden_act
    kind: str = SWIGLU
    gate_up_bias: torch.Tensor | None = None  # gpt_oss [2F]
    down_bias: torch.Tensor | None = None  # gpt_oss [D]
    alpha: float = 1.702  # gpt_oss: config.swiglu_alpha
    limit: float = 7.0  # gpt_oss: config.swiglu_limit

    def __post_init__(self):
        # cheap checks, so a bad shard fails at load rather than on the first request
        if self.kind == SWIGLU:
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"activation {self.activation!r} is not supported "
                                 f"({', '.join(ACTIVATIONS)})")
            d, f = self.down.shape
            if tuple(self.gate_up.shape) != (2 * f, d):
                raise ValueError(f"gate_up {tuple(self.gate_up.shape)} and down "
                                 f"{tuple(self.down.shape)} do not form a swiglu expert")
        elif self.kind == GPT_OSS:
            f, d = self.down.shape
            if (tuple(self.gate_up.shape) != (d, 2 * f) or self.gate_up_bias is None
                    or self.down_bias is None or tuple(self.gate_up_bias.shape) != (2 * f,)
                    or tuple(self.down_bias.shape) != (d,)):
                raise ValueError(f"gate_up {tuple(self.gate_up.shape)}, down "
                                 f"{tuple(self.down.shape)} and their biases do not form a "
                                 f"gpt_oss expert")
        else:
            raise ValueError(f"expert kind {self.kind!r} is not {SWIGLU} or {GPT_OSS}")

    @classmethod
    def from_w123(cls, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  activation: str = "silu") -> "ExpertWeights":
        """Separate gate (w1 [F, D]), down (w2 [D, F]) and up (w3 [F, D]) -> fused, as
        transformers concatenates them at load."""
        assert w1.shape == w3.shape and w2.shape == (w1.shape[1], w1.shape[0]), (
            f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, w3 {tuple(w3.shape)} do not form an expert")
        return cls(gate_up=torch.cat([w1, w3], dim=0).contiguous(), down=w2.contiguous(),
                   activation=activation)

    @property
    def hidden_size(self) -> int:
        return self.down.shape[0] if self.kind == SWIGLU else self.down.shape[1]

    @property
    def ffn_size(self) -> int:
        return self.down.shape[1] if self.kind == SWIGLU else self.down.shape[0]


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The reference form: x [T, D], w1/w3 [F, D], w2 [D, F] -> [T, D]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def expert_forward(x: torch.Tensor, weights: ExpertWeights,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, D] -> [T, D], in the weights' dtype and device. `out` [T, D] receives the result
    and may be x itself: x is consumed by the first projection before the second writes."""
    if weights.kind == GPT_OSS:
        return _gpt_oss_forward(x, weights, out)
    # MixtralExperts.forward (and its copies in every swiglu family)
    gate, up = F.linear(x, weights.gate_up).chunk(2, dim=-1)  # [T, F] each
    hidden = ACTIVATIONS[weights.activation](gate) * up  # [T, F]
    if out is None:
        return F.linear(hidden, weights.down)  # [T, D]
    return torch.matmul(hidden, weights.down.t(), out=out)


def _gpt_oss_forward(x: torch.Tensor, weights: ExpertWeights,
                     out: torch.Tensor | None) -> torch.Tensor:
    # GptOssExperts.forward and _apply_gate: matmul then a separate bias add (not addmm, whose
    # rounding differs), gate/up interleaved, clamped at `limit`
    gate_up = x @ weights.gate_up + weights.gate_up_bias  # [T, 2F]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # [T, F] each
    gate = gate.clamp(min=None, max=weights.limit)
    up = up.clamp(min=-weights.limit, max=weights.limit)
    glu = gate * torch.sigmoid(gate * weights.alpha)
    hidden = (up + 1) * glu  # [T, F]
    if out is None:
        return hidden @ weights.down + weights.down_bias  # [T, D]
    torch.matmul(hidden, weights.down, out=out)
    return out.add_(weights.down_bias)


def flops_per_token(hidden_size: int, ffn_size: int) -> int:
    """Multiply-adds x2 of the three projections (the paper's Eq. 4 without the activation)."""
    return 2 * 3 * hidden_size * ffn_size

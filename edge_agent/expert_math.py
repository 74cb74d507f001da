"""One routed expert's FFN on the box, in the op order of transformers' own experts modules (so
float32 results on a CPU match them bit for bit). Imports only torch (and shard_tool/quant.py,
the quantised format's owner, which imports only torch).

Two kinds (the manifest's `expert_kind`):
  swiglu   Mixtral, Qwen-MoE, OLMoE, DeepSeek, Phi-MoE, Granite: down(act(gate x) * up x)
  gpt_oss  GPT-OSS: clamped gate/up with biases, gate * sigmoid(alpha * gate) * (up + 1)

Weight matrices are float tensors (16 bits: the checkpoint's values) or `QuantLinear`s (8 or 4
bits, kept quantised): those multiply with torch's weight-only int8/int4 kernel where the device
has one that is correct and faster, else dequantise into one shared scratch buffer per call.

Shape legend: T = tokens of this expert, D = hidden size, F = expert FFN (intermediate) size,
N/K = a matrix's out/in features.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shard_tool import quant

SWIGLU, GPT_OSS = "swiglu", "gpt_oss"

# config.hidden_act -> the function transformers' ACT2FN applies (activations.py)
ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Scratch:
    """The one float buffer a box dequantises into, a matrix at a time (never a persistent
    dequantised copy of the weights). Shared by every QuantLinear of one LoadedExperts; the
    agent computes one request at a time, so one buffer is enough."""

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.buffer = torch.empty(0, device=device, dtype=dtype)

    def reserve(self, elements: int) -> None:
        if elements > self.buffer.numel():
            self.buffer = torch.empty(elements, device=self.buffer.device, dtype=self.buffer.dtype)

    def matrix(self, rows: int, cols: int) -> torch.Tensor:
        self.reserve(rows * cols)
        return self.buffer[: rows * cols].view(rows, cols)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 kernels take


def _int4_scales_and_zeros(q: quant.QuantizedMatrix, dtype: torch.dtype) -> torch.Tensor:
    """The int4 kernels' [K/G, N, 2] table: they compute (code - 8) * scale + zero."""
    zero = q.offset + 8 * q.scale  # [N, K/G]
    return torch.stack([q.scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)


def _cuda_int4_tiles(cols: int) -> int:
    return next(t for t in (8, 4, 2, 1) if cols % (t * 16) == 0)


UNLIMITED_TOKENS = 1 << 30


class QuantLinear:
    """W [N, K] at 8 or 4 bits on its device: `linear(x)` = F.linear(x, W), never through a float
    copy of W. Calls of up to `kernel_max_tokens` tokens go through torch's weight-only kernel;
    the rest dequantise W into the shared scratch buffer and run a float matmul. 8 bits: the
    kernel takes the stored int8 rows as they are, so both paths share them. 4 bits: the kernel
    wants its own packing, so a matrix holds one form, all kernel (UNLIMITED) or none (0)."""

    def __init__(self, q: quant.QuantizedMatrix, device: torch.device, dtype: torch.dtype,
                 scratch: Scratch, kernel_max_tokens: int = 0):
        self.bits, self.shape, self.dtype = q.bits, q.shape, dtype
        self.group_size = q.group_size
        self.scratch = scratch
        self.kernel_max_tokens = kernel_max_tokens
        q = q.to(device)
        self.q, self.tensors = None, []
        if q.bits == 8 or kernel_max_tokens < UNLIMITED_TOKENS:  # the dequantising path's form
            self.q = q
            self.tensors += quant.stored_tensors(q)
        if kernel_max_tokens <= 0:
            pass
        elif q.bits == 8:  # per-channel int8 is exactly _weight_int8pack_mm's layout
            self.weight, self.scales = q.qweight, q.scale.to(dtype)
            self.tensors += [] if self.scales is q.scale else [self.scales]
        elif device.type == "cpu":
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quant.codes(q), 1)
            self.scales = _int4_scales_and_zeros(q, dtype)
            self.tensors += [self.weight, self.scales]
        else:  # CUDA tinygemm: two codes a byte, the even column in the high nibble
            codes = quant.codes(q)
            packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
            self.weight = torch.ops.aten._convert_weight_to_int4pack(
                packed, _cuda_int4_tiles(self.shape[1]))
            self.scales = _int4_scales_and_zeros(q, dtype)
            self.tensors += [self.weight, self.scales]
        if self.q is not None:
            scratch.reserve(self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes this matrix holds on its device (the shared scratch not included)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def linear(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, K] -> [T, N], into `out` [T, N] when given."""
        if x.shape[0] <= self.kernel_max_tokens:
            y = self._kernel(x.contiguous())
            return y if out is None else out.copy_(y)
        w = quant.dequantize(self.q, self.dtype, out=self.scratch.matrix(*self.shape))  # [N, K]
        if out is None:
            return F.linear(x, w)
        return torch.matmul(x, w.t(), out=out)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        if x.device.type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size,
                                                              self.scales)
        return torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, self.scales)


@dataclass(frozen=True)
class KernelChoice:
    """Up to how many tokens a box multiplies at `bits` with torch's kernel (0: never), and why
    (`note`, for logs and the bench)."""

    bits: int
    max_tokens: int
    note: str


PROBE_ROWS = 1024  # the probe times at most this many rows of the real matrix
PROBE_TOKENS = (1, 4, 16, 64)
PROBE_REPEATS = 5


def _median_s(fn, sync) -> float:
    fn()
    sync()
    times = []
    for _ in range(PROBE_REPEATS):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose_kernel(q: quant.QuantizedMatrix, device: torch.device, dtype: torch.dtype,
                  mode: str = "auto") -> KernelChoice:
    """Probe torch's weight-only kernel for q's width on this device and dtype, on (up to
    PROBE_ROWS rows of) a real matrix: it must run and agree with the dequantised product; in
    mode "auto" it is then used up to the largest of PROBE_TOKENS at which it is no slower than
    dequantising (4 bits: at all of them, or not at all). "off": never; "on": always when it
    runs and agrees. Torch's CPU kernels are vectorised for AVX-512 only: on an AVX2 box they
    lose to dequantising beyond a few tokens, or on big matrices even at one (README)."""
    if mode == "off":
        return KernelChoice(q.bits, 0, "kernels off")
    if q.bits == 4 and q.group_size not in INT4_KERNEL_GROUPS:
        return KernelChoice(q.bits, 0, f"no int4 kernel for groups of {q.group_size}")
    sample = q.rows(0, min(q.shape[0], PROBE_ROWS))
    scratch = Scratch(device, dtype)
    generator = torch.Generator().manual_seed(0)

    def tokens(t: int) -> torch.Tensor:
        return torch.randn(t, q.shape[1], generator=generator).to(device, dtype)

    x = tokens(1)
    try:
        fast = QuantLinear(sample, device, dtype, scratch, UNLIMITED_TOKENS)
        got = fast.linear(x)
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        return KernelChoice(q.bits, 0, f"no int{q.bits} kernel for {dtype} on {device.type}: "
                                       f"{first}")
    slow = QuantLinear(sample, device, dtype, scratch, 0)
    want = slow.linear(x)
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2
    error = (got.float() - want.float()).abs().max().item()
    if not error <= tolerance * max(want.float().abs().max().item(), 1e-6):
        return KernelChoice(q.bits, 0, f"int{q.bits} kernel disagrees on {device.type} (max "
                                       f"error {error:.3g}): not used")
    if mode == "on":
        return KernelChoice(q.bits, UNLIMITED_TOKENS, f"int{q.bits} kernel (forced)")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    max_tokens, timings = UNLIMITED_TOKENS, []
    previous = 0
    for t in PROBE_TOKENS:
        x = tokens(t)
        kernel_s = _median_s(lambda x=x: fast.linear(x), sync)
        dequant_s = _median_s(lambda x=x: slow.linear(x), sync)
        timings.append(f"{t}: {kernel_s * 1e6:.0f}/{dequant_s * 1e6:.0f}")
        if kernel_s > dequant_s:
            max_tokens = previous
            break
        previous = t
    if q.bits == 4 and max_tokens != UNLIMITED_TOKENS:
        max_tokens = 0
    use = ("always" if max_tokens == UNLIMITED_TOKENS else
           f"up to {max_tokens} tokens" if max_tokens else "never")
    return KernelChoice(q.bits, max_tokens, f"int{q.bits} kernel {use} (tokens: kernel/"
                                            f"dequantise us {', '.join(timings)})")


@dataclass(frozen=True)
class ExpertWeights:
    """One expert of one layer, laid out as its family's transformers module holds expert e.

    swiglu:  gate_up [2F, D] (gate rows, then up rows: one matmul computes both), down [D, F].
    gpt_oss: gate_up [D, 2F] (x @ W; gate and up interleaved on the last axis), down [F, D],
             plus gate_up_bias [2F], down_bias [D], alpha and limit.
    Quantised, gate_up and down are QuantLinears of [out, in] for both kinds (gpt_oss: the
    transposes of the above); biases stay float.
    """

    gate_up: torch.Tensor | QuantLinear
    down: torch.Tensor | QuantLinear
    activation: str = "silu"  # swiglu: config.hidden_act
    kind: str = SWIGLU
    gate_up_bias: torch.Tensor | None = None  # gpt_oss [2F]
    down_bias: torch.Tensor | None = None  # gpt_oss [D]
    alpha: float = 1.702  # gpt_oss: config.swiglu_alpha
    limit: float = 7.0  # gpt_oss: config.swiglu_limit

    def __post_init__(self):
        # cheap checks, so a bad shard fails at load rather than on the first request
        if isinstance(self.gate_up, QuantLinear) != isinstance(self.down, QuantLinear):
            raise ValueError("gate_up and down must both be quantised or both float")
        if self.kind == SWIGLU:
            if self.activation not in ACTIVATIONS:
                raise ValueError(f"activation {self.activation!r} is not supported "
                                 f"({', '.join(ACTIVATIONS)})")
            d, f = self.down.shape
            if tuple(self.gate_up.shape) != (2 * f, d):
                raise ValueError(f"gate_up {tuple(self.gate_up.shape)} and down "
                                 f"{tuple(self.down.shape)} do not form a swiglu expert")
        elif self.kind == GPT_OSS:
            f, d = self.down.shape[::-1] if self.quantized else self.down.shape
            gate_up = self.gate_up.shape[::-1] if self.quantized else tuple(self.gate_up.shape)
            if (tuple(gate_up) != (d, 2 * f) or self.gate_up_bias is None
                    or self.down_bias is None or tuple(self.gate_up_bias.shape) != (2 * f,)
                    or tuple(self.down_bias.shape) != (d,)):
                raise ValueError(f"gate_up {tuple(self.gate_up.shape)}, down "
                                 f"{tuple(self.down.shape)} and their biases do not form a "
                                 f"gpt_oss expert")
        else:
            raise ValueError(f"expert kind {self.kind!r} is not {SWIGLU} or {GPT_OSS}")

    @classmethod
    def from_w123(cls, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  activation: str = "silu") -> ExpertWeights:
        """Separate gate (w1 [F, D]), down (w2 [D, F]) and up (w3 [F, D]) -> fused, as
        transformers concatenates them at load."""
        assert w1.shape == w3.shape and w2.shape == (w1.shape[1], w1.shape[0]), (
            f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}, w3 {tuple(w3.shape)} do not form an expert")
        return cls(gate_up=torch.cat([w1, w3], dim=0).contiguous(), down=w2.contiguous(),
                   activation=activation)

    @property
    def quantized(self) -> bool:
        return isinstance(self.down, QuantLinear)

    @property
    def out_in(self) -> bool:
        """True when down is [D, F] (out, in): swiglu, and every quantised expert."""
        return self.kind == SWIGLU or self.quantized

    @property
    def hidden_size(self) -> int:
        return self.down.shape[0] if self.out_in else self.down.shape[1]

    @property
    def ffn_size(self) -> int:
        return self.down.shape[1] if self.out_in else self.down.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of weights (and biases) held on the device."""
        total = 0
        for m in (self.gate_up, self.down, self.gate_up_bias, self.down_bias):
            if isinstance(m, QuantLinear):
                total += m.nbytes
            elif m is not None:
                total += m.numel() * m.element_size()
        return total


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The reference form: x [T, D], w1/w3 [F, D], w2 [D, F] -> [T, D]."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def expert_forward(x: torch.Tensor, weights: ExpertWeights,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, D] -> [T, D], in the weights' dtype and device. `out` [T, D] receives the result
    and may be x itself: x is consumed by the first projection before the second writes."""
    if weights.quantized:
        return _quantized_forward(x, weights, out)
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


def _quantized_forward(x: torch.Tensor, weights: ExpertWeights,
                       out: torch.Tensor | None) -> torch.Tensor:
    # the float paths' op order with each matmul replaced by QuantLinear.linear
    if weights.kind == SWIGLU:
        gate, up = weights.gate_up.linear(x).chunk(2, dim=-1)  # [T, F] each
        return weights.down.linear(ACTIVATIONS[weights.activation](gate) * up, out=out)  # [T, D]
    gate_up = weights.gate_up.linear(x) + weights.gate_up_bias  # [T, 2F]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=weights.limit)
    up = up.clamp(min=-weights.limit, max=weights.limit)
    hidden = (up + 1) * (gate * torch.sigmoid(gate * weights.alpha))  # [T, F]
    if out is None:
        return weights.down.linear(hidden) + weights.down_bias  # [T, D]
    return weights.down.linear(hidden, out=out).add_(weights.down_bias)


def flops_per_token(hidden_size: int, ffn_size: int) -> int:
    """Multiply-adds x2 of the three projections (the paper's Eq. 4 without the activation)."""
    return 2 * 3 * hidden_size * ffn_size

"""Expert weight quantisation: the one owner of the format. The split writes it, the agent keeps
it in memory and multiplies with it, the bits search measures it. Imports only torch, and that
inside the functions that compute: a 16-bit split reads the names and layout here without it.

Every quantised matrix is W [N, K] = [out features, in features], as `F.linear(x, W)` uses it,
quantised per output channel (row), linear, round to nearest:

  8 bits  symmetric, one group per row:
          qweight int8 [N, K] (codes -127..127), scale float32 [N];       W ~ code * scale
  4 bits  asymmetric, groups of G consecutive inputs along each row (G = 64, or the largest
          power of two dividing K when K is not a multiple of 64):
          qweight uint8 [N, K/2] (column k in the low nibble, column k + K/2 in the high one),
          scale float32 [N, K/G], offset float32 [N, K/G];                 W ~ code * scale + offset
                                                                           (code 0..15)
Error: |W - dequantize(quantize(W))| <= scale / 2 per element (plus float32 rounding), where
scale is its row's (8 bits) or group's (4 bits). In a shard the three tensors are named
`{name}.qweight`, `{name}.scale`, `{name}.offset` after the float tensor they replace.

Shape legend: N = out features (rows), K = in features, G = group size, T = tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FULL_BITS = 16  # "not quantised": the shard keeps the checkpoint's floats
BITS = (16, 8, 4)
INT8_MAX = 127  # symmetric: -127..127 (-128 unused, so the grid is symmetric about 0)
INT4_LEVELS = 15  # codes 0..15
INT4_GROUP_SIZE = 64  # inputs per scale/offset pair (README: Quantised experts)
SUFFIXES = (".qweight", ".scale", ".offset")
# safetensors dtype codes of the stored tensors
QWEIGHT_CODE = {8: "I8", 4: "U8"}
PARAM_CODE = "F32"


@dataclass(frozen=True)
class QuantizedMatrix:
    """One quantised W [N, K] (see the module docstring for the layout)."""

    bits: int
    qweight: torch.Tensor  # 8: int8 [N, K]; 4: uint8 [N, K/2]
    scale: torch.Tensor  # 8: float32 [N]; 4: float32 [N, K/G]
    offset: torch.Tensor | None = None  # 4: float32 [N, K/G]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.qweight.shape
        return (rows, cols * 2) if self.bits == 4 else (rows, cols)

    @property
    def group_size(self) -> int:
        """Inputs sharing one scale (8 bits: the whole row)."""
        return self.shape[1] if self.bits == 8 else self.shape[1] // self.scale.shape[1]

    @property
    def nbytes(self) -> int:
        tensors = (self.qweight, self.scale, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def rows(self, start: int, stop: int) -> QuantizedMatrix:
        """Rows [start, stop) (each row is quantised on its own)."""
        offset = None if self.offset is None else self.offset[start:stop]
        return QuantizedMatrix(self.bits, self.qweight[start:stop], self.scale[start:stop], offset)

    def to(self, device: torch.device) -> QuantizedMatrix:
        offset = None if self.offset is None else self.offset.to(device)
        return QuantizedMatrix(self.bits, self.qweight.to(device), self.scale.to(device), offset)


def check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, not {bits!r}")
    return bits


def group_size_for(in_features: int) -> int:
    """4-bit group size for rows of K inputs. Raises ValueError when K is odd (two codes a byte)."""
    if in_features < 2 or in_features % 2:
        raise ValueError(f"4-bit rows need an even number of inputs, not {in_features}")
    group = INT4_GROUP_SIZE
    while in_features % group:
        group //= 2
    return group


def quantize(w: torch.Tensor, bits: int) -> QuantizedMatrix:
    """W [N, K] (any float dtype) -> its 8- or 4-bit form, computed in float32 on W's device.
    Rows are independent: quantising a block of rows gives those rows of the whole."""
    import torch

    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize takes a float matrix [N, K], not {w.dtype} {tuple(w.shape)}")
    w = w.float()
    if bits == 8:
        scale = w.abs().amax(dim=1) / INT8_MAX  # [N]
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: code 0
        codes = torch.round(w / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return QuantizedMatrix(8, codes.contiguous(), scale.contiguous())
    if bits == 4:
        rows, cols = w.shape
        group = group_size_for(cols)
        grouped = w.reshape(rows, cols // group, group)  # [N, K/G, G]
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)  # [N, K/G]
        scale = (high - low) / INT4_LEVELS
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant groups: code 0
        codes = torch.round((grouped - low[..., None]) / safe[..., None]).clamp_(0, INT4_LEVELS)
        codes = codes.to(torch.uint8).reshape(rows, cols)
        packed = codes[:, : cols // 2] | (codes[:, cols // 2:] << 4)  # [N, K/2]
        return QuantizedMatrix(4, packed.contiguous(), scale.contiguous(), low.contiguous())
    raise ValueError(f"quantize: bits must be 8 or 4, not {bits!r}")


def dequantize(q: QuantizedMatrix, dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """-> W [N, K] in `dtype` (None: float32) on q's device, written into `out` (contiguous
    [N, K]) when given. The agent's scratch path and the bits search both call this, so they see
    the same values."""
    import torch

    rows, cols = q.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype or torch.float32, device=q.qweight.device)
    if q.bits == 8:
        out.copy_(q.qweight)  # int8 -> float: exact
        return out.mul_(q.scale[:, None])  # float32 scale, rounded once into `dtype`
    half = cols // 2
    out[:, :half].copy_(q.qweight & 0x0F)
    out[:, half:].copy_(q.qweight >> 4)
    grouped = out.view(rows, q.scale.shape[1], -1)  # [N, K/G, G]
    grouped.mul_(q.scale[..., None]).add_(q.offset[..., None])
    return out


def codes(q: QuantizedMatrix) -> torch.Tensor:
    """The integer codes [N, K] (int32): int8 values, or 0..15 for 4 bits (kernel packing)."""
    import torch

    if q.bits == 8:
        return q.qweight.to(torch.int32)
    half = q.qweight.shape[1]
    out = torch.empty(q.qweight.shape[0], 2 * half, dtype=torch.int32, device=q.qweight.device)
    out[:, :half] = q.qweight & 0x0F
    out[:, half:] = q.qweight >> 4
    return out


def cat_rows(parts: list[QuantizedMatrix]) -> QuantizedMatrix:
    """Stack matrices of the same width and bits row-wise (gate rows, then up rows)."""
    import torch

    if len({(p.bits, p.shape[1], p.group_size) for p in parts}) != 1:
        raise ValueError("cat_rows: the parts differ in bits, width or group size")
    offset = None if parts[0].offset is None else torch.cat([p.offset for p in parts])
    return QuantizedMatrix(parts[0].bits, torch.cat([p.qweight for p in parts]),
                           torch.cat([p.scale for p in parts]), offset)


def max_error(q: QuantizedMatrix) -> torch.Tensor:
    """The stated bound [N, K] on |W - dequantize(q)|: half a step of the element's group."""
    rows, cols = q.shape
    scale = q.scale[:, None] if q.bits == 8 else q.scale.repeat_interleave(q.group_size, dim=1)
    return (scale / 2).expand(rows, cols)


# -- the shard's tensors ------------------------------------------------------------------------

def tensor_names(name: str, bits: int) -> list[str]:
    """The shard tensors that hold float tensor `name` quantised to `bits`."""
    return [name + s for s in (SUFFIXES if bits == 4 else SUFFIXES[:2])]


def layout(name: str, rows: int, cols: int, bits: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype code, shape) of each stored tensor of W [rows, cols] at `bits`.
    Raises ValueError when 4-bit rows do not pack (odd K)."""
    if bits == 8:
        return [(name + ".qweight", QWEIGHT_CODE[8], (rows, cols)),
                (name + ".scale", PARAM_CODE, (rows,))]
    groups = cols // group_size_for(cols)
    return [(name + ".qweight", QWEIGHT_CODE[4], (rows, cols // 2)),
            (name + ".scale", PARAM_CODE, (rows, groups)),
            (name + ".offset", PARAM_CODE, (rows, groups))]


def stored_tensors(q: QuantizedMatrix) -> list[torch.Tensor]:
    """q's tensors in `layout` order."""
    return [q.qweight, q.scale] + ([q.offset] if q.bits == 4 else [])


def from_stored(bits: int, tensors: list[torch.Tensor]) -> QuantizedMatrix:
    """The inverse of `stored_tensors`, shapes and dtypes checked. Raises ValueError."""
    import torch

    check_bits(bits)
    if bits == FULL_BITS or len(tensors) != len(SUFFIXES[: 3 if bits == 4 else 2]):
        raise ValueError(f"{len(tensors)} tensors do not hold a {bits}-bit matrix")
    qweight, scale = tensors[0], tensors[1].float()
    rows = qweight.shape[0] if qweight.dim() == 2 else -1
    if bits == 8:
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or tuple(scale.shape) != (rows,):
            raise ValueError(f"8-bit qweight {qweight.dtype} {tuple(qweight.shape)} and scale "
                             f"{tuple(scale.shape)} do not fit")
        return QuantizedMatrix(8, qweight, scale)
    offset = tensors[2].float()
    cols = 2 * qweight.shape[1] if qweight.dim() == 2 else 0
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or cols < 2:
        raise ValueError(f"4-bit qweight must be uint8 [N, K/2], not {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    groups = cols // group_size_for(cols)
    if tuple(scale.shape) != (rows, groups) or tuple(offset.shape) != (rows, groups):
        raise ValueError(f"4-bit scale {tuple(scale.shape)} / offset {tuple(offset.shape)} do not "
                         f"fit qweight {tuple(qweight.shape)} (groups of {cols // groups})")
    return QuantizedMatrix(4, qweight, scale, offset)

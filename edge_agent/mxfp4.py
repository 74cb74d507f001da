"""MXFP4 expert weights (published GPT-OSS checkpoints) -> floats, at load. Imports only torch.

A port of transformers' `integrations/mxfp4.py` `convert_moe_packed_tensors` for one expert:
each byte of `blocks` holds two 4-bit E2M1 codes (low nibble first), 32 values share one E8M0
scale byte (2 ** (byte - 127)), and the result is transposed to the [in, out] layout GPT-OSS
multiplies with (x @ W).

Shape legend: R = rows of the quantised matrix, G = groups of 32 values along its columns.
"""

from __future__ import annotations

import torch

# E2M1 code -> value (the code's top bit is the sign)
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_EXPONENT_BIAS = 127  # E8M0: the scale byte is a biased power-of-two exponent


def dequantize(blocks: torch.Tensor, scales: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks [R, G, 16] uint8 + scales [R, G] uint8 -> [G * 32, R] in `dtype` (the transpose of
    the [R, G * 32] matrix they encode), on their device."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, not "
                         f"{blocks.dtype}/{scales.dtype}")
    if blocks.dim() != 3 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not fit scales "
                         f"{tuple(scales.shape)}")
    rows, groups, group_bytes = blocks.shape
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    exponents = scales.to(torch.int32).reshape(rows * groups, 1) - SCALE_EXPONENT_BIAS
    codes = blocks.reshape(rows * groups, group_bytes)
    values = torch.empty(rows * groups, group_bytes * 2, dtype=dtype, device=blocks.device)
    values[:, 0::2] = lut[(codes & 0x0F).to(torch.int)]
    values[:, 1::2] = lut[(codes >> 4).to(torch.int)]
    torch.ldexp(values, exponents, out=values)  # exact: a power of two times a 2-bit mantissa
    return values.reshape(rows, groups * group_bytes * 2).t().contiguous()  # [G * 32, R]

"""Which device and compute dtype a program runs on: `--device auto` and `--dtype auto`.

torch is imported inside the functions: the rest of common/ stays importable without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common.dtypes import canonical_dtype
from common.errors import ShardError

if TYPE_CHECKING:
    import torch

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # the canonical names a model computes in


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when torch sees it (Jetson), else CPU. Raises ShardError for cuda when
    torch sees none."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ShardError("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, model_dtype: str | None = None,
                  device: torch.device | str | None = None) -> torch.dtype:
    """`name` (auto or a dtype name) -> a torch dtype. auto -> `model_dtype` (the model's, as
    its manifest names it; None: float32) on a GPU, float32 on a CPU (half-precision matmuls
    there are emulated on most CPUs: ~8x slower measured on the tiny model). Raises ShardError."""
    import torch

    if name == "auto":
        on_cpu = device is None or torch.device(device).type == "cpu"
        name = "float32" if on_cpu or model_dtype is None else str(model_dtype)
    name = canonical_dtype(name)
    if name not in COMPUTE_DTYPES:
        raise ShardError(f"unknown dtype {name!r} (auto, bfloat16, float16, float32)")
    return getattr(torch, name)

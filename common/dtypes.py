"""Float dtype names as users type them and as files store them: the one table every tool uses."""

from __future__ import annotations

# short name -> canonical (torch's) name
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# canonical name -> safetensors dtype code
SAFETENSORS_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
CODE_NAMES = {code: name for name, code in SAFETENSORS_CODES.items()}


def canonical_dtype(name: str) -> str:
    """'bf16' -> 'bfloat16'; canonical and unknown names are returned as they are."""
    return DTYPE_ALIASES.get(name, name)

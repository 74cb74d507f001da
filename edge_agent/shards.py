"""Load this box's own expert shard(s), and nothing else, checked against the manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property

import torch

from edge_agent import mxfp4
from edge_agent.expert_math import ExpertWeights
from shard_tool.dtypes import canonical_dtype
from shard_tool.errors import ShardError
from shard_tool.families import (DOWN, DOWN_BIAS, DOWN_BLOCKS, DOWN_SCALES, FAMILIES, GATE,
                                 GATE_UP, GATE_UP_BIAS, GATE_UP_BLOCKS, GATE_UP_SCALES, GPT_OSS,
                                 UP, ModelShape)
from shard_tool.manifest import Manifest, check_file, load_manifest
from shard_tool.safetensors_io import read_header, read_tensor

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}


@dataclass(frozen=True)
class LoadedExperts:
    manifest: Manifest
    weights: dict[int, dict[int, ExpertWeights]]  # expert id -> {MoE layer: its weights}
    device: torch.device
    dtype: torch.dtype
    shard_bytes: int

    @property
    def experts(self) -> list[int]:
        return sorted(self.weights)

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """The layers with routed experts, sorted: the only layers a request may name."""
        return tuple(self.manifest.moe_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.manifest.model["hidden_size"])

    @property
    def ffn_size(self) -> int:
        return int(self.manifest.model["ffn_size"])


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when torch sees it (Jetson), else CPU. Raises ShardError for cuda without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ShardError("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, manifest: Manifest, device: torch.device | None = None
                  ) -> torch.dtype:
    """auto -> the model's dtype on a GPU, float32 on a CPU (half-precision matmuls there are
    emulated on most CPUs: ~8x slower measured on the tiny model). Raises ShardError."""
    if name == "auto":
        on_cpu = device is None or torch.device(device).type == "cpu"
        name = "float32" if on_cpu else str(manifest.model.get("dtype", "float32"))
    name = canonical_dtype(name)
    if name not in COMPUTE_DTYPES:
        raise ShardError(f"unknown dtype {name!r} (auto, bfloat16, float16, float32)")
    return COMPUTE_DTYPES[name]


def missing_experts(folder: str, experts: list[int]) -> list[int]:
    """Experts whose shard file is not in `folder` yet (store mode waits for them)."""
    from shard_tool.manifest import expert_file_path

    if not os.path.exists(os.path.join(folder, "manifest.json")):
        return list(experts)
    return [q for q in experts if not os.path.exists(os.path.join(folder, expert_file_path(q)))]


def build_expert(parts: dict[str, torch.Tensor], shape: ModelShape, device: torch.device,
                 dtype: torch.dtype) -> ExpertWeights:
    """One expert of one layer from its shard tensors (by part, see shard_tool/families.py),
    on `device` in `dtype`. Raises ValueError when they do not form an expert."""
    def get(part: str) -> torch.Tensor:
        return parts[part].to(device=device, dtype=dtype)

    if shape.expert_kind == GPT_OSS:
        if GATE_UP_BLOCKS in parts:  # MXFP4: dequantised here, the shard keeps the codes
            gate_up = mxfp4.dequantize(parts[GATE_UP_BLOCKS].to(device),
                                       parts[GATE_UP_SCALES].to(device), dtype)  # [D, 2F]
            down = mxfp4.dequantize(parts[DOWN_BLOCKS].to(device),
                                    parts[DOWN_SCALES].to(device), dtype)  # [F, D]
        else:
            gate_up, down = get(GATE_UP), get(DOWN)
        return ExpertWeights(gate_up=gate_up, down=down, kind=GPT_OSS,
                             gate_up_bias=get(GATE_UP_BIAS), down_bias=get(DOWN_BIAS),
                             alpha=float(shape.swiglu_alpha), limit=float(shape.swiglu_limit))
    if GATE_UP in parts:  # fused on disk (Granite): gate rows, then up rows
        return ExpertWeights(gate_up=get(GATE_UP).contiguous(), down=get(DOWN).contiguous(),
                             activation=shape.activation)
    # as transformers fuses them at load: torch.cat([gate, up])
    return ExpertWeights(gate_up=torch.cat([get(GATE), get(UP)]).contiguous(),
                         down=get(DOWN).contiguous(), activation=shape.activation)


def load_experts(folder: str, experts: list[int], device: str = "auto",
                 dtype: str = "auto") -> LoadedExperts:
    """Check (size, sha256, tensor list) and load expert shards. Raises ShardError."""
    manifest = load_manifest(folder)
    family = FAMILIES.get(manifest.family)
    if family is None:
        raise ShardError(f"manifest family {manifest.family!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    try:
        shape = ModelShape.from_summary(manifest.model)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"manifest model summary is malformed ({type(e).__name__}: {e})") \
            from None
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, manifest, torch_device)
    rows = family.tensors(shape)
    weights: dict[int, dict[int, ExpertWeights]] = {}
    shard_bytes = 0
    for q in experts:
        if not 0 <= q < manifest.num_experts:
            raise ShardError(f"expert {q} is out of range: the model has "
                             f"{manifest.num_experts} experts")
        entry = manifest.expert_file(q)
        check_file(folder, entry)
        shard_bytes += entry.bytes
        tensors, _ = read_header(os.path.join(folder, entry.path))
        layers = {}
        for layer in shape.moe_layers:
            parts = {}
            for row in rows:
                name = row.shard_name(layer, q)
                info = tensors.get(name)
                if info is None:
                    raise ShardError(f"{entry.path}: tensor {name} is missing")
                if tuple(info.shape) != row.shape(shape):
                    raise ShardError(f"{entry.path}: {name} is {list(info.shape)}, "
                                     f"the config implies {list(row.shape(shape))}")
                parts[row.part] = read_tensor(info)
            try:
                layers[layer] = build_expert(parts, shape, torch_device, torch_dtype)
            except ValueError as e:
                raise ShardError(f"{entry.path}: layer {layer}: {e}") from None
        weights[q] = layers
    return LoadedExperts(manifest=manifest, weights=weights, device=torch_device,
                         dtype=torch_dtype, shard_bytes=shard_bytes)

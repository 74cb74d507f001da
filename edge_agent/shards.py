"""Load this box's own expert shard(s), and nothing else, checked against the manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from edge_agent.expert_math import ExpertWeights
from shard_tool.errors import ShardError
from shard_tool.families import FAMILIES
from shard_tool.manifest import Manifest, check_file, load_manifest
from shard_tool.safetensors_io import read_header, read_tensor

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class LoadedExperts:
    manifest: Manifest
    weights: dict[int, list[ExpertWeights]]  # expert id -> one ExpertWeights per layer
    device: torch.device
    dtype: torch.dtype
    shard_bytes: int

    @property
    def experts(self) -> list[int]:
        return sorted(self.weights)

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

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
    name = DTYPE_ALIASES.get(name, name)
    if name not in COMPUTE_DTYPES:
        raise ShardError(f"unknown dtype {name!r} (auto, bfloat16, float16, float32)")
    return COMPUTE_DTYPES[name]


def missing_experts(folder: str, experts: list[int]) -> list[int]:
    """Experts whose shard file is not in `folder` yet (store mode waits for them)."""
    from shard_tool.manifest import expert_file_path

    if not os.path.exists(os.path.join(folder, "manifest.json")):
        return list(experts)
    return [q for q in experts if not os.path.exists(os.path.join(folder, expert_file_path(q)))]


def load_experts(folder: str, experts: list[int], device: str = "auto",
                 dtype: str = "auto") -> LoadedExperts:
    """Check (size, sha256, tensor list) and load expert shards. Raises ShardError."""
    manifest = load_manifest(folder)
    family = FAMILIES.get(manifest.family)
    if family is None:
        raise ShardError(f"manifest family {manifest.family!r} is not supported")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, manifest, torch_device)
    hidden, ffn = int(manifest.model["hidden_size"]), int(manifest.model["ffn_size"])
    weights: dict[int, list[ExpertWeights]] = {}
    shard_bytes = 0
    for q in experts:
        if not 0 <= q < manifest.num_experts:
            raise ShardError(f"expert {q} is out of range: the model has "
                             f"{manifest.num_experts} experts")
        entry = manifest.expert_file(q)
        check_file(folder, entry)
        shard_bytes += entry.bytes
        tensors, _ = read_header(os.path.join(folder, entry.path))
        layers = []
        for layer in range(manifest.num_layers):
            w = {}
            for proj, shape in (("w1", (ffn, hidden)), ("w2", (hidden, ffn)),
                                ("w3", (ffn, hidden))):
                name = family.expert_tensor_name(layer, q, proj)
                info = tensors.get(name)
                if info is None:
                    raise ShardError(f"{entry.path}: tensor {name} is missing")
                if tuple(info.shape) != shape:
                    raise ShardError(f"{entry.path}: {name} is {list(info.shape)}, "
                                     f"the config implies {list(shape)}")
                w[proj] = read_tensor(info).to(device=torch_device, dtype=torch_dtype)
            layers.append(ExpertWeights.from_w123(w["w1"], w["w2"], w["w3"]))
        weights[q] = layers
    return LoadedExperts(manifest=manifest, weights=weights, device=torch_device,
                         dtype=torch_dtype, shard_bytes=shard_bytes)

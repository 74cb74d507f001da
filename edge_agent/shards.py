"""What this box holds: its own expert shard(s), loaded and checked against the manifest.

`load_experts` reads every layer-expert at start (edge_agent/shard_reader.py), or, with a memory
budget (`edge_agent --memory-budget`), those that fit, the rest loading on demand or on a hint
(edge_agent/residency.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch

from edge_agent.expert_math import ExpertWeights, KernelChoice, Scratch
from edge_agent.residency import ExpertStore, StoredLayers
from edge_agent.shard_reader import ExpertReader
from shard_tool.manifest import Manifest


@dataclass(frozen=True)
class LoadedExperts:
    manifest: Manifest
    weights: dict[int, Mapping[int, ExpertWeights]]  # expert id -> {MoE layer: its weights}
    device: torch.device
    dtype: torch.dtype
    shard_bytes: int
    scratch: Scratch | None = None  # the dequantising buffer (None: nothing is quantised)
    kernels: dict[int, KernelChoice] = field(default_factory=dict)  # bits -> how it multiplies
    # with a memory budget: the resident layer-experts and their loader (`weights[q][layer]`
    # then loads through it); None: every layer-expert is in `weights`, loaded at start
    store: ExpertStore | None = None

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

    @property
    def weight_bytes(self) -> int:
        """Bytes of expert weights held on the device, the dequantising scratch included."""
        if self.store is not None:
            held = self.store.resident_bytes
        else:
            held = sum(w.nbytes for layers in self.weights.values() for w in layers.values())
        return held + (self.scratch.nbytes if self.scratch is not None else 0)

    def sample_weights(self) -> ExpertWeights:
        """One layer-expert to measure with (the self-benchmark), without loading anything."""
        if self.store is not None:
            return self.store.any_resident()
        return self.weights[self.experts[0]][self.moe_layers[0]]


def load_experts(folder: str, experts: list[int], device: str = "auto",
                 dtype: str = "auto", quant_kernels: str = "auto",
                 memory_budget_bytes: int | None = None,
                 load_bytes_per_s: float = 0.0, prefetch_hints: str = "auto") -> LoadedExperts:
    """Check (size, sha256, tensor list) and load expert shards. Quantised layers stay
    quantised; `quant_kernels` auto|on|off says when torch's int8/int4 kernels multiply with them
    (expert_math.choose_kernel). With `memory_budget_bytes`, layer-experts beyond the budget stay
    in the shard and load on demand (ExpertStore; `load_bytes_per_s` emulates slow storage for
    those loads). Raises ShardError."""
    reader = ExpertReader(folder, experts, device, dtype, quant_kernels)
    if memory_budget_bytes is None:
        store = None
        weights = {q: {layer: reader.load(q, layer) for layer in reader.moe_layers}
                   for q in experts}
    else:
        store = ExpertStore(reader, experts, memory_budget_bytes, load_bytes_per_s,
                            prefetch_hints)
        weights = {q: StoredLayers(store, q) for q in experts}
    return LoadedExperts(manifest=reader.manifest, weights=weights, device=reader.device,
                         dtype=reader.dtype, shard_bytes=reader.shard_bytes,
                         scratch=reader.scratch if reader.scratch.nbytes or store else None,
                         kernels=reader.kernels, store=store)

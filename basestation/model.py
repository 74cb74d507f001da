"""The base station's model: transformers' own Mixtral classes, minus the experts.

Built on the meta device (no expert weights are ever allocated), each sparse-MoE block swapped
for a `RemoteMoeBlock` that keeps the router, then the base-station shard loaded with
`assign=True`. Attention, RoPE, KV cache, tokenizer, chat template and sampling stay the
library's.

Shape legend: B = batch, S = sequence, T = tokens (B*S), H = hidden, E = experts, K = top-k.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from basestation.selector import Selection, select_experts
from edge_agent.shards import resolve_device, resolve_dtype
from shard_tool.errors import ShardError
from shard_tool.families import FAMILIES
from shard_tool.manifest import BASESTATION_DIR, Manifest, check_file, load_manifest



class MoeRuntime(Protocol):
    """What a RemoteMoeBlock asks of the rest of the base station, once per layer call."""

    theta: float

    def latency_s(self, layer: int, tokens: int) -> torch.Tensor:
        """[E] expected seconds for each expert's device to return this layer's tokens."""

    def available(self) -> torch.Tensor | None:
        """[E] bool: experts that have a live agent (or fallback), None when all do."""

    def run_experts(self, layer: int, x: torch.Tensor, w: torch.Tensor,
                    selection: Selection) -> torch.Tensor:
        """x [T, H], router probabilities w [T, E] -> weighted sum of the experts [T, H]."""


class RemoteMoeBlock(nn.Module):
    """Drop-in for MixtralSparseMoeBlock: router here, expert FFNs on the agents."""

    def __init__(self, gate: nn.Module, layer: int, top_k: int, runtime: MoeRuntime):
        super().__init__()
        self.gate = gate  # MixtralTopKRouter: same module, same weights, same name
        self.layer = layer
        self.top_k = top_k
        self.runtime = runtime

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # [T, H]
        router_logits = self.gate(x)[0]  # [T, E]; through the module so output hooks see it
        w = F.softmax(router_logits.float(), dim=-1)  # [T, E], exactly as MixtralTopKRouter
        t = self.runtime.latency_s(self.layer, x.shape[0])  # [E]
        selection = select_experts(w, t, self.runtime.theta, self.top_k,
                                   self.runtime.available())
        out = self.runtime.run_experts(self.layer, x, w, selection)  # [T, H]
        return out.reshape(batch, seq, hidden)


def combine(num_tokens: int, hidden: int, dtype: torch.dtype, selection: Selection,
            expert_outputs: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]
            ) -> torch.Tensor:
    """Weighted sum of expert outputs, in transformers' order (ascending expert id,
    index_add_), so an unmodified selection reproduces MixtralExperts' arithmetic.

    expert_outputs: [(expert id, token_idx [n], slot [n], output [n, H])].
    """
    device = selection.weights.device
    out = torch.zeros(num_tokens, hidden, dtype=dtype, device=device)  # [T, H]
    ordered = sorted(expert_outputs, key=lambda item: item[0])
    if num_tokens == 1:  # decode: the same products and sums, weights read once as floats
        weights = selection.weights[0].tolist()  # float32 values, exact as Python floats
        for _, _, slot, y in ordered:
            out += (y.to(device) * weights[int(slot)]).to(dtype)
        return out
    for _, token_idx, slot, y in ordered:
        weighted = y.to(device) * selection.weights[token_idx, slot, None]
        out.index_add_(0, token_idx, weighted.to(dtype))
    return out


SMALL_SELECTION = 64  # (token, slot) pairs up to which grouping in Python beats torch ops


def tokens_per_expert(selection: Selection) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """expert id -> (token_idx, slot) of the kept (token, slot) pairs routed to it, in
    ascending expert id, token order kept within an expert."""
    if selection.keep.numel() <= SMALL_SELECTION:  # decode: a token or a few
        lists: dict[int, tuple[list[int], list[int]]] = {}
        for token, (row_experts, row_keep) in enumerate(zip(selection.experts.tolist(),
                                                            selection.keep.tolist())):
            for slot, (expert, kept) in enumerate(zip(row_experts, row_keep)):
                if kept:
                    lists.setdefault(expert, ([], []))[0].append(token)
                    lists[expert][1].append(slot)
        device = selection.keep.device
        return {expert: (torch.tensor(lists[expert][0], device=device),
                         torch.tensor(lists[expert][1], device=device))
                for expert in sorted(lists)}
    token_idx, slot = torch.nonzero(selection.keep, as_tuple=True)
    experts = selection.experts[token_idx, slot]
    order = torch.argsort(experts, stable=True)  # token order kept within an expert
    token_idx, slot, experts = token_idx[order], slot[order], experts[order]
    ids, counts = torch.unique_consecutive(experts, return_counts=True)
    groups = {}
    for expert, t_idx, s_idx in zip(ids.tolist(), token_idx.split(counts.tolist()),
                                    slot.split(counts.tolist())):
        groups[expert] = (t_idx, s_idx)
    return groups


@dataclass
class BaseModel:
    model: nn.Module  # MixtralForCausalLM with RemoteMoeBlocks
    tokenizer: object
    manifest: Manifest
    config: object
    dtype: torch.dtype
    device: torch.device


def load_base_model(shards: str, runtime: MoeRuntime, dtype: str = "auto",
                    device: str = "auto", verify: bool = True) -> BaseModel:
    """Load the base-station shard of split folder `shards`. Raises ShardError."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    manifest = load_manifest(shards)
    family = FAMILIES.get(manifest.family)
    if family is None:
        raise ShardError(f"model family {manifest.family!r} is not supported")
    base_entries = [e for e in manifest.files if e.role == "basestation"]
    if verify:
        for entry in base_entries:
            check_file(shards, entry)
    base_dir = os.path.join(shards, BASESTATION_DIR)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, manifest, torch_device)
    config = AutoConfig.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    for index, layer in enumerate(model.model.layers):
        layer.mlp = RemoteMoeBlock(layer.mlp.gate, index, config.num_experts_per_tok, runtime)

    weights_entry = next(e for e in base_entries if e.tensors)
    on_disk = load_file(os.path.join(shards, weights_entry.path), device=str(torch_device))
    state = {family.in_memory_name(name): t.to(torch_dtype) for name, t in on_disk.items()}
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ShardError(f"base-station shard does not fit the model class: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    # buffers computed at init (rotary inv_freq) stayed on meta: rebuild them for real
    with torch.device(torch_device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise ShardError(f"tensors left unloaded: {leftovers[:5]}")
    model.eval()
    return BaseModel(model=model, tokenizer=tokenizer, manifest=manifest, config=config,
                     dtype=torch_dtype, device=torch_device)

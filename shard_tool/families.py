"""Checkpoint name tables: one per model family.

A table maps every on-disk tensor name of a family to a role (what it is, which layer, which
expert) and back, and gives the shape each name must have under the checkpoint's config.json.
Adding Qwen-MoE or OLMoE means adding one `Family` here; nothing else in the tool names tensors.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

# Roles. Only EXPERT tensors leave the base station.
EMBED, ATTENTION, NORM, ROUTER, EXPERT, LM_HEAD = (
    "embed", "attention", "norm", "router", "expert", "lm_head")


@dataclass(frozen=True)
class ModelShape:
    """The config facts the shard tool needs, in family-neutral names."""

    model_type: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    ffn_size: int  # one expert's intermediate size
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool

    def summary(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TensorRole:
    role: str
    template: str  # the table entry this name matched
    layer: int | None = None
    expert: int | None = None
    proj: str | None = None  # expert projection: w1 | w2 | w3


@dataclass(frozen=True)
class Entry:
    """One row of a family table: a name template, its role and its shape under a config."""

    template: str  # placeholders: {layer}, {expert}
    role: str
    shape: Callable[[ModelShape], tuple[int, ...]]
    proj: str | None = None
    optional: Callable[[ModelShape], bool] = lambda s: False  # absent is fine when true

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.template

    @property
    def per_expert(self) -> bool:
        return "{expert}" in self.template


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    shape_from_config: Callable[[Mapping], ModelShape]
    entries: tuple[Entry, ...]
    expert_projs: tuple[str, ...]  # the projections that make one expert, in call order
    # on-disk -> in-memory name fragments (transformers renames some modules at load time)
    in_memory_renames: tuple[tuple[str, str], ...] = ()
    _patterns: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self):
        for entry in self.entries:
            regex = re.escape(entry.template)
            regex = regex.replace(r"\{layer\}", r"(?P<layer>\d+)")
            regex = regex.replace(r"\{expert\}", r"(?P<expert>\d+)")
            self._patterns.append((re.compile(f"^{regex}$"), entry))

    def parse(self, name: str) -> TensorRole | None:
        """The role of a checkpoint tensor name, or None when the table does not know it."""
        for pattern, entry in self._patterns:
            match = pattern.match(name)
            if match:
                groups = match.groupdict()
                return TensorRole(
                    role=entry.role, template=entry.template,
                    layer=int(groups["layer"]) if "layer" in groups else None,
                    expert=int(groups["expert"]) if "expert" in groups else None,
                    proj=entry.proj)
        return None

    def format(self, role: TensorRole) -> str:
        """The checkpoint name of a role: the inverse of `parse`."""
        return role.template.format(layer=role.layer, expert=role.expert)

    def in_memory_name(self, name: str) -> str:
        """The name transformers' model class gives this checkpoint tensor in memory."""
        for disk, memory in self.in_memory_renames:
            name = name.replace(disk, memory)
        return name

    def entry(self, template: str) -> Entry:
        return next(e for e in self.entries if e.template == template)

    def expected(self, shape: ModelShape) -> dict[str, tuple[tuple[int, ...], bool]]:
        """Every tensor name this config implies -> (shape, optional)."""
        names = {}
        for entry in self.entries:
            layers = range(shape.num_layers) if entry.per_layer else [None]
            experts = range(shape.num_experts) if entry.per_expert else [None]
            for layer in layers:
                for expert in experts:
                    name = entry.template.format(layer=layer, expert=expert)
                    names[name] = (entry.shape(shape), entry.optional(shape))
        return names

    def expert_tensor_name(self, layer: int, expert: int, proj: str) -> str:
        entry = next(e for e in self.entries if e.role == EXPERT and e.proj == proj)
        return entry.template.format(layer=layer, expert=expert)


def _mixtral_shape(config: Mapping) -> ModelShape:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or hidden // heads
    return ModelShape(
        model_type=str(config["model_type"]),
        num_layers=int(config["num_hidden_layers"]),
        num_experts=int(config["num_local_experts"]),
        top_k=int(config["num_experts_per_tok"]),
        hidden_size=hidden,
        ffn_size=int(config["intermediate_size"]),
        vocab_size=int(config["vocab_size"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


_L = "model.layers.{layer}."
_MOE = _L + "block_sparse_moe."

MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    shape_from_config=_mixtral_shape,
    expert_projs=("w1", "w2", "w3"),
    in_memory_renames=((".block_sparse_moe.", ".mlp."),),  # transformers >= 5
    entries=(
        Entry("model.embed_tokens.weight", EMBED, lambda s: (s.vocab_size, s.hidden_size)),
        Entry(_L + "input_layernorm.weight", NORM, lambda s: (s.hidden_size,)),
        Entry(_L + "self_attn.q_proj.weight", ATTENTION,
              lambda s: (s.num_heads * s.head_dim, s.hidden_size)),
        Entry(_L + "self_attn.k_proj.weight", ATTENTION,
              lambda s: (s.num_kv_heads * s.head_dim, s.hidden_size)),
        Entry(_L + "self_attn.v_proj.weight", ATTENTION,
              lambda s: (s.num_kv_heads * s.head_dim, s.hidden_size)),
        Entry(_L + "self_attn.o_proj.weight", ATTENTION,
              lambda s: (s.hidden_size, s.num_heads * s.head_dim)),
        Entry(_L + "post_attention_layernorm.weight", NORM, lambda s: (s.hidden_size,)),
        Entry(_MOE + "gate.weight", ROUTER, lambda s: (s.num_experts, s.hidden_size)),
        # SwiGLU expert: w2(silu(w1 x) * w3 x)
        Entry(_MOE + "experts.{expert}.w1.weight", EXPERT,
              lambda s: (s.ffn_size, s.hidden_size), proj="w1"),
        Entry(_MOE + "experts.{expert}.w2.weight", EXPERT,
              lambda s: (s.hidden_size, s.ffn_size), proj="w2"),
        Entry(_MOE + "experts.{expert}.w3.weight", EXPERT,
              lambda s: (s.ffn_size, s.hidden_size), proj="w3"),
        Entry("model.norm.weight", NORM, lambda s: (s.hidden_size,)),
        Entry("lm_head.weight", LM_HEAD, lambda s: (s.vocab_size, s.hidden_size),
              optional=lambda s: s.tie_word_embeddings),
    ),
)

FAMILIES: dict[str, Family] = {MIXTRAL.name: MIXTRAL}


def family_for_config(config: Mapping) -> Family | None:
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None

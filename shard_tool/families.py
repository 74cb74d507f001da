"""Routed-expert name tables: one per model family.

A table lists the checkpoint tensors that make the ROUTED experts of one MoE layer, what each is
to the agent (its `part`), one expert's shape under config.json, and for tensors fused on disk
(an expert axis first) the per-expert name the slice gets in the expert shard. Everything else
(attention, norms, routers, shared experts, dense MLPs) goes to the base station unchanged.
Adding a family means adding one table and one config reader here.

Shape legend: E = routed experts, H = hidden size, F = one routed expert's intermediate size.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

# Expert kinds: how the agent computes one expert (edge_agent/expert_math.py).
SWIGLU, GPT_OSS = "swiglu", "gpt_oss"
# Parts: what a tensor is to the agent. swiglu: gate [F,H], up [F,H] or gate_up [2F,H] (gate rows
# then up rows), down [H,F]. gpt_oss: gate_up [H,2F] (gate/up interleaved), down [F,H], biases,
# or MXFP4 blocks/scales of [2F,H] and [H,F] (transposed at dequantisation).
GATE, UP, GATE_UP, DOWN = "gate", "up", "gate_up", "down"
GATE_UP_BIAS, DOWN_BIAS = "gate_up_bias", "down_bias"
GATE_UP_BLOCKS, GATE_UP_SCALES = "gate_up_blocks", "gate_up_scales"
DOWN_BLOCKS, DOWN_SCALES = "down_blocks", "down_scales"
MXFP4 = "mxfp4"
MXFP4_BLOCK_VALUES = 32  # values per scale; 16 bytes of two 4-bit values each


@dataclass(frozen=True)
class ModelShape:
    """The config facts the shard tool needs, in family-neutral names (the manifest's `model`)."""

    model_type: str
    num_layers: int
    num_experts: int  # routed experts per MoE layer
    top_k: int
    hidden_size: int
    ffn_size: int  # one routed expert's intermediate size
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    moe_layers: tuple[int, ...]  # layers with routed experts, sorted
    expert_kind: str  # SWIGLU | GPT_OSS
    activation: str  # config.hidden_act
    swiglu_alpha: float | None = None  # gpt_oss only
    swiglu_limit: float | None = None  # gpt_oss only
    expert_quant: str | None = None  # MXFP4 when the experts are stored as blocks + scales

    def summary(self) -> dict:
        """JSON-ready; keys a family does not use are left out."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        out["moe_layers"] = list(self.moe_layers)
        return out

    @classmethod
    def from_summary(cls, model: Mapping) -> "ModelShape":
        """The inverse of `summary` (a manifest's `model`; extra keys such as dtype ignored).
        Manifests from before moe_layers existed are Mixtral: every layer, swiglu, silu.
        Raises KeyError/TypeError/ValueError when malformed."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in model.items() if k in names}
        fields["moe_layers"] = tuple(int(i) for i in fields.get(
            "moe_layers", range(int(model["num_layers"]))))
        fields.setdefault("expert_kind", SWIGLU)
        fields.setdefault("activation", "silu")
        return cls(**fields)


@dataclass(frozen=True)
class ExpertTensor:
    """One row of a family table: a routed-expert tensor of one MoE layer."""

    disk: str  # on-disk template: {layer}, plus {expert} when the checkpoint stores one per expert
    part: str
    shape: Callable[[ModelShape], tuple[int, ...]]  # ONE expert's shape
    shard: str = ""  # fused on disk: the per-expert template ({layer}, {expert}) in the shard
    quants: tuple[str | None, ...] = (None,)  # the checkpoints' quant_method it applies to
    dtype: str | None = None  # required safetensors dtype (MXFP4 blocks and scales: U8)

    @property
    def fused(self) -> bool:
        """True when one tensor holds every expert along its leading axis."""
        return "{expert}" not in self.disk

    def disk_name(self, layer: int, expert: int) -> str:
        return self.disk.format(layer=layer, expert=expert)

    def shard_name(self, layer: int, expert: int) -> str:
        return (self.shard or self.disk).format(layer=layer, expert=expert)

    def disk_shape(self, shape: ModelShape) -> tuple[int, ...]:
        one = self.shape(shape)
        return (shape.num_experts, *one) if self.fused else one


@dataclass(frozen=True)
class ExpertRef:
    """What `Family.parse` found: a table row at one layer (and one expert unless fused)."""

    tensor: ExpertTensor
    layer: int
    expert: int | None


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    shape_from_config: Callable[[Mapping], ModelShape]  # raises KeyError/TypeError/ValueError
    experts: tuple[ExpertTensor, ...]
    # a name matching one of these is a routed expert: it must be in `experts`, or the split
    # stops (so an unknown layout never leaks experts into the base-station shard)
    expert_markers: tuple[str, ...] = (r"\.experts\.",)
    _patterns: list = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self):
        for tensor in self.experts:
            regex = re.escape(tensor.disk)
            regex = regex.replace(r"\{layer\}", r"(?P<layer>\d+)")
            regex = regex.replace(r"\{expert\}", r"(?P<expert>\d+)")
            self._patterns.append((re.compile(f"^{regex}$"), tensor))

    def parse(self, name: str) -> ExpertRef | None:
        """The table row of a checkpoint tensor name, or None when it is not a routed expert."""
        for pattern, tensor in self._patterns:
            match = pattern.match(name)
            if match:
                expert = match.groupdict().get("expert")
                return ExpertRef(tensor, int(match["layer"]),
                                 int(expert) if expert is not None else None)
        return None

    def looks_like_expert(self, name: str) -> bool:
        """True for any name in a routed-expert place, known to the table or not."""
        return any(re.search(marker, name) for marker in self.expert_markers)

    def tensors(self, shape: ModelShape) -> tuple[ExpertTensor, ...]:
        """The rows that apply to this checkpoint (plain or quantised experts)."""
        return tuple(t for t in self.experts if shape.expert_quant in t.quants)

    def quant_methods(self) -> set[str | None]:
        """The checkpoints' quant_method values this table knows (None: plain floats)."""
        return {q for t in self.experts for q in t.quants}

    def expected(self, shape: ModelShape) -> dict[str, tuple[tuple[int, ...], str | None]]:
        """Every routed-expert tensor name this config implies -> (on-disk shape, dtype or None)."""
        names = {}
        for tensor in self.tensors(shape):
            for layer in shape.moe_layers:
                for expert in ([0] if tensor.fused else range(shape.num_experts)):
                    names[tensor.disk_name(layer, expert)] = (tensor.disk_shape(shape),
                                                              tensor.dtype)
        return names


# -- config readers ----------------------------------------------------------------------------

def _first(config: Mapping, *keys: str, default=KeyError):
    """The first of `keys` set in config.json (transformers aliases some, e.g. num_experts)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is KeyError:
        raise KeyError(keys[0])
    return default


def _every_layer(config: Mapping, num_layers: int) -> list[int]:
    return list(range(num_layers))


def _qwen_moe_layers(config: Mapping, num_layers: int) -> list[int]:
    # modeling_qwen2_moe / qwen3_moe DecoderLayer: the other layers hold a dense MLP
    dense = set(config.get("mlp_only_layers") or [])
    step = int(config.get("decoder_sparse_step") or 1)
    return [i for i in range(num_layers) if i not in dense and (i + 1) % step == 0]


def _deepseek_moe_layers(default_dense: int) -> Callable[[Mapping, int], list[int]]:
    # modeling_deepseek_v2 / v3 DecoderLayer: the first `first_k_dense_replace` layers are dense
    def layers(config: Mapping, num_layers: int) -> list[int]:
        return list(range(int(_first(config, "first_k_dense_replace", default=default_dense)),
                          num_layers))
    return layers


def _expert_quant(config: Mapping) -> str | None:
    quant = config.get("quantization_config")
    if quant is None:
        return None
    return str(quant.get("quant_method")) if isinstance(quant, Mapping) else str(quant)


def _reader(experts_keys: tuple[str, ...], ffn_key: str,
            moe_layers: Callable[[Mapping, int], list[int]] = _every_layer,
            kind: str = SWIGLU) -> Callable[[Mapping], ModelShape]:
    def read(config: Mapping) -> ModelShape:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        num_layers = int(config["num_hidden_layers"])
        extra = {}
        if kind == GPT_OSS:  # defaults of GptOssConfig
            extra = dict(swiglu_alpha=float(_first(config, "swiglu_alpha", default=1.702)),
                         swiglu_limit=float(_first(config, "swiglu_limit", default=7.0)))
        return ModelShape(
            model_type=str(config["model_type"]),
            num_layers=num_layers,
            num_experts=int(_first(config, *experts_keys)),
            top_k=int(config["num_experts_per_tok"]),
            hidden_size=hidden,
            ffn_size=int(config[ffn_key]),
            vocab_size=int(config["vocab_size"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            moe_layers=tuple(sorted(moe_layers(config, num_layers))),
            expert_kind=kind,
            activation=str(config.get("hidden_act") or "silu"),
            expert_quant=_expert_quant(config),
            **extra)
    return read


# -- the tables ----------------------------------------------------------------------------------

_L = "model.layers.{layer}."
_F_H = lambda s: (s.ffn_size, s.hidden_size)  # noqa: E731
_H_F = lambda s: (s.hidden_size, s.ffn_size)  # noqa: E731


def _per_expert(prefix: str, gate: str, up: str, down: str) -> tuple[ExpertTensor, ...]:
    """SwiGLU experts stored one tensor per expert and projection (the shard keeps the names)."""
    return (ExpertTensor(f"{prefix}experts.{{expert}}.{gate}.weight", GATE, _F_H),
            ExpertTensor(f"{prefix}experts.{{expert}}.{up}.weight", UP, _F_H),
            ExpertTensor(f"{prefix}experts.{{expert}}.{down}.weight", DOWN, _H_F))


MIXTRAL = Family(
    name="mixtral",
    model_types=("mixtral",),
    shape_from_config=_reader(("num_local_experts", "num_experts"), "intermediate_size"),
    experts=_per_expert(_L + "block_sparse_moe.", gate="w1", up="w3", down="w2"),
)

PHIMOE = Family(
    name="phimoe",
    model_types=("phimoe",),
    shape_from_config=_reader(("num_local_experts", "num_experts"), "intermediate_size"),
    experts=_per_expert(_L + "block_sparse_moe.", gate="w1", up="w3", down="w2"),
)

QWEN2_MOE = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    shape_from_config=_reader(("num_experts", "num_local_experts"), "moe_intermediate_size",
                              _qwen_moe_layers),
    experts=_per_expert(_L + "mlp.", gate="gate_proj", up="up_proj", down="down_proj"),
)

QWEN3_MOE = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    shape_from_config=_reader(("num_experts", "num_local_experts"), "moe_intermediate_size",
                              _qwen_moe_layers),
    experts=_per_expert(_L + "mlp.", gate="gate_proj", up="up_proj", down="down_proj"),
)

OLMOE = Family(
    name="olmoe",
    model_types=("olmoe",),
    shape_from_config=_reader(("num_experts", "num_local_experts"), "intermediate_size"),
    experts=_per_expert(_L + "mlp.", gate="gate_proj", up="up_proj", down="down_proj"),
)

DEEPSEEK_V2 = Family(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    shape_from_config=_reader(("n_routed_experts", "num_experts"), "moe_intermediate_size",
                              _deepseek_moe_layers(default_dense=0)),
    experts=_per_expert(_L + "mlp.", gate="gate_proj", up="up_proj", down="down_proj"),
)

DEEPSEEK_V3 = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    shape_from_config=_reader(("n_routed_experts", "num_local_experts"), "moe_intermediate_size",
                              _deepseek_moe_layers(default_dense=3)),
    experts=_per_expert(_L + "mlp.", gate="gate_proj", up="up_proj", down="down_proj"),
)

# Granite keeps every expert of a layer in two fused tensors: input_linear [E, 2F, H] (gate rows,
# then up rows) and output_linear [E, H, F]. The split slices them per expert.
_GRANITE = _L + "block_sparse_moe."
_GRANITE_EXPERTS = (
    ExpertTensor(_GRANITE + "input_linear.weight", GATE_UP,
                 lambda s: (2 * s.ffn_size, s.hidden_size),
                 shard=_GRANITE + "experts.{expert}.input_linear.weight"),
    ExpertTensor(_GRANITE + "output_linear.weight", DOWN, _H_F,
                 shard=_GRANITE + "experts.{expert}.output_linear.weight"),
)
_GRANITE_MARKERS = (r"\.experts\.", r"\.block_sparse_moe\.(input|output)_linear\.")

GRANITEMOE = Family(
    name="granitemoe",
    model_types=("granitemoe",),
    shape_from_config=_reader(("num_local_experts", "num_experts"), "intermediate_size"),
    experts=_GRANITE_EXPERTS,
    expert_markers=_GRANITE_MARKERS,
)

GRANITEMOESHARED = Family(
    name="granitemoeshared",
    model_types=("granitemoeshared",),
    shape_from_config=_reader(("num_local_experts", "num_experts"), "intermediate_size"),
    experts=_GRANITE_EXPERTS,
    expert_markers=_GRANITE_MARKERS,
)

# GPT-OSS fuses experts as the model computes them: gate_up_proj [E, H, 2F] (x @ W, gate and up
# interleaved on the last axis), down_proj [E, F, H], each with a bias. Published checkpoints store
# the two weights in MXFP4 instead: blocks [E, rows, cols/32, 16] + scales [E, rows, cols/32] of
# the untransposed [2F, H] and [H, F] (transformers' integrations/mxfp4.py); biases stay float.
_GPT = _L + "mlp.experts."


def _gpt_oss_row(name: str, part: str, shape, quants: tuple = (None,),
                 dtype: str | None = None) -> ExpertTensor:
    return ExpertTensor(_GPT + name, part, shape, shard=_GPT + "{expert}." + name, quants=quants,
                        dtype=dtype)


def _mxfp4_blocks(rows, cols):
    return lambda s: (rows(s), cols(s) // MXFP4_BLOCK_VALUES, MXFP4_BLOCK_VALUES // 2)


def _mxfp4_scales(rows, cols):
    return lambda s: (rows(s), cols(s) // MXFP4_BLOCK_VALUES)


_2F = lambda s: 2 * s.ffn_size  # noqa: E731
_H = lambda s: s.hidden_size  # noqa: E731
_F = lambda s: s.ffn_size  # noqa: E731
_ANY = (None, MXFP4)

GPT_OSS_FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    shape_from_config=_reader(("num_local_experts", "num_experts"), "intermediate_size",
                              kind=GPT_OSS),
    experts=(
        _gpt_oss_row("gate_up_proj", GATE_UP, lambda s: (s.hidden_size, 2 * s.ffn_size)),
        _gpt_oss_row("gate_up_proj_bias", GATE_UP_BIAS, lambda s: (2 * s.ffn_size,), _ANY),
        _gpt_oss_row("down_proj", DOWN, lambda s: (s.ffn_size, s.hidden_size)),
        _gpt_oss_row("down_proj_bias", DOWN_BIAS, lambda s: (s.hidden_size,), _ANY),
        _gpt_oss_row("gate_up_proj_blocks", GATE_UP_BLOCKS, _mxfp4_blocks(_2F, _H), (MXFP4,), "U8"),
        _gpt_oss_row("gate_up_proj_scales", GATE_UP_SCALES, _mxfp4_scales(_2F, _H), (MXFP4,), "U8"),
        _gpt_oss_row("down_proj_blocks", DOWN_BLOCKS, _mxfp4_blocks(_H, _F), (MXFP4,), "U8"),
        _gpt_oss_row("down_proj_scales", DOWN_SCALES, _mxfp4_scales(_H, _F), (MXFP4,), "U8"),
    ),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (
    MIXTRAL, QWEN2_MOE, QWEN3_MOE, OLMOE, DEEPSEEK_V2, DEEPSEEK_V3, GPT_OSS_FAMILY, PHIMOE,
    GRANITEMOE, GRANITEMOESHARED)}


def family_for_config(config: Mapping) -> Family | None:
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    return None


def supported_model_types() -> list[str]:
    return sorted(t for family in FAMILIES.values() for t in family.model_types)

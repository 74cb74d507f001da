"""The base station's model: transformers' own model class of the family, minus the routed experts.

Built on the meta device (no routed-expert weight is ever allocated). Routers, shared experts,
dense layers, attention, norms, KV cache, tokenizer, chat template and sampling stay the
library's; only the routed experts' computation is replaced, through transformers' experts
extension point (`ExpertsInterface` + `set_experts_implementation`), so each family's own router
math produces the top-k that `basestation.moe_layer` acts on. The base-station shard keeps the
checkpoint's names; they are mapped to the model's with the library's own conversion table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from basestation.moe_layer import remote_experts_forward
from common.devices import resolve_device, resolve_dtype
from common.errors import ShardError
from shard_tool.manifest import BASESTATION_DIR, Manifest, check_file, load_manifest

EXPERTS_IMPLEMENTATION = "wdmoe_remote"


@dataclass
class BaseModel:
    model: nn.Module  # the family's ForCausalLM, routed experts remote
    tokenizer: object
    manifest: Manifest
    config: object
    dtype: torch.dtype
    device: torch.device
    moe_layers: tuple[int, ...]


def _register_experts_implementation() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, remote_experts_forward)


def routed_experts(model: nn.Module) -> dict[int, nn.Module]:
    """layer index -> the layer's routed-experts module (the ones the library's experts hook
    dispatches: `@use_experts_implementation` gives them `is_concatenated`)."""
    found = {}
    for index, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if hasattr(module, "is_concatenated") and hasattr(module, "num_experts"):
                found[index] = module
    return found


def _checkpoint_to_model_names(model: nn.Module, names) -> dict[str, str]:
    """On-disk name -> in-memory name, by the library's own conversion table (the renames it
    applies at load, e.g. Mixtral's block_sparse_moe -> mlp, Granite's router.layer -> router)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta_state = model.state_dict()
    return {name: rename_source_key(name, renamings, converters, model.base_model_prefix,
                                    meta_state)[0] for name in names}


def _rebuild_meta_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Buffers computed at init (rotary inv_freq) stayed on meta: rebuild their modules."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            with torch.device(device):
                setattr(parent, child, type(module)(config=config))


def load_base_model(shards: str, runtime, dtype: str = "auto", device: str = "auto",
                    verify: bool = True) -> BaseModel:
    """Load the base-station shard of split folder `shards`; every routed-experts module calls
    `runtime.forward(layer, x, top_k_index, top_k_weights)`. Raises ShardError."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    manifest = load_manifest(shards)
    base_entries = [e for e in manifest.files if e.role == "basestation"]
    if verify:
        for entry in base_entries:
            check_file(shards, entry)
    base_dir = os.path.join(shards, BASESTATION_DIR)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, manifest.model.get("dtype"), torch_device)
    config = AutoConfig.from_pretrained(base_dir)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    _register_experts_implementation()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    experts = routed_experts(model)
    moe_layers = tuple(int(i) for i in manifest.model.get("moe_layers", sorted(experts)))
    if tuple(sorted(experts)) != moe_layers:
        raise ShardError(f"the model class has routed experts in layers {sorted(experts)}, the "
                         f"manifest says {list(moe_layers)}")
    for index, module in experts.items():
        for name in list(module._parameters):  # never allocated: the agents hold them
            delattr(module, name)
        module.wdmoe_layer = index
        module.wdmoe_runtime = runtime
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)

    weights_entry = next(e for e in base_entries if e.tensors)
    on_disk = load_file(os.path.join(shards, weights_entry.path), device=str(torch_device))
    names = _checkpoint_to_model_names(model, on_disk)
    state = {names[name]: t.to(torch_dtype) if t.is_floating_point() else t
             for name, t in on_disk.items()}
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ShardError(f"base-station shard does not fit the model class: missing "
                         f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}")
    _rebuild_meta_buffers(model, config, torch_device)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise ShardError(f"tensors left unloaded: {leftovers[:5]}")
    model.eval()
    return BaseModel(model=model, tokenizer=tokenizer, manifest=manifest, config=config,
                     dtype=torch_dtype, device=torch_device, moe_layers=moe_layers)

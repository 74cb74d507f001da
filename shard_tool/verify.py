"""`shard_tool verify` and `shard_tool inspect`: check and describe a split folder."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext

from shard_tool.errors import ShardError
from shard_tool.manifest import Manifest, check_file, load_manifest
from shard_tool.safetensors_io import DTYPE_BYTES

# What `inspect` assumes when it sizes a device's working memory.
PREFILL_TOKENS = 4096  # one layer's prompt sent to an expert at once
CONTEXT_TOKENS = 4096  # KV cache the base station keeps


def verify(folder: str, progress: bool = False) -> Manifest:
    """Re-hash every file the manifest lists and check its tensors. Raises ShardError."""
    manifest = load_manifest(folder)
    total_bytes = sum(entry.bytes for entry in manifest.files)
    if progress:
        from tqdm import tqdm

        bar_context = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                           desc="verify", file=sys.stderr)
    else:
        bar_context = nullcontext(None)
    with bar_context as bar:
        for entry in manifest.files:
            check_file(folder, entry, bar.update if bar is not None else lambda n: None)
    return manifest


def _element_bytes(manifest: Manifest) -> int:
    return DTYPE_BYTES.get({"bfloat16": "BF16", "float16": "F16"}.get(
        manifest.model["dtype"], "F32"), 4)


def weight_memory_bytes(manifest: Manifest, entry) -> int:
    """Bytes the shard's weights take on its device: its size, or for MXFP4 experts (the agent
    dequantises at load) three [H, F] matrices and two biases per MoE layer in the model dtype."""
    model = manifest.model
    if entry.role != "expert" or not model.get("expert_quant"):
        return entry.bytes
    hidden, ffn = model["hidden_size"], model["ffn_size"]
    per_layer = 3 * hidden * ffn + 2 * ffn + hidden
    return len(manifest.moe_layers) * per_layer * _element_bytes(manifest)


def working_memory_bytes(manifest: Manifest, role: str) -> int:
    """Activation/KV memory beside the weights for one device of `role` (see constants)."""
    model = manifest.model
    element_bytes = _element_bytes(manifest)
    if role == "expert":  # x, w1 x, w3 x, output for a prefill batch, one layer at a time
        per_token = 2 * model["hidden_size"] + 2 * model["ffn_size"]
        return PREFILL_TOKENS * per_token * element_bytes
    kv_per_token = 2 * model["num_layers"] * model["num_kv_heads"] * model["head_dim"]
    return CONTEXT_TOKENS * kv_per_token * element_bytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def inspect_table(manifest: Manifest) -> str:
    model = manifest.model
    lines = [
        f"{manifest.family}: {model['num_layers']} layers ({len(manifest.moe_layers)} MoE), "
        f"{model['num_experts']} experts (top-{model['top_k']}), hidden {model['hidden_size']}, "
        f"ffn {model['ffn_size']}, {model['dtype']}"
        f"{' (experts ' + model['expert_quant'] + ')' if model.get('expert_quant') else ''}; "
        f"fingerprint {manifest.fingerprint[:16]}",
        f"device memory = weights + working set ({PREFILL_TOKENS}-token prefill for an expert, "
        f"{CONTEXT_TOKENS}-token KV cache for the base station)",
        "",
        f"{'shard':<36} {'tensors':>7} {'bytes':>12} {'device memory':>14}",
    ]
    shards = [e for e in manifest.files if e.tensors]
    for entry in sorted(shards, key=lambda e: (e.role != "basestation", e.path)):
        device_bytes = (weight_memory_bytes(manifest, entry)
                        + working_memory_bytes(manifest, entry.role))
        aux_bytes = 0
        if entry.role == "basestation":
            aux_bytes = sum(e.bytes for e in manifest.files
                            if e.role == "basestation" and not e.tensors)
        lines.append(f"{entry.path:<36} {len(entry.tensors):>7} "
                     f"{format_bytes(entry.bytes + aux_bytes):>12} {format_bytes(device_bytes):>14}")
    total = sum(e.bytes for e in manifest.files)
    expert_bytes = [e.bytes for e in shards if e.role == "expert"]
    lines.append(f"{'total':<36} {sum(len(e.tensors) for e in shards):>7} "
                 f"{format_bytes(total):>12}")
    if expert_bytes:
        lines.append(f"largest expert shard {format_bytes(max(expert_bytes))}; "
                     f"the base station holds {format_bytes(total - sum(expert_bytes))} "
                     f"({100 * (total - sum(expert_bytes)) / total:.1f} % of the model)")
    return "\n".join(lines)


def files_in(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, fs in os.walk(folder) for f in fs)


__all__ = ["verify", "inspect_table", "ShardError", "files_in"]

"""`shard_tool verify` and `shard_tool inspect`: check and describe a split folder."""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext

from common.errors import ShardError
from shard_tool.families import FAMILIES, ModelShape
from shard_tool.manifest import (
    FULL_BITS,
    QUANTISED_PARTS,
    FileEntry,
    Manifest,
    check_file,
    load_manifest,
    stored_transposed,
)
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
            check_bits(manifest, entry)
            check_file(folder, entry, bar.update if bar is not None else lambda n: None)
    return manifest


def check_bits(manifest: Manifest, entry: FileEntry) -> None:
    """An expert file's tensor list holds each weight matrix the way its layer's bits say:
    the float tensor at 16 bits, quant.layout's tensors at 8 or 4. Raises ShardError."""
    from shard_tool import quant

    if entry.role != "expert" or not entry.tensors or entry.expert is None:
        return
    family = FAMILIES.get(manifest.family)
    if family is None:
        raise ShardError(f"manifest family {manifest.family!r} is not supported")
    try:
        shape = ModelShape.from_summary(manifest.model)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"manifest model summary is malformed ({e})") from None
    unknown = sorted(set(entry.bits) - set(shape.moe_layers))
    if unknown:
        raise ShardError(f"{entry.path}: bits given for layers {unknown}, which have no routed "
                         f"experts")
    for layer in shape.moe_layers:
        bits = entry.layer_bits(layer)
        for row in family.tensors(shape):
            name = row.shard_name(layer, entry.expert)
            if bits == FULL_BITS or row.part not in QUANTISED_PARTS:
                expected = [(name, None, None)]  # its dtype and shape: check_file, as ever
            else:
                expected = quant.layout(name, *_out_in(row.shape(shape), shape), bits)
            for want, code, dims in expected:
                meta = entry.tensors.get(want)
                if meta is None:
                    raise ShardError(f"{entry.path}: layer {layer} is {bits} bits, but the "
                                     f"manifest lists no {want}")
                if code is not None and (meta.get("dtype"), tuple(meta.get("shape", ()))) != (
                        code, dims):
                    raise ShardError(f"{entry.path}: {want} is {meta.get('dtype')}"
                                     f"{meta.get('shape')}, a {bits}-bit matrix of this config "
                                     f"is {code}{list(dims)}")


def _out_in(dims: tuple[int, ...], shape: ModelShape) -> tuple[int, int]:
    rows, cols = dims
    return (cols, rows) if stored_transposed(shape.expert_kind) else (rows, cols)


def _element_bytes(manifest: Manifest) -> int:
    return DTYPE_BYTES.get({"bfloat16": "BF16", "float16": "F16"}.get(
        manifest.model["dtype"], "F32"), 4)


def weight_memory_bytes(manifest: Manifest, entry) -> int:
    """Bytes the shard's weights take on its device: its size (8/4-bit layers stay quantised),
    or for MXFP4 experts (the agent dequantises at load) three [H, F] matrices and two biases
    per MoE layer in the model dtype."""
    model = manifest.model
    if entry.role != "expert" or not model.get("expert_quant"):
        return entry.bytes
    hidden, ffn = model["hidden_size"], model["ffn_size"]
    per_layer = 3 * hidden * ffn + 2 * ffn + hidden
    return len(manifest.moe_layers) * per_layer * _element_bytes(manifest)


def working_memory_bytes(manifest: Manifest, role: str, quantised: bool = False) -> int:
    """Activation/KV memory beside the weights for one device of `role` (see constants);
    `quantised` adds the scratch an agent dequantises one [2F, H] matrix into."""
    model = manifest.model
    element_bytes = _element_bytes(manifest)
    if role == "expert":  # x, w1 x, w3 x, output for a prefill batch, one layer at a time
        per_token = 2 * model["hidden_size"] + 2 * model["ffn_size"]
        scratch = 2 * model["ffn_size"] * model["hidden_size"] if quantised else 0
        return (PREFILL_TOKENS * per_token + scratch) * element_bytes
    kv_per_token = 2 * model["num_layers"] * model["num_kv_heads"] * model["head_dim"]
    return CONTEXT_TOKENS * kv_per_token * element_bytes


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def bits_summary(manifest: Manifest, entry: FileEntry) -> str:
    """'16', '8', '4', or for mixed widths e.g. '8x1,4x3' (layers at each width)."""
    if entry.role != "expert":
        return ""
    counts: dict[int, int] = {}
    for layer in manifest.moe_layers:
        counts[entry.layer_bits(layer)] = counts.get(entry.layer_bits(layer), 0) + 1
    if len(counts) == 1:
        return str(next(iter(counts)))
    return ",".join(f"{b}x{n}" for b, n in sorted(counts.items(), reverse=True))


def bits_table(expert_bits: dict[int, dict[int, int]]) -> str:
    """Bits per expert id (rows) and MoE layer (columns)."""
    layers = sorted({layer for per_layer in expert_bits.values() for layer in per_layer})
    width = max(3, *(len(f"L{layer}") for layer in layers)) if layers else 3
    lines = [f"{'expert':>6}  " + " ".join(f"{'L' + str(layer):>{width}}" for layer in layers)]
    for expert in sorted(expert_bits):
        lines.append(f"{expert:>6}  " + " ".join(
            f"{expert_bits[expert].get(layer, FULL_BITS):>{width}}" for layer in layers))
    return "\n".join(lines)


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
        f"{'shard':<36} {'tensors':>7} {'bytes':>12} {'device memory':>14}  bits",
    ]
    shards = [e for e in manifest.files if e.tensors]
    for entry in sorted(shards, key=lambda e: (e.role != "basestation", e.path)):
        device_bytes = (weight_memory_bytes(manifest, entry)
                        + working_memory_bytes(manifest, entry.role, bool(entry.bits)))
        aux_bytes = 0
        if entry.role == "basestation":
            aux_bytes = sum(e.bytes for e in manifest.files
                            if e.role == "basestation" and not e.tensors)
        lines.append(f"{entry.path:<36} {len(entry.tensors):>7} "
                     f"{format_bytes(entry.bytes + aux_bytes):>12} {format_bytes(device_bytes):>14}"
                     f"  {bits_summary(manifest, entry)}".rstrip())
    total = sum(e.bytes for e in manifest.files)
    expert_bytes = [e.bytes for e in shards if e.role == "expert"]
    lines.append(f"{'total':<36} {sum(len(e.tensors) for e in shards):>7} "
                 f"{format_bytes(total):>12}")
    if expert_bytes:
        lines.append(f"largest expert shard {format_bytes(max(expert_bytes))}; "
                     f"the base station holds {format_bytes(total - sum(expert_bytes))} "
                     f"({100 * (total - sum(expert_bytes)) / total:.1f} % of the model)")
    expert_bits = manifest.expert_bits()
    widths = {b for per_layer in expert_bits.values() for b in per_layer.values()}
    if widths != {FULL_BITS}:
        lines.append("expert weight matrices quantised per output channel (shard_tool/quant.py: "
                     "8 bits one scale a row, 4 bits groups of up to 64 inputs)")
    if len(widths) > 1:
        lines += ["", "bits per expert and MoE layer:", bits_table(expert_bits)]
    return "\n".join(lines)


def files_in(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, fs in os.walk(folder) for f in fs)


__all__ = ["verify", "inspect_table", "ShardError", "files_in"]

"""What an expert shard of a model can weigh: its tensors follow from the model's config, so a
manifest entry that declares other tensors, or more bytes than they take, is forged (a pushed
manifest must not reserve 40 GiB of an agent's disk for a shard of a few MiB; issue 20).
Pure: the manifest in, the bounds or a ShardError out.
"""

from __future__ import annotations

import math

from common.errors import ShardError
from shard_tool import quant
from shard_tool.families import FAMILIES, ModelShape
from shard_tool.manifest import FULL_BITS, QUANTISED_PARTS, FileEntry, Manifest, stored_transposed
from shard_tool.safetensors_io import DTYPE_BYTES, FLOAT_CODES

# The safetensors header: per tensor its name and about 90 characters of dtype, shape and
# offsets (StreamingWriter writes it compact), plus the metadata; generous, a few KiB a shard.
HEADER_BYTES_PER_TENSOR = 160
HEADER_BASE_BYTES = 4096
LENGTH_PREFIX_BYTES = 8  # the header's little-endian u64 length
MAX_LAYERS = 4096  # far above any MoE's (DeepSeek-V3: 61); a forged summary stops here


def expected_tensors(manifest: Manifest, entry: FileEntry) -> dict[str, tuple[tuple[int, ...],
                                                                         str | None]]:
    """Every tensor the config implies in expert `entry.expert`'s shard -> (shape, dtype code
    or None: any float). Raises ShardError when the family or config is unknown."""
    family = FAMILIES.get(manifest.family)
    if family is None:
        raise ShardError(f"manifest family {str(manifest.family)[:40]!r} is not supported")
    layers = manifest.model.get("moe_layers", manifest.model.get("num_layers"))
    if (len(layers) if isinstance(layers, list) else layers if isinstance(layers, int)
            else 0) > MAX_LAYERS:  # before from_summary builds the list of them
        raise ShardError(f"the model declares more than {MAX_LAYERS} layers")
    try:
        shape = ModelShape.from_summary(manifest.model)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"manifest model summary is malformed ({type(e).__name__})") from None
    expert = entry.expert
    if not isinstance(expert, int) or not 0 <= expert < shape.num_experts:
        raise ShardError(f"expert {str(expert)[:20]} is not one of the model's "
                         f"{shape.num_experts}")
    tensors: dict[str, tuple[tuple[int, ...], str | None]] = {}
    for layer in shape.moe_layers:
        bits = entry.layer_bits(layer)
        for row in family.tensors(shape):
            name = row.shard_name(layer, expert)
            if bits != FULL_BITS and row.part in QUANTISED_PARTS:
                rows, cols = row.shape(shape)
                if stored_transposed(shape.expert_kind):
                    rows, cols = cols, rows
                try:
                    stored = quant.layout(name, rows, cols, bits)
                except ValueError as e:
                    raise ShardError(f"{name}: {e}") from None
                tensors.update({n: (tuple(s), code) for n, code, s in stored})
            else:
                tensors[name] = (tuple(row.shape(shape)), row.dtype)
    return tensors


def shard_size_bounds(manifest: Manifest, entry: FileEntry) -> tuple[int, int]:
    """(least, most) bytes expert `entry.expert`'s shard can take: the tensors the config implies
    at their declared dtypes (at the widest float where the entry lists none), plus a header.
    Raises ShardError when the entry's tensor list is not the one the config implies."""
    expected = expected_tensors(manifest, entry)
    declared = entry.tensors
    if declared and set(declared) != set(expected):
        extra, missing = set(declared) - set(expected), set(expected) - set(declared)
        raise ShardError(f"the entry of expert {entry.expert} lists tensors the model does not "
                         f"have ({len(extra)} extra, {len(missing)} missing)")
    least = most = 0
    for name, (shape, code) in expected.items():
        meta = declared.get(name) if declared else None
        if meta is None:  # an entry without a tensor list: any float the config allows
            codes = FLOAT_CODES if code is None else (code,)
            sizes = [DTYPE_BYTES[c] for c in codes]
            least += math.prod(shape) * min(sizes)
            most += math.prod(shape) * max(sizes)
            continue
        got_shape = meta.get("shape") if isinstance(meta, dict) else None
        got_code = meta.get("dtype") if isinstance(meta, dict) else None
        if not isinstance(got_shape, list) or tuple(got_shape) != shape:
            raise ShardError(f"{name}: declared shape {str(got_shape)[:40]}, the model's is "
                             f"{list(shape)}")
        if not isinstance(got_code, str) or got_code not in (FLOAT_CODES if code is None
                                                             else (code,)):
            raise ShardError(f"{name}: declared dtype {str(got_code)[:20]!r} is not "
                             f"{code or 'a float'}")
        least += math.prod(shape) * DTYPE_BYTES[got_code]
        most += math.prod(shape) * DTYPE_BYTES[got_code]
    header_bytes = HEADER_BASE_BYTES + sum(len(n.encode()) + HEADER_BYTES_PER_TENSOR
                                           for n in expected)
    return least + LENGTH_PREFIX_BYTES, most + LENGTH_PREFIX_BYTES + header_bytes


def check_declared_size(manifest: Manifest, entry: FileEntry) -> None:
    """Raises ShardError unless entry.bytes lies within shard_size_bounds."""
    least, most = shard_size_bounds(manifest, entry)
    if not isinstance(entry.bytes, int) or not least <= entry.bytes <= most:
        raise ShardError(f"the entry of expert {entry.expert} declares {entry.bytes} bytes; "
                         f"this model's shard takes {least} to {most}")

"""`shard_tool split`: one checkpoint in, a base-station shard and one shard per expert out.

Reads safetensors tensor by tensor in fixed-size chunks (peak memory does not grow with the
model), builds everything in a hidden folder beside OUT and renames it into place at the end,
so OUT is either complete or absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext

from shard_tool import __version__
from shard_tool.dtypes import CODE_NAMES, DTYPE_ALIASES, SAFETENSORS_CODES
from shard_tool.errors import ShardError
from shard_tool.families import Family, ModelShape, family_for_config, supported_model_types
from shard_tool.manifest import (BASESTATION_DIR, EXPERTS_DIR, FileEntry, Manifest,
                                 expert_file_path, read_json_object, sha256_file,
                                 write_manifest)
from shard_tool.safetensors_io import FLOAT_CODES, StreamingWriter, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BASESTATION_WEIGHTS = f"{BASESTATION_DIR}/model.safetensors"
# Files the base station needs beside its weights: config, generation defaults, tokenizer.
AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
             "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
# --dtype value -> safetensors code (None: keep the checkpoint's)
DTYPE_CHOICES = {"keep": None, **SAFETENSORS_CODES,
                 **{short: SAFETENSORS_CODES[name] for short, name in DTYPE_ALIASES.items()}}
CONFIG_DTYPE_NAME = CODE_NAMES


def read_config(src: str) -> dict:
    if not os.path.isdir(src):
        raise ShardError(f"{src}: no such checkpoint folder")
    return read_json_object(os.path.join(src, "config.json"),
                            f"{src}: no config.json (not a HuggingFace checkpoint)",
                            "config object")


def read_source_tensors(src: str) -> dict[str, TensorInfo]:
    """Every tensor of a single-file or index-sharded safetensors checkpoint, headers only."""
    index_path = os.path.join(src, INDEX_NAME)
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise ShardError(f"{index_path}: malformed index (no weight_map)") from None
        headers = {}
        for file_name in sorted(set(weight_map.values())):
            if os.path.basename(file_name) != file_name:
                raise ShardError(f"{index_path}: unsafe file name {file_name!r}")
            file_path = os.path.join(src, file_name)
            if not os.path.exists(file_path):
                raise ShardError(f"{src}: index lists {file_name}, which is missing")
            headers[file_name] = read_header(file_path)[0]
        tensors = {}
        for name, file_name in weight_map.items():
            if name not in headers[file_name]:
                raise ShardError(f"{src}: index lists {name} in {file_name}, but it is absent")
            tensors[name] = headers[file_name][name]
        return tensors
    single = os.path.join(src, SINGLE_NAME)
    if not os.path.exists(single):
        raise ShardError(f"{src}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors is read)")
    return read_header(single)[0]


def expert_slice(info: TensorInfo, expert: int, name: str) -> TensorInfo:
    """Expert `expert`'s part of a tensor fused on disk, named `name`. With the expert axis
    first it is one contiguous byte range, so the writer streams just that range in chunks."""
    nbytes = info.nbytes // info.shape[0]
    return dataclasses.replace(info, name=name, shape=info.shape[1:],
                               offset=info.offset + expert * nbytes, nbytes=nbytes)


def _layers_text(layers: tuple[int, ...]) -> str:
    """(1, 2, 3, 5) -> "1-3,5": keeps the error for a 60-layer model on one line."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def plan_split(family: Family, shape: ModelShape, tensors: dict[str, TensorInfo]
               ) -> tuple[list[str], dict[int, list[TensorInfo]]]:
    """Check the routed-expert tensors against config.json. Returns the base-station names and,
    per expert id, the sources of its shard (whole tensors or slices, under their shard names).
    Raises ShardError."""
    expected = family.expected(shape)
    for name in expected:
        if name not in tensors:
            raise ShardError(f"tensor {name} is missing from the checkpoint")
    base, experts = [], {q: [] for q in range(shape.num_experts)}
    for name, info in tensors.items():
        ref = family.parse(name)
        if ref is None:
            if family.looks_like_expert(name):  # never let a routed expert reach the base station
                raise ShardError(f"tensor {name} looks like a routed expert, but the "
                                 f"{family.name} table does not know it")
            base.append(name)  # not a routed expert: stays with the base station, untouched
            continue
        if name not in expected:
            raise ShardError(
                f"tensor {name} does not fit config.json ({shape.num_experts} experts in MoE "
                f"layers {_layers_text(shape.moe_layers)}, {shape.expert_quant or 'unquantised'})")
        want_shape, want_dtype = expected[name]
        if info.shape != want_shape:
            raise ShardError(f"tensor {name} has shape {list(info.shape)}, "
                             f"config.json implies {list(want_shape)}")
        if want_dtype is not None and info.dtype != want_dtype:
            raise ShardError(f"tensor {name} is {info.dtype}, {shape.expert_quant} needs "
                             f"{want_dtype}")
        row = ref.tensor
        if row.fused:
            for q in range(shape.num_experts):
                experts[q].append(expert_slice(info, q, row.shard_name(ref.layer, q)))
        else:
            experts[ref.expert].append(
                dataclasses.replace(info, name=row.shard_name(ref.layer, ref.expert)))
    return sorted(base), {q: sorted(infos, key=lambda i: i.name) for q, infos in experts.items()}


def _progress_bar(total_bytes: int, enabled: bool):
    if not enabled:
        return nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc="split", file=sys.stderr, dynamic_ncols=True)


def _target_dtype(info: TensorInfo, out_code: str | None) -> str:
    # only floats convert: MXFP4 blocks and scales (uint8) are codes, not numbers
    return out_code if out_code and info.dtype in FLOAT_CODES else info.dtype


def _write_shard(staging: str, rel_path: str, sources: list[TensorInfo], out_code: str | None,
                 role: str, expert: int | None, advance) -> FileEntry:
    layout = [(i.name, _target_dtype(i, out_code), i.shape) for i in sources]
    writer = StreamingWriter(os.path.join(staging, rel_path), layout)
    try:
        for info in sources:
            writer.copy_from(info, advance)
        digest = writer.close()
    except BaseException:
        writer.abort()
        raise
    return FileEntry(path=rel_path, role=role, bytes=writer.bytes_written, sha256=digest,
                     expert=expert,
                     tensors={n: {"dtype": d, "shape": list(s)} for n, d, s in layout})


def _basestation_config(config: dict, out_code: str | None, drop_quantization: bool
                        ) -> dict | None:
    """config.json as the base station needs it, or None when the source's is right as is."""
    if not out_code and not drop_quantization:
        return None
    config = dict(config)
    if out_code:  # the config's dtype says what the weights are; keep it true after a conversion
        config["dtype"] = CONFIG_DTYPE_NAME[out_code]
        config.pop("torch_dtype", None)
    if drop_quantization:  # only the experts were quantised: the base station builds a plain model
        config.pop("quantization_config", None)
    return config


def _copy_aux(src: str, staging: str, config: dict | None) -> list[FileEntry]:
    """Copy the base station's side files; `config` (if given) replaces config.json."""
    entries = []
    for file_name in AUX_FILES:
        src_path = os.path.join(src, file_name)
        if not os.path.isfile(src_path):
            continue
        rel_path = f"{BASESTATION_DIR}/{file_name}"
        dst_path = os.path.join(staging, rel_path)
        if file_name == "config.json" and config is not None:
            with open(dst_path, "w") as f:
                json.dump(config, f, indent=2)
        else:
            shutil.copyfile(src_path, dst_path)
        entries.append(FileEntry(path=rel_path, role="basestation",
                                 bytes=os.path.getsize(dst_path), sha256=sha256_file(dst_path)))
    return entries


def split(src: str, out: str, dtype: str = "keep", force: bool = False,
          progress: bool = False) -> Manifest:
    """Split checkpoint SRC into OUT. Raises ShardError on bad input; OUT is all or nothing."""
    if dtype not in DTYPE_CHOICES:
        raise ShardError(f"unknown --dtype {dtype} (choose from {', '.join(DTYPE_CHOICES)})")
    out_code = DTYPE_CHOICES[dtype]
    out = os.path.abspath(out)
    if os.path.exists(out) and not force:
        raise ShardError(f"{out} exists (use --force to replace it)")
    config = read_config(src)
    family = family_for_config(config)
    if family is None:
        raise ShardError(f"{src}: model_type {config.get('model_type')!r} is not a supported MoE "
                         f"(supported: {', '.join(supported_model_types())})")
    try:
        shape = family.shape_from_config(config)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShardError(f"{src}/config.json: not a {family.name} MoE config "
                         f"({type(e).__name__}: {e})") from None
    if shape.expert_quant not in family.quant_methods():
        known = sorted(q for q in family.quant_methods() if q) or ["none"]
        raise ShardError(f"{src}: quant_method {shape.expert_quant!r} is not supported for "
                         f"{family.name} (supported: {', '.join(known)})")
    if shape.num_experts < 1 or not shape.moe_layers:
        raise ShardError(f"{src}/config.json: no routed experts ({shape.num_experts} experts, "
                         f"{len(shape.moe_layers)} MoE layers)")
    tensors = read_source_tensors(src)
    base_names, expert_sources = plan_split(family, shape, tensors)
    # blocks/scales left in the base shard mean the rest of the model is quantised too
    base_quantised = any(n.endswith(("_blocks", "_scales")) for n in base_names)
    base_config = _basestation_config(config, out_code,
                                      drop_quantization=bool(shape.expert_quant) and
                                      not base_quantised)

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 is not what OUT should have
        os.makedirs(os.path.join(staging, BASESTATION_DIR))
        os.makedirs(os.path.join(staging, EXPERTS_DIR))
        total_bytes = sum(info.nbytes for info in tensors.values())
        with _progress_bar(total_bytes, progress) as bar:
            advance = bar.update if bar is not None else (lambda n: None)
            files = [_write_shard(staging, BASESTATION_WEIGHTS,
                                  [tensors[n] for n in base_names], out_code, "basestation",
                                  None, advance)]
            for expert, sources in expert_sources.items():
                files.append(_write_shard(staging, expert_file_path(expert), sources, out_code,
                                          "expert", expert, advance))
        files += _copy_aux(src, staging, base_config)
        # the model's float dtype (MXFP4 codes are uint8; their biases say what it computes in)
        sample = next((i for i in expert_sources[0] if i.dtype in FLOAT_CODES),
                      expert_sources[0][0])
        model = dict(shape.summary(), dtype=CONFIG_DTYPE_NAME.get(
            _target_dtype(sample, out_code), sample.dtype))
        manifest = Manifest(family=family.name, model=model, files=tuple(files),
                            tool_version=__version__)
        write_manifest(staging, manifest)
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace(staging: str, out: str) -> None:
    """Move the finished folder into place; an old OUT (--force) goes only once the new is in."""
    if not os.path.exists(out):
        os.rename(staging, out)
        return
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rename(out, os.path.join(trash, "old"))
    os.rename(staging, out)
    shutil.rmtree(trash, ignore_errors=True)

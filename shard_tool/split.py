"""`shard_tool split`: one checkpoint in, a base-station shard and one shard per expert out.

Reads safetensors tensor by tensor in fixed-size chunks (peak memory does not grow with the
model), builds everything in a hidden folder beside OUT and renames it into place at the end,
so OUT is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import nullcontext

from shard_tool import __version__
from shard_tool.errors import ShardError
from shard_tool.families import EXPERT, Family, ModelShape, family_for_config
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
DTYPE_CHOICES = {"keep": None, "bfloat16": "BF16", "float16": "F16", "float32": "F32",
                 "bf16": "BF16", "fp16": "F16", "fp32": "F32"}
CONFIG_DTYPE_NAME = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


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


def plan_split(family: Family, shape: ModelShape, tensors: dict[str, TensorInfo]
               ) -> tuple[list[str], dict[int, list[str]]]:
    """Check names and shapes against config.json; return base names and names per expert."""
    expected = family.expected(shape)
    for name, (want_shape, optional) in expected.items():
        if name not in tensors and not optional:
            raise ShardError(f"tensor {name} is missing from the checkpoint")
    base, experts = [], {q: [] for q in range(shape.num_experts)}
    for name, info in tensors.items():
        role = family.parse(name)
        if role is None:  # not in the table: stays with the base station, untouched
            base.append(name)
            continue
        if name not in expected:
            raise ShardError(f"tensor {name} does not fit config.json "
                             f"({shape.num_layers} layers, {shape.num_experts} experts)")
        want_shape = expected[name][0]
        if info.shape != want_shape:
            raise ShardError(f"tensor {name} has shape {list(info.shape)}, "
                             f"config.json implies {list(want_shape)}")
        if role.role == EXPERT:
            experts[role.expert].append(name)
        else:
            base.append(name)
    return sorted(base), {q: sorted(names) for q, names in experts.items()}


def _progress_bar(total_bytes: int, enabled: bool):
    if not enabled:
        return nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                desc="split", file=sys.stderr, dynamic_ncols=True)


def _write_shard(staging: str, rel_path: str, names: list[str], tensors: dict[str, TensorInfo],
                 out_code: str | None, role: str, expert: int | None, advance) -> FileEntry:
    def target_dtype(info: TensorInfo) -> str:
        return out_code if out_code and info.dtype in FLOAT_CODES else info.dtype

    layout = [(n, target_dtype(tensors[n]), tensors[n].shape) for n in names]
    writer = StreamingWriter(os.path.join(staging, rel_path), layout)
    try:
        for name in names:
            writer.copy_from(tensors[name], advance)
        digest = writer.close()
    except BaseException:
        writer.abort()
        raise
    return FileEntry(path=rel_path, role=role, bytes=writer.bytes_written, sha256=digest,
                     expert=expert,
                     tensors={n: {"dtype": d, "shape": list(s)} for n, d, s in layout})


def _copy_aux(src: str, staging: str, config: dict, out_code: str | None) -> list[FileEntry]:
    entries = []
    for file_name in AUX_FILES:
        src_path = os.path.join(src, file_name)
        if not os.path.isfile(src_path):
            continue
        rel_path = f"{BASESTATION_DIR}/{file_name}"
        dst_path = os.path.join(staging, rel_path)
        if file_name == "config.json" and out_code:
            # the config's dtype says what the weights are; keep it true after a conversion
            config = dict(config, dtype=CONFIG_DTYPE_NAME[out_code])
            config.pop("torch_dtype", None)
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
        raise ShardError(f"{src}: model_type {config.get('model_type')!r} is not a supported "
                         "Mixtral-family MoE")
    try:
        shape = family.shape_from_config(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{src}/config.json: not a {family.name} MoE config ({e})") from None
    tensors = read_source_tensors(src)
    base_names, expert_names = plan_split(family, shape, tensors)

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
            files = [_write_shard(staging, BASESTATION_WEIGHTS, base_names, tensors, out_code,
                                  "basestation", None, advance)]
            for expert, names in expert_names.items():
                files.append(_write_shard(staging, expert_file_path(expert), names, tensors,
                                          out_code, "expert", expert, advance))
        files += _copy_aux(src, staging, config, out_code)
        sample = tensors[expert_names[0][0]]
        model = dict(shape.summary(), dtype=CONFIG_DTYPE_NAME.get(
            out_code or sample.dtype, sample.dtype))
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

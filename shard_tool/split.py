"""`shard_tool split`: one checkpoint in, a base-station shard and one shard per expert out.

Reads safetensors tensor by tensor in fixed-size chunks (peak memory does not grow with the
model), builds everything in a hidden folder beside OUT and renames it into place at the end,
so OUT is either complete or absent. `--bits 8|4|auto` stores the routed experts' weight
matrices quantised (shard_tool/quant.py), a block of rows at a time; `auto` first measures which
experts can take 4 bits (shard_tool/search.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

from common.dtypes import CODE_NAMES, DTYPE_ALIASES, SAFETENSORS_CODES
from common.errors import ShardError
from common.staging import staged_dir
from shard_tool import __version__
from shard_tool.families import (
    ExpertTensor,
    Family,
    ModelShape,
    family_for_config,
    supported_model_types,
)
from shard_tool.manifest import (
    BASESTATION_DIR,
    EXPERTS_DIR,
    FULL_BITS,
    QUANTISED_PARTS,
    FileEntry,
    Manifest,
    expert_file_path,
    read_json_object,
    sha256_file,
    stored_transposed,
    write_manifest,
)
from shard_tool.safetensors_io import (
    COPY_CHUNK_BYTES,
    DTYPE_BYTES,
    FLOAT_CODES,
    StreamingWriter,
    TensorInfo,
    read_header,
    read_tensor,
    torch_dtype,
)

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
BITS_CHOICES = ("16", "8", "4", "auto")
AUTO = "auto"
DEFAULT_CALIBRATION_TOKENS = 2048
MIN_CALIBRATION_TOKENS = 16


@dataclass(frozen=True)
class BitsRequest:
    """--bits and its companions, checked. `bits` is 16, 8, 4, or AUTO."""

    bits: int | str = FULL_BITS
    tolerance_pct: float | None = None  # auto: allowed loss increase over 16 bits, in percent
    calibration: str | None = None  # auto: a text file (None: Python's own docstrings)
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS

    @property
    def quantises(self) -> bool:
        return self.bits != FULL_BITS


def bits_request(bits: int | str = FULL_BITS, tolerance_pct: float | str | None = None,
                 calibration: str | None = None,
                 calibration_tokens: int | str = DEFAULT_CALIBRATION_TOKENS) -> BitsRequest:
    """Check the --bits options as the user typed them. Raises ShardError (one line)."""
    if str(bits) not in BITS_CHOICES:
        raise ShardError(f"--bits {bits}: choose from {', '.join(BITS_CHOICES)}")
    bits = AUTO if str(bits) == AUTO else int(bits)
    if bits != AUTO:
        for flag, value in (("--tolerance", tolerance_pct), ("--calibration", calibration)):
            if value is not None:
                raise ShardError(f"{flag} applies to --bits auto only")
        return BitsRequest(bits)
    if tolerance_pct is None:
        raise ShardError("--bits auto needs --tolerance PCT (the loss increase allowed, in %)")
    try:
        tolerance = float(tolerance_pct)
    except (TypeError, ValueError):
        tolerance = math.nan
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ShardError(f"--tolerance {tolerance_pct}: must be a percentage >= 0")
    try:
        tokens = int(calibration_tokens)
    except (TypeError, ValueError):
        tokens = 0
    if tokens < MIN_CALIBRATION_TOKENS:
        raise ShardError(f"--calibration-tokens {calibration_tokens}: must be an integer >= "
                         f"{MIN_CALIBRATION_TOKENS}")
    if calibration is not None and not os.path.isfile(calibration):
        raise ShardError(f"--calibration {calibration}: no such file")
    return BitsRequest(AUTO, tolerance, calibration, tokens)


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


def _shard_rows(family: Family, shape: ModelShape, expert: int
                ) -> dict[str, tuple[int, ExpertTensor]]:
    """Shard name of each routed-expert tensor of `expert` -> (MoE layer, its table row)."""
    return {row.shard_name(layer, expert): (layer, row)
            for row in family.tensors(shape) for layer in shape.moe_layers}


def _matrix_shape(info: TensorInfo, transposed: bool) -> tuple[int, int]:
    """[out, in] of a weight matrix as quantised (GPT-OSS stores [in, out])."""
    rows, cols = info.shape
    return (cols, rows) if transposed else (rows, cols)


def _quantised_blocks(info: TensorInfo, bits: int, transposed: bool, advance):
    """Quantise one weight matrix a block of rows at a time (each block holds at most one read
    chunk of the source); yields QuantizedMatrix blocks, top to bottom."""
    from shard_tool import quant

    if transposed:  # its rows are the file's columns: read it whole (one matrix)
        matrix = read_tensor(info).t()  # [out, in]
        advance(info.nbytes)
        block = max(1, COPY_CHUNK_BYTES // (matrix.shape[1] * 4))
        for start in range(0, matrix.shape[0], block):
            yield quant.quantize(matrix[start:start + block], bits)
        return
    import torch

    rows, cols = info.shape
    row_bytes = cols * DTYPE_BYTES[info.dtype]
    block = max(1, COPY_CHUNK_BYTES // row_bytes)
    buffer = bytearray(min(rows, block) * row_bytes)
    with open(info.path, "rb", buffering=0) as f:
        for start in range(0, rows, block):
            n = min(block, rows - start)
            view = memoryview(buffer)[: n * row_bytes]
            if os.preadv(f.fileno(), [view], info.offset + start * row_bytes) != len(view):
                raise ShardError(f"{info.path}: truncated while reading {info.name}")
            matrix = torch.frombuffer(view, dtype=torch_dtype(info.dtype)).reshape(n, cols)
            advance(len(view))
            yield quant.quantize(matrix, bits)


def _write_quantised(writer: StreamingWriter, info: TensorInfo, bits: int, transposed: bool,
                     advance) -> None:
    """qweight streams block by block; scale (and offset) follow, kept small meanwhile."""
    import torch

    from shard_tool import quant

    params: list[list] = []

    def raw(tensor) -> memoryview:  # the writer counts len(): flat bytes
        return memoryview(tensor.contiguous().view(torch.uint8).reshape(-1).numpy())

    def qweight_chunks():
        for block in _quantised_blocks(info, bits, transposed, advance):
            tensors = quant.stored_tensors(block)
            params.append(tensors[1:])
            yield raw(tensors[0])

    names = quant.tensor_names(info.name, bits)
    writer.append_raw(names[0], qweight_chunks())
    for i, name in enumerate(names[1:]):
        writer.append_raw(name, [raw(torch.cat([p[i] for p in params]))])


def _write_shard(staging: str, rel_path: str, sources: list[TensorInfo], out_code: str | None,
                 role: str, expert: int | None, advance,
                 quantise: dict[str, int] | None = None, transposed: bool = False) -> FileEntry:
    """`quantise`: shard name -> 8 or 4 for the weight matrices stored quantised."""
    from shard_tool import quant

    quantise = quantise or {}
    layout = []
    for info in sources:
        if info.name in quantise:
            rows, cols = _matrix_shape(info, transposed)
            layout += quant.layout(info.name, rows, cols, quantise[info.name])
        else:
            layout.append((info.name, _target_dtype(info, out_code), info.shape))
    writer = StreamingWriter(os.path.join(staging, rel_path), layout)
    try:
        for info in sources:
            if info.name in quantise:
                _write_quantised(writer, info, quantise[info.name], transposed, advance)
            else:
                writer.copy_from(info, advance)
        digest = writer.close()
    except BaseException:
        writer.abort()
        raise
    return FileEntry(path=rel_path, role=role, bytes=writer.bytes_written, sha256=digest,
                     expert=expert,
                     tensors={n: {"dtype": d, "shape": list(s)} for n, d, s in layout})


def _check_quantisable(family: Family, shape: ModelShape, request: BitsRequest) -> None:
    """--bits below 16 on a checkpoint it cannot apply to. Raises ShardError."""
    if not request.quantises:
        return
    if shape.expert_quant:
        raise ShardError(f"--bits {request.bits}: this {family.name} checkpoint's experts are "
                         f"{shape.expert_quant} already; split it with --bits 16 (the agent "
                         f"dequantises {shape.expert_quant} at load)")
    if request.bits in (4, AUTO) and (shape.hidden_size % 2 or shape.ffn_size % 2):
        raise ShardError(f"--bits {request.bits}: 4-bit rows pack two values a byte, so the "
                         f"hidden ({shape.hidden_size}) and expert FFN ({shape.ffn_size}) sizes "
                         f"must be even")


def _quantise_plan(family: Family, shape: ModelShape, expert: int, sources: list[TensorInfo],
                   layer_bits: dict[int, int]) -> dict[str, int]:
    """Shard name -> bits for the weight matrices of `expert` stored below 16 bits."""
    rows = _shard_rows(family, shape, expert)
    plan = {}
    for info in sources:
        layer, row = rows[info.name]
        bits = layer_bits.get(layer, FULL_BITS)
        if bits != FULL_BITS and row.part in QUANTISED_PARTS:
            plan[info.name] = bits
    return plan


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
          progress: bool = False, bits: BitsRequest | int | str = FULL_BITS,
          on_search: Callable | None = None) -> Manifest:
    """Split checkpoint SRC into OUT. `bits`: 16 (the checkpoint's floats), 8, 4, or a
    BitsRequest (`bits_request`, for auto); `on_search` gets auto's SearchResult before anything
    is written. Raises ShardError on bad input; OUT is all or nothing."""
    request = bits if isinstance(bits, BitsRequest) else bits_request(bits)
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
    _check_quantisable(family, shape, request)
    tensors = read_source_tensors(src)
    base_names, expert_sources = plan_split(family, shape, tensors)
    if request.bits == AUTO:  # measured before anything is written (Ctrl-C leaves nothing)
        from shard_tool.search import search_bits

        result = search_bits(src, shape, request.tolerance_pct, request.calibration,
                             request.calibration_tokens, progress=progress)
        if on_search is not None:
            on_search(result)
        widths = result.widths
    else:
        widths = {q: {layer: request.bits for layer in shape.moe_layers}
                  for q in range(shape.num_experts)}
    transposed = stored_transposed(shape.expert_kind)
    # blocks/scales left in the base shard mean the rest of the model is quantised too
    base_quantised = any(n.endswith(("_blocks", "_scales")) for n in base_names)
    base_config = _basestation_config(config, out_code,
                                      drop_quantization=bool(shape.expert_quant) and
                                      not base_quantised)

    with staged_dir(out, force=force) as staging:
        os.makedirs(os.path.join(staging, BASESTATION_DIR))
        os.makedirs(os.path.join(staging, EXPERTS_DIR))
        total_bytes = sum(info.nbytes for info in tensors.values())
        with _progress_bar(total_bytes, progress) as bar:
            advance = bar.update if bar is not None else (lambda n: None)
            files = [_write_shard(staging, BASESTATION_WEIGHTS,
                                  [tensors[n] for n in base_names], out_code, "basestation",
                                  None, advance)]
            for expert, sources in expert_sources.items():
                quantise = _quantise_plan(family, shape, expert, sources, widths[expert])
                entry = _write_shard(staging, expert_file_path(expert), sources, out_code,
                                     "expert", expert, advance, quantise, transposed)
                files.append(dataclasses.replace(entry, bits={
                    layer: b for layer, b in sorted(widths[expert].items()) if b != FULL_BITS}))
        files += _copy_aux(src, staging, base_config)
        # the model's float dtype (MXFP4 codes are uint8; their biases say what it computes in)
        sample = next((i for i in expert_sources[0] if i.dtype in FLOAT_CODES),
                      expert_sources[0][0])
        model = dict(shape.summary(), dtype=CONFIG_DTYPE_NAME.get(
            _target_dtype(sample, out_code), sample.dtype))
        manifest = Manifest(family=family.name, model=model, files=tuple(files),
                            tool_version=__version__)
        write_manifest(staging, manifest)
    return manifest

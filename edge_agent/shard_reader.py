"""Reading this box's own expert shard(s), and nothing else, checked against the manifest.

`ExpertReader` opens and checks every shard at start; `load(q, layer)` then reads one
layer-expert and builds it on the device (build_expert). Layers split at 8 or 4 bits stay
quantised in memory (edge_agent/expert_math.py QuantLinear); one scratch buffer, the size of the
largest matrix, is all the float memory they add.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.devices import resolve_device, resolve_dtype
from common.errors import ShardError
from edge_agent import mxfp4
from edge_agent.expert_math import ExpertWeights, KernelChoice, QuantLinear, Scratch, choose_kernel
from shard_tool import quant
from shard_tool.families import (
    DOWN,
    DOWN_BIAS,
    DOWN_BLOCKS,
    DOWN_SCALES,
    FAMILIES,
    GATE,
    GATE_UP,
    GATE_UP_BIAS,
    GATE_UP_BLOCKS,
    GATE_UP_SCALES,
    GPT_OSS,
    UP,
    ExpertTensor,
    ModelShape,
)
from shard_tool.manifest import (
    FULL_BITS,
    QUANTISED_PARTS,
    check_file,
    expert_file_path,
    load_manifest,
    stored_transposed,
)
from shard_tool.safetensors_io import TensorInfo, read_header, read_tensor


def missing_experts(folder: str, experts: list[int]) -> list[int]:
    """Experts whose shard file is not in `folder` yet (store mode waits for them)."""
    if not os.path.exists(os.path.join(folder, "manifest.json")):
        return list(experts)
    return [q for q in experts if not os.path.exists(os.path.join(folder, expert_file_path(q)))]


def build_expert(parts: dict, shape: ModelShape, device: torch.device, dtype: torch.dtype,
                 quantized: Callable[[quant.QuantizedMatrix], QuantLinear] | None = None
                 ) -> ExpertWeights:
    """One expert of one layer from its shard tensors (by part, see shard_tool/families.py),
    on `device` in `dtype`; quantised parts (QuantizedMatrix) become QuantLinears through
    `quantized`. Raises ValueError when they do not form an expert."""
    def get(part: str) -> torch.Tensor:
        return parts[part].to(device=device, dtype=dtype)

    if isinstance(parts.get(DOWN), quant.QuantizedMatrix):
        if GATE_UP in parts:  # GPT-OSS (stored [2F, D]) and Granite: one matrix already
            gate_up = parts[GATE_UP]
        else:  # gate rows, then up rows, as transformers fuses them
            gate_up = quant.cat_rows([parts[GATE], parts[UP]])
        if shape.expert_kind == GPT_OSS:
            return ExpertWeights(gate_up=quantized(gate_up), down=quantized(parts[DOWN]),
                                 kind=GPT_OSS, gate_up_bias=get(GATE_UP_BIAS),
                                 down_bias=get(DOWN_BIAS), alpha=float(shape.swiglu_alpha),
                                 limit=float(shape.swiglu_limit))
        return ExpertWeights(gate_up=quantized(gate_up), down=quantized(parts[DOWN]),
                             activation=shape.activation)
    if shape.expert_kind == GPT_OSS:
        if GATE_UP_BLOCKS in parts:  # MXFP4: dequantised here, the shard keeps the codes
            gate_up = mxfp4.dequantize(parts[GATE_UP_BLOCKS].to(device),
                                       parts[GATE_UP_SCALES].to(device), dtype)  # [D, 2F]
            down = mxfp4.dequantize(parts[DOWN_BLOCKS].to(device),
                                    parts[DOWN_SCALES].to(device), dtype)  # [F, D]
        else:
            gate_up, down = get(GATE_UP), get(DOWN)
        return ExpertWeights(gate_up=gate_up, down=down, kind=GPT_OSS,
                             gate_up_bias=get(GATE_UP_BIAS), down_bias=get(DOWN_BIAS),
                             alpha=float(shape.swiglu_alpha), limit=float(shape.swiglu_limit))
    if GATE_UP in parts:  # fused on disk (Granite): gate rows, then up rows
        return ExpertWeights(gate_up=get(GATE_UP).contiguous(), down=get(DOWN).contiguous(),
                             activation=shape.activation)
    # as transformers fuses them at load: torch.cat([gate, up])
    return ExpertWeights(gate_up=torch.cat([get(GATE), get(UP)]).contiguous(),
                         down=get(DOWN).contiguous(), activation=shape.activation)


def _check_quantised(path: str, tensors: dict[str, TensorInfo], row: ExpertTensor, name: str,
                     shape: ModelShape, bits: int) -> tuple[TensorInfo, ...]:
    """The stored tensors of one weight matrix at `bits`, checked against the config's shape.
    Raises ShardError."""
    rows, cols = row.shape(shape)
    if stored_transposed(shape.expert_kind):
        rows, cols = cols, rows
    stored = []
    for want_name, code, want_shape in quant.layout(name, rows, cols, bits):
        info = tensors.get(want_name)
        if info is None:
            raise ShardError(f"{path}: tensor {want_name} is missing (a {bits}-bit layer)")
        if info.dtype != code or tuple(info.shape) != want_shape:
            raise ShardError(f"{path}: {want_name} is {info.dtype}{list(info.shape)}, a {bits}-bit "
                             f"matrix of this config is {code}{list(want_shape)}")
        stored.append(info)
    return tuple(stored)


@dataclass(frozen=True)
class _UnitSource:
    """Where one layer-expert's tensors are in its shard (checked when the reader opened)."""

    path: str  # as the manifest names the file, for messages
    bits: int
    parts: dict[str, TensorInfo | tuple[TensorInfo, ...]]  # part -> tensor, or a quantised one's


class ExpertReader:
    """This box's expert shards, checked when opened (size, sha256, and every tensor's name,
    dtype and shape against the config, so a bad shard fails at start); `load(q, layer)` then
    reads one layer-expert and builds it on the device. Reads are plain preads of the tensors'
    bytes (offsets from the header), not a memory map: a mapping's pages count in the agent's
    resident set until unmapped, and a shard truncated under one kills the process (SIGBUS)
    where a read raises ShardError. Raises ShardError."""

    def __init__(self, folder: str, experts: list[int], device: str = "auto",
                 dtype: str = "auto", quant_kernels: str = "auto"):
        manifest = load_manifest(folder)
        family = FAMILIES.get(manifest.family)
        if family is None:
            raise ShardError(f"manifest family {manifest.family!r} is not supported "
                             f"(supported: {', '.join(FAMILIES)})")
        try:
            shape = ModelShape.from_summary(manifest.model)
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"manifest model summary is malformed ({type(e).__name__}: {e})") \
                from None
        if quant_kernels not in ("auto", "on", "off"):
            raise ShardError(f"quant_kernels {quant_kernels!r}: choose auto, on or off")
        self.manifest, self.shape = manifest, shape
        self.quant_kernels = quant_kernels
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, manifest.model.get("dtype"), self.device)
        self.scratch = Scratch(self.device, self.dtype)
        self.kernels: dict[int, KernelChoice] = {}
        self.sources: dict[tuple[int, int], _UnitSource] = {}
        self.shard_bytes = 0
        rows = family.tensors(shape)
        for q in experts:
            if not 0 <= q < manifest.num_experts:
                raise ShardError(f"expert {q} is out of range: the model has "
                                 f"{manifest.num_experts} experts")
            entry = manifest.expert_file(q)
            check_file(folder, entry)
            self.shard_bytes += entry.bytes
            tensors, _ = read_header(os.path.join(folder, entry.path))
            for layer in shape.moe_layers:
                bits = entry.layer_bits(layer)
                parts: dict[str, TensorInfo | tuple[TensorInfo, ...]] = {}
                for row in rows:
                    name = row.shard_name(layer, q)
                    if bits != FULL_BITS and row.part in QUANTISED_PARTS:
                        parts[row.part] = _check_quantised(entry.path, tensors, row, name, shape,
                                                           bits)
                        continue
                    info = tensors.get(name)
                    if info is None:
                        raise ShardError(f"{entry.path}: tensor {name} is missing")
                    if tuple(info.shape) != row.shape(shape):
                        raise ShardError(f"{entry.path}: {name} is {list(info.shape)}, "
                                         f"the config implies {list(row.shape(shape))}")
                    parts[row.part] = info
                self.sources[(q, layer)] = _UnitSource(entry.path, bits, parts)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(self.shape.moe_layers)

    def _quantized(self, q: quant.QuantizedMatrix) -> QuantLinear:
        if q.bits not in self.kernels:  # probed once per width, on the first matrix of that width
            self.kernels[q.bits] = choose_kernel(q, self.device, self.dtype, self.quant_kernels)
        return QuantLinear(q, self.device, self.dtype, self.scratch,
                           self.kernels[q.bits].max_tokens)

    def disk_bytes(self, expert: int, layer: int) -> int:
        """Bytes of one layer-expert in its shard (what a load reads)."""
        infos = self.sources[(expert, layer)].parts.values()
        return sum(sum(i.nbytes for i in info) if isinstance(info, tuple) else info.nbytes
                   for info in infos)

    def load(self, expert: int, layer: int) -> ExpertWeights:
        """Read and build one layer-expert. Raises ShardError (a file changed or gone since)."""
        source = self.sources[(expert, layer)]
        parts = {}
        try:
            for part, info in source.parts.items():
                if isinstance(info, tuple):
                    try:
                        parts[part] = quant.from_stored(source.bits,
                                                        [read_tensor(i) for i in info])
                    except ValueError as e:
                        raise ShardError(f"{source.path}: {info[0].name}: {e}") from None
                else:
                    parts[part] = read_tensor(info)
        except OSError as e:
            raise ShardError(f"{source.path}: cannot read: {e.strerror}") from None
        try:
            return build_expert(parts, self.shape, self.device, self.dtype, self._quantized)
        except ValueError as e:
            raise ShardError(f"{source.path}: layer {layer}: {e}") from None

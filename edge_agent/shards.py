"""Load this box's own expert shard(s), and nothing else, checked against the manifest.

Layers split at 8 or 4 bits stay quantised in memory (edge_agent/expert_math.py QuantLinear);
one scratch buffer, the size of the largest matrix, is all the float memory they add.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from edge_agent import mxfp4
from edge_agent.expert_math import (ExpertWeights, KernelChoice, QuantLinear, Scratch,
                                    choose_kernel)
from shard_tool import quant
from shard_tool.dtypes import canonical_dtype
from shard_tool.errors import ShardError
from shard_tool.families import (DOWN, DOWN_BIAS, DOWN_BLOCKS, DOWN_SCALES, FAMILIES, GATE,
                                 GATE_UP, GATE_UP_BIAS, GATE_UP_BLOCKS, GATE_UP_SCALES, GPT_OSS,
                                 UP, ExpertTensor, ModelShape)
from shard_tool.manifest import (FULL_BITS, QUANTISED_PARTS, Manifest, check_file, load_manifest,
                                 stored_transposed)
from shard_tool.safetensors_io import TensorInfo, read_header, read_tensor

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}


@dataclass(frozen=True)
class LoadedExperts:
    manifest: Manifest
    weights: dict[int, dict[int, ExpertWeights]]  # expert id -> {MoE layer: its weights}
    device: torch.device
    dtype: torch.dtype
    shard_bytes: int
    scratch: Scratch | None = None  # the dequantising buffer (None: nothing is quantised)
    kernels: dict[int, KernelChoice] = field(default_factory=dict)  # bits -> how it multiplies

    @property
    def experts(self) -> list[int]:
        return sorted(self.weights)

    @property
    def num_layers(self) -> int:
        return self.manifest.num_layers

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        """The layers with routed experts, sorted: the only layers a request may name."""
        return tuple(self.manifest.moe_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.manifest.model["hidden_size"])

    @property
    def ffn_size(self) -> int:
        return int(self.manifest.model["ffn_size"])

    @property
    def weight_bytes(self) -> int:
        """Bytes of expert weights held on the device, the dequantising scratch included."""
        held = sum(w.nbytes for layers in self.weights.values() for w in layers.values())
        return held + (self.scratch.nbytes if self.scratch is not None else 0)


def resolve_device(name: str) -> torch.device:
    """auto -> CUDA when torch sees it (Jetson), else CPU. Raises ShardError for cuda without one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ShardError("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def resolve_dtype(name: str, manifest: Manifest, device: torch.device | None = None
                  ) -> torch.dtype:
    """auto -> the model's dtype on a GPU, float32 on a CPU (half-precision matmuls there are
    emulated on most CPUs: ~8x slower measured on the tiny model). Raises ShardError."""
    if name == "auto":
        on_cpu = device is None or torch.device(device).type == "cpu"
        name = "float32" if on_cpu else str(manifest.model.get("dtype", "float32"))
    name = canonical_dtype(name)
    if name not in COMPUTE_DTYPES:
        raise ShardError(f"unknown dtype {name!r} (auto, bfloat16, float16, float32)")
    return COMPUTE_DTYPES[name]


def missing_experts(folder: str, experts: list[int]) -> list[int]:
    """Experts whose shard file is not in `folder` yet (store mode waits for them)."""
    from shard_tool.manifest import expert_file_path

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


def _read_quantised(path: str, tensors: dict[str, TensorInfo], row: ExpertTensor, name: str,
                    shape: ModelShape, bits: int) -> quant.QuantizedMatrix:
    """One weight matrix stored at `bits`, its tensors checked against the config's shape.
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
        stored.append(read_tensor(info))
    try:
        return quant.from_stored(bits, stored)
    except ValueError as e:
        raise ShardError(f"{path}: {name}: {e}") from None


def load_experts(folder: str, experts: list[int], device: str = "auto",
                 dtype: str = "auto", quant_kernels: str = "auto") -> LoadedExperts:
    """Check (size, sha256, tensor list) and load expert shards. Quantised layers stay
    quantised; `quant_kernels` auto|on|off says when torch's int8/int4 kernels multiply with them
    (expert_math.choose_kernel). Raises ShardError."""
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
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, manifest, torch_device)
    rows = family.tensors(shape)
    weights: dict[int, dict[int, ExpertWeights]] = {}
    shard_bytes = 0
    scratch = Scratch(torch_device, torch_dtype)
    kernels: dict[int, KernelChoice] = {}

    def quantized(q: quant.QuantizedMatrix) -> QuantLinear:
        if q.bits not in kernels:  # probed once per width, on the first matrix of that width
            kernels[q.bits] = choose_kernel(q, torch_device, torch_dtype, quant_kernels)
        return QuantLinear(q, torch_device, torch_dtype, scratch, kernels[q.bits].max_tokens)

    for q in experts:
        if not 0 <= q < manifest.num_experts:
            raise ShardError(f"expert {q} is out of range: the model has "
                             f"{manifest.num_experts} experts")
        entry = manifest.expert_file(q)
        check_file(folder, entry)
        shard_bytes += entry.bytes
        tensors, _ = read_header(os.path.join(folder, entry.path))
        layers = {}
        for layer in shape.moe_layers:
            parts = {}
            bits = entry.layer_bits(layer)
            for row in rows:
                name = row.shard_name(layer, q)
                if bits != FULL_BITS and row.part in QUANTISED_PARTS:
                    parts[row.part] = _read_quantised(entry.path, tensors, row, name, shape, bits)
                    continue
                info = tensors.get(name)
                if info is None:
                    raise ShardError(f"{entry.path}: tensor {name} is missing")
                if tuple(info.shape) != row.shape(shape):
                    raise ShardError(f"{entry.path}: {name} is {list(info.shape)}, "
                                     f"the config implies {list(row.shape(shape))}")
                parts[row.part] = read_tensor(info)
            try:
                layers[layer] = build_expert(parts, shape, torch_device, torch_dtype, quantized)
            except ValueError as e:
                raise ShardError(f"{entry.path}: layer {layer}: {e}") from None
        weights[q] = layers
    return LoadedExperts(manifest=manifest, weights=weights, device=torch_device,
                         dtype=torch_dtype, shard_bytes=shard_bytes,
                         scratch=scratch if scratch.nbytes else None, kernels=kernels)

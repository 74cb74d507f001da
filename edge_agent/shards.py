"""Load this box's own expert shard(s), and nothing else, checked against the manifest.

Layers split at 8 or 4 bits stay quantised in memory (edge_agent/expert_math.py QuantLinear);
one scratch buffer, the size of the largest matrix, is all the float memory they add.
With a memory budget (`edge_agent --memory-budget`), layer-experts beyond it stay in the shard
and load on demand or on a hint (ExpertStore; what stays is edge_agent/expert_cache.py's choice).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from edge_agent import mxfp4
from edge_agent.expert_cache import CacheConfig, CacheCounters, ExpertCache, Unit, hint_in_time
from edge_agent.expert_math import ExpertWeights, KernelChoice, QuantLinear, Scratch, choose_kernel
from shard_tool import quant
from common.dtypes import canonical_dtype
from common.errors import ShardError
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
    Manifest,
    check_file,
    load_manifest,
    stored_transposed,
)
from shard_tool.safetensors_io import TensorInfo, read_header, read_tensor

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
MAX_PENDING_HINTS = 64  # hinted units waiting for the loader; past it the oldest are dropped
# A budgeted agent takes prefetch hints only while a load takes at least this many times the
# CPU it spends (reading, converting), the rest waiting on storage: a load from memory is CPU
# work (measured: 1.06x on the page cache, 2-3x at 400 MB/s emulated), and a
# hint only moves it to another thread, while its wrong guesses (a third to a half) are loads
# and evictions more (measured, bench/expert_cache.py: hints cost 13 % of tokens/s at memory
# speed). The ratio is an EWMA over loads (LOAD_EWMA), so a page cache that goes cold turns
# hints on; `hints="on"`/"off" force it.
HINT_LOAD_RATIO = 1.5
LOAD_EWMA = 0.2
# A gap between two requests longer than this is the box idle (between prompts), not a layer
# step: it is left out of the step time that decides whether a hint comes in time
IDLE_GAP_S = 1.0
STOP_TIMEOUT_S = 2.0

log = logging.getLogger("edge_agent")


@dataclass(frozen=True)
class LoadedExperts:
    manifest: Manifest
    weights: dict[int, dict[int, ExpertWeights]]  # expert id -> {MoE layer: its weights}
    device: torch.device
    dtype: torch.dtype
    shard_bytes: int
    scratch: Scratch | None = None  # the dequantising buffer (None: nothing is quantised)
    kernels: dict[int, KernelChoice] = field(default_factory=dict)  # bits -> how it multiplies
    # with a memory budget: the resident layer-experts and their loader (`weights[q][layer]`
    # then loads through it); None: every layer-expert is in `weights`, loaded at start
    store: ExpertStore | None = None

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
        if self.store is not None:
            held = self.store.resident_bytes
        else:
            held = sum(w.nbytes for layers in self.weights.values() for w in layers.values())
        return held + (self.scratch.nbytes if self.scratch is not None else 0)

    def sample_weights(self) -> ExpertWeights:
        """One layer-expert to measure with (the self-benchmark), without loading anything."""
        if self.store is not None:
            return self.store.any_resident()
        return self.weights[self.experts[0]][self.moe_layers[0]]


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
        self.dtype = resolve_dtype(dtype, manifest, self.device)
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


def load_experts(folder: str, experts: list[int], device: str = "auto",
                 dtype: str = "auto", quant_kernels: str = "auto",
                 memory_budget_bytes: int | None = None,
                 load_bytes_per_s: float = 0.0, prefetch_hints: str = "auto") -> LoadedExperts:
    """Check (size, sha256, tensor list) and load expert shards. Quantised layers stay
    quantised; `quant_kernels` auto|on|off says when torch's int8/int4 kernels multiply with them
    (expert_math.choose_kernel). With `memory_budget_bytes`, layer-experts beyond the budget stay
    in the shard and load on demand (ExpertStore; `load_bytes_per_s` emulates slow storage for
    those loads). Raises ShardError."""
    reader = ExpertReader(folder, experts, device, dtype, quant_kernels)
    if memory_budget_bytes is None:
        store = None
        weights = {q: {layer: reader.load(q, layer) for layer in reader.moe_layers}
                   for q in experts}
    else:
        store = ExpertStore(reader, experts, memory_budget_bytes, load_bytes_per_s,
                            prefetch_hints)
        weights = {q: _StoredLayers(store, q) for q in experts}
    return LoadedExperts(manifest=reader.manifest, weights=weights, device=reader.device,
                         dtype=reader.dtype, shard_bytes=reader.shard_bytes,
                         scratch=reader.scratch if reader.scratch.nbytes or store else None,
                         kernels=reader.kernels, store=store)


class ExpertStore:
    """Layer-experts under a memory budget: the resident ones in a dict, the rest read from the
    shard when a request needs them (a miss: the request waits, a stall) or, ahead of time, when
    a hint names them (a background thread reads, so the read overlaps the agent's other work:
    torch and file reads release the GIL). What stays is expert_cache.ExpertCache's choice.
    The budget covers the units' weights; the dequantising scratch (one matrix) and a unit still
    being computed while a load evicts it (at most one more) come on top. `load_bytes_per_s`
    (emulation, 0: off): a load after the start takes at least its shard bytes / this, as from
    a slow SD card or eMMC (the wait sleeps, so it overlaps like real I/O, and comes before the
    read's CPU, as a real read's does).
    Raises ShardError (at start: when not even one unit fits)."""

    def __init__(self, reader: ExpertReader, experts: Iterable[int], budget_bytes: int,
                 load_bytes_per_s: float = 0.0, hints: str = "auto"):
        if hints not in ("auto", "on", "off"):
            raise ValueError(f"hints {hints!r}: auto, on or off")
        self.reader = reader
        self.hints_mode = hints
        self.load_wall_s = 0.0  # EWMA of a load's time (paced loads: the pace included)
        self.load_cpu_s = 0.0  # EWMA of the CPU a load spends
        self.step_s = 0.0  # EWMA of the time per layer step between requests (0: not yet)
        self._last_request_s: float | None = None
        self.takes_hints = hints == "on"
        self.load_bytes_per_s = load_bytes_per_s
        self.experts = tuple(experts)
        self.layers = reader.moe_layers
        self.budget_bytes = budget_bytes
        self.cache = ExpertCache(self.layers, CacheConfig(budget_bytes))
        self.counters = CacheCounters()
        self.resident: dict[Unit, ExpertWeights] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # a load ended, a hint or request came
        self._loading: set[Unit] = set()
        self._pending: OrderedDict[Unit, None] = OrderedDict()  # hinted, not loaded yet
        self._blocked: set[Unit] = set()  # hinted units with no room until the clock moves
        self._hint_loaded: set[Unit] = set()  # loaded on a hint, not used yet
        # the units the request in progress has yet to compute: no load evicts them
        self._in_use: frozenset[Unit] = frozenset()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._warm()

    @property
    def resident_bytes(self) -> int:
        return self.cache.resident_bytes

    def _warm(self) -> None:
        """Fill the budget at start, in the order a forward pass visits the layers."""
        for layer in self.layers:
            for q in self.experts:
                unit = (q, layer)
                if self.cache.used_bytes + self.cache.estimate(unit) > self.budget_bytes:
                    return
                start_s, cpu_s = time.perf_counter(), time.thread_time()
                weights = self.reader.load(q, layer)
                wall_s = time.perf_counter() - start_s
                if self.load_bytes_per_s:  # later loads are paced
                    wall_s = max(wall_s, self.reader.disk_bytes(q, layer) / self.load_bytes_per_s)
                cpu_s = time.thread_time() - cpu_s
                if self.load_cpu_s == 0.0 or cpu_s < self.load_cpu_s:  # the least CPU: the
                    self._measured(wall_s, cpu_s, seed=True)  # others paid for a cold start
                if not self.resident and weights.nbytes > self.budget_bytes:
                    raise ShardError(f"--memory-budget {self.budget_bytes} bytes is smaller "
                                     f"than one layer-expert ({weights.nbytes} bytes)")
                if self.cache.used_bytes + weights.nbytes > self.budget_bytes:
                    return
                self.cache.insert(unit, weights.nbytes)
                self.resident[unit] = weights
                self.counters.loads += 1
        self.counters.resident_bytes = self.cache.resident_bytes

    def _measured(self, wall_s: float, cpu_s: float, seed: bool = False) -> None:
        """One load's time and CPU: whether hints are worth taking (HINT_LOAD_RATIO). `seed`:
        replace the figures (at start)."""
        if seed or self.load_cpu_s == 0.0:
            self.load_wall_s, self.load_cpu_s = wall_s, max(cpu_s, 1e-6)
        else:
            self.load_wall_s += LOAD_EWMA * (wall_s - self.load_wall_s)
            self.load_cpu_s += LOAD_EWMA * (max(cpu_s, 1e-6) - self.load_cpu_s)
        if self.hints_mode == "auto":
            self.takes_hints = self.load_wall_s >= HINT_LOAD_RATIO * self.load_cpu_s

    def any_resident(self) -> ExpertWeights:
        with self._lock:
            return next(iter(self.resident.values()))

    # -- requests -------------------------------------------------------------------------------

    def acquire(self, layer: int, experts: Iterable[int]) -> dict[int, dict[int, ExpertWeights]]:
        """One request's weights, {expert: {layer: weights}}: the resident ones (hits), the
        others loaded now, the request waiting (misses, stall). Raises ShardError."""
        units = [(q, layer) for q in experts]
        out: dict[int, dict[int, ExpertWeights]] = {}
        missing = []
        with self._lock:
            self._advance(layer)
            for unit in units:
                weights = self.resident.get(unit)
                if weights is None:
                    missing.append(unit)
                    continue
                self.counters.hits += 1
                if unit in self._hint_loaded:
                    self._hint_loaded.discard(unit)
                    self.counters.hinted_hits += 1
                self.cache.touch(unit)
                out[unit[0]] = {layer: weights}
            if self._pending:
                self._changed.notify_all()
        for unit in missing:
            start_s = time.perf_counter()
            weights = self._load(unit, units)
            with self._lock:
                self.counters.misses += 1
                self.counters.stall_s += time.perf_counter() - start_s
                self._hint_loaded.discard(unit)
                self.cache.touch(unit)
            out[unit[0]] = {layer: weights}
        return out

    def acquire_each(self, layer: int, experts: Sequence[int]
                     ) -> Iterator[tuple[int, ExpertWeights]]:
        """One request's weights, (expert, weights) in its order, each resident or loaded just
        before the caller computes it, so that what is resident stays within the budget and
        one unit: `acquire` loads them all first, and one request naming 8 experts left 7.9x
        the budget resident (issue 20). The units still to come are kept from eviction.
        Raises ShardError."""
        units = [(q, layer) for q in experts]
        with self._lock:
            self._advance(layer)
            self._in_use = frozenset(units)
            if self._pending:
                self._changed.notify_all()
        try:
            for i, unit in enumerate(units):
                with self._lock:
                    weights = self.resident.get(unit)
                    if weights is not None:
                        self.counters.hits += 1
                        if unit in self._hint_loaded:
                            self._hint_loaded.discard(unit)
                            self.counters.hinted_hits += 1
                        self.cache.touch(unit)
                if weights is None:
                    start_s = time.perf_counter()
                    weights = self._load(unit)
                    with self._lock:
                        self.counters.misses += 1
                        self.counters.stall_s += time.perf_counter() - start_s
                        self._hint_loaded.discard(unit)
                        self.cache.touch(unit)
                with self._lock:  # computed next: a later load may evict it (the one unit)
                    self._in_use = frozenset(units[i + 1:])
                yield unit[0], weights
                del weights  # before the next load: the budget and one unit, not two
        finally:
            with self._lock:
                self._in_use = frozenset()

    def _advance(self, layer: int) -> None:
        """A request for `layer` (under the lock): the cache's clock, and the step time."""
        now_s = time.perf_counter()
        if self._last_request_s is not None and self.cache.clock is not None:
            gap_s = now_s - self._last_request_s
            if gap_s < IDLE_GAP_S:
                sample_s = gap_s / self.cache.distance((0, layer))
                self.step_s = sample_s if self.step_s == 0.0 else \
                    self.step_s + LOAD_EWMA * (sample_s - self.step_s)
        self._last_request_s = now_s
        self.cache.advance(layer)
        self._blocked.clear()  # the clock moved: hints without room may fit now

    def _in_time(self, unit: Unit, loads_ahead: int) -> bool:
        """hint_in_time for `unit` now (under the lock)."""
        return hint_in_time(self.cache.distance(unit), self.step_s, loads_ahead,
                            self.load_wall_s)

    def _load(self, unit: Unit, protect: Iterable[Unit] = (), for_hint: bool = False
              ) -> ExpertWeights | None:
        """Make `unit` resident and return it; a hint's load returns None when it is no longer
        wanted or has no room now. Raises ShardError."""
        with self._lock:
            while unit in self._loading:  # the other thread is reading it: wait for that
                self._changed.wait()
            weights = self.resident.get(unit)
            if weights is not None:
                return weights
            if for_hint and not self.cache.wanted(unit):
                return None
            estimate = self.cache.estimate(unit)
            protect = {*protect, *self._in_use}
            victims = self.cache.victims(estimate, protect, for_hint=unit if for_hint else None)
            if victims is None:
                self._blocked.add(unit)
                return None
            self._evict(victims)
            self.cache.reserve(unit, estimate)
            self._loading.add(unit)
        try:
            start_s = time.perf_counter()
            paced_s = self.reader.disk_bytes(*unit) / self.load_bytes_per_s \
                if self.load_bytes_per_s else 0.0
            if paced_s:  # storage first, then the CPU (conversion), as a real read goes: a
                # hinted load's CPU then comes after the request it overlaps, not during it
                time.sleep(max(0.0, paced_s - self.load_cpu_s))
            cpu_s = time.thread_time()
            weights = self.reader.load(*unit)
            cpu_s = time.thread_time() - cpu_s
            if paced_s:
                time.sleep(max(0.0, paced_s - (time.perf_counter() - start_s)))
        except BaseException:
            with self._lock:
                self.cache.cancel(unit)
                self._loading.discard(unit)
                self._changed.notify_all()
            raise
        wall_s = time.perf_counter() - start_s
        with self._lock:
            self._measured(wall_s, cpu_s)
            self._loading.discard(unit)
            self.cache.insert(unit, weights.nbytes)
            self.resident[unit] = weights
            self.counters.loads += 1
            if for_hint:
                self.counters.hinted_loads += 1
                self._hint_loaded.add(unit)
            self._evict(self.cache.victims(0, {*protect, unit}) or [])  # larger than estimated
            self.counters.resident_bytes = self.cache.resident_bytes
            self._changed.notify_all()
        return weights

    def _evict(self, units: list[Unit]) -> None:
        for unit in units:  # a request computing with one keeps its tensors alive until done
            self.resident.pop(unit, None)
            self.cache.evict(unit)
            self._hint_loaded.discard(unit)
            self.counters.evictions += 1
            if unit in self.cache.hinted:  # a request took its room: load it again when it can
                self._pending[unit] = None
        self.counters.resident_bytes = self.cache.resident_bytes

    # -- hints ----------------------------------------------------------------------------------

    def hint(self, layer: int, experts: Iterable[int],
             percent: Iterable[int] | None = None) -> None:
        """These experts of `layer` are needed soon (with these chances, in percent; None:
        surely): load the missing ones in the background. Experts not hosted here and layers
        without experts are ignored."""
        if layer not in self.cache.position:
            return
        if not self.takes_hints:  # loads from memory: a hint would cost more than it saves
            self.counters.hints_ignored += 1
            return
        if percent is None:
            percent = [100] * len(experts)
        added = False
        with self._lock:
            self.counters.hints += 1
            for q, chance in zip(experts, percent):
                unit = (q, layer)
                # a resident unit costs two dict writes: kept until its layer comes round
                if q in self.experts and self.cache.hint(unit, chance / 100):
                    if not self._in_time(unit, len(self._pending) + len(self._loading)):
                        self.cache.drop_hint(unit)
                        self.counters.hints_late += 1
                        continue
                    self._pending[unit] = None
                    self._pending.move_to_end(unit)
                    added = True
            if not added:  # nothing to load: the loader sleeps on
                return
            while len(self._pending) > MAX_PENDING_HINTS:
                self._pending.popitem(last=False)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="expert-prefetch",
                                                daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def _next_hinted(self) -> Unit | None:
        for unit in list(self._pending):
            if not self.cache.wanted(unit):
                del self._pending[unit]
            elif not self._in_time(unit, len(self._loading)):  # too late by now
                del self._pending[unit]
                self.cache.drop_hint(unit)
                self.counters.hints_late += 1
            elif unit not in self._blocked:
                del self._pending[unit]
                return unit
        return None

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    unit = self._next_hinted()
                    while unit is None and not self._stop:
                        self._changed.wait()
                        unit = self._next_hinted()
                    if self._stop:
                        return
                try:
                    if self._load(unit, for_hint=True) is None:
                        with self._lock:
                            if self.cache.wanted(unit):  # no room yet: once the clock moves
                                self._pending[unit] = None
                except Exception as e:  # noqa: BLE001 (a hint must never take the agent down)
                    log.warning("prefetch of expert %d layer %d failed: %s", unit[0], unit[1], e)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)

    def figures(self) -> dict:
        """For `info`: the budget, what is resident, and the counters."""
        with self._lock:
            c = self.counters
            return {"budget_bytes": self.budget_bytes, "units": len(self.experts) *
                    len(self.layers), "resident_units": len(self.resident),
                    "resident_bytes": self.cache.resident_bytes, "hits": c.hits,
                    "misses": c.misses, "stall_s": round(c.stall_s, 6), "loads": c.loads,
                    "evictions": c.evictions, "hinted_hits": c.hinted_hits, "hints": c.hints,
                    "hinted_loads": c.hinted_loads, "hints_ignored": c.hints_ignored,
                    "hints_late": c.hints_late, "step_ms": round(self.step_s * 1e3, 3),
                    # whether it takes hints now (the base station sends none when false)
                    "prefetch": self.takes_hints, "load_ms": round(self.load_wall_s * 1e3, 3),
                    "load_cpu_ms": round(self.load_cpu_s * 1e3, 3)}

    def reply_fields(self) -> list[int]:
        return self.counters.reply_fields()  # ints read without the lock: a torn read is fine


class _StoredLayers(Mapping):
    """`loaded.weights[q]` of a budgeted box: layer -> weights, loaded through the store."""

    def __init__(self, store: ExpertStore, expert: int):
        self.store, self.expert = store, expert

    def __getitem__(self, layer: int) -> ExpertWeights:
        if layer not in self.store.cache.position:
            raise KeyError(layer)
        return self.store.acquire(layer, [self.expert])[self.expert][layer]

    def __contains__(self, layer) -> bool:  # Mapping's would load the unit
        return layer in self.store.cache.position

    def __iter__(self) -> Iterator[int]:
        return iter(self.store.layers)

    def __len__(self) -> int:
        return len(self.store.layers)

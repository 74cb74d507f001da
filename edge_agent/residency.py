"""Budgeted residency: layer-experts under a memory budget (`edge_agent --memory-budget`).

Those beyond the budget stay in the shard and load on demand, or ahead of time on a hint, on
this module's own loader thread; what stays is edge_agent/expert_cache.py's choice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

from common.errors import ShardError
from edge_agent.expert_cache import CacheConfig, CacheCounters, ExpertCache, Unit, hint_in_time
from edge_agent.expert_math import ExpertWeights
from edge_agent.shard_reader import ExpertReader

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
            for q, chance in zip(experts, percent, strict=False):
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


class StoredLayers(Mapping):
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

"""Which layer-experts a memory-budgeted agent keeps (`edge_agent --memory-budget`): a pure
policy, no clocks, threads or I/O, so it is tested with hand numbers (tests/test_memory_budget.py).
edge_agent/shards.py's ExpertStore does the loading and the locking around it.

A unit is one expert's FFN at one MoE layer. Decode walks the MoE layers in a cycle, token after
token, so the unit to evict is the one needed last (Belady's rule), and recency is the wrong
guide: on a cycle longer than the cache, LRU evicts exactly the unit needed next and never hits.
With the clock at position c (the layer of the last request, positions 0..n-1 over the n MoE
layers), a unit u at position l_u is next needed after

    steps(u) = d(u) + n (1 - p_u) / p_u,      d(u) = (l_u - c - 1) mod n + 1           (1)

layer steps: its layer comes round in d steps and is then used with probability p_u, else a
whole pass later, and so on (a geometric number of passes). The unit with the most steps goes
first. p_u is the share of the completed passes (tokens) that used u, forgetting old passes
geometrically:

    p_u = (uses_u + PRIOR_USE * PRIOR_PASSES) / (passes + PRIOR_PASSES)                (2)

where uses_u and passes are multiplied by `decay` at each new pass. The pass in progress does
not count: it has used the units of the layers behind the clock and not yet those ahead, and
counting it would rank the layer just served above the next one (measured: 1 hit in 4 instead
of Belady's 1 in 3 on a 4-layer cycle with room for 2). That is EdgeMoE's "keep the
experts used often, and those of the layers coming next". A unit a hint asked for is kept until
its layer has come round once (used or not) unless a request needs the room, and a hint never
evicts a unit needed sooner than the hinted one: a hint that says the unit is used with
probability h when its layer comes round gives it steps d + n (1 - h) / h, as (1) does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Unit = tuple[int, int]  # (expert id, MoE layer)

PRIOR_USE = 0.5  # a unit never seen: used on half the passes, until passes say otherwise
PRIOR_PASSES = 1.0  # how many passes that prior weighs


@dataclass(frozen=True)
class CacheConfig:
    budget_bytes: int
    decay: float = 0.95  # per pass (token): a use counts half after ~14 tokens


@dataclass
class CacheCounters:
    """What a budgeted agent reports (info and every expert reply, protocol.CACHE_FIELDS)."""

    hits: int = 0  # units a request found resident
    misses: int = 0  # units a request had to wait for (loaded then, or a load in progress)
    stall_s: float = 0.0  # time requests waited for those
    loads: int = 0  # units read from the shard (at start, on a miss or on a hint)
    evictions: int = 0
    resident_bytes: int = 0
    hinted_hits: int = 0  # hits on units a hint loaded
    hints: int = 0  # hint messages taken
    hinted_loads: int = 0  # loads a hint started
    hints_ignored: int = 0  # hint messages dropped: loads cost no waiting (residency.ExpertStore)
    hints_late: int = 0  # hinted units dropped: their load would end after their layer's turn

    def reply_fields(self) -> list[int]:
        """protocol.CACHE_FIELDS order: small integers, the stall in microseconds."""
        return [self.hits, self.misses, int(self.stall_s * 1e6), self.loads, self.evictions,
                self.resident_bytes, self.hinted_hits]


# A hinted load may end up to this many times the time until its layer's turn: one that ends
# a little late still spares the request most of its wait (it waits for the load in progress)
HINT_LATE_FACTOR = 2.0


def hint_in_time(distance_steps: int, step_s: float, loads_ahead: int, load_s: float) -> bool:
    """Whether a hinted load that starts after `loads_ahead` others (each `load_s`) ends in
    time for its layer, `distance_steps` layer steps of `step_s` away (HINT_LATE_FACTOR). One
    far too late is a load whose layer goes by, or that the request could have started itself
    (a flood of hints made 919 loads of which 158 were used: issue 20). Not measured yet (0):
    in time."""
    if step_s <= 0.0 or load_s <= 0.0:
        return True
    return (loads_ahead + 1) * load_s <= HINT_LATE_FACTOR * distance_steps * step_s


class ExpertCache:
    """The bookkeeping of one agent's resident units against its budget, and the policy (1)-(2).
    `layers`: the MoE layers in the order a forward pass visits them."""

    def __init__(self, layers: Sequence[int], config: CacheConfig):
        if config.budget_bytes <= 0 or not 0.0 < config.decay <= 1.0:
            raise ValueError(f"budget {config.budget_bytes} and decay {config.decay}: a budget "
                             "above 0 and a decay in (0, 1]")
        self.config = config
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.n = len(layers)
        self.clock: int | None = None  # position of the last request's layer
        self.passes = 0.0  # completed passes, decayed
        self.pass_index = 0  # the pass in progress
        self.uses: dict[Unit, float] = {}  # over the completed passes, decayed
        self._used_in_pass: dict[Unit, int] = {}  # unit -> the last pass that used it
        self.sizes: dict[Unit, int] = {}  # resident units -> bytes
        self.reserved: dict[Unit, int] = {}  # units being loaded -> estimated bytes
        self.known_bytes: dict[Unit, int] = {}  # every unit's size, once loaded
        self.hinted: dict[Unit, int] = {}  # unit -> layer steps until the hint's use
        self.hint_use: dict[Unit, float] = {}  # unit -> the hint's probability of that use

    # -- the clock --------------------------------------------------------------------------

    def advance(self, layer: int) -> None:
        """A request for `layer` arrived: move the clock there (a new pass when it does not move
        forward), forget old passes, and drop the hints whose layer went by unused."""
        target = self.position[layer]
        if self.clock is None:
            steps = 0
        else:
            steps = (target - self.clock - 1) % self.n + 1
            if target <= self.clock:  # wrapped round: the pass is complete, a new token
                decay = self.config.decay
                for unit in self.uses:
                    self.uses[unit] *= decay
                for unit, index in self._used_in_pass.items():
                    if index == self.pass_index:
                        self.uses[unit] = self.uses.get(unit, 0.0) + 1.0
                self.passes = self.passes * decay + 1.0
                self.pass_index += 1
        self.clock = target
        for unit in list(self.hinted):
            left = self.hinted[unit] - steps
            if left < 0:  # its layer came and went: the hint was wrong (or too late)
                del self.hinted[unit]
                self.hint_use.pop(unit, None)
            else:
                self.hinted[unit] = left

    def touch(self, unit: Unit) -> None:
        """A request used `unit` (counted once per pass, when the pass is complete)."""
        self._used_in_pass[unit] = self.pass_index
        self.hinted.pop(unit, None)
        self.hint_use.pop(unit, None)

    def distance(self, unit: Unit) -> int:
        """d(u) of (1): layer steps until the unit's layer comes round (n: it was just served)."""
        if self.clock is None:
            return self.position[unit[1]] + 1
        return (self.position[unit[1]] - self.clock - 1) % self.n + 1

    def use_probability(self, unit: Unit) -> float:
        """p_u of (2), over the completed passes."""
        return (self.uses.get(unit, 0.0) + PRIOR_USE * PRIOR_PASSES) / (self.passes + PRIOR_PASSES)

    def steps(self, unit: Unit) -> float:
        """(1): expected layer steps until a request needs `unit`."""
        p = self.use_probability(unit)
        return self.distance(unit) + self.n * (1.0 - p) / p

    # -- hints ------------------------------------------------------------------------------

    def hint(self, unit: Unit, probability: float = 1.0) -> bool:
        """A hint says `unit` is needed when its layer next comes round, with `probability`;
        True when it must be loaded (not resident, not being loaded)."""
        self.hinted[unit] = self.distance(unit)
        self.hint_use[unit] = min(1.0, max(probability, 0.01))
        return unit not in self.sizes and unit not in self.reserved

    def drop_hint(self, unit: Unit) -> None:
        """A hint not acted on (too late): it protects nothing."""
        self.hinted.pop(unit, None)
        self.hint_use.pop(unit, None)

    def hint_steps(self, unit: Unit) -> float:
        """(1) for a hinted unit, with the hint's probability."""
        h = self.hint_use.get(unit, 1.0)
        return self.distance(unit) + self.n * (1.0 - h) / h

    def wanted(self, unit: Unit) -> bool:
        """Whether a hinted unit is still worth loading (its layer has not gone by)."""
        return unit in self.hinted and unit not in self.sizes and unit not in self.reserved

    # -- room -------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(self.sizes.values()) + sum(self.reserved.values())

    @property
    def resident_bytes(self) -> int:
        return sum(self.sizes.values())

    def estimate(self, unit: Unit) -> int:
        """Bytes `unit` will take: its own size once known, else the largest seen (the units of
        one shard are alike), else 0 (the first load measures)."""
        if unit in self.known_bytes:
            return self.known_bytes[unit]
        return max(self.known_bytes.values(), default=0)

    def victims(self, need_bytes: int, protect: Iterable[Unit] = (),
                for_hint: Unit | None = None) -> list[Unit] | None:
        """Resident units to evict, most steps first, so that `need_bytes` more fit the budget.
        A request's load (`for_hint` None) takes what it needs, hinted units last, never those
        in `protect`, and may end over the budget when only protected units are left (the
        request needs them all at once). A hint's load evicts no hinted unit and none needed
        sooner than `for_hint`; None when that leaves too little room."""
        over = self.used_bytes + need_bytes - self.config.budget_bytes
        if over <= 0:
            return []
        protect = set(protect)
        if for_hint is not None:
            limit = self.hint_steps(for_hint)
            candidates = [u for u in self.sizes
                          if u not in protect and u not in self.hinted and self.steps(u) > limit]
        else:
            candidates = [u for u in self.sizes if u not in protect]
        # unhinted first, then by expected steps (1), the most first; ties: the higher layer
        candidates.sort(key=lambda u: (u not in self.hinted, self.steps(u), u[1], u[0]),
                        reverse=True)
        chosen = []
        for unit in candidates:
            if over <= 0:
                break
            chosen.append(unit)
            over -= self.sizes[unit]
        if over > 0 and for_hint is not None:
            return None
        return chosen

    def reserve(self, unit: Unit, nbytes: int) -> None:
        self.reserved[unit] = nbytes

    def cancel(self, unit: Unit) -> None:
        """A load that failed."""
        self.reserved.pop(unit, None)

    def insert(self, unit: Unit, nbytes: int) -> None:
        """A load finished: `unit` is resident, `nbytes` its measured size."""
        self.reserved.pop(unit, None)
        self.sizes[unit] = nbytes
        self.known_bytes[unit] = nbytes

    def evict(self, unit: Unit) -> None:
        self.sizes.pop(unit, None)

"""Where each expert lives, and how many copies it gets (issue 24's planner): pure.

Inputs are measured: each expert's load (how many (token, layer) slots the routers sent it,
counted while serving, or on a given text) and each box's time per call (a short probe) and
room (experts it can hold: memory / one expert's shard, or a fixed count). The plan follows
DeepSeek's EPLB (replicate the most loaded by load per copy, pack by load), with each box's
measured speed in place of EPLB's equal GPUs:

1. Replicate: for every number of copies the boxes' room allows, EPLB's counts (one copy
   each, every further copy to the expert with the highest load per copy).
2. Pack: copies in falling load per copy, each onto the box with room that then finishes
   its load earliest (load x its seconds per unit), so a slow box takes the cold ones.
3. Keep the count whose plan is shortest in the model below: copies that would not shorten
   it by MIN_GAIN are not made (memory stays free), and a hot expert's copies land on fast
   boxes.
4. Prune slivers: a copy that would take under MIN_SHARE of its expert's load (a slow box
   beside fast holders) is removed, its load left to the others: it would cost the box's memory
   and a push for almost nothing, and the base station's route would hardly ever pick it.

The model of a plan: an expert's tokens are spread over its copies in proportion to their
boxes' speed (1 / seconds per unit of load), so every holder of expert e spends
load_e / sum of its holders' speeds on it, and a box's time is the sum of that over its
experts. Plans compare by their box times sorted from the slowest down (what a layer waits
for under Eq. 7's max, then the next slowest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# a plan with more copies is kept only if it is shorter by this share (of the box time where
# the two plans first differ): a copy costs a box's memory and a push
MIN_GAIN = 0.02
# a copy whose box would take less than this share of its expert's load is not kept
MIN_SHARE = 0.1


class PlacementError(ValueError):
    """Inputs that cannot be planned: no room for one copy of every expert, bad numbers."""


@dataclass(frozen=True)
class BoxProfile:
    """One box as measured. time_s_per_load: seconds it takes per unit of load (one
    (token, layer) slot's call: round trip share plus compute); capacity: experts it can hold."""

    name: str
    time_s_per_load: float
    capacity: int


@dataclass(frozen=True)
class Placement:
    """experts_of[b]: expert ids on box b (ascending); holders[e]: box indices holding e;
    copies[e]: len(holders[e]); box_time_s[b]: planned load x time per load."""

    experts_of: tuple[tuple[int, ...], ...]
    holders: tuple[tuple[int, ...], ...]
    box_time_s: tuple[float, ...]

    @property
    def copies(self) -> tuple[int, ...]:
        return tuple(len(h) for h in self.holders)

    @property
    def time_s(self) -> float:
        return max(self.box_time_s, default=0.0)


def replica_counts(load: list[float], slots: int, max_copies: int | None = None) -> list[int]:
    """Copies per expert for `slots` copies in all (>= len(load)): one each, then every
    further copy to the expert with the highest load per copy (ties: the lower id), none past
    `max_copies` (None: no cap; slots no expert can take are left unused)."""
    num_experts = len(load)
    if slots < num_experts:
        raise PlacementError(f"{slots} slots cannot hold one copy of each of {num_experts} experts")
    copies = [1] * num_experts
    for _ in range(slots - num_experts):
        open_ = [e for e in range(num_experts) if max_copies is None or copies[e] < max_copies]
        if not open_:
            break
        best = max(open_, key=lambda e: (load[e] / copies[e], -e))
        copies[best] += 1
    return copies


def plan_placement(load: list[float], boxes: list[BoxProfile],
                   max_copies: int | None = None) -> Placement:
    """Place len(load) experts on `boxes` (see the module doc), at most one copy of an expert
    per box and `max_copies` copies of any expert (None: one per box). Raises PlacementError
    when the boxes cannot hold one copy of each."""
    _check(load, boxes)
    num_experts = len(load)
    max_copies = len(boxes) if max_copies is None else max(1, min(max_copies, len(boxes)))
    speed = [1.0 / box.time_s_per_load for box in boxes]
    slots = min(sum(box.capacity for box in boxes), num_experts * max_copies)
    best, best_key = None, None
    for total in range(num_experts, slots + 1):
        held = _pack(load, replica_counts(load, total, max_copies), boxes)
        if held is None:
            continue
        times = box_times_s(load, held, speed)
        key = sorted(times, reverse=True)
        if best_key is None or _shorter(key, best_key, MIN_GAIN):
            best, best_key = (held, times), key
    if best is None:
        raise PlacementError("the boxes' room cannot take one copy of every expert")
    held = _prune_slivers(load, best[0], speed)
    times = box_times_s(load, held, speed)
    holders = tuple(tuple(b for b in range(len(boxes)) if e in held[b])
                    for e in range(num_experts))
    return Placement(tuple(tuple(sorted(h)) for h in held), holders, tuple(times))


def _prune_slivers(load: list[float], held: list[set[int]], speed: list[float]
                   ) -> list[set[int]]:
    """`held` without the copies whose box would take under MIN_SHARE of the expert's load
    (its speed over its holders' summed speed), slowest first; every expert keeps a holder."""
    held = [set(experts) for experts in held]
    for expert in range(len(load)):
        holders = sorted((b for b, experts in enumerate(held) if expert in experts),
                         key=lambda b: speed[b])
        while len(holders) > 1 and speed[holders[0]] < MIN_SHARE * sum(
                speed[b] for b in holders):
            held[holders.pop(0)].discard(expert)
    return held


def _pack(load: list[float], copies: list[int], boxes: list[BoxProfile]) -> list[set[int]] | None:
    """EPLB's packing with speeds: copies in falling load per copy, each onto the box with room
    (and no copy of it yet) that then finishes its load earliest; None if a copy finds none."""
    items = sorted(((load[e] / copies[e], e) for e in range(len(load))
                    for _ in range(copies[e])), key=lambda item: (-item[0], item[1]))
    held: list[set[int]] = [set() for _ in boxes]
    box_load = [0.0] * len(boxes)
    for per_copy, expert in items:
        room = [b for b, box in enumerate(boxes)
                if len(held[b]) < box.capacity and expert not in held[b]]
        if not room:
            return None
        best = min(room, key=lambda b: ((box_load[b] + per_copy) * boxes[b].time_s_per_load,
                                        boxes[b].time_s_per_load, b))
        held[best].add(expert)
        box_load[best] += per_copy
    return held


def box_times_s(load: list[float], held: list[set[int]], speed: list[float]) -> list[float]:
    """Each box's planned time: an expert's load spread over its holders in proportion to
    their speed, so each holder of e spends load_e / (sum of its holders' speeds) on it."""
    speed_sum = [0.0] * len(load)
    for b, experts in enumerate(held):
        for e in experts:
            speed_sum[e] += speed[b]
    return [sum(load[e] / speed_sum[e] for e in experts) for experts in held]


def _shorter(a: list[float], b: list[float], gain: float = 0.0) -> bool:
    """a before b with the slowest box first: at the first box time where they differ by more
    than rounding, a's is smaller than b's by more than `gain` of it."""
    for x, y in zip(a, b):
        if abs(x - y) > 1e-9 * max(1.0, abs(y)):
            return x < y * (1.0 - gain)
    return False


def _check(load: list[float], boxes: list[BoxProfile]) -> None:
    if not load:
        raise PlacementError("no experts to place")
    if not boxes:
        raise PlacementError("no boxes to place experts on")
    if any(not math.isfinite(x) or x < 0 for x in load):
        raise PlacementError("expert loads must be finite and >= 0")
    for box in boxes:
        if not math.isfinite(box.time_s_per_load) or box.time_s_per_load <= 0:
            raise PlacementError(f"box {box.name}: time per load must be finite and > 0")
        if box.capacity < 0:
            raise PlacementError(f"box {box.name}: capacity must be >= 0")
    room = sum(b.capacity for b in boxes)
    if room < len(load):
        raise PlacementError(f"the boxes hold {room} experts in all, fewer than the "
                             f"{len(load)} to place")


def capacity_from_memory(memory_bytes: float, expert_bytes: float) -> int:
    """Experts a box can hold: whole shards that fit in its memory for experts."""
    if expert_bytes <= 0:
        raise PlacementError("an expert's shard size must be > 0")
    return max(0, int(memory_bytes // expert_bytes))

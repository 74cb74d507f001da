"""EdgeMoE's expert predictor, for prefetch hints to memory-budgeted agents: which experts a
token takes at the next MoE layer, given those it took at this one. Pure: no sockets, no clocks;
basestation/moe_layer.py sends the hints it plans.

The table is learned online from the routing the base station sees (and may be seeded from a
calibration run, `state()` / `RoutePredictor.from_state`): for consecutive MoE layers l -> l'
of one forward pass, counts[l][i, j] is how many tokens routed to expert i at l went to expert
j at l'. The pass's last layer counts into the next pass's first (decode: this token's last
layer, the next token's first) when both passes have as many tokens. For a token routed to the
set S at layer l, the chance it takes expert j at l' is

    q_j = K * sum_{i in S} counts[l][i, j] / sum_{i in S} sum_j' counts[l][i, j']          (1)

(K = experts per token: the row mass shared out over K picks, capped at 1), and for T tokens
the chance some token takes j is P_j = 1 - prod_t (1 - q_tj). Experts with P_j >= min_probability
are hinted, at most max_experts per layer, the likeliest first.

Shape legend: T = tokens, K = experts per token, E = experts.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import numpy as np

from wire.protocol import prefetch_fields

# above the uniform guess K/E of the usual MoE (2/8 Mixtral, 8/64 OLMoE): a hint that evicts
# something for a coin flip is worse than none
MIN_HINT_PROBABILITY = 0.3


@dataclass(frozen=True)
class PrefetchConfig:
    min_probability: float = MIN_HINT_PROBABILITY
    max_experts: int = 8  # per layer, over all agents (the top-k of most MoEs, and a margin)


def multi_hot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """experts [T, K] (ids) -> [T, E] float64 with 1 at each token's experts."""
    out = np.zeros((experts.shape[0], num_experts))
    np.put_along_axis(out, experts, 1.0, axis=1)
    return out


class RoutePredictor:
    """The transition table (1), learned by `observe`, asked by `predict`. numpy, not torch:
    it runs on every layer of every token, and on [E, E] tables a numpy call costs a few
    microseconds where a torch one costs ten (measured: 68 us a layer in torch)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        # layer -> [E][E] counts, plain lists: decode's update (K x K cells) and question (K rows
        # summed) are a few list operations, where numpy's indexed += and sums cost ~4 us each
        # hot and ~50 us on a base station just woken by a reply (measured in situ)
        self._rows: dict[int, list[list[float]]] = {}
        self.next_layer: dict[int, int] = {}  # layer -> the MoE layer seen after it
        self._previous: tuple[int, np.ndarray] | None = None  # (layer, experts [T, K])
        self.observations = 0  # transitions counted: a plan made from fewer may be stale

    def observe(self, layer: int, experts: np.ndarray) -> None:
        """The router's experts [T, K] at `layer` (ids, distinct per token): count the
        transitions from the layer seen before it."""
        previous = self._previous
        if previous is not None and previous[1].shape[0] == experts.shape[0]:
            before, seen = previous
            rows = self._rows.get(before)
            if rows is None:
                rows = self._rows[before] = [[0.0] * self.num_experts
                                             for _ in range(self.num_experts)]
            if experts.shape[0] == 1:  # decode: one token, K x K cells
                now = experts[0].tolist()
                for i in seen[0].tolist():
                    row = rows[i]
                    for j in now:
                        row[j] += 1.0
            else:
                self._rows[before] = (np.array(rows) + multi_hot(seen, self.num_experts).T
                                      @ multi_hot(experts, self.num_experts)).tolist()
            self.next_layer[before] = layer
            self.observations += experts.shape[0]
        self._previous = (layer, experts)

    @property
    def counts(self) -> dict[int, np.ndarray]:
        """layer -> [E, E] float64, the transitions counted so far (a copy)."""
        return {layer: np.array(rows) for layer, rows in self._rows.items()}

    def predict_one(self, layer: int, experts: list[int]) -> tuple[int, list[float]] | None:
        """`predict` for one token's experts [K] (ids), in plain lists: (1)."""
        rows, following = self._rows.get(layer), self.next_layer.get(layer)
        if rows is None or following is None:
            return None
        mass = [sum(column) for column in zip(*(rows[i] for i in experts))]
        total = sum(mass)
        if total == 0:  # experts never seen here: no guess
            return None
        scale = len(experts) / total
        return following, [min(m * scale, 1.0) for m in mass]

    def predict(self, layer: int, experts: np.ndarray) -> tuple[int, np.ndarray] | None:
        """(the next MoE layer, P [E]: the chance some token takes each expert there) for tokens
        routed to `experts` [T, K] at `layer`; None while the table knows nothing of it."""
        if experts.shape[0] == 1:
            one = self.predict_one(layer, experts[0].tolist())
            return None if one is None else (one[0], np.array(one[1]))
        rows, following = self._rows.get(layer), self.next_layer.get(layer)
        if rows is None or following is None:
            return None
        mass = multi_hot(experts, self.num_experts) @ np.array(rows)  # [T, E]
        total = mass.sum(axis=1, keepdims=True)  # [T, 1]
        q = np.minimum(experts.shape[1] * mass / np.maximum(total, 1e-12), 1.0)  # (1), [T, E]
        return following, 1.0 - np.prod(1.0 - q, axis=0)

    def state(self) -> dict:
        """The table as plain data (JSON-able), to seed another run."""
        return {"num_experts": self.num_experts,
                "counts": {str(k): [list(row) for row in v] for k, v in self._rows.items()},
                "next_layer": {str(k): v for k, v in self.next_layer.items()}}

    @classmethod
    def from_state(cls, state: Mapping) -> RoutePredictor:
        """Raises ValueError (KeyError, TypeError) on data that is not a `state()`."""
        predictor = cls(int(state["num_experts"]))
        for key, rows in state["counts"].items():
            table = np.array(rows, dtype=np.float64)
            if table.shape != (predictor.num_experts, predictor.num_experts):
                raise ValueError(f"layer {key}: a {list(table.shape)} table, not "
                                 f"[{predictor.num_experts}, {predictor.num_experts}]")
            predictor._rows[int(key)] = table.tolist()
        predictor.next_layer = {int(k): int(v) for k, v in state["next_layer"].items()}
        return predictor


def plan_hints(probability: np.ndarray, owner: Mapping[int, Hashable],
               config: PrefetchConfig = PrefetchConfig()) -> dict[Hashable, list[int]]:
    """P [E] -> {agent: its experts to hint, likeliest first}: experts at or above
    min_probability, at most max_experts, only those `owner` (expert -> agent) names."""
    order = sorted(range(len(probability)), key=lambda e: -probability[e])[:config.max_experts]
    hints: dict[Hashable, list[int]] = {}
    for expert in order:
        if probability[expert] < config.min_probability:
            break
        agent = owner.get(expert)
        if agent is not None:
            hints.setdefault(agent, []).append(expert)
    return hints


class HintPlans:
    """plan_hints over `predict`, remembered per (layer, a decode token's experts): decode asks
    the same few questions every token, and a plan costs ~15 us hot but ~80 us on a base station
    just woken by a reply (measured in situ), 4 to 8 times a token. A plan is made again once
    the table has counted REFRESH more transitions, or a quarter more, since it was made.
    Plans are {key: its PREFETCH fields (protocol.prefetch_fields)}."""

    REFRESH = 16

    def __init__(self, predictor: RoutePredictor, owner: Mapping[int, Hashable],
                 config: PrefetchConfig):
        self.predictor, self.owner, self.config = predictor, owner, config
        self._plans: dict[tuple[int, ...], tuple[int, dict]] = {}

    def plan(self, layer: int, experts: np.ndarray) -> dict[Hashable, dict]:
        """Observe this layer's routing `experts` [T, K] and plan the next layer's hints:
        {agent: PREFETCH fields}."""
        predictor = self.predictor
        predictor.observe(layer, experts)
        key = None
        if experts.shape[0] == 1:  # decode: (1) does not depend on the order of the experts
            ids = experts[0].tolist()
            key = (layer, *sorted(ids))
            made = self._plans.get(key)
            if made is not None and predictor.observations - made[0] <= max(self.REFRESH,
                                                                              made[0] // 4):
                return made[1]
            predicted = predictor.predict_one(layer, ids)
        else:
            predicted = predictor.predict(layer, experts)
        if predicted is None:
            return {}
        following, probability = predicted
        hints = {agent: prefetch_fields(following, hinted,
                                        [round(100 * float(probability[e])) for e in hinted])
                 for agent, hinted in plan_hints(probability, self.owner, self.config).items()}
        if key is not None:
            self._plans[key] = (predictor.observations, hints)
        return hints


def cache_summary(figures) -> dict:
    """A budgeted agent's cache figures (a reply's protocol.cache_figures, or its info's
    memory_budget) -> the cache_* fields of its per-agent figures; stall in ms. The agent
    sends them: anything malformed (not a mapping, a count that is not a non-negative int, a
    stall that is not a finite non-negative number) gives {}, ignored as
    protocol.cache_figures ignores a bad reply field (one in a HELLO used to fail requests)."""
    if not isinstance(figures, Mapping):
        return {}
    counts = {name: figures.get(name, 0) for name in _CACHE_COUNTS}
    if "stall_us" in figures:  # a reply's, in integer microseconds
        stall = figures["stall_us"] / 1e6 if _count(figures["stall_us"]) else None
    else:  # the info's, in seconds
        stall = figures.get("stall_s", 0.0)
    if not all(_count(v) for v in counts.values()) or not _seconds(stall):
        return {}
    hits, misses = counts["hits"], counts["misses"]
    return {"cache_hits": hits, "cache_misses": misses,
            "cache_hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "cache_stall_ms": round(float(stall) * 1e3, 3),
            "cache_loads": counts["loads"], "cache_evictions": counts["evictions"],
            "cache_resident_bytes": counts["resident_bytes"],
            "cache_hinted_hits": counts["hinted_hits"]}


_CACHE_COUNTS = ("hits", "misses", "loads", "evictions", "resident_bytes", "hinted_hits")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0

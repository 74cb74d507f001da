"""The live view's recorder: what the MoE layers and the engine measured, kept small enough to
be fed on every reply and read once a second (issue 25's dashboard, `/v1/wdmoe/state`).

Fed by measurement only: every agent reply's round trip and the agent's own compute time, each
layer's routed and computed experts, each forward step's start and end. Pure: numbers in,
times passed in, the snapshot's parts out; `live_tap.py` feeds it from a runtime and an engine.

Writers: the generation thread alone (one step at a time). Readers: the HTTP handlers; a read
torn by a concurrent write costs one snapshot a stale figure; the deques are copied under a
lock held for the copy only.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import NamedTuple

RTT_WINDOW_CALLS = 200  # one-token layer calls per agent behind rtt_p50/p95
LAST_STEPS = 32  # forward steps kept for the token waterfall
SERIES_S = 300  # seconds of the per-second series


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 1]) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)), 1) - 1]


class StepRecord(NamedTuple):
    """One forward step, as measured (seconds); per box lists in box order."""
    step: int
    prefill: bool
    tokens: int
    theta: float
    total_s: float
    wait_s: float
    layers: int
    calls: list[int]
    round_trip_s: list[float]
    compute_s: list[float]
    critical_s: list[float]
    slowest: int | None  # the box with the largest critical time; None: no agent called


class LiveRecorder:
    """`boxes` agents (box = index in the roster's order), `layers` x `experts` MoE layers."""

    def __init__(self, boxes: int, layers: int, experts: int):
        self.boxes, self.layers, self.experts = boxes, layers, experts
        self._rtt_s = [[0.0] * RTT_WINDOW_CALLS for _ in range(boxes)]  # rings
        self._rtt_n = [0] * boxes  # one-token calls seen (ring position = n % window)
        self.routed = [[0] * experts for _ in range(layers)]
        self.computed = [[0] * experts for _ in range(layers)]
        self.layer_tokens = [0] * layers
        self.slots_routed = 0  # top-k slots the routers chose, every layer
        self.slots_computed = 0
        self.steps_done = 0
        self.last_slowest: int | None = None  # the last step's slowest box
        self._lock = threading.Lock()
        self._steps: collections.deque[StepRecord] = collections.deque(maxlen=LAST_STEPS)
        self._series: collections.deque[list] = collections.deque(maxlen=SERIES_S)
        self._open = False
        self._reset_step(0.0, 0, False, 0.0)

    # --- observations (the generation thread) ---------------------------------------------------

    def _reset_step(self, now_s: float, tokens: int, prefill: bool, theta: float) -> None:
        boxes = self.boxes
        self._started_s, self._tokens, self._prefill, self._theta = now_s, tokens, prefill, theta
        self._calls = [0] * boxes
        self._round_trip_s = [0.0] * boxes
        self._compute_s = [0.0] * boxes
        self._critical_s = [0.0] * boxes
        self._layers = 0
        self._layer_max_s, self._layer_max_box = 0.0, -1

    def step_started(self, now_s: float, tokens: int, prefill: bool, theta: float) -> None:
        """A forward step of `tokens` tokens at mean θ `theta` begins."""
        self._reset_step(now_s, tokens, prefill, theta)
        self._open = True

    def reply(self, box: int, round_trip_s: float, compute_s: float, tokens: int) -> None:
        """A valid reply of agent `box` to a layer request of `tokens` tokens."""
        if tokens == 1:  # the RTT figures are of one-token calls (decode's)
            n = self._rtt_n[box]
            self._rtt_s[box][n % RTT_WINDOW_CALLS] = round_trip_s
            self._rtt_n[box] = n + 1
        self._calls[box] += 1
        self._round_trip_s[box] += round_trip_s
        self._compute_s[box] += compute_s
        if round_trip_s > self._layer_max_s:
            self._layer_max_s, self._layer_max_box = round_trip_s, box

    def layer_done(self, layer: int, tokens: int, routed: list[int], computed: list[int]) -> None:
        """Layer `layer` combined `tokens` tokens: `routed` the experts of every top-k slot,
        `computed` those computed in the end (one entry a slot). The slowest reply since the
        last layer is this layer's critical path (Eq. 7's max)."""
        row = self.routed[layer]
        for expert in routed:
            row[expert] += 1
        row = self.computed[layer]
        for expert in computed:
            row[expert] += 1
        self.layer_tokens[layer] += tokens
        self.slots_routed += len(routed)
        self.slots_computed += len(computed)
        if self._layer_max_box >= 0:
            self._critical_s[self._layer_max_box] += self._layer_max_s
            self._layer_max_s, self._layer_max_box = 0.0, -1
        self._layers += 1

    def step_ended(self, now_s: float, wall_s: float, wait_s: float, drops: int,
                   fault_drops: int, failures: int) -> None:
        """The step begun by step_started ended: `wait_s` the time it waited on agents, and
        the slots it dropped, lost to faults and the agent requests that failed."""
        if not self._open:
            return
        self._open = False
        critical = self._critical_s
        slowest = max(range(self.boxes), key=critical.__getitem__) \
            if self.boxes and max(critical) > 0 else None
        self.steps_done += 1
        self.last_slowest = slowest
        total_s = now_s - self._started_s
        record = StepRecord(self.steps_done, self._prefill, self._tokens, self._theta, total_s,
                            wait_s, self._layers, self._calls, self._round_trip_s,
                            self._compute_s, critical, slowest)
        second = int(wall_s)
        with self._lock:
            self._steps.append(record)
            bucket = self._series[-1] if self._series else None
            if bucket is None or bucket[0] != second:
                # [t, tokens, decode step totals, theta sum, steps, drops, fault drops, failures]
                bucket = [second, 0, [], 0.0, 0, 0, 0, 0]
                self._series.append(bucket)
            bucket[1] += self._tokens
            if not self._prefill:
                bucket[2].append(total_s)
            bucket[3] += self._theta
            bucket[4] += 1
            bucket[5] += drops
            bucket[6] += fault_drops
            bucket[7] += failures
        # fresh lists: the record keeps these (a reply outside any step must not change it)
        self._reset_step(now_s, 0, False, 0.0)

    # --- views (any thread) ---------------------------------------------------------------------

    def rtt_ms(self, box: int) -> tuple[float | None, float | None]:
        """(p50, p95) of the agent's last RTT_WINDOW_CALLS one-token calls, ms."""
        n = min(self._rtt_n[box], RTT_WINDOW_CALLS)
        window = self._rtt_s[box][:n]
        p50, p95 = percentile(window, 0.5), percentile(window, 0.95)
        return (None if p50 is None else round(p50 * 1e3, 3),
                None if p95 is None else round(p95 * 1e3, 3))

    def experts_view(self) -> dict:
        """Shares per layer x expert of the tokens counted at that layer."""
        def shares(counts: list[list[int]]) -> list[list[float]]:
            return [[round(c / n, 4) if n else 0.0 for c in row]
                    for row, n in zip(counts, self.layer_tokens)]
        return {"layers": self.layers, "experts": self.experts,
                "routed": shares(self.routed), "computed": shares(self.computed),
                "tokens": self.layer_tokens[0] if self.layers else 0}

    def steps_view(self, names: list[str]) -> list[dict]:
        """The last steps, oldest first; `names`: each box's agent name."""
        with self._lock:
            steps = list(self._steps)
        return [step_dict(s, names) for s in steps]

    def series_view(self, wall_s: float) -> list[dict]:
        """One entry per second that had a step, the last SERIES_S seconds."""
        with self._lock:
            buckets = [(b[0], b[1], list(b[2]), b[3], b[4], b[5], b[6], b[7])
                       for b in self._series]
        out = []
        for second, tokens, totals, theta_sum, steps, drops, fault_drops, failures in buckets:
            if second < wall_s - SERIES_S:
                continue
            p50 = percentile(totals, 0.5)
            out.append({"t_unix_s": second, "tokens": tokens,
                        "token_ms_p50": None if p50 is None else round(p50 * 1e3, 3),
                        "theta": round(theta_sum / steps, 4) if steps else None,
                        "drops": drops, "fault_drops": fault_drops, "failures": failures})
        return out


def step_dict(s: StepRecord, names: list[str]) -> dict:
    """A step as the snapshot shows it: ms, boxes that were called only. A box's time is its
    compute (the agent's report) and the wire (round trip less compute, both ways together:
    no clock is shared with the agents, so send and reply are not told apart)."""
    boxes = [{"agent": names[b], "calls": s.calls[b],
              "round_trip_ms": round(s.round_trip_s[b] * 1e3, 3),
              "compute_ms": round(s.compute_s[b] * 1e3, 3),
              "wire_ms": round(max(s.round_trip_s[b] - s.compute_s[b], 0.0) * 1e3, 3),
              "critical_ms": round(s.critical_s[b] * 1e3, 3)}
             for b in range(len(s.calls)) if s.calls[b]]
    return {"step": s.step, "prefill": s.prefill, "tokens": s.tokens,
            "theta": round(s.theta, 4), "total_ms": round(s.total_s * 1e3, 3),
            "base_station_ms": round(max(s.total_s - s.wait_s, 0.0) * 1e3, 3),
            "wait_ms": round(s.wait_s * 1e3, 3), "layers": s.layers, "boxes": boxes,
            "slowest": names[s.slowest] if s.slowest is not None else None}

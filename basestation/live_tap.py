"""Feeds the live recorder (live.py) from a running MoE runtime, and builds the snapshot that
`/v1/wdmoe/state` and `/v1/wdmoe/events` serve (issue 25).

Where each figure comes from, all measured:
- an agent's round trip and compute: every valid reply, as the agent table learns it
  (`AgentTable.answered` sees the reply's LinkSample);
- routed and computed experts: the MoE layer's observers, once per layer (`on_selection`: what
  WLR kept; `on_computed`: what was computed in the end, after any failure and retry);
- a step's time: the engine's forward hooks (`step_started` / `step_ended`), its wait on
  agents the dispatcher's own gather clock (`MoeStats.network_s`).
Cost on the generation thread: a few list updates per reply and per layer, one record per step;
nothing is formatted until a snapshot is asked for.
"""

from __future__ import annotations

import json
import os
import time

from basestation.live import LiveRecorder
from basestation.moe_layer import MoeRuntime

# where `testbed up` records the links it shaped (testbed/links/state.py owns the rule; this
# side only reads it, to show what the testbed applied to each agent's link)
TESTBED_STATE_ENV = "WDMOE_TESTBED_STATE"
TESTBED_STATE_NAME = "state.json"
BITS_OF_DTYPE = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "int4": 4,
                 "mxfp4": 4}


def testbed_state_path() -> str:
    folder = os.environ.get(TESTBED_STATE_ENV) or (
        "/tmp/wdmoe-testbed" if os.geteuid() == 0 else f"/tmp/wdmoe-testbed-{os.getuid()}")
    return os.path.join(folder, TESTBED_STATE_NAME)


def shapes_by_endpoint(state: dict | None) -> dict[str, dict]:
    """A testbed state file's agents -> {endpoint: the shape applied to its link}."""
    out = {}
    agents = state.get("agents") if isinstance(state, dict) else None
    for agent in agents if isinstance(agents, list) else ():
        if isinstance(agent, dict) and isinstance(agent.get("endpoint"), str) \
                and isinstance(agent.get("shape"), dict):
            out[agent["endpoint"]] = agent["shape"]
    return out


class ShapingFile:
    """The testbed's state file, read again only when it changed (its mtime)."""

    def __init__(self, path: str | None = None):
        self.path = path or testbed_state_path()
        self._mtime_ns: int | None = None
        self._shapes: dict[str, dict] = {}

    def shapes(self) -> dict[str, dict]:
        try:
            mtime_ns = os.stat(self.path).st_mtime_ns
        except OSError:
            self._mtime_ns, self._shapes = None, {}
            return self._shapes
        if mtime_ns != self._mtime_ns:
            try:
                with open(self.path) as f:
                    self._shapes = shapes_by_endpoint(json.load(f))
            except (OSError, ValueError):
                self._shapes = {}  # being written, or not ours: no shaping shown
            self._mtime_ns = mtime_ns
        return self._shapes


def agent_bits(info: dict) -> int | None:
    """The bits per weight an agent serves, from its info (quantized dtypes), else None."""
    bits = info.get("bits")
    if isinstance(bits, int) and not isinstance(bits, bool):
        return bits
    return BITS_OF_DTYPE.get(str(info.get("dtype", "")).lower())


def agent_card(figures: dict, info: dict, rtt: tuple, fault_drops: int,
               shape: dict | None) -> dict:
    """One agent of the snapshot: its figures (AgentLink.figures()), its info, the recorder's
    RTT percentiles and the testbed's shaping of its link (None: not known)."""
    budget = info.get("memory_budget")
    budget_bytes = budget.get("budget_bytes") if isinstance(budget, dict) else None
    throughput = figures["throughput_mbit_s"]
    return {
        "agent": figures["agent"], "address": figures["address"],
        "experts": figures["experts"], "bits": agent_bits(info), "alive": figures["alive"],
        "device": figures["device"], "rtt_p50_ms": rtt[0], "rtt_p95_ms": rtt[1],
        "rtt_ms": figures["rtt_ms"], "down_mbit_s": throughput, "up_mbit_s": throughput,
        "throughput_note": "one estimate of both ways (request and reply sizes are equal)",
        "compute_us_per_token": figures["compute_us_per_token"],
        "calls": figures["calls"], "drops": figures["drops"], "failures": figures["failures"],
        "fault_drops": fault_drops,
        "memory_budget_mb": round(budget_bytes / 2**20, 1)
        if isinstance(budget_bytes, (int, float)) else None,
        "cache_hit_rate": figures.get("cache_hit_rate"),
        "replica_calls": figures.get("replica_calls"),  # None: holds no replicated expert
        "shaping": shape,
    }


class LiveTap:
    """Connects a LiveRecorder to a runtime: installed once (`attach`), then the engine calls
    step_started/step_ended around each batched forward pass."""

    def __init__(self, runtime: MoeRuntime, layers: int, model_id: str = "",
                 theta_default: float = 0.0, shaping: ShapingFile | None = None):
        self.runtime = runtime
        table = runtime.table
        self.recorder = LiveRecorder(len(table.agents), layers, table.num_experts)
        self.model_id, self.theta_default = model_id, theta_default
        self.shaping = shaping or ShapingFile()
        self.started_s = time.monotonic()
        self.fault_drops = [0] * len(table.agents)  # per agent: slots lost to its failures
        self._names = [a.name for a in table.agents]
        self._kept = None  # the layer's keep [T, K] as selected (before any failure)
        self._mark = self._counters()

    def attach(self) -> LiveTap:
        """Observe the agent table's replies and the layers' selections."""
        table, recorder = self.runtime.table, self.recorder
        answered, box_of_agent, reply = table.answered, table.box_of_agent, recorder.reply

        def observed_answered(agent, sample, cache) -> None:
            answered(agent, sample, cache)
            reply(box_of_agent[id(agent)], sample.round_trip_s, sample.compute_s, sample.tokens)

        table.answered = observed_answered  # this instance only; the class is untouched
        runtime = self.runtime
        runtime.on_selection = _chain(runtime.on_selection, self.selected)
        self._final = hasattr(runtime, "on_computed")
        if self._final:
            runtime.on_computed = _chain(runtime.on_computed, self.computed)
        return self

    def selected(self, layer: int, box_of_expert, experts, keep) -> None:
        """on_selection: the router's experts [T, K] and what WLR kept [T, K]. A slot dropped
        because its expert had no live holder is a fault drop of that holder."""
        self._kept = keep
        held = self.runtime.table.boxes().held  # None: every expert has a live holder
        if held is not None:
            self._lost(e for e, k in zip(_flat(experts), _flat(keep)) if not k and not held[e])
        if not self._final:  # a runtime without on_computed: the selection is the figure
            self.computed(layer, experts, experts, keep)

    def computed(self, layer: int, experts, final_experts, final_keep) -> None:
        """on_computed: the router's experts [T, K]; the slots' experts and whether each was
        computed in the end [T, K] (a failed slot not recovered: a fault drop)."""
        routed = _flat(experts)
        finals = routed if final_experts is experts else _flat(final_experts)
        done = _flat(final_keep)
        kept = self._kept
        if kept is not None and kept is not final_keep:  # failures changed the selection
            self._lost(e for e, k, d in zip(routed, _flat(kept), done) if k and not d)
        self._kept = None
        self.recorder.layer_done(layer, experts.shape[0], routed,
                                 [e for e, d in zip(finals, done) if d])

    def _lost(self, experts) -> None:
        table = self.runtime.table
        for expert in experts:
            holder = table.holder.get(expert)
            if holder is not None:
                self.fault_drops[table.box_of_agent[id(holder)]] += 1

    def _counters(self) -> tuple[float, int, int, int]:
        stats = self.runtime.stats
        return (stats.network_s, stats.experts_dropped, stats.fault_drops,
                stats.failed_requests)

    def step_started(self, tokens: int, prefill: bool, theta: float) -> None:
        self._mark = self._counters()
        self.recorder.step_started(time.perf_counter(), tokens, prefill, theta)

    def step_ended(self) -> None:
        now = self._counters()
        mark = self._mark
        self.recorder.step_ended(time.perf_counter(), time.time(), now[0] - mark[0],
                                 now[1] - mark[1], now[2] - mark[2], now[3] - mark[3])

    def last_slowest(self) -> str | None:
        box = self.recorder.last_slowest
        return self._names[box] if box is not None else None

    def snapshot(self) -> dict:
        """The state as `/v1/wdmoe/state` serves it, built now."""
        now_s = time.monotonic()
        recorder, table = self.recorder, self.runtime.table
        shapes = self.shaping.shapes()
        agents = [agent_card(agent.figures(), agent.info if isinstance(agent.info, dict) else {},
                             recorder.rtt_ms(b), self.fault_drops[b], shapes.get(agent.name))
                  for b, agent in enumerate(table.agents)]
        wall_s = time.time()
        snapshot = {"model": self.model_id, "time_unix_s": round(wall_s, 3),
                    "uptime_s": round(now_s - self.started_s, 3),
                    "theta_default": self.theta_default, "agents": agents,
                    "replica_retries": self.runtime.stats.replica_retries,
                    "experts": recorder.experts_view(),
                    "tokens": recorder.steps_view(self._names),
                    "series": recorder.series_view(wall_s)}
        return snapshot


def _flat(slots) -> list:
    """[T, K] -> its T*K values as a list (nested tolist: a view costs more than the copy)."""
    rows = slots.tolist()
    return rows[0] if len(rows) == 1 else [v for row in rows for v in row]


def _chain(first, second):
    """One observer calling `first` (if any) then `second`."""
    if first is None:
        return second

    def both(*args) -> None:
        first(*args)
        second(*args)
    return both

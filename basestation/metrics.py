"""Serving metrics and their Prometheus text exposition (format 0.0.4), written by hand.

Counters are plain ints written by one thread each (the engine thread, or the event loop) and
read by the /metrics handler; a torn read costs at most one scrape's accuracy.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# token latency buckets, seconds: loopback decode is ~ms per token, shaped links ~100s of ms
TOKEN_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SEQUENCES_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # sequences in one forward pass
# time to first token, seconds: queueing and prefill of long prompts over slow links included
FIRST_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
THETA_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)  # the requests' θ (0: exact top-k)


@dataclass
class Histogram:
    bounds: tuple[float, ...] = TOKEN_LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last: +Inf
    total: float = 0.0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        """The exposition lines; `labels`: more labels, as 'phase="decode"'."""
        out, running = [], 0
        more, own = (labels + ",", "{" + labels + "}") if labels else ("", "")
        for bound, count in zip((*map(_num, self.bounds), "+Inf"), self.counts):
            running += count
            out.append(f'{name}_bucket{{{more}le="{bound}"}} {running}')
        return out + [f"{name}_sum{own} {_num(self.total)}", f"{name}_count{own} {running}"]


@dataclass
class EngineMetrics:
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    expert_lost: int = 0  # exact requests failed: an expert lost to a fault
    rejected: int = 0  # queue full
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_latency: Histogram = field(default_factory=Histogram)
    batch_sequences: Histogram = field(
        default_factory=lambda: Histogram(bounds=BATCH_SEQUENCES_BUCKETS))
    # a request's first token (the prefill's) and the tokens after it (decode), kept apart
    prefill_latency: Histogram = field(default_factory=Histogram)
    decode_latency: Histogram = field(default_factory=Histogram)
    time_to_first_token: Histogram = field(
        default_factory=lambda: Histogram(bounds=FIRST_TOKEN_BUCKETS_S))
    theta: Histogram = field(default_factory=lambda: Histogram(bounds=THETA_BUCKETS))
    theta_in_use: float = 0.0  # the last forward step's θ (mean over its tokens)


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# the MoE layers' run counters (dispatch.MoeStats fields): what every answer together lost
MOE_COUNTERS = (
    ("wdmoe_expert_calls_total", "token-expert computations done", "expert_calls"),
    ("wdmoe_experts_dropped_total", "top-k slots not computed (by theta or a fault)",
     "experts_dropped"),
    ("wdmoe_fault_drops_total", "top-k slots lost to a fault (a failed agent request not "
     "recovered, or an agent down with no fallback)", "fault_drops"),
    ("wdmoe_retries_total", "top-k slots sent again after a failure", "retries"),
    ("wdmoe_failed_agent_requests_total", "agent requests that failed (no valid reply)",
     "failed_requests"),
    ("wdmoe_late_replies_waited_total", "agent requests past their estimate's deadline, "
     "waited for because the agent was still connected (slow, not dead)",
     "late_replies_waited"),
    ("wdmoe_replica_retries_total", "token groups of a failed agent sent again to another "
     "replica of their expert (not dropped)", "replica_retries"),
)


def render(engine: EngineMetrics, http_responses: dict[tuple[str, int], int], queue_depth: int,
           agents: list[dict], moe: dict | None = None, slots: tuple[int, int] | None = None
           ) -> str:
    """The /metrics page: requests, tokens, token latency, queue, the MoE counters (`moe`: the
    fields of dispatch.MoeStats) and every agent's figures (dicts of AgentLink.figures()).
    `slots`: (routed, computed) top-k slots of every layer so far (the live recorder's), the
    denominators of the drop rates."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

    metric("wdmoe_http_responses_total", "counter",
           "HTTP responses by route (unknown paths: unmatched) and status",
           [(f'{{path="{_label(p)}",status="{s}"}}', n)
            for (p, s), n in sorted(http_responses.items())])
    metric("wdmoe_requests_total", "counter", "generation requests by outcome",
           [(f'{{outcome="{k}"}}', getattr(engine, k))
            for k in ("completed", "cancelled", "failed", "expert_lost", "rejected")])
    metric("wdmoe_prompt_tokens_total", "counter", "prompt tokens processed",
           [("", engine.prompt_tokens)])
    metric("wdmoe_completion_tokens_total", "counter", "tokens generated",
           [("", engine.completion_tokens)])
    metric("wdmoe_queue_depth", "gauge", "requests waiting for the engine", [("", queue_depth)])
    for name, help_, key in MOE_COUNTERS if moe is not None else ():
        metric(name, "counter", help_, [("", moe[key])])
    if slots is not None:  # drop rate: rate(experts_dropped) / rate(slots_routed)
        metric("wdmoe_expert_slots_routed_total", "counter",
               "top-k slots the routers chose, every MoE layer", [("", slots[0])])
        metric("wdmoe_expert_slots_computed_total", "counter",
               "top-k slots computed in the end (after theta and faults)", [("", slots[1])])
    metric("wdmoe_theta_in_use", "gauge", "theta of the last forward step (mean over its "
           "tokens)", [("", engine.theta_in_use)])
    lines.extend(["# HELP wdmoe_request_theta theta of the requests admitted",
                  "# TYPE wdmoe_request_theta histogram"])
    lines.extend(engine.theta.lines("wdmoe_request_theta"))
    lines.extend(["# HELP wdmoe_time_to_first_token_seconds from a request's arrival to its "
                  "first token", "# TYPE wdmoe_time_to_first_token_seconds histogram"])
    lines.extend(engine.time_to_first_token.lines("wdmoe_time_to_first_token_seconds"))
    lines.extend(["# HELP wdmoe_token_phase_latency_seconds time per token: a sequence's "
                  "first (phase prefill, from its admission) and the rest (phase decode)",
                  "# TYPE wdmoe_token_phase_latency_seconds histogram"])
    lines.extend(engine.prefill_latency.lines("wdmoe_token_phase_latency_seconds",
                                              'phase="prefill"'))
    lines.extend(engine.decode_latency.lines("wdmoe_token_phase_latency_seconds",
                                             'phase="decode"'))
    lines.extend([("# HELP wdmoe_token_latency_seconds time per generated token (the first "
                   "includes the prefill)"), "# TYPE wdmoe_token_latency_seconds histogram"])
    lines.extend(engine.token_latency.lines("wdmoe_token_latency_seconds"))
    lines.extend(["# HELP wdmoe_batch_sequences sequences decoded together per forward pass",
                  "# TYPE wdmoe_batch_sequences histogram"])
    lines.extend(engine.batch_sequences.lines("wdmoe_batch_sequences"))
    per_agent = [
        ("wdmoe_agent_alive", "gauge", "1 while the agent answers", "alive"),
        ("wdmoe_agent_rtt_ms", "gauge", "smoothed round-trip time", "rtt_ms"),
        ("wdmoe_agent_throughput_mbit_s", "gauge", "estimated link throughput",
         "throughput_mbit_s"),
        ("wdmoe_agent_compute_us_per_token", "gauge", "expert compute per token",
         "compute_us_per_token"),
        ("wdmoe_agent_calls_total", "counter", "token-expert computations sent", "calls"),
        ("wdmoe_agent_drops_total", "counter", "token-expert computations dropped", "drops"),
        ("wdmoe_agent_failures_total", "counter", "late, missing or bad replies", "failures"),
    ]
    per_budgeted_agent = [  # agents with --memory-budget only (basestation/prefetch.py)
        ("wdmoe_agent_cache_hits_total", "counter", "layer-experts found resident", "cache_hits"),
        ("wdmoe_agent_cache_misses_total", "counter", "layer-experts a request waited for",
         "cache_misses"),
        ("wdmoe_agent_cache_stall_seconds_total", "counter", "time requests waited for loads",
         "cache_stall_s"),
        ("wdmoe_agent_cache_loads_total", "counter", "layer-experts read from the shard",
         "cache_loads"),
        ("wdmoe_agent_cache_evictions_total", "counter", "layer-experts evicted",
         "cache_evictions"),
        ("wdmoe_agent_cache_resident_bytes", "gauge", "bytes of layer-experts in memory",
         "cache_resident_bytes"),
    ]
    budgeted = [dict(a, cache_stall_s=a["cache_stall_ms"] / 1e3) for a in agents
                if "cache_hits" in a]
    for name, kind, help_, key in per_agent + (per_budgeted_agent if budgeted else []):
        rows = budgeted if key.startswith("cache_") else agents
        metric(name, kind, help_, [((f'{{agent="{_label(a["address"])}",experts="'
                                     f'{",".join(map(str, a["experts"]))}"}}'), float(a[key]))
                                   for a in rows])
    replicas = [(a, expert, n) for a in agents
                for expert, n in (a.get("replica_calls") or {}).items()]
    if replicas:  # experts on several agents (issue 24): who served each, from its figures
        metric("wdmoe_replica_calls_total", "counter", "token computations of a replicated "
               "expert, per agent holding it",
               [(f'{{agent="{_label(a["address"])}",expert="{_label(str(expert))}"}}', float(n))
                for a, expert, n in replicas])
    return "\n".join(lines) + "\n"

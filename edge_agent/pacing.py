"""Emulated compute time (`--pace-compute-us-per-token`, `--pace-compute-us-per-call`): an
expert call on this box takes at least as long as it would on the emulated device."""

from __future__ import annotations

import time

from edge_agent.config import EmulationConfig


def paced_s(experts: list, emulation: EmulationConfig) -> float:
    """The least time a request for `experts` [[expert_id, tokens], ...] takes: per expert, a
    roofline max(per call, tokens x per token) (the paper's Eq. 4 / C_q). Pure; 0 when off."""
    per_call_s, per_token_s = emulation.pace_s_per_call, emulation.pace_s_per_token
    if not (per_call_s or per_token_s):
        return 0.0
    return sum(max(per_call_s, tokens * per_token_s) for _, tokens in experts)


def wait_out(start_s: float, compute_s: float, least_s: float) -> float:
    """Sleep until `least_s` has passed since `start_s` (time.perf_counter()) when the work
    took `compute_s` less; returns the seconds the call took in all."""
    if compute_s >= least_s:
        return compute_s
    time.sleep(least_s - compute_s)
    return time.perf_counter() - start_s

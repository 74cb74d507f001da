"""Where a measured decode step's time goes: waiting for agents, or the base station's own work.

An `on_selection` observer of the MoE layers (chain it with others through `observers`). The
dispatcher adds every layer's wait for its agents to `stats.network_s`; this reads that counter
at the first MoE layer of each forward pass, when nothing of the pass has waited yet, so the
difference between two reads is the whole previous pass's wait. `close()` after a generation
takes the last pass's. The rest of a step (attention, routers, sampling, Python) is the base
station's: measured minus wait. The modeled latency (Eqs. 6-8) is what the wait would be on
the paper's ideal links and boxes, so wait / modeled is what our transport and agents add, and
the base station's share is what the paper leaves out altogether.
"""

from __future__ import annotations


class StepWaits:
    def __init__(self, stats, moe_layers: int):
        self.stats = stats  # has network_s, seconds waited for agents so far
        self.moe_layers = moe_layers
        self._calls = 0
        self._reads_s: list[float] = []

    def __call__(self, layer, box_of_expert, experts, keep) -> None:
        if self._calls % self.moe_layers == 0:
            self._reads_s.append(self.stats.network_s)
        self._calls += 1

    def close(self) -> None:
        """Mark the end of the last forward pass (call after the generation)."""
        if self._calls % self.moe_layers == 0 and self._calls:
            self._reads_s.append(self.stats.network_s)

    def step_waits_s(self) -> list[float]:
        """Seconds waited for agents in each complete forward pass so far."""
        return [b - a for a, b in zip(self._reads_s, self._reads_s[1:])]

    def reset(self) -> None:
        self._calls = 0
        self._reads_s = []


def observers(*callables):
    """One on_selection callable calling each of these (None entries left out) in order."""
    chosen = [c for c in callables if c is not None]
    if not chosen:
        return None
    if len(chosen) == 1:
        return chosen[0]

    def observe(*args) -> None:
        for c in chosen:
            c(*args)
    return observe

"""What each pass of an experiment cost in experts: the base station's `MoeStats` counters,
read before and after the pass, kept in the record per pass, and the rule that a pass which
lost an expert to a fault has altered numbers.

A record's `passes` is {pass name: counts}: `latency` (the decoded prompts) and `quality`
(lm-eval, held-out scoring, the divergence against θ = 0); the θ = 0 pass every θ's divergence
is measured against keeps its counts in `divergence.reference_pass`. Pure functions of the
counters, and two context managers at the end that read them around a pass.
"""

from __future__ import annotations

from contextlib import contextmanager

# the MoeStats fields a pass reports; experts_dropped counts θ's drops and fault drops alike
COUNTERS = ("expert_calls", "experts_dropped", "fault_drops", "failed_requests", "retries")


def snapshot(stats) -> dict[str, int]:
    """The counters of a MoeStats now."""
    return {name: int(getattr(stats, name)) for name in COUNTERS}


def since(before: dict[str, int], stats) -> dict[str, int]:
    """What the counters of STATS grew by since BEFORE (a snapshot)."""
    now = snapshot(stats)
    return {name: now[name] - before[name] for name in COUNTERS}


def add(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {name: a.get(name, 0) + b.get(name, 0) for name in COUNTERS}


def zero() -> dict[str, int]:
    return dict.fromkeys(COUNTERS, 0)


def drop_rate(counts: dict[str, int]) -> float:
    """Share of the (token, expert) slots considered that were not computed, for θ or a
    fault."""
    dropped = counts.get("experts_dropped", 0)
    return dropped / max(1, counts.get("expert_calls", 0) + dropped)


def fault_losses(record: dict) -> dict[str, int]:
    """{pass: experts lost to faults} of the passes of RECORD that lost any (the θ = 0
    reference pass too: every θ's divergence is measured against it)."""
    passes = dict(record.get("passes") or {})
    reference = (record.get("divergence") or {}).get("reference_pass")
    if reference:
        passes["reference"] = reference
    return {name: counts["fault_drops"] for name, counts in passes.items()
            if counts.get("fault_drops", 0) > 0}


def exact_failure(record: dict) -> str | None:
    """Why an --exact row failed, in a few words, or None when it did not (or was not run
    --exact)."""
    if not record.get("exact"):
        return None
    losses = fault_losses(record)
    if not losses:
        return None
    return "lost experts to faults: " + ", ".join(f"{name} {n}" for name, n in losses.items())


@contextmanager
def counted(stats):
    """Yields a dict that holds, once the block ends (raised or not), what STATS' counters
    grew by inside it."""
    counts: dict[str, int] = {}
    before = snapshot(stats)
    try:
        yield counts
    finally:
        counts.update(since(before, stats))


@contextmanager
def quality_pass(session, theta: float):
    """The session's model at THETA for forward passes made outside `generate` (lm-eval,
    held-out scoring): no request ledger, the latency observer off; yields the pass's
    counts (see counted)."""
    runtime = session.runtime
    observer, runtime.on_selection = runtime.on_selection, None
    try:
        with runtime.batch(theta=theta), counted(runtime.stats) as counts:
            yield counts
    finally:
        runtime.on_selection = observer

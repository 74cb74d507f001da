"""θ per token from a latency target (issue 24): pure, plain floats, no clocks.

Users think in milliseconds a token, not in θ. A request with `latency_target_ms` gets, before
each token, the smallest θ on a ladder whose expected latency keeps the request's mean token
latency on the target, and after each token the measured latency corrects what is expected:

- budget: what the next token may take with the mean still on target,
  target x (tokens + 1) - spent. A token that came in under the target leaves the next more
  room; one over it leaves less. Mixing a θ a little too slow with one a little too fast so
  lands the mean on the target (a sigma-delta modulator), rather than every token paying the
  faster θ's drops.
- expected latency at θ: the running mean (EWMA) of the tokens measured at that θ; between
  measured levels, the straight line between them; above the highest measured level, no
  gain is assumed (so a level is tried only to learn it, see below).
- learning: while no measured level fits the budget and the top of the ladder is unmeasured,
  the top is tried once (the floor: every token's best box alone); then the line between
  θ = 0 and the floor points at the level to try.

WLR's κ = min WLR / (min WLR + max WLR) is at most 1/2, so θ = 1/2 keeps one box per token:
the ladder spans [0, 1/2]. A target below what the floor gives is infeasible: it is met as
well as it can be (θ = 1/2) and `Choice.feasible` says so; never an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NamedTuple

# finer near 0: κ of a token whose slow box is R times slower is (w_s/R) / (w_s/R + w_f), so
# with R ~ 40 (a 40 ms box beside 1 ms ones) θ = 0.05 already drops most of its slots. Measured
# (bench/latency_target.py): steps of 0.05 made the target mix θ = 0 with 0.05, which dropped
# 15 % more slots than the fixed θ (0.02) giving the same mean; the fine levels let it mix
# neighbours on that curve instead.
THETA_LADDER = (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
EWMA_GAIN = 0.3  # weight of the newest token at its θ: links move within a few tokens
MAX_TARGET_MS = 600_000.0  # ten minutes a token: beyond it a target is a typo, not a wish


class Choice(NamedTuple):
    theta: float
    expected_ms: float | None  # None: this θ's latency is not known yet (tried to learn it)
    feasible: bool             # False: even the top of the ladder is expected over the target


@dataclass(frozen=True)
class TargetState:
    """One request's controller: its target, what its tokens took, and per ladder level the
    running mean of the tokens measured there (None: not measured yet)."""

    target_ms: float
    tokens: int = 0
    spent_ms: float = 0.0
    measured_ms: tuple[float | None, ...] = (None,) * len(THETA_LADDER)

    @property
    def mean_ms(self) -> float | None:
        return self.spent_ms / self.tokens if self.tokens else None


def start(target_ms: float) -> TargetState:
    if not target_ms > 0:
        raise ValueError("latency_target_ms must be a number > 0")
    return TargetState(float(target_ms))


def expected_ms(state: TargetState) -> list[float | None]:
    """Per ladder level: measured mean, else the line between the nearest measured levels
    below and above, else the nearest measured level below (no gain assumed), else None."""
    known = [(i, ms) for i, ms in enumerate(state.measured_ms) if ms is not None]
    out: list[float | None] = []
    for i, ms in enumerate(state.measured_ms):
        if ms is not None:
            out.append(ms)
            continue
        below = [(j, m) for j, m in known if j < i]
        above = [(j, m) for j, m in known if j > i]
        if below and above:
            (j0, m0), (j1, m1) = below[-1], above[0]
            out.append(m0 + (m1 - m0) * (i - j0) / (j1 - j0))
        elif below:
            out.append(below[-1][1])
        else:  # below every measured level (or none measured): never assumed
            out.append(None)
    return out


def choose(state: TargetState) -> Choice:
    """The θ for the request's next token."""
    budget_ms = state.target_ms * (state.tokens + 1) - state.spent_ms
    expected = expected_ms(state)
    if expected[0] is None:  # first token: the exact model is what is measured first
        return Choice(THETA_LADDER[0], None, True)
    top = len(THETA_LADDER) - 1
    for i, ms in enumerate(expected):
        if ms is not None and ms <= budget_ms and (state.measured_ms[i] is not None or
                                                   state.measured_ms[top] is not None):
            return Choice(THETA_LADDER[i], ms, True)
    if state.measured_ms[top] is None:  # learn the floor before judging the target
        return Choice(THETA_LADDER[top], None, True)
    floor_ms = expected[top]
    return Choice(THETA_LADDER[top], floor_ms, floor_ms <= state.target_ms)


def observe(state: TargetState, theta: float, latency_ms: float) -> TargetState:
    """The state after a token decoded at `theta` (a ladder level) took `latency_ms`."""
    level = THETA_LADDER.index(theta)
    old = state.measured_ms[level]
    new = latency_ms if old is None else old + EWMA_GAIN * (latency_ms - old)
    measured = state.measured_ms[:level] + (new,) + state.measured_ms[level + 1:]
    return replace(state, tokens=state.tokens + 1, spent_ms=state.spent_ms + latency_ms,
                   measured_ms=measured)


@dataclass
class Pacer:
    """One sequence's controller over its tokens, for the loops that decode (serve's engine,
    generate): `next_theta` before each forward step, `token` after each token with its
    measured latency. Holds no clock. The first token is not observed: its latency is the
    prompt's prefill (and, in serve, its wait in the queue), not what a token costs."""

    state: TargetState
    choice: Choice | None = None  # the last step's
    thetas: list[float] = field(default_factory=list)  # per token, the θ it was decoded at
    verdicts: list[bool] = field(default_factory=list)  # per token, Choice.feasible

    def next_theta(self) -> float:
        self.choice = choose(self.state)
        return self.choice.theta

    def token(self, latency_ms: float) -> None:
        choice = self.choice if self.choice is not None else choose(self.state)
        self.thetas.append(choice.theta)
        self.verdicts.append(choice.feasible)
        if len(self.thetas) > 1:
            self.state = observe(self.state, choice.theta, latency_ms)


def steady_feasible(verdicts: list[bool]) -> bool:
    """Whether a sequence met its target as far as the controller knew: False when it said
    infeasible for any token of the second half (the first half learns the link; one slow
    token at the floor early on is not a verdict)."""
    return all(verdicts[len(verdicts) // 2:])


def report(target_ms: float, pacers: list[Pacer]) -> dict:
    """A request's `latency_target` figures over its sequences (choice after choice):
    achieved_mean_ms is the mean of the tokens the controller steered (each sequence's first
    excluded), None when there were none."""
    tokens = sum(p.state.tokens for p in pacers)
    spent_ms = sum(p.state.spent_ms for p in pacers)
    return {"target_ms": target_ms,
            "achieved_mean_ms": round(spent_ms / tokens, 3) if tokens else None,
            "thetas": [t for p in pacers for t in p.thetas],
            "feasible": all(steady_feasible(p.verdicts) for p in pacers)}


def mean_theta(pacers: list[Pacer]) -> float:
    """The mean θ a request's tokens were decoded at (0 before any token)."""
    thetas = [t for p in pacers for t in p.thetas]
    return round(sum(thetas) / len(thetas), 4) if thetas else 0.0

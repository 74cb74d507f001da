"""Bootstrap intervals for latency figures: pure functions of the samples and a seed.

Token latencies are skewed (a fading epoch, a retransmission), so the figures are medians and
means with percentile-bootstrap 95 % intervals, and a θ's latency change against θ = 0 is the
bootstrap distribution of the difference of the two medians (independent resamples of each).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_ITERS = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high}


def _resampled(samples: np.ndarray, stat, iters: int, rng: np.random.Generator) -> np.ndarray:
    picks = rng.integers(0, len(samples), size=(iters, len(samples)))
    return stat(samples[picks], axis=1)


def _bounds(draws: np.ndarray) -> tuple[float, float]:
    tail = (1.0 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap(samples, stat=np.median, iters: int = BOOTSTRAP_ITERS, seed: int = 0) -> Interval:
    """`stat` of the samples with its percentile-bootstrap interval."""
    values = np.asarray(samples, dtype=float)
    if values.size == 0:
        raise ValueError("no samples")
    draws = _resampled(values, stat, iters, np.random.default_rng(seed))
    return Interval(float(stat(values)), *_bounds(draws))


def relative_change(baseline, samples, stat=np.median, iters: int = BOOTSTRAP_ITERS,
                    seed: int = 0) -> Interval:
    """(stat(samples) - stat(baseline)) / stat(baseline), in %, with its bootstrap interval:
    negative is faster than the baseline."""
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(samples, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("no samples")
    rng = np.random.default_rng(seed)
    base_draws = _resampled(a, stat, iters, rng)
    draws = 100.0 * (_resampled(b, stat, iters, rng) - base_draws) / base_draws
    return Interval(float(100.0 * (stat(b) - stat(a)) / stat(a)), *_bounds(draws))

"""Bootstrap intervals (testbed/experiments/stats.py)."""

from __future__ import annotations

import numpy as np
import pytest

from testbed.experiments.stats import bootstrap, relative_change


def test_interval_holds_the_value_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    few, many = rng.exponential(10.0, 30), rng.exponential(10.0, 3000)
    small, large = bootstrap(few), bootstrap(many)
    assert small.low <= small.value <= small.high
    assert (large.high - large.low) < (small.high - small.low) / 4
    assert large.low < 10.0 * np.log(2) < large.high  # the exponential's true median
    assert bootstrap([5.0] * 10).as_dict() == {"value": 5.0, "low": 5.0, "high": 5.0}


def test_relative_change_sees_a_real_cut_and_not_a_fake_one():
    rng = np.random.default_rng(2)
    base = 20.0 + rng.normal(0, 2, 400)
    faster = 16.0 + rng.normal(0, 2, 400)
    cut = relative_change(base, faster)
    assert cut.value == pytest.approx(-20.0, abs=2.0) and cut.high < 0 and cut.excludes_zero()
    same = relative_change(base, 20.0 + rng.normal(0, 2, 400))
    assert not same.excludes_zero()
    with pytest.raises(ValueError):
        relative_change([], [1.0])


def test_step_waits_split_each_forward_pass_at_its_first_moe_layer():
    from types import SimpleNamespace

    from testbed.experiments.step_waits import StepWaits, observers

    stats = SimpleNamespace(network_s=0.0)
    waits = StepWaits(stats, moe_layers=2)
    seen = []
    observe = observers(None, lambda *a: seen.append(a[0]), waits)
    for step_waits in ([0.5, 0.25], [1.0, 2.0], [0.0, 0.125]):  # three passes of two layers
        for layer, wait_s in enumerate(step_waits):
            observe(layer, None, None, None)  # before the layer's gather ...
            stats.network_s += wait_s  # ... which then waits
    waits.close()
    assert waits.step_waits_s() == [0.75, 3.0, 0.125]
    assert seen == [0, 1] * 3
    waits.reset()
    assert waits.step_waits_s() == [] and observers(None) is None

"""Scenario files: shapes per link and per time, checked by hand and against the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed import scenarios
from testbed.links import LinkShape, TestbedError


def test_packaged_scenarios_load():
    assert {"uniform", "one-bad-link", "flaky", "paper"} <= set(scenarios.available())
    for name in scenarios.available():
        shapes = scenarios.load_scenario(name, 8)
        assert set(shapes) == set(range(8))


def test_one_bad_link_overrides_only_its_link():
    shapes = scenarios.load_scenario("one-bad-link", 4)
    assert shapes[0] == LinkShape(delay_ms=40, jitter_ms=5, rate_mbit=20)
    assert shapes[1] == shapes[2] == shapes[3] == LinkShape(delay_ms=2, rate_mbit=100)


def test_flaky_schedule_repeats():
    scenario = scenarios.load("flaky")
    down = [scenarios.shapes_at(scenario, 3, t)[1].down for t in (0.0, 2.9, 3.0, 4.9, 5.0, 8.5)]
    assert down == [False, False, True, True, False, True]
    assert not scenarios.shapes_at(scenario, 3, 3.5)[0].down  # other links untouched
    assert scenario.changes_over_time and scenario.step_s == pytest.approx(2.0)


def test_paper_rates_match_the_formula_for_given_draws():
    scenario = scenarios.load("paper")
    paper = scenario.paper
    for epoch in (0, 3):
        shapes = scenarios.shapes_at(scenario, 8, epoch * paper.epoch_s + 0.1)
        # the same draws, by hand: Rayleigh amplitude with mean 10^(-PL/20), uplink drawn second
        rng = np.random.default_rng([paper.seed, epoch])
        bandwidth_hz = 100e6 / 8
        noise_w = 10 ** ((-174 - 30) / 10) * bandwidth_hz
        pl_db = [32.4 + 20 * math.log10(3.5) + 20 * math.log10(d) for d in paper.channel.distances_m]
        scale = [10 ** (-pl / 20) / math.sqrt(math.pi / 2) for pl in pl_db]
        rng.rayleigh(scale)  # downlink draw
        g_up = rng.rayleigh(scale)
        for q in range(8):
            rate = bandwidth_hz * math.log2(1 + 0.2 * g_up[q] ** 2 / noise_w)
            assert shapes[q].rate_mbit == pytest.approx(rate / 1e6, rel=1e-9)
            assert shapes[q].delay_ms == paper.access_delay_ms
    # fading is redrawn each epoch
    assert scenarios.shapes_at(scenario, 8, 0.1)[0] != scenarios.shapes_at(scenario, 8, 2.1)[0]


def test_bad_scenario_files(tmp_path):
    with pytest.raises(TestbedError, match="no scenario 'nope'"):
        scenarios.load("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[default]\ndelay = 3\n")
    with pytest.raises(TestbedError, match="unknown keys"):
        scenarios.load(str(bad))
    bad.write_text("[default]\nloss_pct = 140\n")
    with pytest.raises(TestbedError, match="out of range"):
        scenarios.load(str(bad))
    bad.write_text("[links.1]\nschedule = [{ at_s = 0, down = true }]\n")
    with pytest.raises(TestbedError, match="period_s"):
        scenarios.load(str(bad))

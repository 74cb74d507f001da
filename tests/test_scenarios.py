"""Scenario files: shapes per link and per time, checked by hand and against the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

from testbed import scenarios
from testbed.links.control import LinkShape, TestbedError


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


def test_paper_emulation_shapes_and_paces_at_mixtral_scale():
    from basestation.channel_model import EMULATED_MODELS, emulated_compute_s_per_token

    scenario = scenarios.load("paper")
    paper = scenario.paper
    assert paper.emulate is EMULATED_MODELS["mixtral-8x7b"]
    ours = 256 * 4  # hidden 256, float32 on the wire
    shapes = scenarios.shapes_at(scenario, 8, 0.1, wire_bytes_per_token=ours)
    down, up = scenarios.paper_rates_bits_per_s(paper, 0)
    for q in range(8):
        # our 1 KiB per token at rate / 8 takes as long as Mixtral's 8 KiB at the full rate
        assert shapes[q].wire_up_mbit * 1e6 == pytest.approx(up[q] / 8)
        assert ours * 8 / (shapes[q].wire_down_mbit * 1e6) == pytest.approx(8192 * 8 / down[q])
        assert shapes[q].rate_mbit is None and shapes[q].delay_ms == paper.access_delay_ms
    pace = scenarios.agent_pacing_us(scenario, 8)
    per_call, per_token = pace[2]
    assert per_call == pytest.approx(1e6 * emulated_compute_s_per_token(paper.emulate, 68e9))
    assert 5000 < per_call < 5500 and 1600 < pace[0][0] < 1800  # Orin Nano, AGX Orin
    assert per_token == pytest.approx(1e6 * emulated_compute_s_per_token(
        paper.emulate, paper.device_peak_flops[2]))
    assert per_token < per_call / 50  # a batch is compute-bound long after one token
    assert scenarios.agent_pacing_us(scenarios.load("uniform"), 8) == {}


def test_modeled_latency_is_eqs_6_to_8():
    import torch

    from basestation.channel_model import modeled_token_latency_s
    from testbed.experiments.modeled_latency import ModeledLatency

    assert modeled_token_latency_s([1.0, 2.0, 5.0], [{0, 1}, {2}, set()]) == 7.0
    scenario = scenarios.load("paper")
    observer = ModeledLatency(scenario.paper, scenario.paper.emulate, num_agents=8,
                              moe_layers=2, start_s=0.0)
    observer.start_s = __import__("time").monotonic()  # epoch 0
    t = observer.device_latency_s(0)
    box_of_expert = torch.arange(8)
    experts = torch.tensor([[2, 5], [0, 1]])
    observer(0, box_of_expert, experts, torch.tensor([[True, True], [True, False]]))
    observer(1, box_of_expert, experts, torch.tensor([[False, True], [True, True]]))
    want_0 = max(t[2], t[5]) + t[0]
    want_1 = t[5] + max(t[0], t[1])
    assert observer.step_totals_s() == [pytest.approx(want_0 + want_1)]

"""The live recorder (basestation/live.py) and the snapshot's pure parts (live_tap.py,
live_routes.py) from synthetic observations, with hand-computed numbers."""

from __future__ import annotations

import json
import os

import pytest

from basestation.live import RTT_WINDOW_CALLS, SERIES_S, LiveRecorder, percentile
from basestation.live_routes import dashboard_file, event_interval_s
from basestation.live_tap import ShapingFile, agent_bits, agent_card, shapes_by_endpoint
from basestation.metrics import EngineMetrics, render

NAMES = ["tcp://a:1", "tcp://b:2"]


def test_percentile_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unsorted
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.95) == 95.0
    assert percentile([7.0], 0.5) == 7.0 and percentile([], 0.5) is None
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0 and percentile([1.0, 2.0], 0.95) == 2.0


def test_rtt_of_one_token_calls_over_the_last_window():
    r = LiveRecorder(boxes=2, layers=1, experts=4)
    assert r.rtt_ms(0) == (None, None)
    for ms in range(1, 101):  # 1..100 ms, one-token calls
        r.reply(0, ms / 1e3, 0.0, tokens=1)
    r.reply(0, 5.0, 0.0, tokens=7)  # a prefill call: not in the RTT figures
    assert r.rtt_ms(0) == (50.0, 95.0) and r.rtt_ms(1) == (None, None)
    for _ in range(RTT_WINDOW_CALLS):  # the window slides: only the newest calls count
        r.reply(0, 0.002, 0.0, tokens=1)
    assert r.rtt_ms(0) == (2.0, 2.0)


def test_shares_routed_and_computed():
    """Two layers, 4 experts, top-2; 2 tokens at layer 0, 1 at layer 1."""
    r = LiveRecorder(boxes=2, layers=2, experts=4)
    r.layer_done(0, 2, routed=[0, 1, 0, 3], computed=[0, 1, 0])  # token 2's expert 3 dropped
    r.layer_done(1, 1, routed=[2, 3], computed=[2, 3])
    view = r.experts_view()
    assert view["tokens"] == 2 and view["layers"] == 2 and view["experts"] == 4
    assert view["routed"] == [[1.0, 0.5, 0.0, 0.5], [0.0, 0.0, 1.0, 1.0]]
    assert view["computed"] == [[1.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    assert (r.slots_routed, r.slots_computed) == (6, 5)


def test_a_step_critical_path_and_breakdown():
    """Layer 0: box 0 answers in 6 ms, box 1 in 4 ms -> box 0 is the critical 6 ms; layer 1:
    box 1 alone, 9 ms -> box 1 critical 9 ms. The step: 20 ms, of which 15 waiting."""
    r = LiveRecorder(boxes=2, layers=2, experts=4)
    r.step_started(100.0, tokens=1, prefill=False, theta=0.25)
    r.reply(0, 0.006, 0.001, 1)
    r.reply(1, 0.004, 0.002, 1)
    r.layer_done(0, 1, [0, 2], [0, 2])
    r.reply(1, 0.009, 0.003, 1)
    r.layer_done(1, 1, [2, 3], [2])
    r.step_ended(100.020, 1000.5, wait_s=0.015, drops=1, fault_drops=0, failures=0)
    [step] = r.steps_view(NAMES)
    assert step["step"] == 1 and not step["prefill"] and step["theta"] == 0.25
    assert step["total_ms"] == 20.0 and step["wait_ms"] == 15.0
    assert step["base_station_ms"] == 5.0 and step["layers"] == 2
    a, b = step["boxes"]
    assert a == {"agent": "tcp://a:1", "calls": 1, "round_trip_ms": 6.0, "compute_ms": 1.0,
                 "wire_ms": 5.0, "critical_ms": 6.0}
    assert b == {"agent": "tcp://b:2", "calls": 2, "round_trip_ms": 13.0, "compute_ms": 5.0,
                 "wire_ms": 8.0, "critical_ms": 9.0}
    assert step["slowest"] == "tcp://b:2" and r.last_slowest == 1


def test_a_step_with_no_agent_call_has_no_slowest():
    r = LiveRecorder(boxes=2, layers=1, experts=4)
    r.step_started(1.0, tokens=3, prefill=True, theta=0.0)
    r.layer_done(0, 3, [0, 1] * 3, [])
    r.step_ended(1.5, 10.0, 0.0, 6, 0, 0)
    [step] = r.steps_view(NAMES)
    assert step["boxes"] == [] and step["slowest"] is None and step["prefill"]
    r.step_ended(2.0, 10.0, 0.0, 0, 0, 0)  # no step open: ignored
    assert len(r.steps_view(NAMES)) == 1


def test_series_buckets_by_second():
    """Steps at wall 1000.2, 1000.7 (decode 10 and 30 ms) and 1001.1 (prefill): two seconds;
    the p50 of a second is of its decode steps; θ is its steps' mean."""
    r = LiveRecorder(boxes=1, layers=1, experts=2)
    for start, total, wall, prefill, theta, drops in ((0.0, 0.010, 1000.2, False, 0.2, 1),
                                                      (1.0, 0.030, 1000.7, False, 0.4, 2),
                                                      (2.0, 0.050, 1001.1, True, 0.0, 0)):
        r.step_started(start, 4 if prefill else 1, prefill, theta)
        r.step_ended(start + total, wall, 0.0, drops, 1 if drops == 2 else 0, 0)
    first, second = r.series_view(1001.5)
    assert first == {"t_unix_s": 1000, "tokens": 2, "token_ms_p50": 10.0, "theta": 0.3,
                     "drops": 3, "fault_drops": 1, "failures": 0}
    assert second["t_unix_s"] == 1001 and second["tokens"] == 4
    assert second["token_ms_p50"] is None  # a prefill alone
    assert r.series_view(1000 + SERIES_S + 0.5) == [second]  # the old second aged out


def test_last_steps_are_bounded():
    r = LiveRecorder(boxes=1, layers=1, experts=2)
    for i in range(40):
        r.step_started(float(i), 1, False, 0.0)
        r.step_ended(i + 0.01, 50.0 + i, 0.0, 0, 0, 0)
    steps = r.steps_view(["x"])
    assert len(steps) == 32 and steps[0]["step"] == 9 and steps[-1]["step"] == 40


def test_agent_card_and_shaping(tmp_path):
    figures = {"agent": "tcp://b:2", "address": "tcp://b:2", "experts": [4, 5], "alive": True,
               "rtt_ms": 2.5, "throughput_mbit_s": 80.0, "compute_us_per_token": 55.0,
               "calls": 10, "drops": 2, "failures": 1, "probes": 0, "device": "cpu",
               "cache_hits": 3, "cache_hit_rate": 0.75}
    info = {"dtype": "bfloat16", "memory_budget": {"budget_bytes": 64 * 2**20}}
    card = agent_card(figures, info, (2.0, 3.0), 4, {"delay_ms": 20})
    assert card["bits"] == 16 and card["memory_budget_mb"] == 64.0
    assert card["cache_hit_rate"] == 0.75 and card["rtt_p50_ms"] == 2.0
    assert card["down_mbit_s"] == card["up_mbit_s"] == 80.0 and card["fault_drops"] == 4
    assert card["shaping"] == {"delay_ms": 20}
    assert agent_bits({"bits": 4, "dtype": "float32"}) == 4 and agent_bits({}) is None
    state = {"agents": [{"endpoint": "tcp://b:2", "shape": {"delay_ms": 20}},
                        {"endpoint": "tcp://c:3"}, "junk"]}
    assert shapes_by_endpoint(state) == {"tcp://b:2": {"delay_ms": 20}}
    assert shapes_by_endpoint(None) == {} and shapes_by_endpoint({"agents": 3}) == {}
    path = tmp_path / "state.json"
    shaping = ShapingFile(str(path))
    assert shaping.shapes() == {}
    path.write_text(json.dumps(state))
    assert shaping.shapes() == {"tcp://b:2": {"delay_ms": 20}}
    path.write_text("{half")
    os.utime(path, ns=(1, 1))  # a new mtime, a file not JSON: nothing shown, no error
    assert shaping.shapes() == {}


def test_dashboard_names_and_interval(tmp_path):
    (tmp_path / "app.js").write_text("//")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / "sub").mkdir()
    assert dashboard_file("app.js", str(tmp_path)) == str(tmp_path / "app.js")
    for name in ("", "..", "../app.js", "sub", "notes.txt", ".app.js", "a\\b.js", "none.js"):
        assert dashboard_file(name, str(tmp_path)) is None, name
    assert event_interval_s(None) == 1.0 and event_interval_s("0.25") == 0.25
    for bad in ("0.1", "11", "nan", "x"):
        with pytest.raises(ValueError):
            event_interval_s(bad)


def test_metrics_render_the_new_series():
    m = EngineMetrics()
    m.prefill_latency.observe(0.02)
    m.decode_latency.observe(0.004)
    m.time_to_first_token.observe(0.3)
    m.theta.observe(0.2)
    m.theta_in_use = 0.2
    text = render(m, {}, 0, [], None, (10, 7))
    assert 'wdmoe_token_phase_latency_seconds_bucket{phase="prefill",le="0.025"} 1' in text
    assert 'wdmoe_token_phase_latency_seconds_bucket{phase="decode",le="0.005"} 1' in text
    assert 'wdmoe_token_phase_latency_seconds_count{phase="decode"} 1' in text
    assert 'wdmoe_time_to_first_token_seconds_bucket{le="0.5"} 1' in text
    assert 'wdmoe_request_theta_bucket{le="0.2"} 1' in text
    assert "wdmoe_theta_in_use 0.2" in text
    assert "wdmoe_expert_slots_routed_total 10" in text
    assert "wdmoe_expert_slots_computed_total 7" in text


def fake_runtime(held=None):
    """What LiveTap reads of a MoeRuntime: agents 0-3 on box 0, 4-7 on box 1."""
    from types import SimpleNamespace

    from basestation.agents import MoeStats

    agents = [SimpleNamespace(name=n, experts=list(range(4 * b, 4 * b + 4)), info={})
              for b, n in enumerate(NAMES)]
    boxes = SimpleNamespace(held=held)
    table = SimpleNamespace(agents=agents, num_experts=8, answered=lambda *a: None,
                            box_of_agent={id(a): b for b, a in enumerate(agents)},
                            holder={e: a for a in agents for e in a.experts},
                            boxes=lambda: boxes)
    return SimpleNamespace(table=table, stats=MoeStats(), on_selection=None, on_computed=None)


def test_tap_counts_what_faults_took_per_agent():
    """Token routed to experts 1 and 5, both kept; agent b (5) failed and nothing recovered it:
    a fault drop of agent b; computed share of 5 is 0. Then agent b is down at selection
    (expert 5 held by no live agent): a fault drop again, at selection."""
    import torch

    from basestation.live_tap import LiveTap

    runtime = fake_runtime()
    tap = LiveTap(runtime, layers=1).attach()
    experts = torch.tensor([[1, 5]])
    keep = torch.tensor([[True, True]])
    runtime.on_selection(0, None, experts, keep)
    runtime.on_computed(0, experts, experts, torch.tensor([[True, False]]))
    assert tap.fault_drops == [0, 1]
    view = tap.recorder.experts_view()
    assert view["routed"][0][5] == 1.0 and view["computed"][0][5] == 0.0
    runtime.table.boxes().held = [True] * 4 + [False] * 4
    dropped = torch.tensor([[True, False]])
    runtime.on_selection(0, None, experts, dropped)
    runtime.on_computed(0, experts, experts, dropped)  # the same keep: no failure after
    assert tap.fault_drops == [0, 2]
    assert tap.recorder.slots_routed == 4 and tap.recorder.slots_computed == 2

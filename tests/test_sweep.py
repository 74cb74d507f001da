"""θ sweeps through agents behind real shaped links (root: namespaces, tc, nftables)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from testbed.links.control import LinkShape, is_root

pytestmark = [pytest.mark.integration, pytest.mark.root,
              pytest.mark.skipif(not is_root(), reason="needs root: namespaces, veth and tc")]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_slow_link_theta_routes_around_it(tiny_split, tmp_path):
    """Agent 0 (experts 0-1) behind 40 ms each way: θ = 0 pays it on most tokens, θ = 0.3
    drops it and is faster; the drops land on that agent."""
    scenario = tmp_path / "slow0.toml"
    scenario.write_text("[links.0]\ndelay_ms = 40\n")
    from testbed.experiments.sweep import SweepConfig, run_sweep

    run_sweep(SweepConfig(shards=tiny_split, out=str(tmp_path / "out"), scenario=str(scenario),
                          thetas=(0.0, 0.3), num_agents=4, max_new_tokens=12, progress=False))
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    at0, at3 = rows
    assert at0["backend"] != "loopback (no shaping)"
    assert at0["median_token_ms"] > 80  # the 80 ms round trip is on the critical path
    assert at3["median_token_ms"] < at0["median_token_ms"] / 2
    slow = next(a for a in at3["per_agent"].values() if a["experts"] == [0, 1])
    others = [a for a in at3["per_agent"].values() if a["experts"] != [0, 1]]
    assert slow["drops"] > sum(a["drops"] for a in others)
    assert at0["experts_dropped"] == 0 and at3["experts_dropped"] > 0
    # the divergence harness eval uses, on the bundled held-out text; both passes counted
    assert at0["divergence"]["kl_nats"]["value"] == 0.0 and at0["agreement"] == 1.0
    assert at3["divergence"]["kl_nats"]["value"] > 0 and at3["divergence"]["blocks"] == 16
    assert at3["passes"]["quality"]["expert_calls"] > 0
    assert at3["passes"]["latency"]["experts_dropped"] == at3["experts_dropped"]
    assert os.path.exists(tmp_path / "out" / "results.csv")


def test_flaky_scenario_never_hangs_a_sweep(tiny_split, tmp_path):
    """A link going down and up on a schedule: the sweep finishes, the outage shows as
    fault drops or routed-around tokens, and the host is left clean."""
    result = subprocess.run(
        [sys.executable, "-m", "testbed", "sweep", "--shards", tiny_split, "--scenario", "flaky",
         "--agents", "2", "--thetas", "0,0.2", "--max-new-tokens", "40",
         "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)  # a hang guard, not a target
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "out" / "results.jsonl")]
    assert [r["theta"] for r in rows] == [0.0, 0.2]
    assert all(r["scenario"] == "flaky" and r["tokens"] > 0 for r in rows)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in listed.splitlines() if str(tmp_path) in line]


def test_report_draws_the_figures(tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    base = {"scenario": "uniform", "backend": "tbf+nft+relay", "tokens": 10,
            "p95_token_ms": 9.0, "mean_token_ms": 6.0, "tokens_per_s": 150.0,
            "expert_calls": 100, "experts_dropped": 0, "fault_drops": 0, "drop_rate": 0.0,
            "perplexity": 20.0, "agreement": 1.0,
            "per_agent": {"a": {"experts": [0], "calls": 50, "drops": 0},
                          "b": {"experts": [1], "calls": 50, "drops": 0}}}
    counts = {"expert_calls": 100, "experts_dropped": 0, "fault_drops": 0,
              "failed_requests": 0, "retries": 0}
    kl = {"kl_nats": {"value": 0.0213, "low": 0.0170, "high": 0.0262},
          "top1_agreement": {"value": 0.912, "low": 0.89, "high": 0.93},
          "positions": 1008, "blocks": 16, "interval": "bootstrap 95 % over blocks"}
    rows = [dict(base, theta=0.0, median_token_ms=6.0),
            dict(base, theta=0.3, median_token_ms=4.0, perplexity=21.5, drop_rate=0.2,
                 per_agent={"a": {"experts": [0], "calls": 30, "drops": 20},
                            "b": {"experts": [1], "calls": 50, "drops": 0}},
                 divergence=kl, passes={"latency": counts,
                                        "quality": dict(counts, fault_drops=57,
                                                        failed_requests=2)})]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_cli("testbed", "report", str(out))
    assert result.returncode == 0, result.stderr
    assert "21.50" in result.stdout and "20.0%" in result.stdout
    # KL and agreement with θ = 0 with their intervals; faults of both passes (gen/quality)
    assert "0.0213 [0.0170, 0.0262]" in result.stdout and "0.912 [0.890, 0.930]" in result.stdout
    assert "0/57" in result.stdout and "0/2" in result.stdout
    for name in ("quality.png", "drops.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + [
        dict(rows[0], kind="eval")]))
    mixed = run_cli("testbed", "report", str(out))
    assert mixed.returncode != 0 and len(mixed.stderr.strip().splitlines()) == 1


def test_link_shape_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LinkShape().delay_ms = 3  # type: ignore[misc]

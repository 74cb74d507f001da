"""`testbed sweep --bandwidth static,shared,joint` (issue 23): the sweep on one shared cell,
the policies interleaved per prompt, one record per (policy, θ) with the modeled latency of
each; joint at θ > 0 selects on its allocation's latencies."""

from __future__ import annotations

import csv
import json
import os

import pytest

pytestmark = pytest.mark.integration


def test_sweep_compares_the_cells_policies_at_each_theta(run_cli, tiny_split, tmp_path):
    out = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = run_cli("testbed", "sweep", "--shards", tiny_split, "--scenario", "paper",
                     "--bandwidth", "static,shared,joint", "--cell-mhz", "20",
                     "--thetas", "0,0.3", "--kl-tokens", "0", "--max-new-tokens", "5",
                     "--agents", "8", "--out", str(out), timeout_s=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [(r["theta"], r["bandwidth"]) for r in rows] == [
        (t, p) for t in (0.0, 0.3) for p in ("static", "shared", "joint")]
    for r in rows:
        assert r["tokens"] == 4 * 4 and r["modeled_median_token_ms"] > 0
        assert r["cell_bandwidth_hz"] == 20e6 and not r["cell_errors"]
        assert r["shares"] and r["quality_bandwidth"] == "static"
    at_zero = [r for r in rows if r["theta"] == 0]
    # θ = 0: every selected expert is called under every policy, and the answer is the same
    assert len({r["tokens_sha256"] for r in at_zero}) == 1
    assert all(r["experts_dropped"] == 0 for r in at_zero)
    joint = [r for r in rows if r["bandwidth"] == "joint"]
    # this θ's layers only: at most 4 prompts x 5 steps x 2 MoE layers
    assert all(0 < r["joint_allocations_sent"] <= r["joint_layers_allocated"] <= 40
               for r in joint)
    assert all(0 < s <= 1 for r in joint for s in r["joint_mean_shares_sent"].values())
    # θ = 0 decodes the same steps under each policy: the modeled min-max split beats static
    static0, joint0 = at_zero[0], at_zero[2]
    assert joint0["modeled_median_token_ms"] < static0["modeled_median_token_ms"]
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["bandwidth"] for row in table] == [r["bandwidth"] for r in rows]
    report = run_cli("testbed", "report", str(out), timeout_s=120, env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "paper/joint" in report.stdout and (out / "quality.png").stat().st_size > 0

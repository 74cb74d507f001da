"""`testbed eval --bandwidth static,shared,joint` (issue 23): our agents on loopback behind one
shared cell process, the three policies interleaved per prompt, one record per (policy, θ)."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration


def test_joint_cuts_the_token_latency_of_a_20_mhz_cell_against_the_static_split(
        run_cli, tiny_split, tmp_path):
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = run_cli("testbed", "eval", "--shards", tiny_split, "--scenario", "paper",
                     "--bandwidth", "static,shared,joint", "--thetas", "0", "--cell-mhz", "20",
                     "--tasks", "", "--kl-tokens", "0", "--max-new-tokens", "8",
                     "--agents", "8", "--out", str(out), timeout_s=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    by_policy = {r["bandwidth"]: r for r in rows}
    for r in rows:
        print(r["bandwidth"], "measured median", r["median_token_ms"], "modeled median",
              r["modeled_median_token_ms"], "wait", r["wait_median_token_ms"]["value"],
              "base", r["base_median_token_ms"]["value"], "cell shares", r["shares"])
    assert [r["bandwidth"] for r in rows] == ["static", "shared", "joint"]
    assert all(r["theta"] == 0 and r["cell_bandwidth_hz"] == 20e6 for r in rows)
    assert all(r["tokens"] == 8 * 7 and r["experts_dropped"] == 0 for r in rows)
    # bandwidth changes time, never the answer: the same greedy tokens under every policy
    assert len({r["tokens_sha256"] for r in rows}) == 1
    static, shared, joint = (by_policy[p] for p in ("static", "shared", "joint"))
    # joint's median cut against static, its whole 95 % interval. (How far beyond 10 % it
    # goes, the figure, is the README's: two suites on two cores shrink the cut, by
    # the base station's share of a token, not the policy.)
    assert joint["change_vs_first_pct"]["measured"]["high"] < 0, joint["change_vs_first_pct"]
    # shared (a work-conserving scheduler) also beats the static split: its median (its
    # interval reached +2.8 % with two suites on two cores)
    assert shared["change_vs_first_pct"]["measured"]["value"] < 0, shared["change_vs_first_pct"]
    # the modeled figures beside them: the min-max split beats the static one
    assert joint["modeled_median_token_ms"]["value"] < static["modeled_median_token_ms"]["value"]
    assert all(r["modeled_median_token_ms"]["value"] > 0 for r in rows)
    # the base station told the cell a split before every joint layer, among called boxes
    assert joint["joint_allocations_sent"] > 0
    assert all(0 < share <= 1 for share in joint["joint_mean_shares_sent"].values())
    assert static["joint_allocations_sent"] is None and not any(r["cell_errors"] for r in rows)
    table = (out / "table-paper.md").read_text()
    assert "| bandwidth |" in table and "| 0 | joint |" in table and "| 0 | static |" in table

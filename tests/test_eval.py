"""`testbed eval`: lm-eval tasks and token latency per θ through agents behind the scenario's
links (the paper's channel emulating Mixtral-8x7B), records, tables and figures."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration


def test_eval_on_the_paper_scenario_writes_table_i_and_fig_3(run_cli, tiny_split, tmp_path):
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    result = run_cli("testbed", "eval", "--shards", tiny_split, "--scenario", "paper",
                     "--thetas", "0,0.3", "--tasks", "wdmoe_mc_heldout,wdmoe_heldout_next_word",
                     "--limit", "6", "--batch-size", "6", "--max-new-tokens", "6",
                     "--agents", "4", "--out", str(out), timeout_s=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert [r["theta"] for r in rows] == [0.0, 0.3]
    for r in rows:
        assert r["emulated"] == "Mixtral-8x7B" and r["scenario"] == "paper"
        assert r["tokens"] == 8 * 5  # 8 prompts, 5 decode steps each
        median = r["median_token_ms"]
        assert 0 < median["low"] <= median["value"] <= median["high"]
        assert r["modeled_median_token_ms"]["value"] > 0 and r["measured_over_modeled"] > 0
        # each step split into waiting for the agents (paced to at least 1.7 ms a layer) and
        # the base station's own share
        wait, base = r["wait_median_token_ms"]["value"], r["base_median_token_ms"]["value"]
        assert wait > 1.7 and base > 0 and r["wait_over_modeled"] > 0
        # agents paced to the emulated expert: Eq. 4 / C_q for one token
        assert min(p["per_call"] for p in r["pace_us"].values()) > 1000
        mc = r["tasks"]["wdmoe_mc_heldout"]
        assert mc["items"] == 6 and 0 <= mc["metrics"]["acc,none"]["value"] <= 1
        assert mc["metrics"]["acc,none"]["stderr"] is not None
        assert "exact_match,first_word" in r["tasks"]["wdmoe_heldout_next_word"]["metrics"]
    assert rows[0]["experts_dropped"] == 0 and rows[1]["experts_dropped"] > 0
    assert rows[0]["change_vs_first_pct"]["measured"]["value"] == 0.0
    for name in ("table-paper.md", "table-paper.csv", "fig3-paper.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table-paper.md").read_text()
    assert "emulating Mixtral-8x7B" in table and "| 0.3 |" in table
    assert "wdmoe_mc_heldout acc" in table and "waiting for agents ms" in table


def test_eval_bad_input_is_one_line(run_cli, tiny_split, tmp_path):
    for args in (["--thetas", "0,x"], ["--thetas", "2"], ["--limit", "0"],
                 ["--scenario", "nowhere"]):
        result = run_cli("testbed", "eval", "--shards", tiny_split, "--out",
                         str(tmp_path / "e"), *args, timeout_s=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

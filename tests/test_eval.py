"""`testbed eval`: lm-eval tasks and token latency per θ through agents behind the scenario's
links (the paper's channel emulating Mixtral-8x7B), records, tables and figures."""

from __future__ import annotations

import json
import os

import pytest
from agent_fixtures import start_agent  # noqa: F401

from testbed.experiments import evaluate

pytestmark = pytest.mark.integration


def test_eval_on_the_paper_scenario_writes_table_i_and_fig_3(run_cli, tiny_split, tmp_path):
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    result = run_cli("testbed", "eval", "--shards", tiny_split, "--scenario", "paper",
                     "--thetas", "0,0.3", "--tasks", "wdmoe_mc_heldout,wdmoe_heldout_next_word",
                     "--limit", "6", "--batch-size", "6", "--max-new-tokens", "6",
                     "--agents", "4", "--exact", "--out", str(out), timeout_s=900, env=env)
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
        # both passes' expert counts; --exact passed: no fault lost an expert on clean links
        assert set(r["passes"]) == {"latency", "quality"} and r["exact"] and r["failed"] is None
        assert r["passes"]["quality"]["expert_calls"] > 0
        assert r["passes"]["latency"]["expert_calls"] == r["expert_calls"]
        kl = r["divergence"]
        assert kl["positions"] == 16 * 63 and kl["blocks"] == 16
        assert kl["kl_nats"]["low"] <= kl["kl_nats"]["value"] <= kl["kl_nats"]["high"]
    assert rows[0]["divergence"]["kl_nats"]["value"] == 0.0  # θ = 0 against itself, exactly
    assert rows[0]["divergence"]["top1_agreement"]["value"] == 1.0
    # θ = 0.3 drops experts: the distribution moves (the random model's argmax may not)
    assert rows[1]["divergence"]["kl_nats"]["value"] > 0
    assert rows[0]["experts_dropped"] == 0 and rows[1]["experts_dropped"] > 0
    assert rows[0]["change_vs_first_pct"]["measured"]["value"] == 0.0
    for name in ("table-paper.md", "table-paper.csv", "fig3-paper.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table-paper.md").read_text()
    assert "emulating Mixtral-8x7B" in table and "| 0.3 |" in table
    assert "wdmoe_mc_heldout acc" in table and "waiting for agents ms" in table
    assert "KL vs θ=0 nats [95% CI]" in table and "fault drops latency / quality" in table
    assert "| 0 | ok |" in table  # the --exact verdict, after θ
    assert "KL vs θ=0" in result.stdout
    report = run_cli("testbed", "report", str(out), timeout_s=120)  # eval's records too
    assert report.returncode == 0, report.stderr[-2000:]
    assert "top-1 agreement vs θ=0" in report.stdout


def test_eval_bad_input_is_one_line(run_cli, tiny_split, tmp_path):
    for args in (["--thetas", "0,x"], ["--thetas", "2"], ["--limit", "0"],
                 ["--scenario", "nowhere"]):
        result = run_cli("testbed", "eval", "--shards", tiny_split, "--out",
                         str(tmp_path / "e"), *args, timeout_s=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_quality_pass_counts_real_faults_and_exact_fails_the_row(start_agent, tiny_split,
                                                                tmp_path):
    """Regression: the quality pass's fault drops never reached the record's figures (lm-eval's
    stayed in tasks["_run"]). Here an agent that crashes on its 3rd expert request serves the
    θ = 0 reference and the quality pass (the divergence; lm-eval runs in the same counted
    pass, left out to keep this short): the counts land in passes["quality"] and
    divergence["reference_pass"], the table shows them, and --exact marks the row failed."""
    from basestation.session import build_roster, open_session
    from testbed.experiments import eval_report

    good = start_agent("--expert", "0-3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*")
    flaky = start_agent("--expert", "4-7", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--fault", "crash=3")
    config = evaluate.EvalConfig(shards=tiny_split, out=str(tmp_path), tasks=(),
                                 divergence_tokens=256, progress=False, exact=True)
    session = open_session(tiny_split, build_roster(
        [f"0-3={good.endpoint}", f"4-7={flaky.endpoint}"], None, None), dtype="float32",
        wait_s=20, progress=False)
    try:
        reference, reference_counts = evaluate.reference_pass(session, config)
        quality, quality_counts = evaluate.quality_pass(session, config, 0.2, reference,
                                                        reference_counts)
    finally:
        session.close()
    assert reference_counts["failed_requests"] + quality_counts["failed_requests"] == 1
    assert quality_counts["fault_drops"] > 0  # the dead agent's experts, every block
    assert quality["divergence"]["reference_pass"] == reference_counts
    assert quality["divergence"]["positions"] == 4 * 63
    assert 0 <= quality["divergence"]["top1_agreement"]["value"] <= 1
    clean = {"measured": [10.0, 11.0], "modeled": [], "wait": [],
             "counts": dict.fromkeys(("expert_calls", "experts_dropped", "fault_drops",
                                      "failed_requests", "retries"), 0)}
    record = evaluate.make_record({"scenario": "s", "backend": "b", "theta": 0.2,
                                   "exact": True}, clean, clean, quality, quality_counts)
    assert record["failed"].startswith("lost experts to faults: quality")
    header, cells = eval_report.table_rows([record])
    faults = cells[0][header.index("fault drops latency / quality")]
    assert faults == f"0 / {quality_counts['fault_drops']}"
    assert cells[0][header.index("exact")].startswith("FAILED")

"""`testbed eval --latency-targets` (issue 24): latency targets as the rows' axis instead of θs,
so Table I reads as accuracy at a given latency. The latency pass decodes with each target's
controller; the quality pass replays the θs it used, one per token."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import torch

from basestation.latency_target import MAX_TARGET_MS
from testbed import cli
from testbed.experiments import eval_report, evaluate, report_html

COUNTS = dict.fromkeys(("expert_calls", "experts_dropped", "fault_drops", "failed_requests",
                        "retries"), 0)


# --- the axis on the command line -------------------------------------------------------

def test_the_axis_is_thetas_by_default_or_targets_in_ms():
    assert cli.eval_axis(None, None) == ((0.0, 0.1, 0.2, 0.3), ())
    assert cli.eval_axis("0,0.2", None) == ((0.0, 0.2), ())
    assert cli.eval_axis(None, "80,20.5,40") == ((), (80.0, 20.5, 40.0))
    assert cli.eval_axis(None, f"{MAX_TARGET_MS:g}") == ((), (MAX_TARGET_MS,))


@pytest.mark.parametrize("thetas, targets, says", [
    ("0,0.1", "40", "give one axis, not both"),
    (None, "0", "each > 0"),
    (None, "-5", "each > 0"),
    (None, "nan", "each > 0"),
    (None, "inf", "each > 0"),
    (None, f"{MAX_TARGET_MS * 2:g}", f"at most {MAX_TARGET_MS:g}"),
    (None, "20,20", "distinct"),
    (None, "20,x", "numbers like 20,40,80"),
    (None, "", "numbers like 20,40,80"),
])
def test_bad_axes_are_refused_in_one_line(thetas, targets, says):
    with pytest.raises(SystemExit) as refused:
        cli.eval_axis(thetas, targets)
    message = str(refused.value.code)
    assert message.startswith("testbed: error: ") and says in message
    assert "\n" not in message


def test_both_axes_from_the_shell_is_one_line_and_writes_nothing(run_cli, tmp_path):
    out = tmp_path / "never"
    result = run_cli("testbed", "eval", "--shards", str(tmp_path), "--out", str(out),
                     "--thetas", "0", "--latency-targets", "40", timeout_s=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "testbed: error: --thetas and --latency-targets: give one axis, not both"]
    assert not out.exists()


# --- the quality pass's replay ----------------------------------------------------------

def test_a_replay_hands_out_the_thetas_in_order_and_cycles():
    replay = evaluate.ThetaReplay([0.0, 0.5, 0.25])
    assert replay.take(2) == [0.0, 0.5]
    assert replay.take(5) == [0.25, 0.0, 0.5, 0.25, 0.0]
    assert replay.take(0) == []
    with pytest.raises(ValueError):
        evaluate.ThetaReplay([])


class _Runtime:
    """runtime.batch as the MoE layers see it: the θ of the innermost batch."""

    def __init__(self):
        self.plans: list = [0.125]  # the caller's θ (quality_pass's, lm-eval's model's)
        self.seen: list = []

    @contextlib.contextmanager
    def batch(self, theta=0.0):
        self.plans.append(theta)
        try:
            yield
        finally:
            self.plans.pop()


class _Model(torch.nn.Module):
    def __init__(self, runtime):
        super().__init__()
        self.runtime = runtime

    def forward(self, input_ids=None, inputs_embeds=None):
        self.runtime.seen.append(self.runtime.plans[-1])
        return input_ids


def test_replayed_gives_each_token_of_each_forward_pass_its_theta():
    runtime = _Runtime()
    model = _Model(runtime)
    with evaluate.replayed(model, runtime, evaluate.ThetaReplay([0.0, 0.5, 0.5])):
        model(torch.zeros(2, 2, dtype=torch.long))  # 4 tokens, positionally (lm-eval)
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))  # 3 tokens (generate, KL)
        model(inputs_embeds=torch.zeros(1, 1, 8))  # 1 token
    first, second, third = runtime.seen
    assert first.dtype == torch.float64 and first.tolist() == [0.0, 0.5, 0.5, 0.0]
    assert second.tolist() == [0.5, 0.5, 0.0]
    assert third == 0.5  # one θ for every token: a plain number, as a θ row runs
    assert runtime.plans == [0.125]  # every batch left
    model(torch.zeros(1, 1, dtype=torch.long))
    assert runtime.seen[-1] == 0.125  # the hooks are gone


# --- records, table, page ---------------------------------------------------------------

def _record(point: float, sample: dict, first: dict, target: bool, accuracy: float) -> dict:
    row = {"scenario": "s", "backend": "b", "kind": "eval", "exact": True}
    if target:
        row.update(evaluate.target_fields(point, sample))
        row["theta"] = row["latency_target"]["mean_theta"]
    else:
        row["theta"] = point
    quality = {"tasks": {"mc": {"items": 4, "metrics": {"acc,none": {"value": accuracy,
                                                                       "stderr": 0.1}}}}}
    return evaluate.make_record(row, sample, first, quality, COUNTS)


def _sample(measured: list[float], thetas: list[float], feasible: list[bool]) -> dict:
    return {"measured": measured, "modeled": [], "wait": [], "counts": COUNTS,
            "thetas": thetas, "feasible": feasible}


def test_target_rows_carry_target_achieved_mean_theta_and_sort_by_target():
    tight = _sample([10.0, 20.0, 30.0], [0.5, 0.5, 0.0], [False, True])
    loose = _sample([40.0, 40.0, 40.0], [0.0, 0.0, 0.0], [True, True])
    fields = evaluate.target_fields(15.0, tight)["latency_target"]
    assert fields["achieved_mean_ms"] == 20.0 and fields["mean_theta"] == 0.3333
    assert fields["feasible"] is False and (fields["prompts_feasible"], fields["prompts"]) == (1, 2)
    assert fields["thetas"] == [0.5, 0.5, 0.0]
    rows = [_record(600.0, loose, loose, True, 0.5), _record(15.0, tight, loose, True, 0.25)]
    theta_row = _record(0.0, loose, loose, False, 0.5)
    ordered = sorted(rows + [theta_row], key=eval_report.axis_key)
    assert [eval_report.row_label(r) for r in ordered] == ["θ=0", "target 15 ms",
                                                           "target 600 ms"]
    header, cells = eval_report.table_rows(sorted(rows, key=eval_report.axis_key))
    assert header[:4] == ["target ms", "achieved mean ms [95% CI]", "mean θ", "feasible"]
    assert cells[0][:2] == ["15", eval_report._ci(rows[1]["mean_token_ms"])]
    assert cells[0][2:4] == ["0.333", "no (1/2 prompts)"]
    assert cells[1][2:4] == ["0.000", "yes"]
    assert cells[0][header.index("mc acc")] == "0.250 ± 0.100"
    markdown = eval_report.markdown(ordered)
    assert eval_report.TARGET_NOTE in markdown
    # a θ row beside them reads its θ as its mean θ
    assert "| - | 40.00 [40.00, 40.00] | 0 | - |" in markdown
    page = report_html.page(ordered, {}, "out")
    assert "target 15 ms, target 600 ms" in page and "no (1/2 prompts)" in page


def test_theta_rows_read_as_before():
    sample = _sample([10.0, 12.0], [], [])
    rows = [_record(0.0, sample, sample, False, 0.5), _record(0.2, sample, sample, False, 0.4)]
    header, cells = eval_report.table_rows(rows)
    assert header[:2] == ["θ", "exact"] and [c[0] for c in cells] == ["0", "0.2"]
    assert "Δ median vs first θ % [95% CI]" in header
    markdown = eval_report.markdown(rows)
    assert eval_report.TARGET_NOTE not in markdown and "target" not in markdown
    assert "(θ = 0, 0.2)" in report_html.page(rows, {}, "out")


# --- the whole command ------------------------------------------------------------------

@pytest.mark.integration
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the scenario's links are namespaces: root")
def test_eval_with_latency_targets_reads_accuracy_at_a_latency(run_cli, tiny_split, tmp_path):
    """θ = 0, then a loose target (never drops: the same numbers as θ = 0) and a 1 ms one
    (below what a token takes: infeasible, met at θ = 0.5 once learned), into one --out."""
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    common = ("--shards", tiny_split, "--scenario", "uniform", "--agents", "2",
              "--tasks", "wdmoe_mc_heldout", "--limit", "4",
              "--batch-size", "4", "--max-new-tokens", "4", "--kl-tokens", "128", "--exact",
              "--out", str(out))
    popularity = tmp_path / "popularity.json"  # eval counts expert popularity too
    first = run_cli("testbed", "eval", *common, "--thetas", "0", "--popularity-out",
                    str(popularity), timeout_s=300, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    from basestation.popularity import load_popularity

    counted = load_popularity(str(popularity))
    assert counted.num_experts == 8 and counted.slots > 0
    assert sorted(int(layer) for layer in counted.snapshot()) == [0, 1]
    result = run_cli("testbed", "eval", *common, "--latency-targets", f"{MAX_TARGET_MS:g},1",
                     timeout_s=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    theta0, loose, tight = [json.loads(line) for line in open(out / "results.jsonl")]
    assert "latency_target_ms" not in theta0 and theta0["theta"] == 0.0
    for row, target in ((loose, MAX_TARGET_MS), (tight, 1.0)):
        figures = row["latency_target"]
        assert row["latency_target_ms"] == figures["target_ms"] == target
        assert row["tokens"] == 8 * 3 == len(figures["thetas"])  # 8 prompts, 3 measured steps
        assert figures["achieved_mean_ms"] == pytest.approx(row["mean_token_ms"]["value"],
                                                            abs=1e-3)
        mean = row["mean_token_ms"]
        assert 0 < mean["low"] <= mean["value"] <= mean["high"]
        assert row["theta"] == figures["mean_theta"] == pytest.approx(
            sum(figures["thetas"]) / len(figures["thetas"]), abs=1e-4)
        assert 0 <= row["tasks"]["wdmoe_mc_heldout"]["metrics"]["acc,none"]["value"] <= 1
        assert row["failed"] is None
    # a loose target never drops: the same quality as θ = 0, to the bit
    assert loose["latency_target"]["feasible"] is True and loose["theta"] == 0.0
    assert set(loose["latency_target"]["thetas"]) == {0.0}
    assert loose["tasks"]["wdmoe_mc_heldout"]["metrics"] == \
        theta0["tasks"]["wdmoe_mc_heldout"]["metrics"]
    assert loose["divergence"]["kl_nats"]["value"] == 0.0
    assert loose["passes"]["quality"] == theta0["passes"]["quality"]
    assert loose["passes"]["quality"]["experts_dropped"] == 0 == loose["experts_dropped"]
    # 1 ms: infeasible, the floor once learned; the quality pass ran at that mix of θ
    assert tight["latency_target"]["feasible"] is False
    assert set(tight["latency_target"]["thetas"]) == {0.0, 0.5} and 0 < tight["theta"] < 0.5
    assert tight["passes"]["quality"]["experts_dropped"] > 0
    assert tight["divergence"]["kl_nats"]["value"] > 0
    table = (out / "table-uniform.md").read_text()
    assert "| target ms | achieved mean ms [95% CI] | mean θ | feasible |" in table
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines[1:4]] == ["| -", "| 1", "| 600000"]
    assert "| no (0/8 prompts) |" in table and eval_report.TARGET_NOTE in table
    assert "| target ms |" in result.stdout
    assert "target 1 ms, target 600000 ms" in (out / "report.html").read_text()
    assert (out / "fig3-uniform.png").stat().st_size > 0


@pytest.mark.integration
def test_targets_under_a_shared_cell_read_each_policys_accuracy_at_a_latency(
        run_cli, tiny_split, tmp_path):
    """Targets with --bandwidth: a row per (target, policy), each target's quality pass
    replaying the θs of that policy's own latency pass, under that policy."""
    out = tmp_path / "eval"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = run_cli("testbed", "eval", "--shards", tiny_split, "--scenario", "paper",
                     "--bandwidth", "static,joint", "--cell-mhz", "20",
                     "--latency-targets", "600,1", "--tasks", "", "--kl-tokens", "64",
                     "--max-new-tokens", "4", "--agents", "2", "--out", str(out),
                     timeout_s=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert sorted((r["latency_target_ms"], r["bandwidth"]) for r in rows) == [
        (1.0, "joint"), (1.0, "static"), (600.0, "joint"), (600.0, "static")]
    for r in rows:
        assert r["quality_bandwidth"] == r["bandwidth"]  # its own policy's quality pass
        assert r["theta"] == r["latency_target"]["mean_theta"]
    loose = [r for r in rows if r["latency_target_ms"] == 600]
    tight = [r for r in rows if r["latency_target_ms"] == 1]
    # a loose target is θ = 0 under every policy: the exact model, the same tokens
    for r in loose:
        assert r["latency_target"]["feasible"] and r["theta"] == 0
        assert r["passes"]["latency"]["experts_dropped"] == 0
        assert r["passes"]["quality"]["experts_dropped"] == 0
        assert r["divergence"]["kl_nats"]["value"] == 0
    assert len({r["tokens_sha256"] for r in loose}) == 1
    # 1 ms is below any token: met as well as it can be, at θ > 0, and the replayed
    # quality pass drops experts and moves the distribution
    for r in tight:
        assert not r["latency_target"]["feasible"] and r["theta"] > 0
        assert r["passes"]["quality"]["experts_dropped"] > 0
        assert r["divergence"]["kl_nats"]["value"] > 0
    table = (out / "table-paper.md").read_text()
    assert "| target ms |" in table and "| bandwidth |" in table
    assert " static |" in table and " joint |" in table

"""`testbed eval`'s records, tables and figure, and `testbed report` on them, from records made
by evaluate.make_record (no agents: the passes' counts are given)."""

from __future__ import annotations

import json

import pytest

from testbed import cli
from testbed.experiments import eval_report, evaluate, pass_counts
from testbed.experiments.divergence import BlockFigures, summarize


def counts(**kw) -> dict:
    return dict(pass_counts.zero(), **kw)


def sample(ms: float, **kw) -> dict:
    return {"measured": [ms, ms + 1, ms + 2, ms + 1], "modeled": [], "wait": [],
            "counts": counts(**kw)}


def row(theta: float, exact: bool = False, quality_faults: int = 0, kl: float = 0.0) -> dict:
    figures = BlockFigures(kl_nats=[kl, kl * 2, kl, kl * 2], agreement=[1 - kl] * 4,
                           positions_per_block=63)
    quality = {"tasks": {"wdmoe_mc_heldout": {"items": 16, "metrics": {
                   "acc,none": {"value": 0.3125, "stderr": 0.12}}}, "_run": {"seconds": 1.0}},
               "divergence": dict(summarize(figures), reference_pass=counts(expert_calls=900))}
    base = {"kind": "eval", "scenario": "paper", "backend": "tbf+relay", "emulated": None,
            "theta": theta, "exact": exact}
    return evaluate.make_record(
        base, sample(30.0 - 10 * theta, expert_calls=800, experts_dropped=int(400 * theta)),
        sample(30.0), {**quality},
        counts(expert_calls=5000, experts_dropped=1000 + quality_faults,
               fault_drops=quality_faults, failed_requests=quality_faults // 1000))


def test_quality_pass_fault_drops_reach_the_table():
    """Regression: the drop-rate column said 0.0 % while the lm-eval pass had 28,740 fault
    drops (they stayed in tasks["_run"], which the table skips)."""
    rows = [row(0.0), row(0.2, quality_faults=28740, kl=0.05)]
    header, cells = eval_report.table_rows(rows)
    at = {name: i for i, name in enumerate(header)}
    assert cells[1][at["fault drops latency / quality"]] == "0 / 28740"
    assert cells[1][at["failed requests latency / quality"]] == "0 / 28"
    # dropped / (computed + dropped): 80 / 880 and 29740 / 34740
    assert cells[1][at["drop rate % latency / quality"]] == "9.1 / 85.6"
    assert cells[0][at["fault drops latency / quality"]] == "0 / 0"
    assert rows[1]["passes"]["quality"]["fault_drops"] == 28740
    assert "exact" not in header  # not asked: counts shown, no verdict


def test_kl_and_agreement_columns_carry_their_intervals():
    rows = [row(0.0), row(0.3, kl=0.1)]
    header, cells = eval_report.table_rows(rows)
    at = {name: i for i, name in enumerate(header)}
    assert cells[0][at["KL vs θ=0 nats [95% CI]"]] == "0.0000 [0.0000, 0.0000]"
    kl = cells[1][at["KL vs θ=0 nats [95% CI]"]]
    assert kl.startswith("0.1500 [") and cells[1][at["top-1 agreement vs θ=0 [95% CI]"]] \
        == "0.900 [0.900, 0.900]"
    text = eval_report.markdown(rows)
    assert "252 held-out positions, bootstrap 95 % over blocks (4 blocks)" in text


def test_exact_rows_that_lost_experts_are_marked_failed():
    rows = [row(0.0, exact=True), row(0.1, exact=True, quality_faults=3)]
    assert rows[0]["failed"] is None
    assert rows[1]["failed"] == "lost experts to faults: quality 3"
    header, cells = eval_report.table_rows(rows)
    assert header[1] == "exact" and cells[0][1] == "ok"
    assert cells[1][1] == "FAILED: lost experts to faults: quality 3"
    assert "**--exact: FAILED rows** (θ = 0.1)" in eval_report.markdown(rows)


def test_old_records_without_passes_still_show_the_quality_faults():
    old = row(0.2)
    del old["passes"]
    old["tasks"]["_run"].update(expert_calls=100, experts_dropped=50, fault_drops=40,
                                failed_requests=2)
    header, cells = eval_report.table_rows([old])
    at = {name: i for i, name in enumerate(header)}
    assert cells[0][at["fault drops latency / quality"]] == "- / 40"


def write(folder, rows) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_reads_eval_output(tmp_path, capsys):
    """Regression: `testbed report` on eval's records raised TypeError (report.py:34 formatted
    an interval dict as a number)."""
    out = tmp_path / "eval"
    write(out, [row(0.0), row(0.3, kl=0.1)])
    assert cli.main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "KL vs θ=0 nats" in printed and "| 0.3 |" in printed
    for name in ("table-paper.md", "table-paper.csv", "fig3-paper.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "fig3-paper.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exact_eval_exits_non_zero_naming_the_rows(tmp_path, monkeypatch, capsys):
    out = tmp_path / "eval"
    write(out, [row(0.0, exact=True, quality_faults=5)])  # an earlier run's: not this one's
    seen = {}

    def fake_run_eval(config):
        seen["config"] = config
        with open(out / "results.jsonl", "a") as f:
            for r in (row(0.0, exact=True), row(0.2, exact=True, quality_faults=7)):
                f.write(json.dumps(r) + "\n")
        return str(out / "results.jsonl")

    monkeypatch.setattr(evaluate, "run_eval", fake_run_eval)
    code = cli.main(["eval", "--shards", "unused", "--exact", "--thetas", "0,0.2",
                     "--out", str(out)])
    assert code != 0 and seen["config"].exact
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["testbed: error: --exact: 1 row(s) lost experts to faults, their numbers "
                   "are altered: paper θ=0.2"]


@pytest.mark.parametrize("args", [["--kl-tokens", "-1"]])
def test_eval_bad_kl_tokens_is_one_line(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--shards", "x", "--out", "y", *args])
    assert "--kl-tokens" in str(e.value)

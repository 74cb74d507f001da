"""The shared cell's part of `make demo` and of Fig. 3 (issue 23): the three policies' table
and one latency line per policy, from records shaped like `testbed eval --bandwidth`'s."""

from __future__ import annotations

from testbed.experiments import figures
from testbed.experiments.eval_report import policy_table


def interval(value: float) -> dict:
    return {"value": value, "low": value - 0.5, "high": value + 0.5}


def rows(digests=("a", "a", "a")) -> list[dict]:
    out = []
    for theta in (0.0, 0.2):
        for (policy, ms, modeled), digest in zip(
                (("static", 26.5, 15.6), ("shared", 17.6, 10.6), ("joint", 19.9, 10.3)),
                digests):
            first = policy == "static"
            out.append({"theta": theta, "bandwidth": policy, "median_token_ms": interval(ms),
                        "modeled_median_token_ms": interval(modeled),
                        "tokens_sha256": digest,
                        "change_vs_first_pct": {"measured": None if first else
                                                interval(100 * (ms - 26.5) / 26.5)}})
    return out


def test_the_policy_table_sets_each_policy_against_the_first():
    table = policy_table(rows())
    lines = table.splitlines()
    assert len(lines) == 2 + 6
    assert lines[2].startswith("| 0 | static | 26.50 [26.00, 27.00] |  | 15.60 | yes |")
    assert "| 0 | joint | 19.90 [19.40, 20.40] | -24.9 [-25.4, -24.4] | 10.30 | yes |" in table
    assert "| 0.2 | shared |" in table


def test_the_policy_table_says_when_the_tokens_differ():
    assert "| 0 | joint |" in policy_table(rows(("a", "a", "b")))
    assert policy_table(rows(("a", "a", "b"))).splitlines()[4].endswith("| NO |")


def test_fig3_draws_a_measured_and_a_modeled_line_per_policy(tmp_path):
    panel = figures.policy_panel(rows(), "shared cell")
    lines = (panel.latency,) + panel.more
    assert [line.label for line in lines] == [
        "measured static", "measured shared", "measured joint",
        "modeled static", "modeled shared", "modeled joint"]
    assert panel.labels == ["0", "0.2"] and lines[2].values == [19.9, 19.9]
    path = figures.fig3(str(tmp_path / "fig3.png"), [panel], panel_in=(5, 3.8))
    assert (tmp_path / "fig3.png").stat().st_size > 0 and path.endswith("fig3.png")

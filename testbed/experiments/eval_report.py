"""`testbed eval`'s outputs: a Table-I-style table (markdown and CSV) and a Fig.-3-style figure
per scenario, from results.jsonl. Pure reading and formatting; `figures` draws."""

from __future__ import annotations

import csv
import os

from testbed.experiments import figures
from testbed.experiments.link_record import links_lines
from testbed.experiments.pass_counts import drop_rate, exact_failure
from testbed.experiments.report import read_results


def _primary(task: dict) -> tuple[str, dict] | None:
    """The metric a task is read by: the first of lm-eval's (acc before acc_norm)."""
    metrics = task.get("metrics") or {}
    return next(iter(metrics.items()), None)


def _ci(figure: dict | None, spec: str = ".2f") -> str:
    if not figure:
        return "-"
    return f"{figure['value']:{spec}} [{figure['low']:{spec}}, {figure['high']:{spec}}]"


def _value(figure: dict | None) -> str:
    return f"{figure['value']:.2f}" if figure else "-"


def pass_counts(row: dict, name: str) -> dict | None:
    """The counts of one pass of a row (latency, quality), also from records written before
    `passes` existed (latency: the row's own figures; quality: lm-eval's `_run`)."""
    passes = row.get("passes")
    if passes is not None:
        return passes.get(name)
    if name == "latency":
        return {"expert_calls": row.get("expert_calls", 0),
                "experts_dropped": row.get("experts_dropped", 0)}
    run = (row.get("tasks") or {}).get("_run") or {}
    return run if "expert_calls" in run else None


def _both(row: dict, fmt) -> str:
    """'latency / quality' of FMT(counts) ('-' for a pass without counts)."""
    return " / ".join(fmt(c) if c is not None else "-"
                      for c in (pass_counts(row, "latency"), pass_counts(row, "quality")))


def _count(key: str):
    return lambda counts: str(counts[key]) if key in counts else "-"


def status(row: dict) -> str:
    """An --exact row's verdict: ok, or FAILED and why; '-' for a row not run --exact."""
    if not row.get("exact"):
        return "-"
    failure = exact_failure(row)
    return f"FAILED: {failure}" if failure else "ok"


def _by_scenario(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["scenario"], []).append(row)
    return {name: sorted(rs, key=lambda r: r["theta"]) for name, rs in out.items()}


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: θ, each task's primary metric ± stderr, KL and top-1 agreement with
    θ = 0 with intervals, latency with intervals, and each pass's drops and faults (latency /
    quality); with --exact rows, their verdict after θ."""
    tasks = sorted({t for r in rows for t in (r.get("tasks") or {}) if not t.startswith("_")})
    exact = any(r.get("exact") for r in rows)
    cell = any(r.get("bandwidth") for r in rows)  # a shared cell's policies (issue 23)
    header = ["θ"] + (["bandwidth"] if cell else []) + (["exact"] if exact else [])
    for t in tasks:  # one column per task, named by the first row that has its metric
        metric = next((p[0] for r in rows if (p := _primary((r.get("tasks") or {}).get(t, {})))),
                      "-")
        header.append(f"{t} {metric.split(',')[0]}")
    header += ["KL vs θ=0 nats [95% CI]", "top-1 agreement vs θ=0 [95% CI]",
               "median token ms [95% CI]",
               f"Δ median vs first {'policy' if cell else 'θ'} % [95% CI]",
               "modeled median ms", "Δ modeled %", "measured / modeled",
               "waiting for agents ms", "base station ms", "wait / modeled",
               "drop rate % latency / quality", "fault drops latency / quality",
               "failed requests latency / quality"]
    cells = []
    for r in rows:
        line = [f"{r['theta']:g}"] + ([r.get("bandwidth") or "-"] if cell else []) + \
            ([status(r)] if exact else [])
        for t in tasks:
            primary = _primary((r.get("tasks") or {}).get(t, {}))
            if primary is None:
                line.append("-")
                continue
            value, stderr = primary[1]["value"], primary[1]["stderr"]
            line.append(f"{value:.3f} ± {stderr:.3f}" if stderr is not None else f"{value:.3f}")
        change = r.get("change_vs_first_pct") or {}
        kl = r.get("divergence") or {}
        line += [_ci(kl.get("kl_nats"), ".4f"), _ci(kl.get("top1_agreement"), ".3f"),
                 _ci(r["median_token_ms"]), _ci(change.get("measured"), "+.1f"),
                 _ci(r.get("modeled_median_token_ms")),
                 f"{change['modeled']['value']:+.1f}" if change.get("modeled") else "-",
                 f"{r['measured_over_modeled']:.2f}" if r.get("measured_over_modeled")
                 else "-",
                 _value(r.get("wait_median_token_ms")), _value(r.get("base_median_token_ms")),
                 f"{r['wait_over_modeled']:.2f}" if r.get("wait_over_modeled") else "-",
                 _both(r, lambda c: f"{100 * drop_rate(c):.1f}"),
                 _both(r, _count("fault_drops")), _both(r, _count("failed_requests"))]
        cells.append(line)
    return header, cells


def markdown(rows: list[dict]) -> str:
    header, cells = table_rows(rows)
    first = rows[0]
    title = f"### {first['scenario']} ({first['backend']})"
    if first.get("emulated"):
        title += f", emulating {first['emulated']}"
    lines = [title, "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    kl = next((r["divergence"] for r in rows if r.get("divergence")), None)
    if kl:
        lines += ["", f"KL and agreement: {kl['positions']} held-out positions, "
                      f"{kl['interval']} ({kl['blocks']} blocks)."]
    links = links_lines(first.get("links") or [], first["backend"],
                        first.get("real_boxes", False), first.get("shape_dev"))
    if links:
        lines += [""] + links
    failed = [f"θ = {r['theta']:g}" for r in rows if exact_failure(r)]
    if failed:
        lines += ["", f"**--exact: FAILED rows** ({', '.join(failed)}): their numbers are "
                      "altered by experts lost to faults."]
    return "\n".join(lines)


def policy_table(rows: list[dict]) -> str:
    """A shared cell's policies side by side (issue 23), markdown: per (θ, policy) the
    measured median token latency with its 95 % interval, its change against the first
    policy, the modeled median, and whether the greedy tokens match the first policy's."""
    lines = ["| θ | bandwidth | measured median ms [95%] | vs first % [95%] | modeled median ms "
             "| same tokens |", "|---|---|---|---|---|---|"]
    first: dict[float, dict] = {}
    for r in rows:
        ref = first.setdefault(r["theta"], r)
        change = (r.get("change_vs_first_pct") or {}).get("measured")
        same = "-" if r.get("tokens_sha256") is None else \
            ("yes" if r["tokens_sha256"] == ref.get("tokens_sha256") else "NO")
        lines.append(f"| {r['theta']:g} | {r.get('bandwidth') or '-'} | "
                     f"{_ci(r['median_token_ms'])} | "
                     f"{_ci(change, '+.1f') if r is not ref else ''} | "
                     f"{_value(r.get('modeled_median_token_ms'))} | {same} |")
    return "\n".join(lines)


def write_tables(folder: str) -> list[str]:
    """table-SCENARIO.md and .csv for each scenario in folder/results.jsonl; their paths."""
    paths = []
    for name, rows in _by_scenario(read_results(folder)).items():
        md = os.path.join(folder, f"table-{name}.md")
        with open(md, "w") as f:
            f.write(markdown(rows) + "\n")
        header, cells = table_rows(rows)
        path = os.path.join(folder, f"table-{name}.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(cells)
        paths += [md, path]
    return paths


def draw(folder: str) -> list[str]:
    """fig3-SCENARIO.png (`figures`): per task, accuracy bars with their standard errors and
    the median token latency (measured, with its interval, and modeled) against θ; then KL and
    top-1 agreement with θ = 0 where every row has them."""
    paths = []
    for name, rows in _by_scenario(read_results(folder)).items():
        policies = list(dict.fromkeys(r["bandwidth"] for r in rows if r.get("bandwidth")))
        if policies:  # a shared cell: θ on x, one measured and one modeled line per policy
            paths.append(_draw_policies(folder, name, rows, policies))
            continue
        tasks = sorted({t for r in rows for t in (r.get("tasks") or {})
                        if not t.startswith("_")}) or [None]
        labels = [f"{r['theta']:g}" for r in rows]
        median = [r["median_token_ms"] for r in rows]
        more = []
        if all(r.get("modeled_median_token_ms") for r in rows):
            more.append(figures.Series([r["modeled_median_token_ms"]["value"] for r in rows],
                                       "s--", "#7f8c8d", "modeled (Eqs. 6-8)"))
        if all(r.get("wait_median_token_ms") for r in rows):
            more.append(figures.Series([r["wait_median_token_ms"]["value"] for r in rows],
                                       "^:", "#d35400", "of which waiting for agents"))
        panels = [figures.Panel(
            labels=labels, bars=_task_bars(rows, task), title=task,
            latency=figures.Series([m["value"] for m in median], "o-", figures.LATENCY_COLOR,
                                   "measured median token latency"),
            band=([m["low"] for m in median], [m["high"] for m in median]),
            more=tuple(more), latency_axis_label="token latency (ms)") for task in tasks]
        kl = None
        if all(r.get("divergence") for r in rows):
            kl = figures.DivergencePanel(labels, [r["divergence"]["kl_nats"] for r in rows],
                                         [r["divergence"]["top1_agreement"] for r in rows],
                                         rows[0]["divergence"]["positions"])
        emulated = f", emulating {rows[0]['emulated']}" if rows[0].get("emulated") else ""
        paths.append(figures.fig3(os.path.join(folder, f"fig3-{name}.png"), panels,
                                  panel_in=(4.6, 3.6), divergence=kl, legend_fontsize=7,
                                  suptitle=f"{name} ({rows[0]['backend']}{emulated})"))
    return paths


def _draw_policies(folder: str, name: str, rows: list[dict], policies: list[str]) -> str:
    """fig3-SCENARIO.png for a shared cell's policies: measured median token latency per
    policy (solid) and the modeled one (dashed), against θ."""
    panel = figures.policy_panel(rows, "shared cell: " + ", ".join(policies))
    emulated = f", emulating {rows[0]['emulated']}" if rows[0].get("emulated") else ""
    return figures.fig3(os.path.join(folder, f"fig3-{name}.png"), [panel], panel_in=(5.2, 3.8),
                        legend_fontsize=7,
                        suptitle=f"{name} ({rows[0]['backend']}{emulated})")


def _task_bars(rows: list[dict], task: str | None) -> figures.Bars | None:
    """TASK's primary metric per row with its standard error (None: no task)."""
    if task is None:
        return None
    primary = [_primary(r["tasks"][task]) for r in rows]
    metric = primary[0][0].split(",")[0] if primary[0] else "score"
    return figures.Bars([p[1]["value"] if p else 0.0 for p in primary],
                        f"{metric} (± s.e.)", f"{task}: {metric}",
                        errors=[(p[1]["stderr"] or 0.0) if p else 0.0 for p in primary])

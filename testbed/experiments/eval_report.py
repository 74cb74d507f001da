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


# said under a table with latency-target rows: what their quality columns were measured at
TARGET_NOTE = ("Latency-target rows: the latency pass decodes each prompt with the target's "
               "controller (θ per token); achieved is the mean of its measured tokens. lm-eval "
               "scores by prefill passes, which no controller can pace on their own latency, so "
               "each target's accuracy, KL and quality-pass drops are measured at the θs its "
               "latency pass used, replayed one per token in order (mean θ: their mean).")


LOOSE_TARGET_OVER = 3.0  # a target this many times the slowest achieved mean is not drawn


def target_of(row: dict) -> float | None:
    """A latency-target row's target in ms (issue 24), None for a θ row."""
    return row.get("latency_target_ms")


def axis_key(row: dict) -> tuple:
    """How a scenario's rows are ordered: θ rows by θ, then latency-target rows by target."""
    target = target_of(row)
    return (0, row["theta"]) if target is None else (1, target)


def row_label(row: dict) -> str:
    """A row in a few words: 'θ=0.1', or 'target 40 ms' for a latency-target row."""
    target = target_of(row)
    return f"θ={row['theta']:g}" if target is None else f"target {target:g} ms"


def _by_scenario(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["scenario"], []).append(row)
    return {name: sorted(rs, key=axis_key) for name, rs in out.items()}


def _first_of(rows: list[dict]) -> str:
    """What a row's change is against: its run's first θ or first target."""
    targets = {target_of(r) is not None for r in rows}
    return "θ" if targets == {False} else "target" if targets == {True} else "row of its run"


def _target_cells(row: dict) -> list[str]:
    """target ms, achieved mean ms [95% CI], mean θ, feasible; a θ row's θ is its mean θ."""
    figures = row.get("latency_target")
    if figures is None:
        return ["-", _ci(row.get("mean_token_ms")), f"{row['theta']:g}", "-"]
    feasible = "yes" if figures["feasible"] else \
        f"no ({figures['prompts_feasible']}/{figures['prompts']} prompts)"
    return [f"{figures['target_ms']:g}", _ci(row.get("mean_token_ms")),
            f"{figures['mean_theta']:.3f}", feasible]


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: θ, each task's primary metric ± stderr, KL and top-1 agreement with
    θ = 0 with intervals, latency with intervals, and each pass's drops and faults (latency /
    quality); with --exact rows, their verdict after θ. With latency-target rows, θ gives way
    to the target, the achieved mean token latency, the mean θ used and whether the target
    was met (θ rows: their θ, '-' for the rest)."""
    tasks = sorted({t for r in rows for t in (r.get("tasks") or {}) if not t.startswith("_")})
    exact = any(r.get("exact") for r in rows)
    cell = any(r.get("bandwidth") for r in rows)  # a shared cell's policies (issue 23)
    targets = any(target_of(r) is not None for r in rows)  # issue 24
    axis = ["target ms", "achieved mean ms [95% CI]", "mean θ", "feasible"] if targets \
        else ["θ"]
    header = axis + (["bandwidth"] if cell else []) + (["exact"] if exact else [])
    for t in tasks:  # one column per task, named by the first row that has its metric
        metric = next((p[0] for r in rows if (p := _primary((r.get("tasks") or {}).get(t, {})))),
                      "-")
        header.append(f"{t} {metric.split(',')[0]}")
    header += ["KL vs θ=0 nats [95% CI]", "top-1 agreement vs θ=0 [95% CI]",
               "median token ms [95% CI]",
               f"Δ median vs first {'policy' if cell else _first_of(rows)} % "
               "[95% CI]",
               "modeled median ms", "Δ modeled %", "measured / modeled",
               "waiting for agents ms", "base station ms", "wait / modeled",
               "drop rate % latency / quality", "fault drops latency / quality",
               "failed requests latency / quality"]
    cells = []
    for r in rows:
        line = (_target_cells(r) if targets else [f"{r['theta']:g}"]) + \
            ([r.get("bandwidth") or "-"] if cell else []) + ([status(r)] if exact else [])
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
    if any(target_of(r) is not None for r in rows):
        lines += ["", TARGET_NOTE]
    links = links_lines(first.get("links") or [], first["backend"],
                        first.get("real_boxes", False), first.get("shape_dev"))
    if links:
        lines += [""] + links
    failed = [row_label(r).replace("=", " = ") for r in rows if exact_failure(r)]
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
    top-1 agreement with θ = 0 where every row has them. Latency-target rows stand on the x
    axis by their target, with the target and the achieved mean as two more lines."""
    paths = []
    for name, rows in _by_scenario(read_results(folder)).items():
        policies = list(dict.fromkeys(r["bandwidth"] for r in rows if r.get("bandwidth")))
        if policies:  # a shared cell: θ on x, one measured and one modeled line per policy
            paths.append(_draw_policies(folder, name, rows, policies))
            continue
        tasks = sorted({t for r in rows for t in (r.get("tasks") or {})
                        if not t.startswith("_")}) or [None]
        targets = [target_of(r) for r in rows]
        labels = [f"{r['theta']:g}" if t is None else f"{t:g} ms" for r, t in zip(rows, targets)]
        x_label = "θ" if all(t is None for t in targets) else \
            "latency target" if all(t is not None for t in targets) else "θ / latency target"
        median = [r["median_token_ms"] for r in rows]
        more = []
        if any(t is not None for t in targets):  # what the targets asked and what they got
            achieved = [r["mean_token_ms"]["value"] for r in rows]
            # a gap for a θ row, and for a loose target far above every token (drawn, it
            # would flatten every other line to the axis)
            shown = [t if t is not None and t <= LOOSE_TARGET_OVER * max(achieved)
                     else float("nan") for t in targets]
            more.append(figures.Series(achieved, "D-", "#8e44ad", "achieved mean token latency"))
            if any(t == t for t in shown):  # NaN != NaN
                more.append(figures.Series(shown, "_", "#2c3e50", "latency target"))
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
            more=tuple(more), latency_axis_label="token latency (ms)", x_label=x_label)
            for task in tasks]
        kl = None
        if all(r.get("divergence") for r in rows):
            kl = figures.DivergencePanel(labels, [r["divergence"]["kl_nats"] for r in rows],
                                         [r["divergence"]["top1_agreement"] for r in rows],
                                         rows[0]["divergence"]["positions"], x_label=x_label)
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

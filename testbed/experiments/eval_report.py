"""`testbed eval`'s outputs: a Table-I-style table (markdown and CSV) and a Fig.-3-style figure
per scenario, from results.jsonl. Pure reading and formatting, plus matplotlib."""

from __future__ import annotations

import csv
import os

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
    header = ["θ"] + (["exact"] if exact else [])
    for t in tasks:  # one column per task, named by the first row that has its metric
        metric = next((p[0] for r in rows if (p := _primary((r.get("tasks") or {}).get(t, {})))),
                      "-")
        header.append(f"{t} {metric.split(',')[0]}")
    header += ["KL vs θ=0 nats [95% CI]", "top-1 agreement vs θ=0 [95% CI]",
               "median token ms [95% CI]", "Δ median vs first θ % [95% CI]",
               "modeled median ms", "Δ modeled %", "measured / modeled",
               "waiting for agents ms", "base station ms", "wait / modeled",
               "drop rate % latency / quality", "fault drops latency / quality",
               "failed requests latency / quality"]
    cells = []
    for r in rows:
        line = [f"{r['theta']:g}"] + ([status(r)] if exact else [])
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
    failed = [f"θ = {r['theta']:g}" for r in rows if exact_failure(r)]
    if failed:
        lines += ["", f"**--exact: FAILED rows** ({', '.join(failed)}): their numbers are "
                      "altered by experts lost to faults."]
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
    """fig3-SCENARIO.png: per task, accuracy bars with their standard errors and the median
    token latency (measured, with its interval, and modeled) against θ."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name, rows in _by_scenario(read_results(folder)).items():
        tasks = sorted({t for r in rows for t in (r.get("tasks") or {})
                        if not t.startswith("_")}) or [None]
        with_kl = all(r.get("divergence") for r in rows)
        panels = len(tasks) + with_kl
        fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6), squeeze=False)
        labels = [f"{r['theta']:g}" for r in rows]
        if with_kl:
            _draw_divergence(axes[0][-1], labels, rows)
        for ax, task in zip(axes[0], tasks):
            if task is not None:
                primary = [_primary(r["tasks"][task]) for r in rows]
                values = [p[1]["value"] if p else 0.0 for p in primary]
                errors = [(p[1]["stderr"] or 0.0) if p else 0.0 for p in primary]
                metric = primary[0][0].split(",")[0] if primary[0] else "score"
                ax.bar(labels, values, yerr=errors, capsize=3, color="#8fb3d9",
                       label=f"{metric} (± s.e.)")
                ax.set_ylabel(f"{task}: {metric}")
                ax.set_title(task, fontsize=9)
            ax.set_xlabel("θ")
            twin = ax.twinx()
            median = [r["median_token_ms"] for r in rows]
            twin.plot(labels, [m["value"] for m in median], "o-", color="#c0392b",
                      label="measured median token latency")
            twin.fill_between(labels, [m["low"] for m in median], [m["high"] for m in median],
                              color="#c0392b", alpha=0.2)
            if all(r.get("modeled_median_token_ms") for r in rows):
                twin.plot(labels, [r["modeled_median_token_ms"]["value"] for r in rows], "s--",
                          color="#7f8c8d", label="modeled (Eqs. 6-8)")
            if all(r.get("wait_median_token_ms") for r in rows):
                twin.plot(labels, [r["wait_median_token_ms"]["value"] for r in rows], "^:",
                          color="#d35400", label="of which waiting for agents")
            twin.set_ylabel("token latency (ms)")
            twin.set_ylim(bottom=0)
            handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
            ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=7)
        emulated = f", emulating {rows[0]['emulated']}" if rows[0].get("emulated") else ""
        fig.suptitle(f"{name} ({rows[0]['backend']}{emulated})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(folder, f"fig3-{name}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _draw_divergence(ax, labels: list[str], rows: list[dict]) -> None:
    """KL(θ=0 || θ) bars and top-1 agreement with θ = 0, both with their 95 % intervals."""
    kl = [r["divergence"]["kl_nats"] for r in rows]
    ax.bar(labels, [k["value"] for k in kl], color="#a9cba4",
           yerr=[[max(0.0, k["value"] - k["low"]) for k in kl],
                 [max(0.0, k["high"] - k["value"]) for k in kl]],
           capsize=3, label="KL(θ=0 || θ) nats (95 % CI)")
    ax.set_xlabel("θ")
    ax.set_ylabel("KL vs θ = 0 (nats / position)")
    first = rows[0]["divergence"]
    ax.set_title(f"next token vs θ = 0, {first['positions']} held-out positions", fontsize=9)
    twin = ax.twinx()
    agree = [r["divergence"]["top1_agreement"] for r in rows]
    twin.errorbar(labels, [a["value"] for a in agree],
                  yerr=[[max(0.0, a["value"] - a["low"]) for a in agree],
                        [max(0.0, a["high"] - a["value"]) for a in agree]],
                  fmt="o-", color="#2c3e50", capsize=3, label="top-1 agreement (95 % CI)")
    twin.set_ylabel("top-1 agreement with θ = 0")
    twin.set_ylim(0, 1.02)
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="center left", fontsize=7)

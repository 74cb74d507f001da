"""`testbed report DIR`: the paper's Fig. 3 in small, from a sweep's results.jsonl.

quality.png: quality bars (perplexity, or multiple-choice accuracy when there is one) and the
median token latency line against θ, one panel per scenario; drops.png: per-agent drop rate
against θ. Also prints the table. An eval's records get eval's own tables and figure
(`eval_report`; the command dispatches on `is_eval`).
"""

from __future__ import annotations

import json
import os

from testbed.experiments import figures
from testbed.experiments.link_record import links_lines
from testbed.links.control import TestbedError


def read_results(folder: str) -> list[dict]:
    path = os.path.join(folder, "results.jsonl")
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise TestbedError(f"{folder}: no results.jsonl (run `testbed sweep --out {folder}`)") \
            from None
    except ValueError as e:
        raise TestbedError(f"{path}: not JSON lines: {e}") from None


def is_eval(row: dict) -> bool:
    """A `testbed eval` record (its latency figures are intervals), not a sweep's."""
    return row.get("kind") == "eval" or isinstance(row.get("median_token_ms"), dict)


def _interval(figure: dict | None, spec: str) -> str:
    if not figure:
        return "-"
    return f"{figure['value']:{spec}} [{figure['low']:{spec}}, {figure['high']:{spec}}]"


def _per_pass(row: dict, key: str) -> str:
    """'generation / quality' of a counter of the sweep's passes ('-' before passes)."""
    passes = row.get("passes") or {}
    return "/".join(str(passes[name][key]) if name in passes else "-"
                    for name in ("latency", "quality"))


def table(rows: list[dict]) -> str:
    """A sweep's table: quality, KL and top-1 agreement with θ = 0 over held-out text (95 %
    intervals over blocks), latency, drops, and the fault drops and failed requests of the
    generation / quality passes."""
    lines = [f"{'scenario':<13} {'theta':>5} {'ppl':>8} {'top1':>6} {'mc':>6} "
             f"{'KL vs θ=0 nats [95% CI]':>26} {'agree θ=0 [95% CI]':>21} {'gen agree':>9} "
             f"{'median ms':>9} {'p95 ms':>8} {'tok/s':>7} {'drop':>6} "
             f"{'faults gen/qual':>15} {'failed gen/qual':>15}"]
    for r in rows:
        def fmt(key, spec, r=r):
            return format(r[key], spec) if r.get(key) is not None else "-"
        kl = r.get("divergence") or {}
        # in records without "divergence", "agreement" is the generated tokens' agreement
        generated = r.get("generated_agreement", None if kl else r.get("agreement"))
        name = r["scenario"] + (f"/{r['bandwidth']}" if r.get("bandwidth") else "")
        lines.append(f"{name:<13} {r['theta']:>5.2f} {fmt('perplexity', '8.2f'):>8} "
                     f"{fmt('top1_accuracy', '6.3f'):>6} {fmt('mc_accuracy', '6.3f'):>6} "
                     f"{_interval(kl.get('kl_nats'), '.4f'):>26} "
                     f"{_interval(kl.get('top1_agreement'), '.3f'):>21} "
                     f"{format(generated, '.3f') if generated is not None else '-':>9} "
                     f"{r['median_token_ms']:>9.2f} "
                     f"{r['p95_token_ms']:>8.2f} {r['tokens_per_s']:>7.1f} "
                     f"{100 * r['drop_rate']:>5.1f}% "
                     f"{_per_pass(r, 'fault_drops'):>15} {_per_pass(r, 'failed_requests'):>15}")
    seen: set[str] = set()
    for r in rows:  # each scenario's links, as measured when its run started
        if r.get("links") and r["scenario"] not in seen:
            seen.add(r["scenario"])
            lines += ["", f"{r['scenario']}:"] + links_lines(
                r["links"], r["backend"], r.get("real_boxes", False), r.get("shape_dev"))
    return "\n".join(lines)


def draw(folder: str) -> list[str]:
    """Writes quality.png (Fig. 3: `figures`) and drops.png into `folder`; returns their paths.
    Raises TestbedError."""
    rows = read_results(folder)
    if not rows:
        raise TestbedError(f"{folder}/results.jsonl is empty")
    if any(is_eval(r) for r in rows):
        raise TestbedError(f"{folder}: `testbed eval` records: draw them with "
                           "testbed.experiments.eval_report.draw")
    by_scenario: dict[str, list[dict]] = {}
    for r in rows:
        by_scenario.setdefault(r["scenario"], []).append(r)
    by_scenario = {name: sorted(srows, key=lambda r: r["theta"])
                   for name, srows in by_scenario.items()}
    # perplexity first: over a few hundred tokens it moves less by chance than a small
    # multiple-choice set does
    quality_key = next((k for k in ("perplexity", "mc_accuracy")
                        if any(r.get(k) is not None for r in rows)), "agreement")
    quality_label = {"mc_accuracy": "multiple-choice accuracy",
                     "perplexity": "held-out perplexity (lower is better)",
                     "agreement": "agreement with θ = 0"}[quality_key]
    panels = [figures.Panel(
        labels=[f"{r['theta']:g}" for r in srows],
        bars=figures.Bars([r.get(quality_key) or 0 for r in srows], quality_label,
                          quality_label),
        latency=figures.Series([r["median_token_ms"] for r in srows], "o-",
                               figures.LATENCY_COLOR, "median token latency"),
        latency_axis_label="median token latency (ms)",
        title=f"{scenario} ({srows[0]['backend']})")
        for scenario, srows in by_scenario.items()]
    if any(r.get("bandwidth") for r in rows):  # a shared cell (issue 23): a line per policy
        panels = [figures.policy_panel(srows, f"{scenario} ({srows[0]['backend']})")
                  for scenario, srows in by_scenario.items()]
    quality_png = figures.fig3(os.path.join(folder, "quality.png"), panels, panel_in=(5, 3.8))
    return [quality_png, _draw_drops(os.path.join(folder, "drops.png"), by_scenario)]


def _draw_drops(path: str, by_scenario: dict[str, list[dict]]) -> str:
    """Per scenario, each agent's drop rate, one bar per θ."""
    plt = figures.pyplot()
    fig, axes = plt.subplots(1, len(by_scenario), figsize=(5 * len(by_scenario), 3.5),
                             squeeze=False)
    for ax, (scenario, srows) in zip(axes[0], by_scenario.items()):
        agents = sorted(srows[0]["per_agent"],
                        key=lambda name: min(srows[0]["per_agent"][name]["experts"]))
        width = 0.8 / max(1, len(srows))
        for i, r in enumerate(srows):
            rates = []
            for name in agents:
                a = r["per_agent"].get(name, {})
                considered = a.get("calls", 0) + a.get("drops", 0)
                rates.append(100 * a.get("drops", 0) / considered if considered else 0.0)
            ax.bar([j + i * width for j in range(len(agents))], rates, width,
                   label=f"θ = {r['theta']:g}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(agents))])
        ax.set_xticklabels([",".join(map(str, srows[0]["per_agent"][n]["experts"]))
                            for n in agents], fontsize=8)
        ax.set_xlabel("agent (experts)")
        ax.set_ylabel("drop rate (%)")
        ax.set_title(scenario, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=figures.DPI)
    plt.close(fig)
    return path

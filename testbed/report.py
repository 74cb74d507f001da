"""`testbed report DIR`: the paper's Fig. 3 in small, from a sweep's results.jsonl.

quality.png: quality bars (perplexity, or multiple-choice accuracy when there is one) and the
median token latency line against θ, one panel per scenario; drops.png: per-agent drop rate
against θ. Also prints the table.
"""

from __future__ import annotations

import json
import os

from testbed.links import TestbedError


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


def table(rows: list[dict]) -> str:
    lines = [f"{'scenario':<13} {'theta':>5} {'ppl':>8} {'top1':>6} {'mc':>6} {'agree':>6} "
             f"{'median ms':>9} {'p95 ms':>8} {'tok/s':>7} {'drop':>6}"]
    for r in rows:
        def fmt(key, spec):
            return format(r[key], spec) if r.get(key) is not None else "-"
        lines.append(f"{r['scenario']:<13} {r['theta']:>5.2f} {fmt('perplexity', '8.2f'):>8} "
                     f"{fmt('top1_accuracy', '6.3f'):>6} {fmt('mc_accuracy', '6.3f'):>6} "
                     f"{fmt('agreement', '6.3f'):>6} {r['median_token_ms']:>9.2f} "
                     f"{r['p95_token_ms']:>8.2f} {r['tokens_per_s']:>7.1f} "
                     f"{100 * r['drop_rate']:>5.1f}%")
    return "\n".join(lines)


def draw(folder: str) -> list[str]:
    """Writes quality.png and drops.png into `folder`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_results(folder)
    if not rows:
        raise TestbedError(f"{folder}/results.jsonl is empty")
    by_scenario: dict[str, list[dict]] = {}
    for r in rows:
        by_scenario.setdefault(r["scenario"], []).append(r)
    # perplexity first: over a few hundred tokens it moves less by chance than a small
    # multiple-choice set does
    quality_key = next((k for k in ("perplexity", "mc_accuracy")
                        if any(r.get(k) is not None for r in rows)), "agreement")
    quality_label = {"mc_accuracy": "multiple-choice accuracy",
                     "perplexity": "held-out perplexity (lower is better)",
                     "agreement": "agreement with θ = 0"}[quality_key]

    fig, axes = plt.subplots(1, len(by_scenario), figsize=(5 * len(by_scenario), 3.8),
                             squeeze=False)
    for ax, (scenario, srows) in zip(axes[0], by_scenario.items()):
        srows = sorted(srows, key=lambda r: r["theta"])
        labels = [f"{r['theta']:g}" for r in srows]
        ax.bar(labels, [r.get(quality_key) or 0 for r in srows], color="#8fb3d9",
               label=quality_label)
        ax.set_xlabel("θ")
        ax.set_ylabel(quality_label)
        twin = ax.twinx()
        twin.plot(labels, [r["median_token_ms"] for r in srows], "o-", color="#c0392b",
                  label="median token latency")
        twin.set_ylabel("median token latency (ms)")
        twin.set_ylim(bottom=0)
        ax.set_title(f"{scenario} ({srows[0]['backend']})", fontsize=9)
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=8)
    fig.tight_layout()
    quality_png = os.path.join(folder, "quality.png")
    fig.savefig(quality_png, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(by_scenario), figsize=(5 * len(by_scenario), 3.5),
                             squeeze=False)
    for ax, (scenario, srows) in zip(axes[0], by_scenario.items()):
        srows = sorted(srows, key=lambda r: r["theta"])
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
    drops_png = os.path.join(folder, "drops.png")
    fig.savefig(drops_png, dpi=120)
    plt.close(fig)
    return [quality_png, drops_png]

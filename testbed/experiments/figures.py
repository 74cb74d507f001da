"""The paper's Fig. 3, drawn for `testbed report` (a sweep's records) and `testbed eval`: per
panel, quality against θ as bars on the left axis and token latency as lines on the right axis
(from 0); eval adds a panel of KL and top-1 agreement against θ = 0. The callers turn records
into series; this module only draws them (matplotlib, headless).
"""

from __future__ import annotations

from dataclasses import dataclass

BAR_COLOR = "#8fb3d9"
LATENCY_COLOR = "#c0392b"
LATENCY_BAND_ALPHA = 0.2
# a shared cell's bandwidth policies (issue 23), one colour each across figures
POLICY_COLORS = {"static": "#7f8c8d", "shared": "#2980b9", "joint": "#c0392b"}
DPI = 120


@dataclass(frozen=True)
class Series:
    """One line on the latency axis: VALUES per θ, a matplotlib format and colour, a legend
    label."""
    values: list[float]
    fmt: str
    color: str
    label: str


@dataclass(frozen=True)
class Bars:
    """Quality per θ on the left axis, with ERRORS (± per bar) when there are any."""
    values: list[float]
    label: str
    axis_label: str
    errors: list[float] | None = None


@dataclass(frozen=True)
class Panel:
    """One Fig. 3 panel: θ LABELS on x, BARS (or none), the measured LATENCY line with its
    interval BAND (low, high) where known, and MORE latency lines."""
    labels: list[str]
    latency: Series
    latency_axis_label: str
    bars: Bars | None = None
    band: tuple[list[float], list[float]] | None = None
    more: tuple[Series, ...] = ()
    title: str | None = None
    x_label: str = "θ"  # latency-target rows stand by their target (issue 24)


@dataclass(frozen=True)
class DivergencePanel:
    """KL(θ=0 || θ) and top-1 agreement with θ = 0 per θ, each {"value", "low", "high"}."""
    labels: list[str]
    kl_nats: list[dict]
    top1_agreement: list[dict]
    positions: int
    x_label: str = "θ"


def policy_series(rows: list[dict], key: str, fmt: str, label: str) -> list[Series]:
    """One latency line per shared-cell policy (the rows' `bandwidth`, in order of first
    appearance) over the rows' θs (ROWS sorted by θ); KEY a number or an interval's
    {"value"}. A policy missing a figure at some θ gets no line."""
    policies = list(dict.fromkeys(r["bandwidth"] for r in rows if r.get("bandwidth")))
    out = []
    for policy in policies:
        values = [r.get(key) for r in rows if r.get("bandwidth") == policy]
        if len(values) * len(policies) != len(rows) or any(v is None for v in values):
            continue
        out.append(Series([v["value"] if isinstance(v, dict) else v for v in values], fmt,
                          POLICY_COLORS.get(policy, "#2c3e50"), f"{label} {policy}"))
    return out


def policy_panel(rows: list[dict], title: str) -> Panel:
    """A Fig. 3 panel of a shared cell's policies (issue 23): the median token latency per
    policy measured (solid) and modeled (dashed) against θ; ROWS sorted by θ."""
    first = [r for r in rows if r.get("bandwidth") == rows[0].get("bandwidth")]
    measured = policy_series(rows, "median_token_ms", "o-", "measured")
    modeled = policy_series(rows, "modeled_median_token_ms", "s--", "modeled")
    lines = measured + modeled
    return Panel(labels=[f"{r['theta']:g}" for r in first], latency=lines[0],
                 more=tuple(lines[1:]), latency_axis_label="median token latency (ms)",
                 title=title)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def fig3(path: str, panels: list[Panel], *, panel_in: tuple[float, float],
         divergence: DivergencePanel | None = None, suptitle: str | None = None,
         legend_fontsize: int = 8) -> str:
    """Writes PANELS side by side (then DIVERGENCE, when given) as a PNG at PATH; returns
    PATH. Raises OSError."""
    plt = pyplot()
    count = len(panels) + (divergence is not None)
    fig, axes = plt.subplots(1, count, figsize=(panel_in[0] * count, panel_in[1]),
                             squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=False):  # the last axis may be divergence
        _draw_panel(ax, panel, legend_fontsize)
    if divergence is not None:
        _draw_divergence(axes[0][-1], divergence)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _draw_panel(ax, panel: Panel, legend_fontsize: int) -> None:
    bars = panel.bars
    if bars is not None:
        extra = {"yerr": bars.errors, "capsize": 3} if bars.errors is not None else {}
        ax.bar(panel.labels, bars.values, color=BAR_COLOR, label=bars.label, **extra)
        ax.set_ylabel(bars.axis_label)
    if panel.title:
        ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel(panel.x_label)
    twin = ax.twinx()
    line = panel.latency
    twin.plot(panel.labels, line.values, line.fmt, color=line.color, label=line.label)
    if panel.band is not None:
        twin.fill_between(panel.labels, *panel.band, color=line.color,
                          alpha=LATENCY_BAND_ALPHA)
    for more in panel.more:
        twin.plot(panel.labels, more.values, more.fmt, color=more.color, label=more.label)
    twin.set_ylabel(panel.latency_axis_label)
    twin.set_ylim(bottom=0)
    _legend(ax, twin, "lower left", legend_fontsize)


def _draw_divergence(ax, panel: DivergencePanel) -> None:
    """KL bars and the top-1 agreement line, both with their 95 % intervals."""
    kl, agree = panel.kl_nats, panel.top1_agreement
    ax.bar(panel.labels, [k["value"] for k in kl], color="#a9cba4", yerr=_error_bars(kl),
           capsize=3, label="KL(θ=0 || θ) nats (95 % CI)")
    ax.set_xlabel(panel.x_label)
    ax.set_ylabel("KL vs θ = 0 (nats / position)")
    ax.set_title(f"next token vs θ = 0, {panel.positions} held-out positions", fontsize=9)
    twin = ax.twinx()
    twin.errorbar(panel.labels, [a["value"] for a in agree], yerr=_error_bars(agree),
                  fmt="o-", color="#2c3e50", capsize=3, label="top-1 agreement (95 % CI)")
    twin.set_ylabel("top-1 agreement with θ = 0")
    twin.set_ylim(0, 1.02)
    _legend(ax, twin, "center left", 7)


def _error_bars(intervals: list[dict]) -> list[list[float]]:
    """matplotlib's (below, above) distances from each value to its interval's ends."""
    return [[max(0.0, i["value"] - i["low"]) for i in intervals],
            [max(0.0, i["high"] - i["value"]) for i in intervals]]


def _legend(ax, twin, loc: str, fontsize: int) -> None:
    """One legend for both axes of a panel."""
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc=loc, fontsize=fontsize)

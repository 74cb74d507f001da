"""What each link gave, beside what was asked: measured before an experiment starts
(testbed/boxes/linkcheck.py) and kept in every record, so a figure says on which links it was
made."""

from __future__ import annotations

from collections.abc import Sequence

from testbed.links.spec import LinkShape, TestbedError

# Enough calls for a p95 and a transfer that takes a few RTTs on a 20 Mbit/s link, without
# making a short experiment much longer.
LINKCHECK_CALLS = 12
LINKCHECK_BYTES = 1 << 20


def asked_rtt_ms(shape: LinkShape) -> float:
    """The round trip the shaping adds: the one-way delay each way (jitter averages out)."""
    return 2.0 * shape.delay_ms


NOT_SHAPED = "not shaped"


def link_records(measures: Sequence, shapes: dict[int, LinkShape] | None,
                 endpoints: Sequence[str]) -> list[dict]:
    """One dict per link, in roster order: the agent's own endpoint, what was asked (SHAPES;
    None: the links were left as they are, nothing asked) and what was measured (a
    LinkMeasure's record). Pure."""
    out = []
    for measure in measures:
        shape = (shapes or {}).get(measure.index, LinkShape())
        measured = measure.as_record()
        asked = {"asked": NOT_SHAPED, "asked_rtt_ms": None, "asked_down_mbit": None,
                 "asked_up_mbit": None, "asked_loss_pct": None} if shapes is None else {
            "asked": shape.describe(), "asked_rtt_ms": asked_rtt_ms(shape),
            "asked_down_mbit": shape.down_rate_mbit, "asked_up_mbit": shape.up_rate_mbit,
            "asked_loss_pct": shape.loss_pct}
        out.append({
            "index": measure.index,
            "endpoint": endpoints[measure.index] if measure.index < len(endpoints)
            else measure.endpoint,
            "dialed": measure.endpoint,
            "experts": list(measure.experts),
            **asked,
            "measured_rtt_ms": measure.rtt_p50_ms,
            "measured_rtt_p95_ms": measure.rtt_p95_ms,
            "measured_down_mbit": measure.down_mbit,
            "measured_up_mbit": measure.up_mbit,
            "compute_us_per_token": measure.compute_us_per_token,
            "answered": measure.answered,
            "measured": measured,
        })
    return out


def measure(roster_path: str, shapes: dict[int, LinkShape] | None, endpoints: Sequence[str],
            transfer_bytes: int | None = None) -> list[dict]:
    """Measure every link of ROSTER_PATH (the roster the base station dials) now, throughput
    with TRANSFER_BYTES (default LINKCHECK_BYTES)."""
    from testbed.boxes.linkcheck import measure_links

    return link_records(measure_links(roster_path, calls=LINKCHECK_CALLS,
                                      transfer_bytes=transfer_bytes or LINKCHECK_BYTES),
                        shapes, endpoints)


def check_answered(links: Sequence[dict]) -> None:
    """Raises TestbedError naming the first link whose agent did not answer: an experiment
    on a roster runs on every agent it names or not at all."""
    for link in links:
        if not link["answered"]:
            error = link["measured"].get("error") or "no answer"
            raise TestbedError(f"agent {link['index']} ({link['endpoint']}) did not answer: "
                               f"{error}")


def quantity(value, unit: str) -> str:
    """Three significant digits and the unit, '-' for none (every link table's cells)."""
    return "-" if value is None else f"{value:.3g} {unit}"


def measured_cells(link: dict) -> tuple[str, str]:
    """A link's measured RTT ('p50 / p95') and rates ('down / up') cells, or that it did not
    answer."""
    if not link.get("answered", True):
        return "did not answer", "-"
    return (f"{quantity(link.get('measured_rtt_ms'), 'ms')} / "
            f"{quantity(link.get('measured_rtt_p95_ms'), 'ms')}",
            f"{quantity(link.get('measured_down_mbit'), 'Mbit/s')} / "
            f"{quantity(link.get('measured_up_mbit'), 'Mbit/s')}")


def links_lines(links: Sequence[dict], backend: str, real_boxes: bool = False,
                shape_dev: str | None = None) -> list[str]:
    """A markdown table of what each link was asked and what it measured, under a line naming
    the agents and the shaping backend (for eval's and sweep's reports). Pure."""
    if not links:
        return []
    where = "the user's agents (--roster)" if real_boxes else "our own agents"
    on = f" on {shape_dev}" if shape_dev else ""
    lines = [f"Links ({where}, shaping: {backend}{on}), measured before the run:", "",
             "| link | agent | asked | asked RTT | measured RTT p50 / p95 | down / up measured |",
             "|---|---|---|---|---|---|"]
    for link in links:
        measured, rates = measured_cells(link)
        lines.append(f"| {link['index']} | {link['endpoint']} | {link['asked']} | "
                     f"{quantity(link['asked_rtt_ms'], 'ms')} | {measured} | {rates} |")
    return lines

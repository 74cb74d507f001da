"""`testbed eval`'s report.html: one self-contained page per --out folder. Per scenario it
shows Table I (the Markdown's cells, `eval_report.table_rows`), Fig. 3 (the PNG `draw` wrote,
embedded as a data: URI), what each row lost, each link as asked and as measured, and the
options of the run. Plain HTML and inline CSS: nothing is fetched, it works offline. Pure:
records and figure bytes in, a string out (the caller writes it); every string from a record
is escaped.
"""

from __future__ import annotations

import base64
import json
import shlex
from collections.abc import Mapping, Sequence
from html import escape

from testbed.experiments import eval_report
from testbed.experiments.link_record import links_lines, measured_cells, quantity
from testbed.experiments.pass_counts import COUNTERS, exact_failure

# the Table I columns that say what a row lost (their cells are copied, not recomputed)
LOSS_COLUMNS = ("exact", "drop rate % latency / quality", "fault drops latency / quality",
                "failed requests latency / quality")
# record fields that describe the run, shown under "Run" (one value, or each distinct one)
RUN_FIELDS = ("scenario", "description", "backend", "emulated", "agents", "agent_endpoints",
              "real_boxes", "shape_dev", "base_station_threads", "pace_us",
              "cell_bandwidth_hz", "cell_slowdown", "exact", "fingerprint", "code_version")

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td { white-space: nowrap; } td.wrap { white-space: normal; }
tr.failed td { background: #fbe3e0; }
.failed-note { color: #a93226; font-weight: bold; }
code { background: #f4f4f4; padding: 0.1em 0.3em; word-break: break-all; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; }
.muted { color: #777; }
"""


def fig3_name(scenario: str) -> str:
    """The file eval_report.draw writes a scenario's Fig. 3 to."""
    return f"fig3-{scenario}.png"


def page(rows: Sequence[dict], figures: Mapping[str, bytes], title: str) -> str:
    """The report of ROWS (an eval's records, any order): per scenario its tables, its Fig. 3
    from FIGURES ({file name: PNG bytes}; a missing one is said, not fetched), its links and
    its run. TITLE names the page (the --out folder)."""
    by_scenario = _by_scenario(rows)
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>testbed eval: {escape(title)}</title>", f"<style>{STYLE}</style>",
             "</head>", "<body>", f"<h1>testbed eval: {escape(title)}</h1>",
             f"<p>{len(rows)} records (results.jsonl), "
             f"{len(by_scenario)} scenario(s). Everything is in this file: it works offline."
             "</p>"]
    if len(by_scenario) > 1:
        parts.append("<ul>" + "".join(f'<li><a href="#scenario-{i}">{escape(name)}</a></li>'
                                      for i, name in enumerate(by_scenario)) + "</ul>")
    for i, (name, scenario_rows) in enumerate(by_scenario.items()):
        parts.append(_section(i, name, scenario_rows, figures.get(fig3_name(name))))
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _by_scenario(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Each scenario's rows by θ (then latency targets), in the order of the Markdown (a
    stable sort)."""
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["scenario"], []).append(row)
    return {name: sorted(rs, key=eval_report.axis_key) for name, rs in out.items()}


def _markdown_prose(rows: list[dict]) -> tuple[str, list[str]]:
    """The Markdown's title and its sentences (the KL note, the --exact verdict), taken from
    eval_report.markdown itself so the page says exactly what table-SCENARIO.md says."""
    lines = eval_report.markdown(rows).splitlines()
    prose = [line.replace("**", "") for line in lines[1:]
             if line.strip() and not line.startswith("|") and not line.startswith("Links (")]
    return lines[0].removeprefix("### "), prose


def _section(index: int, name: str, rows: list[dict], fig3_png: bytes | None) -> str:
    header, cells = eval_report.table_rows(rows)
    failed = [exact_failure(r) is not None for r in rows]
    title, prose = _markdown_prose(rows)
    out = [f'<section id="scenario-{index}">', f"<h2>{escape(title)}</h2>"]
    if rows[0].get("description"):
        out.append(f"<p>{escape(str(rows[0]['description']))}</p>")
    out += ["<h3>Table I</h3>", _table(header, cells, failed)]
    out += [f'<p class="{"failed-note" if line.startswith("--exact") else "note"}">'
            f"{escape(line)}</p>" for line in prose]
    out += ["<h3>Fig. 3</h3>", _figure(name, fig3_png)]
    out += ["<h3>What each row lost</h3>", _losses(rows, header, cells, failed)]
    out += ["<h3>Links</h3>", _links(rows[0])]
    out += ["<h3>Run</h3>", _run(rows), "</section>"]
    return "\n".join(out)


def _table(header: Sequence[str], cells: Sequence[Sequence[str]],
           failed: Sequence[bool] = ()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for i, line in enumerate(cells):
        mark = ' class="failed"' if i < len(failed) and failed[i] else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{escape(str(c))}</td>" for c in line)
                    + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table></div>")


def _figure(name: str, png: bytes | None) -> str:
    if png is None:
        return f'<p class="muted">no {escape(fig3_name(name))} in the folder</p>'
    data = base64.b64encode(png).decode("ascii")
    alt = f"Fig. 3 of {name}: accuracy, token latency and divergence against θ"
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(alt)}">'
            f"<figcaption>{escape(fig3_name(name))}</figcaption></figure>")


def _per_pass(row: dict, key: str) -> str:
    """KEY's count in each pass, 'latency / quality / reference' ('-' where not kept)."""
    passes = [eval_report.pass_counts(row, "latency"), eval_report.pass_counts(row, "quality"),
              (row.get("divergence") or {}).get("reference_pass")]
    return " / ".join(str(c[key]) if c and key in c else "-" for c in passes)


def _losses(rows: list[dict], header: list[str], cells: list[list[str]],
            failed: list[bool]) -> str:
    """Table I's loss cells as they are, then every pass's raw counters and the run's
    errors, per row."""
    at = {name: i for i, name in enumerate(header)}
    keys = [k for k in ("θ", "target ms", "mean θ", "bandwidth") + LOSS_COLUMNS if k in at]
    counters = [c for c in COUNTERS if c != "fault_drops" and c != "failed_requests"]
    errors = any(r.get("schedule_errors") or r.get("cell_errors") for r in rows)
    out_header = keys + [f"{c.replace('_', ' ')} latency / quality / reference"
                         for c in counters] + (["errors"] if errors else [])
    out_cells = []
    for row, line in zip(rows, cells):
        out_line = [line[at[k]] for k in keys] + [_per_pass(row, c) for c in counters]
        if errors:
            out_line.append("; ".join(str(e) for e in
                                      (row.get("schedule_errors") or [])
                                      + (row.get("cell_errors") or [])) or "-")
        out_cells.append(out_line)
    return _table(out_header, out_cells, failed)


def _links(row: dict) -> str:
    """The Markdown's link table (its columns first, the same cells), then what it leaves
    out: the throughput asked, the agent's compute, whether it answered, the relay dialed."""
    links = row.get("links") or []
    if not links:
        return '<p class="muted">no links in the records (written before links were kept)</p>'
    intro = links_lines(links, row["backend"], row.get("real_boxes", False),
                        row.get("shape_dev"))[0]
    header = ["link", "agent", "asked", "asked RTT", "measured RTT p50 / p95",
              "down / up measured", "down / up asked", "compute per token", "answered",
              "dialed", "experts"]
    cells = []
    for link in links:
        answered = link.get("answered", True)
        measured, rates = measured_cells(link)
        error = (link.get("measured") or {}).get("error")
        cells.append([
            str(link["index"]), str(link["endpoint"]), str(link["asked"]),
            quantity(link.get("asked_rtt_ms"), "ms"), measured, rates,
            f"{quantity(link.get('asked_down_mbit'), 'Mbit/s')} / "
            f"{quantity(link.get('asked_up_mbit'), 'Mbit/s')}",
            quantity(link.get("compute_us_per_token"), "µs"),
            "yes" if answered else f"no: {error or 'no answer'}",
            str(link.get("dialed") or "-"),
            ",".join(str(e) for e in link.get("experts") or []) or "-"])
    return f"<p>{escape(intro)}</p>" + _table(header, cells)


def command_line(options: Mapping) -> str:
    """The `testbed eval` line of a record's eval_options (every option as parsed, defaults
    included): run it again to repeat the run."""
    words = ["testbed", "eval"]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def _made(made: list[str]) -> str:
    """'θ = 0, 0.1' for θ rows only (as before latency targets), else every row's words."""
    if all(m.startswith("θ = ") for m in made):
        return "θ = " + ", ".join(m.removeprefix("θ = ") for m in made)
    return ", ".join(made)


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _run(rows: list[dict]) -> str:
    """Each distinct command line and which θs (or latency targets) it made; then the run's
    fields (each distinct value, where rows differ) and when the records were written."""
    commands: dict[str, list[str]] = {}
    for r in rows:
        line = command_line(r["eval_options"]) if r.get("eval_options") else \
            "(not recorded: the records predate eval_options, or run_eval was called directly)"
        target = eval_report.target_of(r)
        commands.setdefault(line, []).append(f"θ = {r['theta']:g}" if target is None
                                             else f"target {target:g} ms")
    out = ["<p>Command line" + ("s" if len(commands) > 1 else "") + ":</p><ul>"]
    # θ rows read as before, "(θ = 0, 0.1)"; latency-target rows "(target 40 ms, ...)"
    out += [f"<li><code>{escape(line)}</code> <span class=\"muted\">("
            f"{escape(_made(made))})</span></li>" for line, made in commands.items()]
    out.append("</ul>")
    fields = []
    for key in RUN_FIELDS:
        values = list(dict.fromkeys(_shown(r[key]) for r in rows if r.get(key) is not None))
        if values:
            fields.append([key, " | ".join(values)])
    tasks = {t: task.get("items") for r in rows for t, task in (r.get("tasks") or {}).items()
             if not t.startswith("_")}
    if tasks:
        fields.append(["tasks (items)", ", ".join(f"{t} ({n})" for t, n in tasks.items())])
    times = [r["time"] for r in rows if r.get("time")]
    if times:
        fields.append(["written", f"{min(times)} – {max(times)}"])
    table = "".join(f"<tr><th>{escape(k)}</th><td class=\"wrap\">{escape(v)}</td></tr>"
                    for k, v in fields)
    return "\n".join(out) + f'<div class="scroll"><table>{table}</table></div>'

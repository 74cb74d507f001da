"""Writing an eval folder's report.html: its records and Fig. 3 PNGs in, the page
(`report_html`, pure) staged then renamed into place."""

from __future__ import annotations

import os

from common.staging import write_file_atomic
from testbed.experiments import report_html
from testbed.experiments.report import read_results


def write_report_html(folder: str) -> str:
    """FOLDER/report.html from its records and the Fig. 3 PNGs `draw` wrote there; its path.
    Raises OSError, TestbedError."""
    rows = read_results(folder)
    figures = {}
    for name in dict.fromkeys(r["scenario"] for r in rows):
        try:
            with open(os.path.join(folder, report_html.fig3_name(name)), "rb") as f:
                figures[report_html.fig3_name(name)] = f.read()
        except FileNotFoundError:
            pass  # the page says so
    path = os.path.join(folder, "report.html")
    page = report_html.page(rows, figures, title=os.path.abspath(folder))
    write_file_atomic(path, page.encode())
    return path

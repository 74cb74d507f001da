"""report.html of `testbed eval` / `testbed report`: one self-contained page with the Markdown's
tables, Fig. 3 embedded, the links, the losses and the command line, from the records of a
real `testbed eval` run (tests/data/eval-results.jsonl: `testbed eval --shards SPLIT --scenario
paper --thetas 0,0.3 --tasks wdmoe_mc_heldout --limit 4 --batch-size 4 --max-new-tokens 4
--agents 4 --kl-tokens 128 --exact`)."""

from __future__ import annotations

import base64
import json
import os
import pathlib
from html.parser import HTMLParser
from unittest import mock

from testbed import cli
from testbed.experiments import evaluate, report_html

RECORDS = pathlib.Path(__file__).parent / "data" / "eval-results.jsonl"
HOSTILE = '<script>alert("agent")</script>'


class Page(HTMLParser):
    """What a browser would see: the tags, every table row's cell texts, every URL attribute."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.rows: list[list[str]] = []
        self.urls: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [value or "" for name, value in attrs if name in ("src", "href", "action")]
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def markdown_rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")]
            for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]


def eval_folder(tmp_path) -> pathlib.Path:
    """The captured records, with a hostile agent endpoint and the θ = 0.3 row's quality pass
    losing 3 experts to faults (an --exact FAILED row)."""
    rows = [json.loads(line) for line in RECORDS.read_text().splitlines() if line.strip()]
    for row in rows:
        row["links"][0]["endpoint"] = HOSTILE
        row["agent_endpoints"][0] = HOSTILE
    rows[1]["passes"]["quality"].update(fault_drops=3, failed_requests=1)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def test_report_writes_a_self_contained_page_with_every_markdown_row(tmp_path, capsys):
    out = eval_folder(tmp_path)
    assert cli.main(["report", str(out)]) == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out
    html = (out / "report.html").read_text()
    page = Page(html)
    # every row of table-paper.md (Table I and the links), its cells unchanged, in order
    markdown = (out / "table-paper.md").read_text()
    wanted = markdown_rows(markdown)
    assert len(wanted) == 3 + 5  # header and 2 θs; header and 4 links
    for cells in wanted:
        assert any(row[:len(cells)] == cells for row in page.rows), cells
    # what each row lost, as the Markdown says it, and the --exact verdict
    header, failed_row = wanted[0], wanted[2]
    lost = ["θ", "exact", "drop rate % latency / quality", "fault drops latency / quality",
            "failed requests latency / quality"]
    assert [failed_row[header.index(name)] for name in lost][1:] == \
        ["FAILED: lost experts to faults: quality 3", "10.9 / 2.7", "0 / 3", "0 / 1"]
    assert lost + ["expert calls latency / quality / reference"] in \
        [row[:6] for row in page.rows]
    assert [failed_row[header.index(name)] for name in lost] in [row[:5] for row in page.rows]
    assert "--exact: FAILED rows (θ = 0.3): their numbers are altered by experts lost to " \
           "faults." in "".join(page.text)
    # Fig. 3 is the PNG `draw` wrote, inside the page
    images = [u for u in page.urls if u.startswith("data:image/png;base64,")]
    assert len(images) == 1
    assert base64.b64decode(images[0].split(",", 1)[1]) == (out / "fig3-paper.png").read_bytes()
    # nothing to fetch: only data: URIs and in-page anchors, no script, no stylesheet links
    assert all(u.startswith(("data:", "#")) for u in page.urls), page.urls
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    assert "url(" not in html and "@import" not in html
    # the hostile agent name is text, not markup
    assert "<script" not in html.lower()
    assert HOSTILE in [row[1] for row in page.rows]
    # the links' figures the Markdown leaves out, and the run's command line
    link = next(row for row in page.rows if row[:1] == ["1"] and len(row) == 11)
    assert link[6:9] == ["7.9 Mbit/s / 6.7 Mbit/s", "55.5 µs", "yes"]
    assert ("testbed eval --shards /tmp/w22/split --scenario paper --thetas 0,0.3 --tasks "
            "wdmoe_mc_heldout --limit 4 --batch-size 4") in "".join(page.text)
    assert sorted(os.listdir(out)) == ["fig3-paper.png", "report.html", "results.jsonl",
                                       "table-paper.csv", "table-paper.md"]


def test_eval_writes_the_page_with_the_options_it_ran_with(tmp_path, monkeypatch):
    """`testbed eval` hands its parsed options to run_eval (they go into every record) and
    writes report.html beside the tables."""
    out = tmp_path / "eval"
    out.mkdir()
    seen = {}

    def fake_run_eval(config):
        seen["options"] = dict(config.options)
        rows = [json.loads(line) for line in RECORDS.read_text().splitlines()]
        with open(out / "results.jsonl", "a") as f:
            for row in rows:
                f.write(json.dumps(dict(row, eval_options=seen["options"])) + "\n")
        return str(out / "results.jsonl")

    monkeypatch.setattr(evaluate, "run_eval", fake_run_eval)
    assert cli.main(["eval", "--shards", "my shards", "--thetas", "0,0.3", "--tasks", "",
                     "--exact", "--out", str(out)]) == 0
    assert seen["options"]["shards"] == "my shards" and seen["options"]["exact"] is True
    assert "func" not in seen["options"] and "command" not in seen["options"]
    text = "".join(Page((out / "report.html").read_text()).text)
    assert "testbed eval --shards 'my shards' --scenario paper --thetas 0,0.3 --tasks ''" in text


def test_command_line_quotes_values_and_leaves_out_unset_options():
    assert report_html.command_line({"shards": "a b", "limit": None, "exact": True,
                                     "emulate": False, "tasks": "", "cell_mhz": 20.0}) == \
        "testbed eval --shards 'a b' --exact --tasks '' --cell-mhz 20.0"


def test_records_without_links_figure_or_options_say_so():
    rows = [json.loads(line) for line in RECORDS.read_text().splitlines()]
    for row in rows:
        del row["links"], row["eval_options"]
    page = Page(report_html.page(rows, {}, title="old"))
    text = "".join(page.text)
    assert "no fig3-paper.png in the folder" in text
    assert "no links in the records" in text
    assert "not recorded" in text


def test_ctrl_c_while_writing_leaves_the_old_page_and_no_staged_file(tmp_path):
    out = eval_folder(tmp_path)
    assert cli.main(["report", str(out)]) == 0
    before = (out / "report.html").read_bytes()
    with mock.patch("common.staging.os.replace", side_effect=KeyboardInterrupt):
        assert cli.main(["report", str(out)]) == 130
    assert (out / "report.html").read_bytes() == before
    assert not [name for name in os.listdir(out) if name.startswith(".")]

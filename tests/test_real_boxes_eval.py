"""`testbed eval --roster` on agents the test started itself, as a user's boxes would be: the
links shaped from the base station (a bridge towards keyed boxes in namespaces, as root; relays
alone on loopback otherwise), each link's asked and measured figures in every record, and the
host exactly as it was afterwards."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from agent_fixtures import start_agent  # noqa: F401  (a fixture)
from bridge_boxes import BridgeBoxes

from basestation.roster import RosterAgent, format_roster

pytestmark = pytest.mark.integration
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="a bridge and namespaces need root")
OURS = ("testbed.links.relay", "testbed shape", "-m testbed")
# measured within 15 % of asked plus the unshaped base (the figure); jitter is ±5 ms
# uniform each way, so the median sits on the asked delay
RTT_TOLERANCE = 0.15
RTT_FLOOR_MS = 1.0  # ... or 1 ms, whichever is larger: a 4 ms link's 15 % is a scheduler tick


def host_snapshot(dev: str | None) -> dict:
    """What shaping may touch on the base station: DEV's qdiscs, the nftables ruleset, the
    interfaces, and the processes of ours that run."""
    def run(*cmd: str) -> str:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout

    procs = sorted(line.strip() for line in run("ps", "-eo", "pid,args").splitlines()
                   if any(tag in line for tag in OURS) and "pytest" not in line)
    snap = {"procs": procs, "links": sorted(
        line.split(":")[1].strip() for line in run("ip", "-o", "link").splitlines())}
    if dev:
        snap["qdiscs"] = run("tc", "qdisc", "show", "dev", dev)
        snap["nft"] = run("nft", "list", "ruleset")
    return snap


def eval_args(split: str, roster: str, out, *extra: str) -> list[str]:
    return ["testbed", "eval", "--shards", split, "--roster", roster, "--scenario",
            "one-bad-link", "--thetas", "0,0.3", "--tasks", "wdmoe_mc_heldout", "--limit", "4",
            "--batch-size", "4", "--max-new-tokens", "8", "--kl-tokens", "0", "--out",
            str(out), *extra]


def offline_env(tmp_path) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                HF_DATASETS_CACHE=str(tmp_path / "datasets"))


def base_rtt_ms(roster: str) -> list[float]:
    from testbed.boxes.linkcheck import measure_links

    return [m.rtt_p50_ms for m in measure_links(roster, calls=12, transfer_bytes=1 << 18)]


def check_links(rows: list[dict], endpoints: list[str], base_ms: list[float]) -> None:
    for row in rows:
        links = row["links"]
        assert [link["endpoint"] for link in links] == endpoints
        assert row["agent_endpoints"] == endpoints and row["real_boxes"]
        assert [link["asked_rtt_ms"] for link in links] == [80.0] + [4.0] * (len(links) - 1)
        for link, base in zip(links, base_ms):
            expected = link["asked_rtt_ms"] + base
            assert link["answered"] and link["measured_rtt_p95_ms"] >= link["measured_rtt_ms"]
            allowed = max(RTT_TOLERANCE * expected, RTT_FLOOR_MS)
            assert abs(link["measured_rtt_ms"] - expected) <= allowed, (link, base)


def check_latency_cut(rows: list[dict]) -> None:
    assert [r["theta"] for r in rows] == [0.0, 0.3]
    assert rows[0]["experts_dropped"] == 0 and rows[1]["experts_dropped"] > 0
    cut = rows[1]["change_vs_first_pct"]["measured"]
    assert cut["value"] < 0 and cut["high"] < 0, cut  # faster, and its whole interval too
    assert rows[1]["tasks"]["wdmoe_mc_heldout"]["items"] == 4


@as_root
@pytest.mark.root
def test_eval_on_keyed_boxes_shapes_from_the_bridge_and_leaves_the_host_as_it_was(
        run_cli, tiny_split, tmp_path):
    with BridgeBoxes(tiny_split, 4, tmp_path / "boxes") as boxes:
        before = host_snapshot(boxes.dev)
        base_ms = base_rtt_ms(boxes.roster)
        out = tmp_path / "eval"
        result = run_cli(*eval_args(tiny_split, boxes.roster, out, "--shape-dev", boxes.dev,
                                    "--agents-on-host", "4"),
                         timeout_s=900, env=offline_env(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in open(out / "results.jsonl")]
        assert {r["backend"] for r in rows} == {"htb+nft+relay"}
        assert {r["shape_dev"] for r in rows} == {boxes.dev}
        check_links(rows, boxes.endpoints, base_ms)
        check_latency_cut(rows)
        table = (out / "table-one-bad-link.md").read_text()
        assert "the user's agents (--roster)" in table and boxes.endpoints[0] in table
        assert host_snapshot(boxes.dev) == before
        assert boxes.answering() == set(boxes.endpoints)  # the boxes were never touched


def test_eval_without_root_shapes_with_relays_alone_and_says_so(
        run_cli, start_agent, tiny_split, tmp_path):
    """The relays backend is what a user without root gets (choose_backend's unit tests); on
    loopback agents it runs anywhere."""
    agents = [start_agent("--expert", spec, "--shards", tiny_split, "--bind",
                          "tcp://127.0.0.1:*", "--no-self-benchmark")
              for spec in ("0-1", "2-3", "4-5", "6-7")]
    endpoints = [a.endpoint for a in agents]
    roster = tmp_path / "roster.toml"
    roster.write_text(format_roster(RosterAgent(tuple(range(2 * i, 2 * i + 2)), e)
                                    for i, e in enumerate(endpoints)))
    before = host_snapshot(None)
    base_ms = base_rtt_ms(str(roster))
    out = tmp_path / "eval"
    result = run_cli(*eval_args(tiny_split, str(roster), out, "--shape-dev", "lo",
                                "--shape-backend", "relays"),
                     timeout_s=900, env=offline_env(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    assert {r["backend"] for r in rows} == {"relays"}
    check_links(rows, endpoints, base_ms)
    check_latency_cut(rows)
    assert "shaping: relays" in (out / "table-one-bad-link.md").read_text()
    assert host_snapshot(None) == before


def test_eval_on_a_roster_refuses_bad_input_in_one_line(run_cli, tiny_split, tmp_path):
    roster = tmp_path / "roster.toml"
    roster.write_text(format_roster([RosterAgent((0, 1, 2, 3), "tcp://127.0.0.1:9"),
                                     RosterAgent((4, 5, 6, 7), "tcp://127.0.0.1:10")]))
    cases = {
        ("--agents", "2"): "--agents counts our own agents",
        ("--scenario", "flaky"): "give --shape-dev",
        ("--shape-dev", "wd-no-such-dev"): "wd-no-such-dev",
        ("--scenario", "uniform"): "did not answer",
    }
    for extra, expected in cases.items():
        args = eval_args(tiny_split, str(roster), tmp_path / "out", *extra)  # the last wins
        result = run_cli(*args, timeout_s=120)
        assert result.returncode == 2 and expected in result.stderr, (extra, result.stderr)
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    no_roster = run_cli("testbed", "eval", "--shards", tiny_split, "--shape-dev", "lo",
                        "--out", str(tmp_path / "out"), timeout_s=60)
    assert no_roster.returncode != 0 and "--shape-dev needs --roster" in no_roster.stderr

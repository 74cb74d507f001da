"""testbed links: agents in network namespaces behind shaped veth links, measured from outside.

Shaped tests run as root (namespaces on this machine) and, without root, inside an
unprivileged user namespace (testbed/links/userns.py); they skip only where neither is possible.
They make namespaces named wdm-*, addresses in 10.213.0.0/16 and nothing else; every process
they start lives in those namespaces and every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest
import torch
from waiting import wait_until

from testbed.links import cli as links_cli
from testbed.links import control as links
from testbed.links import netns, userns
from testbed.links.cli import parse_ms, parse_pct, parse_rate_mbit
from testbed.links.control import LinkShape, TestbedError
from testbed.links.plan import (
    agent_args_by_index,
    backend_name,
    choose_mode,
    plan_namespaced_agent,
    plan_namespaced_agents,
    plan_up,
)
from testbed.links.procs import alive, free_port

UNSHAPED_WHY = links.link_mode()[1]  # None where root or user namespaces work
shaped = [pytest.mark.root,
          pytest.mark.skipif(UNSHAPED_WHY is not None, reason=f"no shaped links: {UNSHAPED_WHY}")]
# Root tests the user-namespace path too, where this kernel allows it.
SHAPED_MODES = ([links.ROOT] if links.is_root() else []) + \
    ([links.USERNS] if userns.unavailable_reason() is None else [])
AGENT_ARGS = ["--no-self-benchmark"]
PROBE_TCP_PORT = 7001  # bulk sink/source in the namespace (the link itself, not the relay)
PROBE_UDP_PORT = 7002  # UDP echo in the namespace
DEADLINE_S = 30.0
PACE_US_PER_TOKEN = 20000  # agent_args test: 5 tokens take >= 100 ms on the paced agent

# Runs inside an agent's namespace: TCP "r<bytes>\n" -> sends that many bytes back,
# "s<bytes>\n" -> reads that many, answers "ok\n", "c0\n" -> datagrams received since the
# last "c0" (then zero); UDP: echoes every datagram.
PROBE = r"""
import socket, sys, threading
addr = sys.argv[1]
received = [0]
def tcp_client(c):
    f = c.makefile("rb")
    cmd = f.readline().decode().strip()
    n = int(cmd[1:])
    if cmd[0] == "c":
        c.sendall(b"%%d\n" %% received[0]); received[0] = 0
    elif cmd[0] == "r":
        block = b"x" * 65536
        while n > 0:
            c.sendall(block[:min(n, len(block))]); n -= min(n, len(block))
    else:
        while n > 0:
            got = f.read1(min(n, 1 << 20))
            if not got: break
            n -= len(got)
        c.sendall(b"ok\n")
    c.close()
def tcp():
    s = socket.create_server((addr, %d))
    while True:
        c, _ = s.accept(); threading.Thread(target=tcp_client, args=(c,), daemon=True).start()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((addr, %d))
    while True:
        data, peer = u.recvfrom(2048)
        received[0] += 1
        try: u.sendto(data, peer)
        except OSError: pass
threading.Thread(target=udp, daemon=True).start()
print("probe ready", flush=True)
tcp()
""" % (PROBE_TCP_PORT, PROBE_UDP_PORT)


# Runs where the host ends of the links are (this machine as root, the user namespace
# otherwise): `OP ADDR [ARGS]` against the probe above, prints one JSON number.
PROBE_CLIENT = r"""
import json, socket, sys, time
op, addr, args = sys.argv[1], sys.argv[2], [float(a) for a in sys.argv[3:]]
TCP, UDP, DEADLINE_S = %d, %d, %g
def upload(nbytes):
    nbytes = int(nbytes)
    with socket.create_connection((addr, TCP), timeout=DEADLINE_S) as s:
        block = b"y" * 65536
        start = time.monotonic()
        s.sendall(b"s%%d\n" %% nbytes)
        for off in range(0, nbytes, len(block)):
            s.sendall(block[:min(len(block), nbytes - off)])
        assert s.makefile("rb").readline() == b"ok\n"
        return nbytes * 8 / (time.monotonic() - start) / 1e6
def download(nbytes):
    nbytes = int(nbytes)
    with socket.create_connection((addr, TCP), timeout=DEADLINE_S) as s:
        s.sendall(b"r%%d\n" %% nbytes)
        got, start = 0, time.monotonic()
        while got < nbytes:
            chunk = s.recv(1 << 20)
            assert chunk, "probe closed early"
            got += len(chunk)
        return nbytes * 8 / (time.monotonic() - start) / 1e6
def received():
    with socket.create_connection((addr, TCP), timeout=DEADLINE_S) as s:
        s.sendall(b"c0\n")
        return int(s.makefile("rb").readline())
def drain(u):
    out = set()
    while True:
        try:
            out.add(int.from_bytes(u.recv(64)[:4], "big"))
        except BlockingIOError:
            return out
def udp_loss(count, gap_s):
    count = int(count)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(0.0)
        got = set()
        for i in range(count):
            u.sendto(i.to_bytes(4, "big"), (addr, UDP))
            time.sleep(gap_s)
            got |= drain(u)
        deadline = time.monotonic() + 0.5  # stragglers: a window (the lost never come)
        while time.monotonic() < deadline:
            got |= drain(u)
            time.sleep(0.01)
    return 1 - len(got) / count
ops = {"upload": upload, "download": download, "received": received, "udp_loss": udp_loss}
print(json.dumps(ops[op](*args)))
""" % (PROBE_TCP_PORT, PROBE_UDP_PORT, DEADLINE_S)


def shaped_test(fn):
    """Marks a test that needs shaped links (root or user namespaces)."""
    for mark in (pytest.mark.integration, *shaped):
        fn = mark(fn)
    return fn


def run_links_cli(*argv: str) -> int:
    """`testbed up|degrade|status|down …` in this process (links_cli is what testbed/cli.py
    wires in)."""
    parser = argparse.ArgumentParser(prog="testbed")
    links_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# -- pure -----------------------------------------------------------------------------------

def test_assign_experts_is_contiguous():
    assert links.assign_experts(8, 8) == [(i,) for i in range(8)]
    assert links.assign_experts(8, 2) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert links.assign_experts(8, 3) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    with pytest.raises(TestbedError):
        links.assign_experts(8, 9)


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    # A kernel may give the same ephemeral port to binds in a row once the first socket is
    # closed (CI saw it: two cell links on one address). Here it answers with the first port
    # three more times; free_port binds again until it gets a port it has not handed out.
    import socket

    real_bind = socket.socket.bind
    repeats = {"port": None, "left": 3}

    def sticky_bind(sock, address):
        if repeats["port"] is not None and repeats["left"] > 0:
            repeats["left"] -= 1
            return real_bind(sock, (address[0], repeats["port"]))
        return real_bind(sock, address)

    monkeypatch.setattr(socket.socket, "bind", sticky_bind)
    first = free_port()
    repeats["port"] = first
    second = free_port()
    assert second != first and repeats["left"] == 0
    assert len({free_port() for _ in range(50)} | {first, second}) == 52


def test_units_parse():
    assert parse_ms("40ms") == 40 and parse_ms("0.5s") == 500 and parse_ms("7") == 7
    assert parse_pct("2%") == 2 and parse_pct("0.5") == 0.5
    assert parse_rate_mbit("20mbit") == 20 and parse_rate_mbit("500kbit") == 0.5
    assert parse_rate_mbit("1gbit") == 1000 and parse_rate_mbit("none") is None
    for bad in ("20mbps", "fast", "-1mbit"):
        with pytest.raises(TestbedError):
            parse_rate_mbit(bad)
    with pytest.raises(TestbedError):
        parse_pct("120%")


def test_roster_is_what_basestation_reads(tmp_path):
    from basestation.roster import read_roster_file

    path = tmp_path / "roster.toml"
    path.write_text(links.roster_toml({(0, 1, 2, 3): "tcp://10.213.0.2:5600",
                                       (4,): "tcp://10.213.0.6:5600"}))
    assert read_roster_file(str(path)) == [((0, 1, 2, 3), "tcp://10.213.0.2:5600"),
                                           ((4,), "tcp://10.213.0.6:5600")]


def test_mode_is_root_then_user_namespace_then_loopback():
    assert choose_mode(True, "user.max_user_namespaces = 0") == (links.ROOT, None)
    assert choose_mode(False, None) == (links.USERNS, None)
    mode, why = choose_mode(False, "user.max_user_namespaces = 0")
    assert mode == links.LOOPBACK and "user.max_user_namespaces = 0" in why


def test_backend_names_say_where_and_how():
    assert backend_name(links.ROOT, "netem") == "netem"
    assert backend_name(links.ROOT, "tbf+nft+relay") == "tbf+nft+relay"
    assert backend_name(links.USERNS, "tbf+nft+relay") == "userns+tbf+nft+relay"
    assert backend_name(links.USERNS, "netem") == "userns+netem+relay"


def test_agent_args_for_all_or_per_agent():
    pace = ["--pace-compute-us-per-token", "350"]
    assert agent_args_by_index(None, 2) == {0: [], 1: []}
    assert agent_args_by_index(["-v"], 2) == {0: ["-v"], 1: ["-v"]}
    assert agent_args_by_index({1: tuple(pace)}, 2) == {0: [], 1: pace}
    for bad in ({2: []}, {-1: []}, {"0": []}, {0: "--x"}, {0: [3]}, "-v"):
        with pytest.raises(TestbedError) as e:
            agent_args_by_index(bad, 2)
        assert "\n" not in str(e.value)


def test_plan_names_and_addresses():
    agent = plan_namespaced_agent(3, (6, 7), "beef", 9, "/state", ["-v"])
    assert (agent["ns"], agent["host_dev"], agent["ns_dev"]) == ("wdm-beef-3", "wdmbeefh3",
                                                                 "wdmbeefn3")
    assert (agent["host_addr"], agent["ns_addr"]) == ("10.213.9.13", "10.213.9.14")
    assert agent["endpoint"] == "tcp://10.213.9.14:5600"
    assert agent["agent_args"] == ["-v"] and agent["log"] == "/state/agent-3.log"


def test_up_is_planned_as_data_before_anything_is_made():
    """plan_up: experts, arguments, shapes and paths of `testbed up`, with no I/O."""
    slow = LinkShape(delay_ms=40)
    plan = plan_up(num_experts=8, num_agents=3, shapes={2: slow, 0: LinkShape()},
                   agent_args={1: ["-v"]}, mode="root", unshaped_reason=None,
                   shards="/m", state_dir="/state", roster_path=None, tag="beef")
    assert plan.groups == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert plan.agent_args == {0: [], 1: ["-v"], 2: []}
    assert plan.shapes == {2: slow}  # a plain link is left alone
    assert plan.roster_path == "/state/roster.toml"
    agents = plan_namespaced_agents(plan, 9)
    assert [a["ns"] for a in agents] == ["wdm-beef-0", "wdm-beef-1", "wdm-beef-2"]
    assert agents[2]["experts"] == [6, 7] and agents[1]["agent_args"] == ["-v"]
    with pytest.raises(TestbedError, match="network namespaces \\(no userns\\)"):
        plan_up(num_experts=8, num_agents=2, shapes={0: slow}, agent_args=None,
                mode="loopback", unshaped_reason="no userns", shards="/m", state_dir="/s",
                roster_path=None, tag="beef")


def test_each_direction_can_have_its_own_rate():
    shape = LinkShape(delay_ms=5, rate_mbit=50, wire_down_mbit=20)
    assert (shape.down_rate_mbit, shape.up_rate_mbit) == (20, 50)
    assert shape.describe() == "delay 5 ms, loss 0 %, rate down 20 mbit / up 50 mbit"
    assert LinkShape(rate_mbit=7).describe() == "delay 0 ms, loss 0 %, rate 7 mbit"
    assert links.shaping.netem_args(shape, shape.down_rate_mbit) == [
        "netem", "delay", "5ms", "rate", "20000kbit", "limit", "100000"]
    with pytest.raises(TestbedError, match="rate"):
        LinkShape(wire_up_mbit=0).check()


def test_bad_mode_is_one_line(tiny_split, tmp_path):
    with pytest.raises(TestbedError, match="mode 'fast'"):
        links.up(tiny_split, 2, state_dir=str(tmp_path / "state"), mode="fast")
    assert not (tmp_path / "state").exists()  # refused before anything was made


# -- loopback (no privileges needed) ---------------------------------------------------------

@pytest.mark.integration
def test_loopback_fallback_without_root_or_user_namespaces(tiny_split, tmp_path, monkeypatch,
                                                           capsys):
    """Neither root nor user namespaces: loopback agents without shaping, a one-line notice
    from `testbed up` saying why, and degrade and shapes say why they cannot."""
    monkeypatch.setattr(links, "is_root", lambda: False)
    monkeypatch.setattr(userns, "unavailable_reason", lambda: "user.max_user_namespaces = 0")
    state_dir = str(tmp_path / "state")
    try:
        assert run_links_cli("up", "--shards", tiny_split, "--agents", "2",
                             "--agent-arg=--no-self-benchmark", "--state-dir", state_dir) == 0
        pids = [p for a in links.load_state(state_dir)["agents"] for p in a["pids"]]
        notice = [ln for ln in capsys.readouterr().err.splitlines() if "without shaping" in ln]
        assert len(notice) == 1 and "user.max_user_namespaces = 0" in notice[0]
        rows = links.status(state_dir)
        assert rows[0].backend == links.shaping.LOOPBACK
        assert all(r.endpoint.startswith("tcp://127.0.0.1:") for r in rows)
        assert [r.answers for r in rows] == [True, True]
        with pytest.raises(TestbedError, match="loopback"):
            links.degrade(state_dir, 0, LinkShape(delay_ms=10))
        with pytest.raises(TestbedError, match="user.max_user_namespaces = 0"):
            links.up(tiny_split, 2, {0: LinkShape(delay_ms=5)}, state_dir=str(tmp_path / "x"))
    finally:
        assert run_links_cli("down", "--state-dir", state_dir) == 0
    assert not any(alive(p) for p in pids)


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline") as f:
        return f.read().split("\0")


def expert_compute_s(endpoint: str, expert: int) -> float:
    """The compute time an agent reports for 5 tokens of one expert."""
    from wire.client import AgentClient

    with AgentClient() as client:
        peer = client.connect(endpoint)
        client.info(peer, timeout_s=DEADLINE_S)
        _, reply = client.expert(peer, 0, torch.randn(5, 64), [(expert, 5)],
                                 timeout_s=DEADLINE_S)
    return reply.header["compute_s"]


@pytest.mark.integration
def test_agent_args_per_agent_are_used_recorded_and_kept_on_restart(tiny_split, tmp_path):
    """up(agent_args={i: [...]}) gives agent i its own arguments; the state records them, status
    shows them and restart starts the agent with them again."""
    state_dir = str(tmp_path / "state")
    pace = ["--pace-compute-us-per-token", str(PACE_US_PER_TOKEN)]
    paced_s = 5 * PACE_US_PER_TOKEN / 1e6
    tb = links.up(tiny_split, 2, state_dir=state_dir, mode=links.LOOPBACK,
                  agent_args={0: AGENT_ARGS + pace, 1: AGENT_ARGS})
    try:
        pids = [p for a in links.load_state(state_dir)["agents"] for p in a["pids"]]
        assert [r.agent_args for r in links.status(state_dir)] == [tuple(AGENT_ARGS + pace),
                                                                   tuple(AGENT_ARGS)]
        assert expert_compute_s(tb.endpoints[0], 0) >= paced_s
        # agent 1 runs without the pace (its command line: its speed would depend on load)
        agent1_pids = links.load_state(state_dir)["agents"][1]["pids"]
        assert agent1_pids and not any(pace[0] in cmdline(p) for p in agent1_pids)
        old_pid = pids[0]
        new_pid = tb.restart(0)
        pids.append(new_pid)
        assert new_pid != old_pid and not alive(old_pid)
        assert expert_compute_s(tb.endpoints[0], 0) >= paced_s  # still paced
        rows = links.status(state_dir)
        assert rows[0].agent_args == tuple(AGENT_ARGS + pace) and all(r.answers for r in rows)
    finally:
        tb.down()
    assert not any(alive(p) for p in pids)


# -- helpers for shaped tests -----------------------------------------------------------------

def _out(*cmd: str) -> str:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10).stdout


# a testbed's namespace (wdm-TAG-I) or veth (wdmTAGhI, wdmTAGnI), and its /24 slot (plan.py)
TESTBED_NAME = re.compile(r"wdm-?([0-9a-f]{4})(?:-\d|[hn]\d)")
TESTBED_SLOT = re.compile(r"\b10\.213\.(\d+)\.")
# what other tests (of this run or of one beside it) make meanwhile and never the links
# testbed: boxes on a bridge (tests/bridge_boxes.py), `testbed shape`'s IFB and netem probe
OTHER_TESTS_NAME = re.compile(r"\bwd(?:br|bp|box|ifb|prb)[0-9a-f]")
OTHER_TESTS_TABLE = re.compile(r"^table \S+ wdmoe_shape_")  # `testbed shape`'s, on the host


def _without_other_tables(ruleset: str) -> str:
    """The nft ruleset less the tables of `testbed shape` (the links testbed makes its own
    tables inside its namespaces only)."""
    kept, keep = [], True
    for line in ruleset.splitlines():
        if line.startswith("table "):
            keep = not OTHER_TESTS_TABLE.match(line)
        if keep:
            kept.append(line)
    return "\n".join(kept)


def host_snapshot(*mine: str, state: dict | None = None) -> dict:
    """What up/down could leave behind: namespaces, links, qdiscs, routes, rules, and processes
    whose command line names one of `mine` (other tests may run agents of their own). Lines
    naming another testbed than `state`'s (its tag or slot), or what other tests make (bridges,
    IFBs, `testbed shape`'s tables), are left out: a test run beside this one, or a whole suite
    in another clone, makes its own and takes them down again at any time."""
    tag, slot = (state["tag"], str(state["slot"])) if state else (None, None)
    if state and state["mode"] != links.ROOT:  # its slot is inside its user namespace
        slot = None

    def lines(text: str) -> list[str]:
        return sorted(line for line in text.splitlines()
                      if all(m.group(1) == tag for m in TESTBED_NAME.finditer(line))
                      and all(m.group(1) == slot for m in TESTBED_SLOT.finditer(line))
                      and not OTHER_TESTS_NAME.search(line))

    procs = sorted(line for line in _out("ps", "-ww", "-eo", "pid,args").splitlines()
                   if any(m in line for m in mine))
    tool = links.shaping.tool
    return {"netns": lines(_out(tool("ip"), "netns", "list")),
            "links": lines("\n".join(ln.split(":")[1].strip() for ln in
                                     _out(tool("ip"), "-o", "link").splitlines())),
            "qdiscs": lines(_out(tool("tc"), "qdisc", "show")),
            "routes": lines(_out(tool("ip"), "route", "show", "table", "all")),
            "nft": lines(_without_other_tables(_out(tool("nft"), "list", "ruleset"))
                         if tool("nft") != "nft" else ""),
            "processes": procs}


class Probe:
    """The probe server inside one agent's namespace; its client runs where the host ends of
    the links are (this machine as root, inside the user namespace otherwise)."""

    def __init__(self, state_dir: str, ns: str, addr: str):
        self.state_dir, self.addr = state_dir, addr
        cmd = links.host_command(state_dir, links.shaping.tool("ip"), "netns", "exec", ns,
                                 sys.executable, "-c", PROBE, addr)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = _readline_with_deadline(self.proc, DEADLINE_S)
        assert line.startswith("probe ready"), line

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def _client(self, op: str, *args: float) -> float:
        cmd = links.host_command(self.state_dir, sys.executable, "-c", PROBE_CLIENT, op,
                                 self.addr, *map(str, args))
        out = subprocess.run(cmd, check=False, capture_output=True, text=True,
                             timeout=2 * DEADLINE_S)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def upload_mbit_s(self, nbytes: int) -> float:
        return self._client("upload", nbytes)

    def download_mbit_s(self, nbytes: int) -> float:
        return self._client("download", nbytes)

    def received(self) -> int:
        """Datagrams the probe received since the last call (asked over TCP, which retries)."""
        return int(self._client("received"))

    def udp_echo_loss(self, count: int, gap_s: float = 0.002) -> float:
        """Share of datagrams that did not come back (lost either way)."""
        return self._client("udp_loss", count, gap_s)


def _readline_with_deadline(proc: subprocess.Popen, timeout_s: float) -> str:
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout_s)
    if not result:
        proc.kill()
        pytest.fail(f"no line from {proc.args[:6]} within {timeout_s} s")
    return result[0]


def zmq_rtt_ms(endpoint: str, rounds: int = 25) -> list[float]:
    """Round trips of PING through the link (and the relay), as the base station sees them."""
    from wire.client import AgentClient

    with AgentClient() as client:
        peer = client.connect(endpoint)
        client.info(peer, timeout_s=10)
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            client.call(peer, "ping", timeout_s=10)
            out.append((time.perf_counter() - start) * 1000)
    return out


@pytest.fixture(scope="module", params=SHAPED_MODES or ["none"])
def bed(request, tiny_split, tmp_path_factory):
    """Two agents (experts 0-3, 4-7) and a probe in agent 0's namespace, per mode this machine
    can shape in; always torn down."""
    if UNSHAPED_WHY is not None:
        pytest.skip(f"no shaped links: {UNSHAPED_WHY}")
    state_dir = str(tmp_path_factory.mktemp("links") / "state")
    tb = links.up(tiny_split, 2, state_dir=state_dir, agent_args=AGENT_ARGS, mode=request.param)
    probe = None
    try:
        agent0 = links.load_state(state_dir)["agents"][0]
        probe = Probe(state_dir, agent0["ns"], agent0["ns_addr"])
        yield tb, probe
    finally:
        if probe:
            probe.stop()
        tb.down()


# -- shaped: cleanup --------------------------------------------------------------------------

@shaped_test
@pytest.mark.parametrize("mode", SHAPED_MODES or ["none"])
def test_up_degrade_restart_down_leave_host_as_it_was(tiny_split, tmp_path, mode):
    state_dir = str(tmp_path / "state")
    before = host_snapshot(tiny_split, state_dir)  # no line of its tag: that is not made yet
    tb = links.up(tiny_split, 2, {1: LinkShape(delay_ms=5, loss_pct=1, rate_mbit=50)},
                  state_dir=state_dir, agent_args={0: AGENT_ARGS, 1: AGENT_ARGS + ["-v"]},
                  mode=mode)
    state = links.load_state(state_dir)
    userns_id = None
    try:
        assert tb.agent_of == {e: e // 4 for e in range(8)}
        assert tb.backend.startswith("userns+") == (mode == links.USERNS)
        if mode == links.USERNS:  # the base station dials relays on this machine
            assert all(ep.startswith("tcp://127.0.0.1:") for ep in tb.endpoints.values())
            userns_id = userns.namespace_id(links.load_state(state_dir)["holder"]["pid"])
        assert host_snapshot(tiny_split, state_dir, state=state) != before
        tb.degrade(0, LinkShape(delay_ms=10, jitter_ms=2, rate_mbit=30, loss_pct=2))
        tb.degrade(0, LinkShape(down=True))
        rows = links.status(state_dir)
        assert [r.answers for r in rows] == [False, True] and all(r.alive for r in rows)
        assert rows[1].agent_args == (*AGENT_ARGS, "-v")
        old_pid = links.load_state(state_dir)["agents"][1]["agent_pid"]
        new_pid = tb.restart(1)  # in its namespace again, with its arguments
        with open(f"/proc/{new_pid}/cmdline", "rb") as f:
            assert b"\0-v\0" in f.read() + b"\0"
        assert new_pid != old_pid and links.status(state_dir)[1].answers
    finally:
        removed = tb.down()
    assert any(r.startswith("namespace") for r in removed)
    assert host_snapshot(tiny_split, state_dir, state=state) == before
    if userns_id is not None:
        assert userns.pids_in_namespace(userns_id) == []  # so the namespace is gone
    assert links.down(state_dir) == []  # twice is fine
    assert host_snapshot(tiny_split, state_dir, state=state) == before


KILL_POINTS = {  # when to kill `up`, judged from its state file
    "agents-starting": lambda state: bool(state["agents"] and state["agents"][0]["pids"]),
    "userns-starting": lambda state: bool(state.get("holder")),
}


@shaped_test
@pytest.mark.parametrize("mode, kill_point", [
    (mode, point) for mode in SHAPED_MODES or ["none"] for point in KILL_POINTS
    if point == "agents-starting" or mode == links.USERNS])
def test_down_cleans_up_after_up_is_killed(tiny_split, tmp_path, mode, kill_point):
    """`kill -9` of `up` midway (the user namespace starting, or agents starting and not yet
    answering) leaves nothing after down."""
    state_dir = str(tmp_path / "state")
    before = host_snapshot(tiny_split, state_dir)
    code = ("import sys; from testbed.links import control as links; "
            f"links.up({tiny_split!r}, 4, state_dir={state_dir!r}, agent_args={AGENT_ARGS!r}, "
            f"mode={mode!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    states = []

    def reached() -> bool:
        try:
            state = links.load_state(state_dir) if os.path.exists(state_dir) else None
        except TestbedError:  # caught mid-write
            state = None
        if state:
            states.append(state)
        return bool(state and KILL_POINTS[kill_point](state))

    try:  # until the first processes exist
        wait_until(reached, DEADLINE_S, what=f"up to reach {kill_point}")
        assert proc.poll() is None, "up finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    removed = links.down(state_dir)
    assert any(r.startswith("process") for r in removed)
    assert host_snapshot(tiny_split, state_dir, state=states[-1]) == before
    assert links.down(state_dir) == []


@pytest.mark.root
@pytest.mark.skipif(not links.is_root(), reason="needs root: a route on this machine")
def test_a_slot_another_testbed_fenced_first_is_not_claimed():
    """Regression: two `up` at once (two test suites on one machine) picked the same lowest
    free /24; the second's fence failed, and its cleanup removed the first one's route. The
    fence is the claim: refused once made. Slot 255, which no testbed reaches here."""
    slot, route = 255, "10.213.255.0/24"
    assert route not in netns.our_routes(())
    try:
        assert netns.fence_slot((), slot)
        assert not netns.fence_slot((), slot)
    finally:
        netns.ip((), "route", "del", "unreachable", route, check=False)
    assert route not in netns.our_routes(())


# -- shaped: the shaping is what was asked---------------------------------------------------

@shaped_test
def test_delay_gives_the_round_trip_asked(bed):
    tb, _ = bed
    endpoint = tb.endpoints[0]
    base_ms = statistics.median(zmq_rtt_ms(endpoint))
    tb.degrade(0, LinkShape(delay_ms=20))
    try:
        delayed = zmq_rtt_ms(endpoint)
    finally:
        tb.degrade(0, LinkShape())
    after = zmq_rtt_ms(endpoint)
    print(f"RTT base {base_ms:.2f} ms, with 20 ms delay {statistics.median(delayed):.2f} ms "
          f"(fastest {min(delayed):.2f}), after {statistics.median(after):.2f} ms")
    # Load only adds to a round trip, so the fastest of 25 is the link's own: netem holds each
    # packet at least its delay (a floor), and a load that slows all 25 by 20 ms is not one.
    assert 40 <= min(delayed) < 40 + 20  # 2 × one-way delay
    assert min(after) < 20  # and back


@shaped_test
def test_jitter_spreads_round_trips(bed):
    tb, _ = bed
    tb.degrade(0, LinkShape(delay_ms=20, jitter_ms=8))
    try:
        rtts = sorted(zmq_rtt_ms(tb.endpoints[0], rounds=40))
    finally:
        tb.degrade(0, LinkShape())
    spread_ms = rtts[int(0.9 * len(rtts))] - rtts[int(0.1 * len(rtts))]
    print(f"jitter 8 ms: RTT median {statistics.median(rtts):.1f} ms, p10-p90 {spread_ms:.1f} ms")
    # 2 × (20 ± 8) ms: some come in under twice the delay (load adds, it never takes away),
    # none under twice the least delay, and load only widens the spread
    assert rtts[0] >= 2 * (20 - 8) and rtts[0] < 40 and spread_ms > 4


@shaped_test
def test_rate_gives_the_throughput_asked(bed):
    tb, probe = bed
    tb.degrade(0, LinkShape(rate_mbit=20))
    try:
        up_mbit_s = probe.upload_mbit_s(3_000_000)
        down_mbit_s = probe.download_mbit_s(3_000_000)
        # each direction its own: base station -> agent 20, agent -> base station 10
        tb.degrade(0, LinkShape(wire_down_mbit=20, wire_up_mbit=10))
        to_agent_mbit_s = probe.upload_mbit_s(3_000_000)
        from_agent_mbit_s = probe.download_mbit_s(1_500_000)
    finally:
        tb.degrade(0, LinkShape())
    print(f"rate 20 mbit: upload {up_mbit_s:.1f}, download {down_mbit_s:.1f} mbit/s; "
          f"down 20 / up 10: to the agent {to_agent_mbit_s:.1f}, from it "
          f"{from_agent_mbit_s:.1f} mbit/s")
    # The ceilings are the shaping and hold under any load; the floors only say the link was
    # not throttled far below what was asked (a probe starved of CPU sends slower).
    assert 5 <= up_mbit_s <= 25 and 5 <= down_mbit_s <= 25
    assert 5 <= to_agent_mbit_s <= 25 and 2.5 <= from_agent_mbit_s <= 12.5


@shaped_test
def test_loss_gives_the_loss_asked(bed):
    tb, probe = bed
    count = 600
    tb.degrade(0, LinkShape(loss_pct=20))
    try:
        probe.received()  # zero the probe's count
        lost_round_trip = probe.udp_echo_loss(count, gap_s=0.001)
        arrived = probe.received()
    finally:
        tb.degrade(0, LinkShape())
    lost_in = 1 - arrived / count  # host -> namespace
    lost_out = 1 - (1 - lost_round_trip) * count / arrived  # namespace -> host, of those
    print(f"loss 20 % each way: in {lost_in:.3f}, out {lost_out:.3f}, "
          f"round trip {lost_round_trip:.3f}")
    # 20 % of 600 probes has a standard deviation of 1.6 points: allow > 4 of them.
    assert abs(lost_in - 0.20) < 0.07 and abs(lost_out - 0.20) < 0.08
    probe.received()
    assert probe.udp_echo_loss(100) < 0.02 and probe.received() >= 98


@shaped_test
def test_down_makes_the_agent_unreachable_and_up_restores_it(bed):
    from wire.client import AgentClient

    tb, _ = bed
    state_dir = tb.state_dir
    with AgentClient() as client:
        peer = client.connect(tb.endpoints[0])
        client.info(peer, timeout_s=10)
        tb.degrade(0, LinkShape(down=True))
        try:
            with pytest.raises(TimeoutError):
                client.call(peer, "ping", timeout_s=1.0)
            rows = links.status(state_dir)
            assert rows[0].alive and not rows[0].answers and rows[1].answers
        finally:
            tb.degrade(0, LinkShape())

        def answers() -> bool:
            try:
                client.call(peer, "ping", timeout_s=1.0)
                return True
            except TimeoutError:
                return False

        # The same client gets through again. The outage (a 1 s ping, status's 3 s INFO wait)
        # outlasts HEARTBEAT_TIMEOUT_S, so libzmq drops the connection and redials: a ping sent
        # on the dying connection is lost, so ask again until one is answered.
        wait_until(answers, DEADLINE_S, interval_s=0.0, what="a ping answered after up")
    assert links.status(state_dir)[0].answers


@shaped_test
def test_degrade_while_serving_keeps_the_agent_serving(bed):
    from wire.client import AgentClient

    tb, _ = bed
    x = torch.randn(4, 64)
    errors: list[Exception] = []
    results: list[torch.Tensor] = []
    stop = threading.Event()

    def serve_calls() -> None:
        with AgentClient() as client:
            peer = client.connect(tb.endpoints[4])  # expert 4: agent 1
            deadline = time.monotonic() + DEADLINE_S
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    y, _ = client.expert(peer, 0, x, [(4, 4)], timeout_s=10)
                    results.append(y)
                except Exception as e:  # noqa: BLE001 - collected and asserted below
                    errors.append(e)
                    return

    worker = threading.Thread(target=serve_calls, daemon=True)
    worker.start()
    try:
        for shape in (LinkShape(delay_ms=15), LinkShape(delay_ms=5, jitter_ms=3, loss_pct=3),
                      LinkShape(rate_mbit=10, delay_ms=10), LinkShape()):
            tb.degrade(1, shape)
            served = len(results)
            wait_until(lambda served=served: errors or len(results) >= served + 2, DEADLINE_S,
                       what=f"two calls through the link with {shape.describe()}")
    finally:
        stop.set()
        worker.join(DEADLINE_S)
    assert not errors and len(results) > 5
    assert all(torch.equal(r, results[0]) for r in results)
    assert all(r.alive and r.answers for r in links.status(tb.state_dir))

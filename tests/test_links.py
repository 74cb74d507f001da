"""testbed links: agents in network namespaces behind shaped veth links, measured from outside.

Root tests make namespaces named wdm-*, addresses in 10.213.0.0/16 and nothing else; every
process they start lives in those namespaces and every wait has a deadline.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest
import torch

from testbed import links
from testbed.links import LinkShape, TestbedError
from testbed.links_cli import parse_ms, parse_pct, parse_rate_mbit

IS_ROOT = os.geteuid() == 0
root = [pytest.mark.root,
        pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")]
AGENT_ARGS = ["--no-self-benchmark"]
PROBE_TCP_PORT = 7001  # bulk sink/source in the namespace (the link itself, not the relay)
PROBE_UDP_PORT = 7002  # UDP echo in the namespace
DEADLINE_S = 30.0

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


# -- pure -----------------------------------------------------------------------------------

def test_assign_experts_is_contiguous():
    assert links.assign_experts(8, 8) == [(i,) for i in range(8)]
    assert links.assign_experts(8, 2) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert links.assign_experts(8, 3) == [(0, 1, 2), (3, 4, 5), (6, 7)]
    with pytest.raises(TestbedError):
        links.assign_experts(8, 9)


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
    from basestation.session import read_roster_file

    path = tmp_path / "roster.toml"
    path.write_text(links.roster_toml({(0, 1, 2, 3): "tcp://10.213.0.2:5600",
                                       (4,): "tcp://10.213.0.6:5600"}))
    assert read_roster_file(str(path)) == [((0, 1, 2, 3), "tcp://10.213.0.2:5600"),
                                           ((4,), "tcp://10.213.0.6:5600")]


def test_loopback_fallback_without_root(tiny_split, tmp_path, monkeypatch):
    """Not root: loopback agents, no shaping, and degrade says why it cannot."""
    monkeypatch.setattr(links, "is_root", lambda: False)
    state_dir = str(tmp_path / "state")
    tb = links.up(tiny_split, 2, state_dir=state_dir, agent_args=AGENT_ARGS)
    try:
        assert tb.backend == links.shaping.LOOPBACK
        assert all(ep.startswith("tcp://127.0.0.1:") for ep in tb.endpoints.values())
        assert [s.answers for s in links.status(state_dir)] == [True, True]
        with pytest.raises(TestbedError, match="loopback"):
            tb.degrade(0, LinkShape(delay_ms=10))
    finally:
        pids = [p for a in links.load_state(state_dir)["agents"] for p in a["pids"]]
        tb.down()
    assert not any(links._alive(p) for p in pids)


# -- helpers for root tests -------------------------------------------------------------------

def _out(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout


def host_snapshot(*mine: str) -> dict:
    """What up/down could leave behind: namespaces, links, qdiscs, routes, rules, and processes
    whose command line names one of `mine` (other tests may run agents of their own)."""
    procs = sorted(line for line in _out("ps", "-eo", "pid,args").splitlines()
                   if any(m in line for m in mine))
    return {"netns": _out("ip", "netns", "list"),
            "links": sorted(ln.split(":")[1].strip() for ln in
                            _out("ip", "-o", "link").splitlines()),
            "qdiscs": _out("tc", "qdisc", "show"),
            "routes": _out("ip", "route", "show", "table", "all"),
            "nft": _out("nft", "list", "ruleset") if _has("nft") else "",
            "processes": procs}


def _has(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


class Probe:
    """The probe server inside one agent's namespace."""

    def __init__(self, ns: str, addr: str):
        self.addr = addr
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE,
                                      addr], stdout=subprocess.PIPE, text=True)
        line = _readline_with_deadline(self.proc, DEADLINE_S)
        assert line.startswith("probe ready"), line

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def upload_mbit_s(self, nbytes: int) -> float:
        with socket.create_connection((self.addr, PROBE_TCP_PORT), timeout=DEADLINE_S) as s:
            block = b"y" * 65536
            start = time.monotonic()
            s.sendall(f"s{nbytes}\n".encode())
            for off in range(0, nbytes, len(block)):
                s.sendall(block[:min(len(block), nbytes - off)])
            assert s.makefile("rb").readline() == b"ok\n"
            return nbytes * 8 / (time.monotonic() - start) / 1e6

    def download_mbit_s(self, nbytes: int) -> float:
        with socket.create_connection((self.addr, PROBE_TCP_PORT), timeout=DEADLINE_S) as s:
            s.sendall(f"r{nbytes}\n".encode())
            got, start = 0, time.monotonic()
            while got < nbytes:
                chunk = s.recv(1 << 20)
                assert chunk, "probe closed early"
                got += len(chunk)
            return nbytes * 8 / (time.monotonic() - start) / 1e6

    def received(self) -> int:
        """Datagrams the probe received since the last call (asked over TCP, which retries)."""
        with socket.create_connection((self.addr, PROBE_TCP_PORT), timeout=DEADLINE_S) as s:
            s.sendall(b"c0\n")
            return int(s.makefile("rb").readline())

    def udp_echo_loss(self, count: int, gap_s: float = 0.002) -> float:
        """Share of datagrams that did not come back (lost either way)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(0.0)
            got = set()
            for i in range(count):
                u.sendto(i.to_bytes(4, "big"), (self.addr, PROBE_UDP_PORT))
                time.sleep(gap_s)
                got |= _drain(u)
            deadline = time.monotonic() + 0.5  # stragglers
            while time.monotonic() < deadline:
                got |= _drain(u)
                time.sleep(0.01)
        return 1 - len(got) / count


def _drain(u: socket.socket) -> set[int]:
    out = set()
    while True:
        try:
            out.add(int.from_bytes(u.recv(64)[:4], "big"))
        except BlockingIOError:
            return out


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
    from edge_agent.client import AgentClient

    with AgentClient() as client:
        peer = client.connect(endpoint)
        client.info(peer, timeout_s=10)
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            client.call(peer, "ping", timeout_s=10)
            out.append((time.perf_counter() - start) * 1000)
    return out


@pytest.fixture(scope="module")
def bed(tiny_split, tmp_path_factory):
    """Two agents (experts 0-3, 4-7) and a probe in agent 0's namespace; always torn down."""
    if not IS_ROOT:
        pytest.skip("needs root: network namespaces, veth and tc")
    state_dir = str(tmp_path_factory.mktemp("links") / "state")
    tb = links.up(tiny_split, 2, state_dir=state_dir, agent_args=AGENT_ARGS)
    probe = None
    try:
        agent0 = links.load_state(state_dir)["agents"][0]
        probe = Probe(agent0["ns"], agent0["ns_addr"])
        yield tb, probe
    finally:
        if probe:
            probe.stop()
        tb.down()


# -- root: cleanup ----------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")
def test_up_degrade_down_leave_host_as_it_was(tiny_split, tmp_path):
    state_dir = str(tmp_path / "state")
    before = host_snapshot(tiny_split, state_dir)
    tb = links.up(tiny_split, 2, {1: LinkShape(delay_ms=5, loss_pct=1, rate_mbit=50)},
                  state_dir=state_dir, agent_args=AGENT_ARGS)
    try:
        assert tb.agent_of == {e: e // 4 for e in range(8)}
        assert host_snapshot(tiny_split, state_dir) != before
        tb.degrade(0, LinkShape(delay_ms=10, jitter_ms=2, rate_mbit=30, loss_pct=2))
        tb.degrade(0, LinkShape(down=True))
        rows = links.status(state_dir)
        assert [r.answers for r in rows] == [False, True] and all(r.alive for r in rows)
    finally:
        removed = tb.down()
    assert any(r.startswith("namespace") for r in removed)
    assert host_snapshot(tiny_split, state_dir) == before
    assert links.down(state_dir) == []  # twice is fine
    assert host_snapshot(tiny_split, state_dir) == before


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")
def test_down_cleans_up_after_up_is_killed(tiny_split, tmp_path):
    """`kill -9` of `up` midway (agents starting, not yet answering) leaves nothing after down."""
    state_dir = str(tmp_path / "state")
    before = host_snapshot(tiny_split, state_dir)
    code = ("import sys; from testbed import links; "
            f"links.up({tiny_split!r}, 4, state_dir={state_dir!r}, agent_args={AGENT_ARGS!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:  # until the first processes are in namespaces
            state = links.load_state(state_dir) if os.path.exists(state_dir) else None
            if state and state["agents"] and state["agents"][0]["pids"]:
                break
            time.sleep(0.02)
        else:
            pytest.fail("up made no agent within the deadline")
        assert proc.poll() is None, "up finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert host_snapshot(tiny_split, state_dir) != before
    removed = links.down(state_dir)
    assert any(r.startswith("process") for r in removed)
    assert host_snapshot(tiny_split, state_dir) == before
    assert links.down(state_dir) == []


# -- root: the shaping is what was asked ------------------------------------------------------

@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")
def test_delay_gives_the_round_trip_asked(bed):
    tb, _ = bed
    endpoint = tb.endpoints[0]
    base_ms = statistics.median(zmq_rtt_ms(endpoint))
    tb.degrade(0, LinkShape(delay_ms=20))
    try:
        delayed_ms = statistics.median(zmq_rtt_ms(endpoint))
    finally:
        tb.degrade(0, LinkShape())
    print(f"RTT base {base_ms:.2f} ms, with 20 ms delay {delayed_ms:.2f} ms")
    assert abs((delayed_ms - base_ms) - 40) < 4  # 2 × one-way delay
    assert statistics.median(zmq_rtt_ms(endpoint)) < base_ms + 4  # and back


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")
def test_jitter_spreads_round_trips(bed):
    tb, _ = bed
    tb.degrade(0, LinkShape(delay_ms=20, jitter_ms=8))
    try:
        rtts = sorted(zmq_rtt_ms(tb.endpoints[0], rounds=40))
    finally:
        tb.degrade(0, LinkShape())
    spread_ms = rtts[int(0.9 * len(rtts))] - rtts[int(0.1 * len(rtts))]
    print(f"jitter 8 ms: RTT median {statistics.median(rtts):.1f} ms, p10-p90 {spread_ms:.1f} ms")
    assert 25 < statistics.median(rtts) < 60 and spread_ms > 4


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")
def test_rate_gives_the_throughput_asked(bed):
    tb, probe = bed
    tb.degrade(0, LinkShape(rate_mbit=20))
    try:
        up_mbit_s = probe.upload_mbit_s(3_000_000)
        down_mbit_s = probe.download_mbit_s(3_000_000)
    finally:
        tb.degrade(0, LinkShape())
    print(f"rate 20 mbit: upload {up_mbit_s:.1f}, download {down_mbit_s:.1f} mbit/s")
    assert 15 <= up_mbit_s <= 25 and 15 <= down_mbit_s <= 25


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")
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


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")
def test_down_makes_the_agent_unreachable_and_up_restores_it(bed):
    from edge_agent.client import AgentClient

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
        client.call(peer, "ping", timeout_s=10)  # the same connection works again
    assert links.status(state_dir)[0].answers


@pytest.mark.root
@pytest.mark.skipif(not IS_ROOT, reason="needs root: network namespaces, veth and tc")
def test_degrade_while_serving_keeps_the_agent_serving(bed):
    from edge_agent.client import AgentClient

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
            time.sleep(0.4)
    finally:
        stop.set()
        worker.join(DEADLINE_S)
    assert not errors and len(results) > 5
    assert all(torch.equal(r, results[0]) for r in results)
    assert all(r.alive and r.answers for r in links.status(tb.state_dir))

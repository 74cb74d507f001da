"""The shared cell (testbed.links.cell): the shares each policy gives and the fluid
processor-sharing pool by hand (pure), then a real cell process with three links on 127.0.0.1
whose transfers take the time their shares give."""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from waiting import wait_until

from testbed.links.cell import (
    parse_cell_settings,
    send_allocation,
    stats_path,
    write_cell_settings,
)
from testbed.links.cell_policy import (
    Allocation,
    FluidPool,
    accept_allocation,
    format_allocation,
    parse_allocation,
    pool_shares,
    rate_bits_per_s,
    snr_hz_for,
)

DEADLINE_S = 10.0

# -- pure: shares ----------------------------------------------------------------------------------


def test_static_gives_every_link_its_nth_busy_or_not():
    for busy in ({0}, {0, 1}, {0, 1, 2}):
        shares, until_s = pool_shares("static", 3, frozenset(busy), None, 0.0)
        assert shares == {link: pytest.approx(1 / 3) for link in busy}
        assert until_s == math.inf


def test_shared_splits_the_pool_among_the_busy_links():
    assert pool_shares("shared", 3, frozenset({2}), None, 0.0)[0] == {2: 1.0}
    assert pool_shares("shared", 3, frozenset({0, 2}), None, 0.0)[0] == {0: 0.5, 2: 0.5}
    assert pool_shares("shared", 3, frozenset(), None, 0.0) == ({}, math.inf)


def test_joint_follows_the_allocation_while_its_links_are_busy_then_shares():
    allocation = Allocation(seq=1, shares={0: 0.75, 1: 0.25}, received_s=10.0)
    # link 2 is not in the allocation: it waits while 0 or 1 has bytes
    shares, until_s = pool_shares("joint", 3, frozenset({0, 1, 2}), allocation, 10.1, 0.5)
    assert shares == {0: 0.75, 1: 0.25, 2: 0.0} and until_s == pytest.approx(10.5)
    # link 0 is idle (its reply not ready yet): link 1, still allocated, takes what 0 left
    # (work-conserving); link 2 still waits
    assert pool_shares("joint", 3, frozenset({1, 2}), allocation, 10.1, 0.5)[0] == {
        1: 1.0, 2: 0.0}
    # the allocated links drained: link 2 gets the pool
    assert pool_shares("joint", 3, frozenset({2}), allocation, 10.1, 0.5)[0] == {2: 1.0}
    # the allocation is older than the TTL: shared, whoever is busy
    assert pool_shares("joint", 3, frozenset({0, 2}), allocation, 10.5, 0.5) == (
        {0: 0.5, 2: 0.5}, math.inf)
    # no allocation yet: shared
    assert pool_shares("joint", 3, frozenset({0, 1}), None, 0.0)[0] == {0: 0.5, 1: 0.5}


def test_a_share_runs_at_its_shannon_rate_over_its_own_bandwidth():
    snr_hz = snr_hz_for(20e6, 1e6)  # 1 MHz carries 20 Mbit/s: snr / B = 2^20 - 1
    assert snr_hz == pytest.approx((2**20 - 1) * 1e6)
    assert rate_bits_per_s(1 / 3, 3e6, snr_hz) == pytest.approx(20e6)
    assert rate_bits_per_s(1 / 3, 3e6, snr_hz, slowdown=2) == pytest.approx(10e6)
    # the whole pool: 3 MHz with a third of the SNR per Hz, Eq. 2
    assert rate_bits_per_s(1.0, 3e6, snr_hz) == pytest.approx(3e6 * math.log2(1 + snr_hz / 3e6))
    assert rate_bits_per_s(0.0, 3e6, snr_hz) == 0.0


# -- pure: the control datagram --------------------------------------------------------------------


def test_an_allocation_datagram_round_trips():
    assert parse_allocation(format_allocation(7, {0: 0.75, 1: 0.25}), 3) == (7, {0: 0.75, 1: 0.25})
    assert parse_allocation(format_allocation(8, {}), 3) == (8, {})


@pytest.mark.parametrize("datagram", [
    b"", b"\xff\xfe", b"not json", b"[1, 2]", b'{"seq": 1}', b'{"seq": "1", "shares": {}}',
    b'{"seq": true, "shares": {}}', b'{"seq": 1, "shares": {"0": -0.1}}',
    b'{"seq": 1, "shares": {"0": 0.7, "1": 0.4}}', b'{"seq": 1, "shares": {"3": 0.1}}',
    b'{"seq": 1, "shares": {"x": 0.1}}', b'{"seq": 1, "shares": {"0": NaN}}',
    b'{"seq": 1, "shares": {"0": true}}', b'{"seq": 1, "shares": {"0": "0.5"}}',
    b"[" * 100000, b'{"seq": 1, "shares": {}, "pad": "' + b"x" * 5000 + b'"}',
])
def test_anything_but_an_allocation_is_refused(datagram):
    with pytest.raises(ValueError):
        parse_allocation(datagram, 3)


def test_an_overtaken_allocation_is_stale_until_the_current_one_expires():
    current = Allocation(seq=5, shares={0: 1.0}, received_s=10.0)
    assert accept_allocation(None, 0, 10.0)
    assert accept_allocation(current, 6, 10.1, 0.5) and accept_allocation(current, 5, 10.1, 0.5)
    assert not accept_allocation(current, 4, 10.1, 0.5)
    assert accept_allocation(current, 0, 10.5, 0.5)  # a restarted base station counts from 0


# -- pure: the fluid pool --------------------------------------------------------------------------

POOL_BITS_PER_S = 1000.0  # a linear toy rate, so every completion time is a hand sum


def toy_pool(policy: str = "shared", allocation: Allocation | None = None,
             ttl_s: float = 100.0) -> FluidPool:
    return FluidPool(
        shares_of=lambda busy, now_s: pool_shares(policy, 3, busy, allocation, now_s, ttl_s),
        rate_of=lambda link, share: share * POOL_BITS_PER_S)


def completions(pool: FluidPool, until_s: float = 100.0) -> dict[object, float]:
    return {item: done_s for done_s, _, item in pool.advance(until_s)}


def test_two_equal_flows_each_get_half():
    pool = toy_pool()
    pool.add(0.0, 0, 125, "a")  # 1000 bits
    pool.add(0.0, 1, 125, "b")
    assert completions(pool) == {"a": pytest.approx(2.0), "b": pytest.approx(2.0)}
    alone = toy_pool()
    alone.add(0.0, 0, 125, "a")
    assert completions(alone) == {"a": pytest.approx(1.0)}


def test_a_flow_that_starts_later_shares_from_then_on():
    pool = toy_pool()
    pool.add(0.0, 0, 125, "a")
    assert pool.next_event_s() == pytest.approx(1.0)
    # a alone for 0.5 s (500 bits), then both at 500 bit/s: a's last 500 bits end at 1.5;
    # b has 500 left then and finishes alone at 1000 bit/s at 2.0
    assert pool.add(0.5, 1, 125, "b") == []
    assert pool.next_event_s() == pytest.approx(1.5)
    assert completions(pool) == {"a": pytest.approx(1.5), "b": pytest.approx(2.0)}


def test_processor_sharing_completion_times_by_hand():
    pool = toy_pool()
    for link, num_bytes in enumerate((125, 250, 375)):  # 1000, 2000, 3000 bits
        pool.add(0.0, link, num_bytes, link)
    # 3 at 333.3: the first done at 3.0; 2 at 500: the second's 1000 left at 5.0; the last
    # 1000 alone at 6.0 (work-conserving: 6000 bits / 1000 bit/s)
    assert completions(pool) == {0: pytest.approx(3.0), 1: pytest.approx(5.0),
                                 2: pytest.approx(6.0)}


def test_chunks_of_a_link_go_in_order_and_an_end_of_stream_right_after():
    pool = toy_pool()
    pool.add(0.0, 0, 125, "first")
    pool.add(0.0, 0, 125, "second")
    pool.add(0.0, 0, 0, "eof")
    assert list(completions(pool).items()) == [("first", pytest.approx(1.0)),
                                               ("second", pytest.approx(2.0)),
                                               ("eof", pytest.approx(2.0))]


def test_static_leaves_the_idle_share_unused():
    pool = toy_pool("static")
    pool.add(0.0, 0, 125, "a")
    assert completions(pool) == {"a": pytest.approx(3.0)}


def test_joint_holds_unallocated_links_until_the_allocated_ones_drain():
    pool = toy_pool("joint", Allocation(1, {0: 0.75, 1: 0.25}, received_s=0.0))
    for link in range(3):
        pool.add(0.0, link, 125, link)
    # 0 at 750 bit/s: 1.333; 1 at 250 bit/s to then (333 bits), then the whole pool for its
    # last 667: 2.0; 2 waits while an allocated link is busy, then alone: 3.0
    assert completions(pool) == {0: pytest.approx(4 / 3), 1: pytest.approx(2.0),
                                 2: pytest.approx(3.0)}
    stats = {link: pool.stats[link].as_dict() for link in range(3)}
    assert stats[0]["mean_share"] == pytest.approx(0.75)
    assert stats[1]["mean_share"] == pytest.approx(0.5)  # 1.333 s at 0.25, 0.667 s at 1
    assert stats[2]["busy_s"] == pytest.approx(3.0)
    assert stats[2]["share_s"] == pytest.approx(1.0)  # 2 s at 0, 1 s at 1
    assert all(stats[link]["bytes_served"] == 125 for link in range(3))


def test_joint_falls_back_to_shared_when_the_allocation_expires():
    pool = toy_pool("joint", Allocation(1, {0: 0.75, 1: 0.25}, received_s=0.0), ttl_s=0.5)
    for link in range(3):
        pool.add(0.0, link, 125, link)
    # to 0.5: 375 / 125 / 0 bits served; then thirds: link 0's 625 left at 2.375; then halves:
    # link 1's 250 left at 2.875; link 2's last 125 alone at 3.0
    assert completions(pool) == {0: pytest.approx(2.375), 1: pytest.approx(2.875),
                                 2: pytest.approx(3.0)}


def test_a_closed_connections_bytes_leave_the_pool():
    pool = toy_pool()
    pool.add(0.0, 0, 125, "gone")
    pool.add(0.0, 1, 125, "kept")
    assert pool.discard(0.5, 0, lambda item: item == "gone") == []
    # both at 500 bit/s to 0.5 (250 bits), then kept alone: 750 bits at 1000 bit/s
    assert completions(pool) == {"kept": pytest.approx(1.25)}


# -- pure: settings ------------------------------------------------------------------------------

GOOD_LINK = {"listen": "127.0.0.1:5600", "target": "127.0.0.1:5601", "snr_down_hz": 1e9,
             "snr_up_hz": 1e9}


@pytest.mark.parametrize("change, word", [
    ({"links": []}, "links"),
    ({"total_bandwidth_hz": 0}, "total_bandwidth_hz"),
    ({"total_bandwidth_hz": None}, "total_bandwidth_hz"),
    ({"slowdown": 0.5}, "slowdown"),
    ({"policy": "fair"}, "policy"),
    ({"allocation_ttl_s": -1}, "allocation_ttl_s"),
    ({"links": [dict(GOOD_LINK, target="nowhere")]}, "HOST:PORT"),
    ({"links": [dict(GOOD_LINK, listen_fd=3)]}, "listen"),
    ({"links": [dict(GOOD_LINK, snr_up_hz=-1)]}, "snr_up_hz"),
    ({"links": [dict(GOOD_LINK, delay_ms="5")]}, "delay_ms"),
    ({"links": [dict(GOOD_LINK, down="yes")]}, "down"),
    ({"links": [GOOD_LINK, GOOD_LINK]}, "same address"),
])
def test_bad_settings_name_the_field(change, word):
    data = {"links": [GOOD_LINK], "total_bandwidth_hz": 1e6, **change}
    with pytest.raises(ValueError, match=word):
        parse_cell_settings({k: v for k, v in data.items() if v is not None})


def test_settings_that_do_not_parse_are_never_written(tmp_path):
    path = tmp_path / "cell.json"
    with pytest.raises(ValueError):
        write_cell_settings(str(path), {"links": [GOOD_LINK]}, wait=False)
    assert not path.exists()


# -- a real cell -----------------------------------------------------------------------------------

BANDWIDTH_HZ = 3e6
SNR_HZ = snr_hz_for(20e6, 1e6)  # a third of the pool (1 MHz) carries 20 Mbit/s
SLOWDOWN = 2.0  # so 10 Mbit/s: a MiB in 0.84 s
TRANSFER_BYTES = 1 << 20
WINDOW = 0.25  # +-25 %: what a loaded 2-core machine keeps


def transfer_s(share: float) -> float:
    return TRANSFER_BYTES * 8 / rate_bits_per_s(share, BANDWIDTH_HZ, SNR_HZ, SLOWDOWN)


def within(measured_s: float, expected_s: float) -> bool:
    return (1 - WINDOW) * expected_s <= measured_s <= (1 + WINDOW) * expected_s


class Server:
    """On 127.0.0.1, per connection: echo every byte back (echo=True), or read messages of an
    8-byte length and their bytes and answer each with b"ok" (a sink: the time is the
    downlink's)."""

    def __init__(self, echo: bool):
        self.echo = echo
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                if self.echo:
                    while data := conn.recv(65536):
                        conn.sendall(data)
                    return
                while header := recv_exactly(conn, 8):
                    (size,) = struct.unpack("!Q", header)
                    left = size
                    while left:
                        chunk = conn.recv(min(left, 1 << 20))
                        if not chunk:
                            return
                        left -= len(chunk)
                    conn.sendall(b"ok")
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


def recv_exactly(conn: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = conn.recv(size - len(got))
        if not chunk:
            return b""
        got += chunk
    return got


class RunningCell:
    """A cell process with three links to TARGET on inherited listening sockets; stopped by
    close() (SIGTERM, then SIGKILL)."""

    def __init__(self, tmp_path, target: str, policy: str, **extra):
        self.path = str(tmp_path / "cell.json")
        self.listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]
        self.ports = [s.getsockname()[1] for s in self.listeners]
        self.settings = {
            "links": [{"listen_fd": s.fileno(), "target": target, "snr_down_hz": SNR_HZ,
                       "snr_up_hz": SNR_HZ} for s in self.listeners],
            "total_bandwidth_hz": BANDWIDTH_HZ, "slowdown": SLOWDOWN, "policy": policy, **extra}
        write_cell_settings(self.path, self.settings, wait=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "testbed.links.cell", "--settings", self.path,
             "--control", "127.0.0.1:0"], pass_fds=[s.fileno() for s in self.listeners],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for s in self.listeners:
            s.close()  # the cell holds its own copies
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(DEADLINE_S)
        if not line or not line[0].startswith("cell ready: control 127.0.0.1:"):
            self.close()
            pytest.fail(f"cell did not start: {line} {self.proc.stderr.read()}")
        self.control = line[0].split()[3].rstrip(";")

    def change(self, **settings) -> None:
        self.settings.update(settings)
        assert write_cell_settings(self.path, self.settings, wait=True), "cell did not apply"

    def change_link(self, index: int, **fields) -> None:
        self.settings["links"][index].update(fields)
        self.change()

    def stats(self) -> dict | None:
        try:
            with open(stats_path(self.path)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=DEADLINE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=DEADLINE_S)


@pytest.fixture
def sink():
    server = Server(echo=False)
    yield server
    server.close()


@pytest.fixture
def echo():
    server = Server(echo=True)
    yield server
    server.close()


@pytest.fixture
def cell_factory(tmp_path):
    cells = []

    def start(target: str, policy: str, **extra) -> RunningCell:
        cells.append(RunningCell(tmp_path, target, policy, **extra))
        return cells[-1]

    yield start
    for cell in cells:
        cell.close()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S * 3)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def send_message(s: socket.socket, num_bytes: int = TRANSFER_BYTES) -> float:
    """Seconds from the first byte sent to the sink's answer."""
    start = time.monotonic()
    s.sendall(struct.pack("!Q", num_bytes) + bytes(num_bytes))
    assert recv_exactly(s, 2) == b"ok", "the cell closed the connection"
    return time.monotonic() - start


def simultaneous(ports: list[int]) -> list[float]:
    """Send one message on each port at once; the seconds each took from the common start."""
    sockets = [connect(port) for port in ports]
    start = threading.Barrier(len(ports))
    took: list[float] = [math.nan] * len(ports)

    def one(i: int) -> None:
        start.wait(DEADLINE_S)
        took[i] = send_message(sockets[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(ports))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE_S * 3)
    for s in sockets:
        s.close()
    return took


@pytest.mark.integration
def test_one_transfer_alone_gets_the_pool_under_shared_and_a_third_under_static(
        cell_factory, sink):
    cell = cell_factory(sink.address, "shared")
    with connect(cell.ports[0]) as s:
        shared_s = send_message(s)
        assert within(shared_s, transfer_s(1.0)), (shared_s, transfer_s(1.0))
        cell.change(policy="static")
        static_s = send_message(s)
    assert within(static_s, transfer_s(1 / 3)), (static_s, transfer_s(1 / 3))
    assert static_s > 2.2 * shared_s  # ~N x longer (2.76 x at this SNR)
    # the stats file follows within its interval: both messages (and their headers) served
    stats = wait_until(lambda: (s := cell.stats()) and s["policy"] == "static" and s["links"][0][
        "down"]["bytes_served"] >= 2 * TRANSFER_BYTES and s, DEADLINE_S,
        what=lambda: f"the stats file: {cell.stats()}")
    assert stats["links"][1]["down"]["bytes_served"] == 0


@pytest.mark.integration
def test_two_transfers_at_once_share_the_pool(cell_factory, sink):
    cell = cell_factory(sink.address, "shared")
    took = simultaneous(cell.ports[:2])
    assert all(within(t, transfer_s(0.5)) for t in took), (took, transfer_s(0.5))
    assert all(t > 1.5 * transfer_s(1.0) for t in took)  # ~2 x alone (1.9 x at this SNR)


@pytest.mark.integration
def test_joint_gives_the_allocated_shares_and_holds_the_others(cell_factory, sink):
    cell = cell_factory(sink.address, "joint", allocation_ttl_s=5.0)
    send_allocation(cell.control, 1, {0: 0.75, 1: 0.25})
    wait_until(lambda: (s := cell.stats()) and s["control"]["accepted"] == 1, DEADLINE_S,
               what="the allocation taken")
    took = simultaneous(cell.ports)
    # link 0 at 0.75 of the pool; link 1 at 0.25 until then, and then (work-conserving) the
    # whole pool for what it has left; link 2 waited for link 1's last byte, then went alone
    first_s = transfer_s(0.75)
    second_s = first_s + (1 - first_s / transfer_s(0.25)) * transfer_s(1.0)
    assert within(took[0], first_s), (took, first_s)
    assert within(took[1], second_s), (took, second_s)
    assert took[0] < took[1] < took[2]
    assert within(took[2], second_s + transfer_s(1.0)), took
    stats = wait_until(lambda: (s := cell.stats()) and s["links"][2]["down"]["busy_s"] > 0
                       and s, DEADLINE_S, what="the stats file")
    assert stats["links"][0]["down"]["mean_share"] == pytest.approx(0.75, abs=0.01)


@pytest.mark.integration
def test_garbage_on_the_control_port_is_counted_and_the_cell_keeps_serving(
        cell_factory, echo):
    cell = cell_factory(echo.address, "joint")
    host, port = cell.control.split(":")
    garbage = [os.urandom(64), os.urandom(60000), b"{bad json", b'{"seq": 1, "shares": []}',
               format_allocation(1, {0: -0.5}), format_allocation(1, {0: 0.9, 1: 0.9}),
               format_allocation(1, {7: 0.5})]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for datagram in garbage:
            udp.sendto(datagram, (host, int(port)))
    wait_until(lambda: (s := cell.stats()) and s["control"]["ignored"] == len(garbage),
               DEADLINE_S, what=lambda: f"the garbage counted: {cell.stats()}")
    assert cell.proc.poll() is None
    send_allocation(cell.control, 2, {0: 1.0})
    wait_until(lambda: (s := cell.stats()) and s["control"]["accepted"] == 1, DEADLINE_S,
               what="the good allocation taken")
    with connect(cell.ports[0]) as s:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"


@pytest.mark.integration
def test_settings_change_while_connections_run(cell_factory, echo):
    cell = cell_factory(echo.address, "shared")
    with connect(cell.ports[1]) as s:
        def round_trip_s() -> float:
            start = time.monotonic()
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
            return time.monotonic() - start

        assert round_trip_s() < 0.04  # 4 bytes at 27 Mbit/s, no delay: not the 60 ms below
        cell.change_link(1, delay_ms=30.0)
        assert min(round_trip_s() for _ in range(3)) >= 0.06 - 0.002  # held 30 ms each way
        cell.change_link(1, down=True)
        s.sendall(b"lost")
        s.settimeout(0.3)  # the absence of a reply can only be waited for
        with pytest.raises(TimeoutError):
            s.recv(4)
        s.settimeout(DEADLINE_S)
        cell.change_link(1, down=False, delay_ms=0.0)
        assert round_trip_s() < 0.04
    # a settings file that moves a socket is refused: never confirmed, the cell keeps running
    moved = dict(cell.settings, links=[dict(link, target="127.0.0.1:1")
                                       for link in cell.settings["links"]])
    assert not write_cell_settings(cell.path, moved, wait=True)
    assert cell.proc.poll() is None


@pytest.mark.parametrize("settings, word", [
    (None, "No such file"),
    ("{not json", "Expecting"),
    ({"links": [GOOD_LINK]}, "total_bandwidth_hz"),
])
def test_bad_settings_files_are_one_line(tmp_path, settings, word):
    path = tmp_path / "cell.json"
    if settings is not None:
        path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    out = subprocess.run([sys.executable, "-m", "testbed.links.cell", "--settings", str(path)],
                         capture_output=True, text=True, timeout=DEADLINE_S, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and word in out.stderr, out.stderr


def test_a_control_port_off_loopback_is_refused(tmp_path):
    path = tmp_path / "cell.json"
    path.write_text(json.dumps({"links": [dict(GOOD_LINK, listen="127.0.0.1:0")],
                                "total_bandwidth_hz": 1e6}))
    out = subprocess.run([sys.executable, "-m", "testbed.links.cell", "--settings", str(path),
                          "--control", "0.0.0.0:0"], capture_output=True, text=True,
                         timeout=DEADLINE_S, check=False)
    assert out.returncode == 2 and "loopback" in out.stderr and "Traceback" not in out.stderr

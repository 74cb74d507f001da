"""The shared cell: one relay process that every link of a scenario crosses, serialising each
message at the rate its link gets now.

`python -m testbed.links.cell --settings FILE [--control 127.0.0.1:PORT]` accepts on every
link's listen address (or inherited listening socket) and forwards to its target, like
relay.py, but the bytes of all links go through two pools, downlink (client -> target, base
station -> agent) and uplink: a scheduler thread per pool serves the queued bytes as a fluid
(cell_policy.FluidPool), each busy link at the rate of its share of the pool under the policy
(static: 1/N each; shared: the busy links split it; joint: the shares the base station sent on
the control port, while its links are busy). A chunk is written on when its last bit is served
plus the link's delay (± jitter), never overtaking the chunk before it.

The settings file (JSON, written atomically by `write_cell_settings`, re-read when it changes):
    {"links": [{"listen": "127.0.0.1:5600" | "listen_fd": 5, "target": "10.0.0.2:5555",
                "delay_ms": 5, "jitter_ms": 0, "down": false,
                "snr_down_hz": 1.6e12, "snr_up_hz": 3.2e10}, ...],
     "total_bandwidth_hz": 1e8, "slowdown": 1, "policy": "static", "allocation_ttl_s": 0.5}
snr_*_hz = P g^2 / N0, so share x of the pool runs at x B log2(1 + snr / (x B)) / slowdown.
The links' addresses are fixed at start; everything else changes while connections run.
Per link and direction, the bytes served, busy time and share-time integral go to FILE.stats.json.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import random
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

from testbed.links.cell_policy import (
    DEFAULT_ALLOCATION_TTL_S,
    POLICIES,
    Allocation,
    FluidPool,
    accept_allocation,
    format_allocation,
    frame_allocation,
    parse_allocation,
    pool_shares,
    rate_bits_per_s,
)
from testbed.links.relay import (
    CHUNK_BYTES,
    CONNECT_TIMEOUT_S,
    LISTEN_BACKLOG,
    MAX_QUEUED_BYTES,
    SETTINGS_POLL_S,
    close_connection,
    confirm_applied,
    parse_hostport,
    read_if_changed,
    write_json_atomic,
    write_json_settings,
    write_released,
)

WAYS = ("down", "up")  # down: client -> target (base station -> agent); up: the reply
STATS_INTERVAL_S = 0.5  # how often changed counters are written to the stats file
CONTROL_BUFFER_BYTES = 65536  # read whole datagrams, so an oversized one is seen and refused
CONTROL_POLL_S = 0.5  # the control thread's read timeout
IDLE_WAKE_S = 1.0  # a scheduler with nothing to do still wakes this often
# The pools are served this far ahead of the clock, so a chunk reaches its writer before its
# release and the writer's timed sleep, not a thread hand-off, sets when it leaves (a hand-off
# costs 0.1-0.3 ms on our 2-core machines). The price: a flow that starts within this of another's
# completion starts up to this late, and a share change takes effect up to this late.
LOOKAHEAD_S = 0.0003


# -- settings (pure) ---------------------------------------------------------------------------

@dataclass(frozen=True)
class CellLink:
    target: str  # HOST:PORT
    snr_down_hz: float  # P g^2 / N0 of the downlink (base station -> agent)
    snr_up_hz: float
    listen: str | None = None  # HOST:PORT, or
    listen_fd: int | None = None  # a listening socket inherited from the parent
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    down: bool = False  # discard every byte read, both ways


@dataclass(frozen=True)
class CellSettings:
    links: tuple[CellLink, ...]
    total_bandwidth_hz: float  # B of each pool
    slowdown: float = 1.0  # every rate / this (scenarios.wire_slowdown: emulate a bigger model)
    policy: str = "static"
    allocation_ttl_s: float = DEFAULT_ALLOCATION_TTL_S

    def rate_bits_per_s(self, link: int, way: str, share: float) -> float:
        snr_hz = getattr(self.links[link], f"snr_{way}_hz")
        return rate_bits_per_s(share, self.total_bandwidth_hz, snr_hz, self.slowdown)

    def wiring(self) -> tuple:
        """What cannot change while the cell runs: its sockets."""
        return tuple((link.listen, link.listen_fd, link.target) for link in self.links)


def _number(table: dict, key: str, where: str, default: float | None = None,
            low: float = 0.0, above: bool = False) -> float:
    value = table.get(key, default)
    if value is None:
        raise ValueError(f"{where}{key}: missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}{key}: {value!r} is not a number")
    if value < low or (above and value == low):
        raise ValueError(f"{where}{key}: {value!r} must be {'>' if above else '>='} {low:g}")
    return float(value)


def _link(table: object, index: int) -> CellLink:
    where = f"links[{index}]."
    if not isinstance(table, dict):
        raise ValueError(f"links[{index}]: expected an object")
    target = table.get("target")
    if not isinstance(target, str):
        raise ValueError(f"{where}target: expected HOST:PORT")
    parse_hostport(target)
    listen, listen_fd = table.get("listen"), table.get("listen_fd")
    if (listen is None) == (listen_fd is None):
        raise ValueError(f"{where}: give one of listen (HOST:PORT) or listen_fd")
    if listen is not None:
        if not isinstance(listen, str):
            raise ValueError(f"{where}listen: expected HOST:PORT")
        parse_hostport(listen)
    elif isinstance(listen_fd, bool) or not isinstance(listen_fd, int) or listen_fd < 0:
        raise ValueError(f"{where}listen_fd: expected a file descriptor number")
    down = table.get("down", False)
    if not isinstance(down, bool):
        raise ValueError(f"{where}down: expected true or false")
    return CellLink(target=target, listen=listen, listen_fd=listen_fd, down=down,
                    snr_down_hz=_number(table, "snr_down_hz", where, above=True),
                    snr_up_hz=_number(table, "snr_up_hz", where, above=True),
                    delay_ms=_number(table, "delay_ms", where, 0.0),
                    jitter_ms=_number(table, "jitter_ms", where, 0.0))


def parse_cell_settings(data: object) -> CellSettings:
    """The cell's settings from the file's JSON; unknown keys are ignored. Raises ValueError
    naming the first bad field."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    links = data.get("links")
    if not isinstance(links, list) or not links:
        raise ValueError("links: expected a non-empty list")
    policy = data.get("policy", "static")
    if policy not in POLICIES:
        raise ValueError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
    settings = CellSettings(
        links=tuple(_link(table, i) for i, table in enumerate(links)), policy=policy,
        total_bandwidth_hz=_number(data, "total_bandwidth_hz", "", above=True),
        slowdown=_number(data, "slowdown", "", 1.0, low=1.0),
        allocation_ttl_s=_number(data, "allocation_ttl_s", "", DEFAULT_ALLOCATION_TTL_S,
                                 above=True))
    listens = [link.listen for link in settings.links if link.listen is not None]
    if len(set(listens)) != len(listens):
        raise ValueError("links: two links listen on the same address")
    return settings


def settings_fields(settings: CellSettings) -> dict:
    fields = asdict(settings)
    fields["links"] = [{k: v for k, v in link.items() if v is not None}
                       for link in fields["links"]]
    return fields


def write_cell_settings(path: str, settings: CellSettings | dict, wait: bool = True) -> bool:
    """Atomically replace the cell's settings file; with `wait`, return once the cell runs with
    them (True) or relay.APPLY_TIMEOUT_S passed (False). Settings that do not parse are refused
    before anything is written (ValueError); a cell refuses (and never confirms) settings that
    move its sockets. Raises ValueError, OSError."""
    if isinstance(settings, dict):
        settings = parse_cell_settings(settings)
    return write_json_settings(path, settings_fields(settings), wait)


def stats_path(settings_path: str) -> str:
    return settings_path + ".stats.json"


def send_allocation(address: str | tuple[str, int], seq: int, shares: dict[int, float]) -> None:
    """Tell the cell at ADDRESS (its --control) the joint shares: one datagram, no reply.
    Raises OSError, ValueError."""
    with AllocationSender(address) as sender:
        sender.send(seq, shares)


class AllocationSender:
    """One socket for many allocations (the base station sends one per MoE layer: opening a
    socket each time would cost more than the datagram)."""

    def __init__(self, address: str | tuple[str, int]):
        self.address = parse_hostport(address) if isinstance(address, str) else address
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, seq: int, shares: dict[int, float]) -> None:
        """Raises OSError."""
        self.sock.sendto(format_allocation(seq, shares), self.address)

    def send_encoded(self, seq: int, shares_json: bytes) -> None:
        """Shares encoded once by cell_policy.format_shares. Raises OSError."""
        self.sock.sendto(frame_allocation(seq, shares_json), self.address)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AllocationSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the running cell ----------------------------------------------------------------------------

class Pool:
    """One direction of the cell: the fluid pool, its lock, and the thread that serves it."""

    def __init__(self, cell: Cell, way: str):
        self.cell, self.way = cell, way
        self.cond = threading.Condition()
        self.fluid = FluidPool(shares_of=self._shares_of, rate_of=self._rate_of,
                               now_s=time.monotonic())
        self.last_release_s: dict[int, float] = {}  # per link: order is kept within a link
        self.rate_cache: dict[tuple[int, float], float] = {}  # emptied when settings change
        self.wake_at_s = math.inf  # when the scheduler thread means to wake next
        threading.Thread(target=self._run, daemon=True).start()

    def _shares_of(self, busy: frozenset[int], now_s: float):
        s = self.cell.settings
        return pool_shares(s.policy, len(s.links), busy, self.cell.allocation, now_s,
                           s.allocation_ttl_s)

    def _rate_of(self, link: int, share: float) -> float:
        # a few shares recur (1/n, the allocation's): a log per chunk is CPU the pool's
        # other links and the wake-ups want
        key = (link, share)
        if key not in self.rate_cache:
            self.rate_cache[key] = self.cell.settings.rate_bits_per_s(link, self.way, share)
        return self.rate_cache[key]

    def put(self, link: int, data: bytes | None, out: Direction) -> None:
        with self.cond:
            self._deliver(self.fluid.add(time.monotonic(), link, len(data) if data else 0,
                                         (data, out)))
            self.catch_up()  # a small chunk alone is through at once: no hand-off
            if self.fluid.next_event_s() - LOOKAHEAD_S < self.wake_at_s:
                self.cond.notify()  # sooner than the scheduler's plan (else let it sleep)

    def forget(self, link: int, out: Direction) -> None:
        with self.cond:
            self._deliver(self.fluid.discard(time.monotonic(), link,
                                             lambda item: item[1] is out))
            self.cond.notify()

    def _deliver(self, done: list) -> None:
        # Under self.cond, so chunks reach their writers in the order they were served.
        for done_s, link, (data, out) in done:
            release_s = max(self.last_release_s.get(link, 0.0),
                            done_s + self.cell.hold_s(link))
            self.last_release_s[link] = release_s
            out.release_at(release_s, data)

    def catch_up(self) -> None:
        """Serve up to now (+ LOOKAHEAD_S) at the shares in force (the caller holds
        self.cond): also before the shares change, so the time before is served at the old."""
        self._deliver(self.fluid.advance(time.monotonic() + LOOKAHEAD_S))

    def _run(self) -> None:
        with self.cond:
            while True:
                self.catch_up()
                self.wake_at_s = self.fluid.next_event_s() - LOOKAHEAD_S
                wait_s = self.wake_at_s - time.monotonic()
                if wait_s > 0:
                    self.cond.wait(min(wait_s, IDLE_WAKE_S))

    def stats(self) -> dict[int, dict]:
        with self.cond:
            self.catch_up()
            return {link: s.as_dict() for link, s in self.fluid.stats.items()}


class Cell:
    def __init__(self, settings: CellSettings):
        self.settings = settings
        self.allocation: Allocation | None = None
        self.control_counts = {"accepted": 0, "ignored": 0, "stale": 0}
        self.last_ignored = ""
        self.pools = {way: Pool(self, way) for way in WAYS}

    def hold_s(self, link: int) -> float:
        shape = self.settings.links[link]
        jitter_s = shape.jitter_ms / 1000
        hold_s = shape.delay_ms / 1000 + (random.uniform(-jitter_s, jitter_s) if jitter_s else 0)
        return max(0.0, hold_s)

    def _change(self, **values) -> None:
        # Both pools are served up to now under the old values, then both see the new ones.
        down, up = self.pools["down"], self.pools["up"]
        with down.cond, up.cond:
            for pool in (down, up):
                pool.catch_up()
            for name, value in values.items():
                setattr(self, name, value)
            for pool in (down, up):
                pool.rate_cache.clear()
                pool.cond.notify()

    def apply(self, settings: CellSettings) -> None:
        self._change(settings=settings)

    def take_datagram(self, datagram: bytes) -> None:
        """A control datagram: the new joint shares, or counted and ignored."""
        try:
            seq, shares = parse_allocation(datagram, len(self.settings.links))
        except ValueError as e:
            self.control_counts["ignored"] += 1
            self.last_ignored = str(e)
            return
        now_s = time.monotonic()
        if not accept_allocation(self.allocation, seq, now_s, self.settings.allocation_ttl_s):
            self.control_counts["stale"] += 1
            return
        self.control_counts["accepted"] += 1
        self._change(allocation=Allocation(seq, shares, now_s))

    def stats(self) -> dict:
        per_way = {way: pool.stats() for way, pool in self.pools.items()}
        allocation = self.allocation
        return {"policy": self.settings.policy,
                "links": [{way: per_way[way].get(i, {"bytes_served": 0, "busy_s": 0.0,
                                                       "share_s": 0.0, "mean_share": None})
                           for way in WAYS} for i in range(len(self.settings.links))],
                "control": {**self.control_counts, "last_ignored": self.last_ignored,
                            "last_seq": allocation.seq if allocation else None,
                            "last_shares": ({str(k): v for k, v in allocation.shares.items()}
                                            if allocation else None)}}


class Direction:
    """One direction of one connection: a reader puts chunks in the pool, the pool hands them
    back served (release_at), a writer sends them at their release time."""

    def __init__(self, src: socket.socket, dst: socket.socket, cell: Cell, link: int,
                 way: str, on_done):
        self.src, self.dst, self.cell, self.link, self.on_done = src, dst, cell, link, on_done
        self.pool = cell.pools[way]
        self.queue: deque[tuple[float, bytes | None]] = deque()
        self.queued_bytes = 0  # read and not yet written: bounds the memory a link can take
        self.cond = threading.Condition()
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK_BYTES)
                if data and self.cell.settings.links[self.link].down:
                    continue  # lost on a link that is down; a close still passes
                with self.cond:
                    while self.queued_bytes > MAX_QUEUED_BYTES and not self.closed:
                        self.cond.wait(0.1)
                    if self.closed:
                        return
                    self.queued_bytes += len(data)
                self.pool.put(self.link, data or None, self)
                if not data:
                    return
        except OSError:
            self.abort()

    def release_at(self, release_s: float, data: bytes | None) -> None:
        with self.cond:
            self.queue.append((release_s, data))
            self.cond.notify_all()

    def _write(self) -> None:
        write_released(self)

    def abort(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.pool.forget(self.link, self)  # its unserved bytes must not hold the pool
        self.on_done(error=True)


class Connection:
    """A client of one link and its own connection to the link's target."""

    def __init__(self, client: socket.socket, upstream: socket.socket, cell: Cell, link: int):
        self.client, self.upstream = client, upstream
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = threading.Lock()
        self.done = 0
        self.directions = [Direction(client, upstream, cell, link, "down", self._done),
                           Direction(upstream, client, cell, link, "up", self._done)]

    def _done(self, error: bool = False) -> None:
        with self.lock:
            self.done += 1
            if not error and self.done < 2:
                return
        close_connection(self.directions, (self.client, self.upstream))


def _open(client: socket.socket, cell: Cell, link: int) -> None:
    target = parse_hostport(cell.settings.links[link].target)
    try:
        upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        # The agent is not listening (yet) or its link drops the SYNs: refuse this client.
        print(f"cell: link {link}: cannot reach {target[0]}:{target[1]}: {e}", file=sys.stderr,
              flush=True)
        client.close()
        return
    upstream.settimeout(None)
    Connection(client, upstream, cell, link)


def _accept(server: socket.socket, cell: Cell, link: int) -> None:
    while True:
        try:
            client, _ = server.accept()
        except OSError:
            return
        # Connect in a thread: a target that does not answer takes CONNECT_TIMEOUT_S to fail
        # and must not hold up the clients after it.
        threading.Thread(target=_open, args=(client, cell, link), daemon=True).start()


def _control(sock: socket.socket, cell: Cell) -> None:
    while True:
        try:
            datagram = sock.recv(CONTROL_BUFFER_BYTES)
        except TimeoutError:
            continue
        except OSError:
            return
        cell.take_datagram(datagram)


def _listening_socket(index: int, link: CellLink) -> socket.socket:
    """Raises OSError naming the link."""
    try:
        if link.listen_fd is not None:
            return socket.socket(fileno=link.listen_fd)
        return socket.create_server(parse_hostport(link.listen), backlog=LISTEN_BACKLOG)
    except OSError as e:
        where = link.listen or f"fd {link.listen_fd}"
        raise OSError(e.errno, f"link {index}: listen {where}: {e.strerror or e}") from None


def _control_socket(address: str) -> socket.socket:
    host, port = parse_hostport(address)
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"--control {address}: must be a loopback address (anyone who can "
                         "send to it decides the shares)")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"--control {address}: {e.strerror or e}") from None
    sock.settimeout(CONTROL_POLL_S)
    return sock


def _read_settings(path: str) -> tuple[CellSettings, str, tuple]:
    data, stamp = read_if_changed(path, None)
    try:
        return parse_cell_settings(data), str(data.get("token", "")), stamp
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _watch_settings(path: str, cell: Cell, token: str, stamp: tuple) -> tuple[str, tuple]:
    """Apply a changed settings file; a bad one is reported once and the old ones kept."""
    try:
        data, stamp = read_if_changed(path, stamp)
        if data is None or str(data.get("token", "")) == token:
            return token, stamp
        token = str(data.get("token", ""))
        settings = parse_cell_settings(data)
        if settings.wiring() != cell.settings.wiring():
            raise ValueError("the links' listen and target addresses are fixed while the cell "
                             "runs (restart it to change them)")
    except (OSError, ValueError) as e:
        print(f"cell: {path}: settings not applied: {e}", file=sys.stderr, flush=True)
        return token, stamp
    cell.apply(settings)
    confirm_applied(path, token)
    return token, stamp


def serve(settings_path: str, control: str | None) -> None:
    """Run the cell until SIGTERM or Ctrl-C. Raises ValueError, OSError (before it is ready)."""
    settings, token, stamp = _read_settings(settings_path)
    servers = [_listening_socket(i, link) for i, link in enumerate(settings.links)]
    control_sock = _control_socket(control) if control else None
    cell = Cell(settings)
    for i, server in enumerate(servers):
        threading.Thread(target=_accept, args=(server, cell, i), daemon=True).start()
    if control_sock is not None:
        threading.Thread(target=_control, args=(control_sock, cell), daemon=True).start()
    confirm_applied(settings_path, token)
    where = [f"link {i} {'%s:%d' % s.getsockname()[:2]} -> {link.target}"
             for i, (s, link) in enumerate(zip(servers, settings.links))]
    if control_sock is not None:
        where.insert(0, "control %s:%d" % control_sock.getsockname()[:2])
    print(f"cell ready: {'; '.join(where)}", flush=True)
    written: dict | None = None
    next_stats_s = time.monotonic() + STATS_INTERVAL_S
    try:
        while True:
            time.sleep(SETTINGS_POLL_S)
            token, stamp = _watch_settings(settings_path, cell, token, stamp)
            if time.monotonic() >= next_stats_s:
                written = _write_stats(settings_path, cell, written)
                next_stats_s = time.monotonic() + STATS_INTERVAL_S
    finally:
        _write_stats(settings_path, cell, written)


def _write_stats(settings_path: str, cell: Cell, written: dict | None) -> dict | None:
    stats = cell.stats()
    if stats != written:
        try:
            write_json_atomic(stats_path(settings_path), stats)
        except OSError as e:
            print(f"cell: {stats_path(settings_path)}: {e.strerror or e}", file=sys.stderr,
                  flush=True)
            return written
    return stats


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the cell as Ctrl-C does: stats written, exit 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testbed.links.cell", description=__doc__.splitlines()[0])
    p.add_argument("--settings", required=True, help="the cell's JSON settings file")
    p.add_argument("--control", metavar="127.0.0.1:PORT",
                   help="UDP address for the joint policy's allocations (port 0: any free one)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)
    try:
        serve(args.settings, args.control)
    except KeyboardInterrupt:
        return 0
    except ValueError as e:
        print(f"cell: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"cell: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

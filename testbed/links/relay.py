"""A delaying TCP relay: delay and jitter for kernels without netem.

`python -m testbed.links.relay --listen 10.213.0.2:5600 --target 127.0.0.1:5601 --settings FILE`
runs in the agent's namespace (as root): it accepts on the namespace's external address and
forwards to the agent on the namespace's loopback. Without root it runs inside the user
namespace (testbed/links/userns.py) with `--listen-fd`: a socket listening on this machine's
127.0.0.1, made by `testbed up` and inherited, so the base station on this machine reaches an
agent behind the veth; it forwards to the agent's veth address. Without `--settings` it only
forwards (netem delays).

Every chunk read, in either direction, is held until arrival + delay_ms (+ uniform jitter in
±jitter_ms), never overtaking the chunk before it, so byte order is kept. The settings file
(JSON, written atomically by `write_settings`) is re-read when it changes, so delay and jitter
change while connections run.

Unlike netem, the delay is not seen by the host's TCP stack (it ends at the relay): an
application's request/reply sees 2 × delay, but TCP's window is not stretched by it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import socket
import sys
import threading
import time

from common.staging import write_file_atomic

CHUNK_BYTES = 256 * 1024  # one recv; big enough that tens of MB/s cost few wake-ups
MAX_QUEUED_BYTES = 64 * 1024 * 1024  # per direction; beyond this the reader stops reading
SETTINGS_POLL_S = 0.01  # how soon a changed settings file takes effect (a stat per poll)
APPLY_TIMEOUT_S = 2.0  # write_settings(wait=True) gives up on a relay that does not answer
LISTEN_BACKLOG = 64
CONNECT_TIMEOUT_S = 5.0  # to the target; a link that is down drops the SYNs


def applied_path(path: str) -> str:
    return path + ".applied"  # the relay writes the token of the settings it runs with


def write_settings(path: str, delay_ms: float, jitter_ms: float, wait: bool = False,
                   wire_down_mbit: float | None = None,
                   wire_up_mbit: float | None = None, down: bool = False) -> bool:
    """Atomically replace the relay's settings file. With `wait`, return once the relay runs
    with them (True) or APPLY_TIMEOUT_S passed (False), so callers measure the new link.
    wire_*_mbit: serialise each direction's bytes at that rate (None: as fast as they come).
    down: discard every byte read either way (nothing passes; peers' heartbeats notice)."""
    return write_json_settings(path, {"delay_ms": float(delay_ms), "jitter_ms": float(jitter_ms),
                                      "wire_down_mbit": wire_down_mbit,
                                      "wire_up_mbit": wire_up_mbit, "down": bool(down)}, wait)


def write_json_settings(path: str, fields: dict, wait: bool) -> bool:
    """Atomically replace PATH with FIELDS and a fresh token; with `wait`, return once the
    reader wrote that token to applied_path (True) or APPLY_TIMEOUT_S passed (False)."""
    token = os.urandom(8).hex()
    write_json_atomic(path, {**fields, "token": token})
    deadline = time.monotonic() + APPLY_TIMEOUT_S
    while wait and time.monotonic() < deadline:
        try:
            with open(applied_path(path)) as f:
                if f.read().strip() == token:
                    return True
        except OSError:
            pass
        time.sleep(SETTINGS_POLL_S / 2)
    return not wait


def write_json_atomic(path: str, data: dict) -> None:
    """Readers see the old file or the new one, never half of one. Raises OSError."""
    write_file_atomic(path, json.dumps(data).encode())


def read_if_changed(path: str, seen: tuple | None) -> tuple[dict | None, tuple | None]:
    """(the file's JSON, its new stamp), or (None, SEEN) when it has not changed since SEEN.
    Raises OSError, ValueError."""
    # A stat per poll, a read only when the file changed: write_json_settings replaces it, and
    # a file created while the old one still exists has another inode, so (inode, mtime,
    # size) changes on every rewrite however quick (mtime alone is too coarse). Eight
    # relays reading and parsing JSON 100 times a second each cost the shared CPU.
    st = os.stat(path)
    stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    if stamp == seen:
        return None, seen
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data, stamp


def confirm_applied(path: str, token: str) -> None:
    """Tell write_json_settings(wait=True) that the settings with TOKEN are in force."""
    write_file_atomic(applied_path(path), token.encode())


class Settings:
    """The current delay, jitter and wire rates, refreshed from the file by a watcher thread."""

    def __init__(self, path: str | None):
        self.path = path  # None: no delay, ever (a plain forwarder)
        self.delay_s = 0.0
        self.jitter_s = 0.0
        # bits/s each way (0: unlimited); "down" is client -> target (base station -> agent)
        self.wire_bits_per_s = {"down": 0.0, "up": 0.0}
        self.down = False  # discard what is read, both ways (a link that is down)
        self._token: str | None = None
        self._seen: tuple[int, int, int] | None = None
        if path:
            self.refresh()
            threading.Thread(target=self._watch, daemon=True).start()

    def refresh(self) -> None:
        try:
            data, self._seen = read_if_changed(self.path, self._seen)
            if data is None:
                return
            token = str(data.get("token", ""))
            if token == self._token and self._token is not None:
                return
            self.delay_s = max(0.0, float(data.get("delay_ms", 0))) / 1000
            self.jitter_s = max(0.0, float(data.get("jitter_ms", 0))) / 1000
            self.wire_bits_per_s = {way: max(0.0, float(data.get(f"wire_{way}_mbit") or 0)) * 1e6
                                    for way in ("down", "up")}
            self.down = bool(data.get("down", False))
            self._token = token
            confirm_applied(self.path, token)
        except (OSError, ValueError):
            pass  # missing or unreadable: keep the last good settings

    def _watch(self) -> None:
        while True:
            time.sleep(SETTINGS_POLL_S)
            self.refresh()

    def hold_s(self) -> float:
        if self.jitter_s:
            return max(0.0, self.delay_s + random.uniform(-self.jitter_s, self.jitter_s))
        return self.delay_s


class Direction:
    """One direction of one connection: a reader thread queues chunks, a writer releases them.

    With a wire rate, a chunk first waits for the wire (free once the chunks before it are
    serialised) and takes bytes x 8 / rate on it, then the delay: what netem's rate does per
    packet, and what tbf cannot do for messages smaller than its burst."""

    def __init__(self, src: socket.socket, dst: socket.socket, settings: Settings, on_done,
                 way: str = "down"):
        self.src, self.dst, self.settings, self.on_done = src, dst, settings, on_done
        self.way = way
        self.wire_free = 0.0  # when the wire has sent the chunks before
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued_bytes = 0
        self.cond = threading.Condition()
        self.last_release = 0.0
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _push(self, data: bytes | None) -> None:
        # Order is kept: a chunk never leaves before the one read before it.
        sent = time.monotonic()
        rate = self.settings.wire_bits_per_s[self.way]
        if rate and data:
            self.wire_free = max(self.wire_free, sent) + len(data) * 8 / rate
            sent = self.wire_free
        release = max(self.last_release, sent + self.settings.hold_s())
        self.last_release = release
        with self.cond:
            while self.queued_bytes > MAX_QUEUED_BYTES and not self.closed:
                self.cond.wait(0.1)
            self.queue.append((release, data))
            self.queued_bytes += len(data) if data else 0
            self.cond.notify_all()

    def _read(self) -> None:
        try:
            while True:
                data = self.src.recv(CHUNK_BYTES)
                if data and self.settings.down:
                    continue  # lost on a link that is down; a close still passes
                self._push(data or None)
                if not data:
                    return
        except OSError:
            self.abort()

    def _write(self) -> None:
        write_released(self)

    def abort(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.on_done(error=True)


def write_released(direction) -> None:
    """A direction's writer thread (the relay's and the cell's alike): send each queued
    (release_s, data) chunk at its release time, in order; None ends the direction (a half
    close). DIRECTION has cond, queue, closed, queued_bytes (bytes read and not yet written,
    which bounds the memory a link takes), dst, on_done() and abort()."""
    d = direction
    try:
        while True:
            with d.cond:
                while not d.queue and not d.closed:
                    d.cond.wait(1.0)
                if d.closed:
                    return
                release_s, data = d.queue.popleft()
            wait_s = release_s - time.monotonic()
            if wait_s > 0:
                time.sleep(wait_s)  # Linux sleeps are accurate to ~0.1 ms; no spinning
            if data is None:
                d.dst.shutdown(socket.SHUT_WR)
                d.on_done()
                return
            d.dst.sendall(data)
            with d.cond:
                d.queued_bytes -= len(data)
                d.cond.notify_all()
    except OSError:
        d.abort()


class Connection:
    def __init__(self, client: socket.socket, target: tuple[str, int], settings: Settings):
        self.client = client
        self.upstream = socket.create_connection(target, timeout=CONNECT_TIMEOUT_S)
        self.upstream.settimeout(None)
        for s in (self.client, self.upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = threading.Lock()
        self.done = 0
        self.directions = [Direction(client, self.upstream, settings, self._done, "down"),
                           Direction(self.upstream, client, settings, self._done, "up")]

    def _done(self, error: bool = False) -> None:
        with self.lock:
            self.done += 1
            if not error and self.done < 2:
                return
        close_connection(self.directions, (self.client, self.upstream))


def close_connection(directions, sockets) -> None:
    """End a relayed connection: wake every direction's writer (each has `cond` and `closed`)
    and shut both sockets (the relay's and the cell's connections end alike)."""
    for d in directions:
        with d.cond:
            d.closed = True
            d.cond.notify_all()
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def parse_hostport(value: str) -> tuple[str, int]:
    """'10.213.0.2:5600' -> ('10.213.0.2', 5600). Raises ValueError."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{value!r}: expected HOST:PORT")
    return host, int(port)


def _open(client: socket.socket, target: tuple[str, int], settings: Settings) -> None:
    try:
        Connection(client, target, settings)
    except OSError as e:
        # The agent is not listening (yet) or its link is down: refuse this client.
        print(f"relay: cannot reach {target[0]}:{target[1]}: {e}", file=sys.stderr, flush=True)
        client.close()


def serve(server: socket.socket, target: tuple[str, int], settings_path: str | None) -> None:
    """Accept on SERVER (a listening socket) forever, one Connection per client."""
    settings = Settings(settings_path)
    host, port = server.getsockname()[:2]
    print(f"relay ready: {host}:{port} -> {target[0]}:{target[1]}", flush=True)
    while True:
        client, _ = server.accept()
        # Connect in a thread: a target behind a link that is down takes CONNECT_TIMEOUT_S to
        # fail, and must not hold up the clients after it.
        threading.Thread(target=_open, args=(client, target, settings), daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="testbed.links.relay", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", help="HOST:PORT to accept on")
    where.add_argument("--listen-fd", type=int, metavar="FD",
                       help="an inherited listening socket to accept on")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--settings", help="JSON file with delay_ms and jitter_ms (default: none, "
                   "no delay)")
    args = p.parse_args(argv)
    try:
        target = parse_hostport(args.target)
        if args.listen_fd is not None:
            server = socket.socket(fileno=args.listen_fd)
        else:
            server = socket.create_server(parse_hostport(args.listen), backlog=LISTEN_BACKLOG)
        serve(server, target, args.settings)
    except KeyboardInterrupt:
        return 0
    except ValueError as e:
        print(f"relay: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = args.listen or f"fd {args.listen_fd}"
        print(f"relay: error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-peer limits on an agent's bound socket: connections, bytes in flight, unread replies.

libzmq bounds one frame (MAXMSGSIZE) and counts whole messages (HWM); nothing bounds a
multipart message that never ends (an unfinished message is invisible to the application and
grows inside libzmq: +1 GB in 3 s, measured), the replies queued for a peer that never reads,
or the connections a listener accepts (past the descriptor limit its accept loop spins at
100 % CPU and answers nobody, measured). So the agent keeps a ledger per TCP connection, keyed
by its file descriptor (the socket monitor names it on accept and close; every received message
carries it as ZMQ_SRCFD), against the kernel's own counters (TCP_INFO):
    in flight   bytes the kernel received from the peer - wire bytes of the complete messages
                the agent read from it = what libzmq holds for it, finished or not
    unread      wire bytes of replies queued to the peer - bytes its TCP acknowledged = what
                waits in libzmq and the kernel for a peer that does not read
A connection over its in-flight budget, the largest while all of them together are over the
total, or the one idle longest beyond the connection cap, is shut down: libzmq sees the socket
close, drops the connection and frees what it held; a real client reconnects by itself. A
reply that would take a peer over its unread budget is dropped, not queued.
Only TCP has the counters: an ipc:// peer counts towards the cap only. ZMTP heartbeats count as
in flight too (about 80 B/s per connection, 410 B/s with CURVE, measured): a connection's
budget grows with its age by HEARTBEAT_ALLOWANCE_BYTES_PER_S, so they never get it cut.
"""

from __future__ import annotations

import ctypes
import logging
import resource
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import zmq

log = logging.getLogger("edge_agent")

MAX_PEERS = 64  # connections on the bound socket: a base station, pushers, probes, and room
DESCRIPTOR_RESERVE = 128  # below the limit, kept for the agent (libzmq mailboxes, files, torch)
IN_FLIGHT_SLACK_BYTES = 16 * 2**20  # per connection beyond one whole message (see the docstring)
# ZMTP heartbeats count as in flight (80 B/s a connection, 410 B/s with CURVE, measured): the
# budget of a connection grows by this much per second of its age, 2.5x the CURVE rate, so a
# healthy connection is never cut for them (it was after ~11 h with keys); a flood is bytes per
# millisecond and is cut as before.
HEARTBEAT_ALLOWANCE_BYTES_PER_S = 1024
CHECK_INTERVAL_S = 0.05  # counters are read this often: an attack overshoots by its rate x this
LOG_EVERY_S = 10.0  # a flood of cuts or drops is summed up in one line this often
# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, tcpi_bytes_received (Linux 4.1+), u64 each
TCP_INFO_BYTES = 232
TCP_INFO_ACKED_OFFSET = 120
SHUT_RDWR = 2


@dataclass(frozen=True)
class PeerLimits:
    max_peers: int = MAX_PEERS
    in_flight_bytes: int = 0  # per connection; 0: not enforced
    in_flight_total_bytes: int = 0
    unread_bytes: int = 0  # per connection; 0: not enforced
    unread_total_bytes: int = 0

    @classmethod
    def for_message_cap(cls, max_message_bytes: int, max_peers: int = MAX_PEERS
                        ) -> PeerLimits:
        """One whole message plus slack per connection; two of those for all of them (a base
        station's request and a push chunk at once)."""
        per_peer = max_message_bytes + IN_FLIGHT_SLACK_BYTES
        return cls(max_peers=max_peers, in_flight_bytes=per_peer,
                   in_flight_total_bytes=2 * per_peer, unread_bytes=per_peer,
                   unread_total_bytes=2 * per_peer)


# ---------------------------------------------------------------------------------------------
# Pure: wire sizes and decisions (time and counters passed in)


def frame_wire_bytes(nbytes: int, curve: bool) -> int:
    """Bytes one frame takes on a ZMTP 3 connection (measured against TCP_INFO): a 2-byte
    header up to 255 bytes of body, else 9; CURVE wraps each frame in a MESSAGE command
    (8 name + 8 nonce + 16 MAC + 1 flags = 33 bytes)."""
    body = nbytes + 33 if curve else nbytes
    return body + (2 if body <= 255 else 9)


def message_wire_bytes(frames: Iterable, curve: bool) -> int:
    """frame_wire_bytes of every frame, inlined: it runs twice per request."""
    total, wrap = 0, 33 if curve else 0
    for frame in frames:
        body = (len(frame) if isinstance(frame, (zmq.Frame, bytes, bytearray))
                else memoryview(frame).nbytes) + wrap
        total += body + (2 if body <= 255 else 9)
    return total


@dataclass
class Peer:
    """One accepted connection, as the kernel and the agent count it."""

    fd: int
    address: bytes | None  # getpeername(): a reused descriptor has another one
    accepted_s: float
    last_message_s: float | None = None
    consumed: int = 0  # wire bytes of the messages the agent read from it
    received: int = 0  # the kernel's count of bytes from it, at the last reading
    sent: int = 0  # wire bytes of the replies queued to it (moved up to `acked` when below)
    acked: int = 0  # the kernel's count of bytes it acknowledged, at the last reading
    counted: bool = True  # False: no TCP counters (ipc://), the cap only

    @property
    def in_flight(self) -> int:
        return max(0, self.received - self.consumed)

    @property
    def unread(self) -> int:
        return max(0, self.sent - self.acked)

    @property
    def idle_key(self) -> tuple[bool, float]:
        """Smallest is cut first: never sent a message, then the longest since it last did."""
        if self.last_message_s is None:
            return (False, self.accepted_s)
        return (True, self.last_message_s)


def over_cap(peers: Sequence[Peer], max_peers: int) -> list[Peer]:
    """The peers to cut so that at most `max_peers` remain, idle first."""
    excess = len(peers) - max_peers
    return sorted(peers, key=lambda p: p.idle_key)[:excess] if excess > 0 else []


def heartbeat_allowance_bytes(peer: Peer, now_s: float | None) -> int:
    """The bytes ZMTP heartbeats may have added to a connection's count by `now_s`: they reach
    the kernel's count but never the reader's (None: no allowance)."""
    if now_s is None:
        return 0
    return int(max(0.0, now_s - peer.accepted_s) * HEARTBEAT_ALLOWANCE_BYTES_PER_S)


def over_budget(peers: Sequence[Peer], limits: PeerLimits, now_s: float | None = None
                ) -> list[tuple[Peer, str]]:
    """The peers to cut for bytes in flight, each with the reason. With `now_s`, each
    connection's budget grows by its heartbeats' allowance (heartbeat_allowance_bytes)."""
    cuts = []
    if limits.in_flight_bytes:
        cuts = [(p, f"{p.in_flight} bytes in flight, over its {limits.in_flight_bytes}")
                for p in peers
                if p.in_flight > limits.in_flight_bytes + heartbeat_allowance_bytes(p, now_s)]
    if limits.in_flight_total_bytes:
        cut = {id(p) for p, _ in cuts}
        left = sorted((p for p in peers if id(p) not in cut), key=lambda p: -p.in_flight)
        total = sum(p.in_flight for p in left)
        for peer in left:
            if total <= limits.in_flight_total_bytes or not peer.in_flight:
                break
            cuts.append((peer, (f"{peer.in_flight} bytes in flight, the most while all "
                                f"peers hold {total}, over {limits.in_flight_total_bytes}")))
            total -= peer.in_flight
    return cuts


def reply_fits(unread: int, unread_total: int, nbytes: int, limits: PeerLimits) -> bool:
    """Whether a reply of `nbytes` may be queued to a peer with `unread` bytes waiting (and
    `unread_total` for all peers)."""
    if limits.unread_bytes and unread + nbytes > limits.unread_bytes:
        return False
    return not limits.unread_total_bytes or unread_total + nbytes <= limits.unread_total_bytes


def peer_cap(max_peers: int, descriptor_limit: int) -> int:
    """Connections allowed: the configured cap, and never so many that libzmq runs out of
    descriptors (its accept loop would spin)."""
    return max(1, min(max_peers, descriptor_limit - DESCRIPTOR_RESERVE))


# ---------------------------------------------------------------------------------------------
# The kernel: counters, identity and shutdown of a descriptor libzmq owns (never closed here)


_libc = None
if sys.platform.startswith("linux") and hasattr(socket, "TCP_INFO"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_uint32)]
        _libc.getpeername.argtypes = [ctypes.c_int, ctypes.c_void_p,
                                      ctypes.POINTER(ctypes.c_uint32)]
        _libc.shutdown.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):  # no libc by that name: the cap alone, via socket calls
        _libc = None
# Buffers are per thread: every AgentClient's guard reads counters from its own watchdog thread,
# and ctypes calls release the GIL. With one module-wide buffer, one thread read another's
# counters, took them for a reused descriptor and forgot a live connection; its agent's replies
# were then dropped as "from a connection the client does not know" (3 of 4 runs of a bench
# holding three sessions in one process).
_buffers = threading.local()


def _buffer(name: str, size: int):
    buf = getattr(_buffers, name, None)
    if buf is None:
        buf = ctypes.create_string_buffer(size)
        setattr(_buffers, name, buf)
    return buf


def tcp_counters(fd: int) -> tuple[int, int] | None:
    """(bytes acked by the peer, bytes received from it), or None (not TCP, or gone)."""
    if _libc is None:
        return None
    info = _buffer("info", TCP_INFO_BYTES)
    size = ctypes.c_uint32(TCP_INFO_BYTES)
    if _libc.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, info, ctypes.byref(size)) \
            or size.value < TCP_INFO_ACKED_OFFSET + 16:
        return None
    return struct.unpack_from("=QQ", info.raw, TCP_INFO_ACKED_OFFSET)


def peer_address(fd: int) -> bytes | None:
    if _libc is None:
        return None
    address = _buffer("address", 128)
    size = ctypes.c_uint32(len(address))
    if _libc.getpeername(fd, address, ctypes.byref(size)):
        return None
    return address.raw[:size.value]


def shut_down(fd: int) -> None:
    """End the connection under libzmq's feet: it reads end-of-file, drops the connection and
    closes the descriptor itself."""
    if _libc is not None:
        _libc.shutdown(fd, SHUT_RDWR)
        return
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # libzmq still owns the descriptor


def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ---------------------------------------------------------------------------------------------
# The ledger the agent keeps: its loop and its watchdog thread call it under one lock


class LogTally:
    """Logs the first event, then at most one line per LOG_EVERY_S saying how many more came:
    a flood of connections or bad peers must not become a flood of log lines."""

    def __init__(self):
        self.count, self.logged_s = 0, -LOG_EVERY_S

    def add(self, now_s: float, message: str) -> None:
        self.count += 1
        if now_s - self.logged_s >= LOG_EVERY_S:
            more = f" ({self.count - 1} more like it since the last such line)" \
                if self.count > 1 else ""
            log.warning("%s%s", message, more)
            self.count, self.logged_s = 0, now_s


class PeerGuard:
    """The limits of one bound socket. `curve`: its links are CurveZMQ (framing differs)."""

    def __init__(self, limits: PeerLimits, curve: bool, clock=time.monotonic):
        self.limits = limits
        self.curve = curve
        self.clock = clock
        self.max_peers = peer_cap(limits.max_peers, descriptor_limit())
        self.peers: dict[int, Peer] = {}
        self.cuts = 0
        self.dropped_replies = 0
        self._unread_total = 0  # an upper bound between readings: acks only lower it
        self._cut_log = LogTally()
        self._drop_log = LogTally()

    # -- events ---------------------------------------------------------------------------

    def accepted(self, fd: int) -> None:
        now = self.clock()
        counters = tcp_counters(fd)
        peer = Peer(fd=fd, address=peer_address(fd), accepted_s=now,
                    counted=counters is not None)
        if counters is not None:
            peer.acked, peer.received = counters
            peer.sent = peer.acked
            peer.consumed = peer.received  # the greeting so far is not a message in flight
        self.peers[fd] = peer
        for victim in over_cap(list(self.peers.values()), self.max_peers):
            self._cut(victim, f"{len(self.peers)} connections, over the cap of "
                              f"{self.max_peers} (the one idle longest goes)", now)

    def closed(self, fd: int) -> bool:
        """Connection `fd` is gone; whether it was one this guard did not cut itself."""
        return self.peers.pop(fd, None) is not None

    def received(self, fd: int | None, frames: Sequence) -> None:
        """A complete message read from connection `fd` (its ZMQ_SRCFD)."""
        peer = self.peers.get(fd) if fd is not None else None
        if peer is not None:
            peer.consumed += message_wire_bytes(frames, self.curve)
            peer.last_message_s = self.clock()

    def reply_allowed(self, fd: int | None, frames: Sequence) -> bool:
        """Whether to queue this reply to connection `fd`; counts it when yes. Reads the
        kernel's counters only when the estimate says no."""
        peer = self.peers.get(fd) if fd is not None else None
        if peer is None or not peer.counted:
            return True
        nbytes = message_wire_bytes(frames, self.curve)
        if not reply_fits(peer.unread, self._unread_total, nbytes, self.limits):
            self._read_counters(self.peers.values())  # acks since the last reading count
            if not reply_fits(peer.unread, self._unread_total, nbytes, self.limits):
                self.dropped_replies += 1
                self._drop_log.add(self.clock(), (
                    f"dropped a reply: the peer at {_format(peer.address)} does not read "
                    f"({peer.unread} bytes wait for it, this reply {nbytes}; at most "
                    f"{self.limits.unread_bytes} per peer, {self.limits.unread_total_bytes} "
                    "for all)"))
                return False
        peer.sent += nbytes
        self._unread_total += nbytes
        return True

    def check(self) -> None:
        """Read every connection's counters and cut the ones over their budget."""
        if not self.peers:
            return
        self._read_counters(self.peers.values())
        now = self.clock()
        for peer, why in over_budget([p for p in self.peers.values() if p.counted],
                                     self.limits, now):
            self._cut(peer, why, now)

    # -- inside -----------------------------------------------------------------------------

    def _read_counters(self, peers: Iterable[Peer]) -> None:
        total = 0
        for peer in list(peers):
            if not peer.counted:
                continue
            counters = tcp_counters(peer.fd)
            if counters is None or counters[1] < peer.received:  # gone, or a reused descriptor
                self.peers.pop(peer.fd, None)  # its ACCEPTED event, if any, re-adds it
                continue
            peer.acked, peer.received = counters
            peer.sent = max(peer.sent, peer.acked)  # heartbeats are acked, never "sent" here
            total += peer.unread
        self._unread_total = total

    def _cut(self, peer: Peer, why: str, now: float) -> None:
        if peer.address is not None and peer_address(peer.fd) != peer.address:
            self.peers.pop(peer.fd, None)  # closed and reused since: not this connection
            return
        shut_down(peer.fd)
        self.peers.pop(peer.fd, None)
        self.cuts += 1
        self._cut_log.add(now, f"cut the connection from {_format(peer.address)}: {why}")


def _format(address: bytes | None) -> str:
    """A sockaddr_in / sockaddr_in6 as HOST:PORT (for the log)."""
    if not address or len(address) < 8:
        return "a local peer"
    family = int.from_bytes(address[:2], sys.byteorder)
    port = int.from_bytes(address[2:4], "big")
    if family == socket.AF_INET:
        return f"{socket.inet_ntop(socket.AF_INET, address[4:8])}:{port}"
    if family == socket.AF_INET6 and len(address) >= 24:
        return f"[{socket.inet_ntop(socket.AF_INET6, address[8:24])}]:{port}"
    return "a peer"

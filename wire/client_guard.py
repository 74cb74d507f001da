"""The bounds of an AgentClient's socket: which connection may speak for which agent, and how
much each connection may make the client hold.

One ROUTER talks to agents it dialled (`connect`) and to agents that dial in (`bind`). libzmq
names every peer by the routing id the peer chooses, so the client keeps its own book, by
connection: the descriptor the socket monitor names on connect, accept and close, which every
received message carries as ZMQ_SRCFD.
    dialled     a connection the client made: it speaks for its alias (the endpoint) only
    stranger    an accepted connection that has not announced itself (no HELLO yet)
    announced   an accepted connection whose HELLO claimed a routing id: the id is bound to it
                until it closes, and over CurveZMQ to its public key for the client's life
A message counts only from the connection its routing id is bound to, and a request goes only
to a bound routing id. libzmq's ROUTER_HANDOVER is off (client.py): a second connection with a
routing id in use is ignored by libzmq, never handed the id. A HELLO under another key than the
one its routing id announced with, or under a dialled agent's alias, cuts its connection.

Memory: the socket has no receive HWM. With one, a peer that fills its queue and hangs up aborts
the process at the next read (libzmq 4.3.5 "Assertion failed: !_io_error", stream_engine_base.cpp
310, whenever ZMTP heartbeats are on; libzmq issues 3937 and 4364; measured here with 3,000
100-byte messages, then close). So bytes are bounded here, from the kernel's counters (as on the
agent, wire/peer_limits.py), every CHECK_INTERVAL_S by a watchdog thread that also runs
while nobody reads: per connection, the bytes received but not yet read, and for strangers a
deadline to say HELLO. A connection over a bound is shut down under libzmq's feet; an agent
reconnects by itself.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from wire.keys import peer_public_key
from wire.peer_limits import (
    CHECK_INTERVAL_S,
    IN_FLIGHT_SLACK_BYTES,
    MAX_PEERS,
    LogTally,
    Peer,
    PeerLimits,
    descriptor_limit,
    message_wire_bytes,
    over_budget,
    over_cap,
    peer_address,
    peer_cap,
    shut_down,
    tcp_counters,
)

log = logging.getLogger("edge_agent")

STRANGER_IN_FLIGHT_BYTES = 1 << 20  # before its HELLO (a few hundred bytes of info), per peer
STRANGERS_IN_FLIGHT_BYTES = 8 << 20  # all strangers together
HELLO_DEADLINE_S = 5.0  # a stranger the client has read up to this long after accepting it
MONITOR_EVENTS = (zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
                  | zmq.EVENT_CLOSED)
MONITOR_EVENT_WAIT_S = 0.2  # for the event of a connection a message came on (_await_link)
NO_FD = -1  # inproc: messages carry no descriptor, there is no connection to tell apart

ACCEPT, DROP, CUT = "accept", "drop", "cut"


@dataclass(frozen=True)
class ClientLimits:
    agent_in_flight_bytes: int  # per dialled or announced connection: one reply and slack
    max_accepted: int = MAX_PEERS  # connections on the bound socket, strangers cut first
    stranger_in_flight_bytes: int = STRANGER_IN_FLIGHT_BYTES
    strangers_in_flight_bytes: int = STRANGERS_IN_FLIGHT_BYTES
    hello_deadline_s: float = HELLO_DEADLINE_S

    @classmethod
    def for_message_cap(cls, max_message_bytes: int) -> ClientLimits:
        """A reply has its request's shape and dtype, and an agent refuses a request over
        `max_message_bytes`: one such reply in flight per agent, and the slack for heartbeats
        (peer_limits.py)."""
        return cls(agent_in_flight_bytes=max_message_bytes + IN_FLIGHT_SLACK_BYTES)


@dataclass
class Link:
    """One connection of the client's socket."""

    peer: Peer  # the kernel's counters and what the client read (peer_limits.py)
    alias: bytes | None  # dialled: the routing id the client gave it; None: accepted
    curve: bool
    announced: bytes | None = None  # accepted: the routing id its HELLO bound to it


# ---------------------------------------------------------------------------------------------
# Pure: who may speak for whom, and which connections are over a bound


def judge(peer: bytes, hello: bool, fd: int, link: Link | None, owner: dict[bytes, int],
          bound_keys: dict[bytes, str], key: str | None, aliases: Collection[bytes]
          ) -> tuple[str, str]:
    """What to do with a message from routing id `peer` on connection `fd` (`link`, None when
    the client does not know it): ACCEPT, DROP it, or CUT the connection; with the reason.
    `owner`: routing id -> connection bound to it; `bound_keys`: routing id -> public key;
    `key`: the sender's public key (CurveZMQ bind) or None."""
    if link is None:
        return DROP, f"a message for {_name(peer)} from a connection the client does not know"
    if link.alias is not None:  # libzmq names a dialled connection by its alias only
        if peer != link.alias:
            return DROP, f"a message for {_name(peer)} on the connection to another agent"
        if hello:
            return DROP, f"a HELLO from the agent the client dialled as {_name(peer)}"
        return ACCEPT, ""
    if peer in aliases:
        return CUT, f"an accepted connection calls itself {_name(peer)}, a dialled agent's name"
    if hello:
        if peer in bound_keys and key != bound_keys[peer]:
            return CUT, (f"a HELLO for {_name(peer)} under another key than the one it "
                         "announced with")
        if owner.get(peer, fd) != fd:
            return CUT, f"a HELLO for {_name(peer)}, which another connection holds"
        return ACCEPT, ""
    if owner.get(peer) == fd:
        return ACCEPT, ""
    return DROP, f"a message for {_name(peer)} from a connection that did not announce it"


def _name(peer: bytes) -> str:
    return repr(peer.decode(errors="replace")[:64])


def over_limits(links: Sequence[Link], limits: ClientLimits, drained_s: float,
                now_s: float | None = None) -> list[tuple[Link, str]]:
    """The connections to cut, each with the reason: accepted ones over the cap (strangers
    first, then the idle longest), any over its bytes in flight, strangers together over
    theirs, and strangers still silent although the client read everything it was sent up to
    `drained_s`, over hello_deadline_s after accepting them. `now_s`: agents' budgets grow
    by their heartbeats' allowance (peer_limits.heartbeat_allowance_bytes)."""
    by_fd = {link.peer.fd: link for link in links}
    accepted = [link for link in links if link.alias is None]
    strangers = [link for link in accepted if link.announced is None]
    agents = [link for link in links if link.alias is not None or link.announced is not None]
    cap = (f"{len(accepted)} connections, over the cap of {limits.max_accepted} (the one idle "
           "longest goes)")
    cuts = [(by_fd[p.fd], cap)
            for p in over_cap([link.peer for link in accepted], limits.max_accepted)]
    cuts += [(by_fd[p.fd], f"a stranger with {why}") for p, why in over_budget(
        [link.peer for link in strangers if link.peer.counted],
        PeerLimits(in_flight_bytes=limits.stranger_in_flight_bytes,
                   in_flight_total_bytes=limits.strangers_in_flight_bytes))]
    cuts += [(by_fd[p.fd], why) for p, why in over_budget(
        [link.peer for link in agents if link.peer.counted],
        PeerLimits(in_flight_bytes=limits.agent_in_flight_bytes), now_s)]
    cuts += [(link, f"no HELLO within {limits.hello_deadline_s:g} s of connecting")
             for link in strangers
             if drained_s - link.peer.accepted_s > limits.hello_deadline_s]
    seen: set[int] = set()
    return [(link, why) for link, why in cuts
            if link.peer.fd not in seen and not seen.add(link.peer.fd)]


# ---------------------------------------------------------------------------------------------
# The book, kept from the monitor (a watchdog thread, and the reading thread before each message)


class LinkGuard:
    """The connection book of one AgentClient socket. The client's thread calls `dialling`,
    `listening`, `admit`, `may_send`, `drained` and `close`; a watchdog thread reads the
    counters every CHECK_INTERVAL_S. Both hold the lock while touching the book or the monitor
    socket (never the client's socket)."""

    def __init__(self, sock: zmq.Socket, limits: ClientLimits, clock=time.monotonic):
        self.limits = ClientLimits(**{**limits.__dict__, "max_accepted": peer_cap(
            limits.max_accepted, descriptor_limit())})
        self.clock = clock
        self.links: dict[int, Link] = {}
        self.owner: dict[bytes, int] = {}  # announced routing id -> its connection
        self.bound_keys: dict[bytes, str] = {}  # announced routing id -> its public key
        self.aliases: set[bytes] = set()
        self.cuts = 0
        self.refused = 0  # messages dropped: not from the connection their name is bound to
        self._dialled: dict[str, tuple[bytes, bool]] = {}  # endpoint -> (alias, CurveZMQ)
        self._bound_curve = False
        self._drained_s = -math.inf
        self._sock = sock
        self._monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cut_log, self._refused_log = LogTally(), LogTally()
        self._thread = threading.Thread(target=self._watch, name="agent-client-guard",
                                        daemon=True)
        self._thread.start()

    # -- the client's thread ----------------------------------------------------------------

    def dialling(self, endpoint: str, alias: bytes, curve: bool) -> None:
        """Before connect(endpoint): its connections speak for `alias`."""
        with self._lock:
            self._dialled[endpoint] = (alias, curve)
            self.aliases.add(alias)

    def listening(self, curve: bool) -> None:
        """Before bind(): whether accepted connections are CurveZMQ."""
        with self._lock:
            self._bound_curve = curve

    def admit(self, frames: Sequence[zmq.Frame], hello: bool) -> bool:
        """Whether a received message ([routing id, *body]) counts: it came from the connection
        its routing id is bound to, or is a HELLO that may bind it. Counts its bytes read."""
        peer, fd = frames[0].bytes, _source_fd(frames[0])
        with self._lock:
            if fd is None:  # inproc: one process, nothing to tell apart
                if hello:
                    self.owner[peer] = NO_FD
                return True
            link = self.links.get(fd)
            # libzmq gives a dialled alias to no other connection: that reply is settled.
            # Anything else is judged on a fresh book: a close or accept queued before this
            # message is read first (a reused descriptor, a name taken after its holder left).
            if link is None or link.alias != peer:
                self._drain()
                link = self.links.get(fd)
            if link is None and peer in self.aliases:
                link = self._await_link(fd)
            if link is not None:
                link.peer.consumed += message_wire_bytes(frames[1:], link.curve)
                link.peer.last_message_s = self.clock()
            key = peer_public_key(frames[0]) if link is not None and link.curve else None
            verdict, why = judge(peer, hello, fd, link, self.owner, self.bound_keys, key,
                                 self.aliases)
            if verdict == ACCEPT:
                if hello:
                    self.owner[peer], link.announced = fd, peer
                    if key is not None:
                        self.bound_keys.setdefault(peer, key)
                return True
            self.refused += 1
            if verdict == CUT:
                self._cut(link, why)
            else:
                self._refused_log.add(self.clock(), f"dropped {why}")
            return False

    def _await_link(self, fd: int) -> Link | None:
        """A dialled agent's first reply can be read before the monitor event of its connection
        (libzmq sends them down two pipes: two bench runs lost a reply that way): wait for the
        event a moment instead of dropping the reply."""
        deadline = time.monotonic() + MONITOR_EVENT_WAIT_S  # real time, whatever self.clock is
        while fd not in self.links and time.monotonic() < deadline:
            if self._monitor.poll(5):
                self._drain()
        return self.links.get(fd)

    def may_send(self, peer: bytes) -> bool:
        """Whether `peer` names a connection now: a dialled alias, or a routing id bound by a
        HELLO to a connection still open."""
        with self._lock:
            if peer in self.aliases:
                return True
            self._drain()
            return peer in self.owner

    def connected(self, peer: bytes) -> bool:
        """Whether `peer` has an open connection now, by the monitor's events: a dialled alias
        with a connection up, or a routing id bound by a HELLO. What tells a slow agent (still
        connected: its ZMTP heartbeats are answered by libzmq's I/O thread while it computes)
        from a gone one (closed, reset, or silent past the heartbeat timeout)."""
        with self._lock:
            self._drain()
            if peer in self.aliases:
                return any(link.alias == peer for link in self.links.values()) or any(
                    alias == peer and endpoint.startswith("inproc://")  # no events: can't tell
                    for endpoint, (alias, _) in self._dialled.items())
            return peer in self.owner

    def drained(self, now_s: float) -> None:
        """The client found nothing left to read at `now_s` (the HELLO deadline counts from
        what it has read, so a client that is busy elsewhere cuts no one)."""
        self._drained_s = now_s

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)

    # -- the watchdog thread --------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            with self._lock:
                try:
                    self._drain()
                except zmq.ZMQError:  # its context was terminated under it: nothing to guard
                    return
                self._check()

    def _check(self) -> None:
        for link in list(self.links.values()):
            if not link.peer.counted:
                continue
            counters = tcp_counters(link.peer.fd)
            if counters is None or counters[1] < link.peer.received:  # gone, or reused
                self._forget(link.peer.fd)  # its events, when they come, say the rest
                continue
            link.peer.acked, link.peer.received = counters
        for link, why in over_limits(list(self.links.values()), self.limits,
                                     self._drained_s, self.clock()):
            self._cut(link, why)

    # -- both (under the lock) ------------------------------------------------------------

    def _drain(self) -> None:
        while self._monitor.get(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(self._monitor)
            kind, fd = event["event"], int(event.get("value") or 0)
            if kind == zmq.EVENT_ACCEPTED:
                self._add(fd, None, self._bound_curve)
            elif kind == zmq.EVENT_CONNECTED:
                dialled = self._dialled.get(event.get("endpoint", b"").decode(errors="replace"))
                if dialled is not None:
                    self._add(fd, *dialled)
            else:  # disconnected or closed
                self._forget(fd)

    def _add(self, fd: int, alias: bytes | None, curve: bool) -> None:
        self._forget(fd)  # a descriptor number reused: the old connection is gone
        now = self.clock()
        counters = tcp_counters(fd)
        peer = Peer(fd=fd, address=peer_address(fd), accepted_s=now,
                    counted=counters is not None)
        if counters is not None:  # the greeting so far is not a message in flight
            peer.acked, peer.received = counters
            peer.sent, peer.consumed = peer.acked, peer.received
        self.links[fd] = Link(peer=peer, alias=alias, curve=curve)

    def _forget(self, fd: int) -> None:
        link = self.links.pop(fd, None)
        if link is not None and link.announced is not None \
                and self.owner.get(link.announced) == fd:
            del self.owner[link.announced]

    def _cut(self, link: Link, why: str) -> None:
        fd = link.peer.fd
        if link.peer.address is None or peer_address(fd) == link.peer.address:
            shut_down(fd)  # else closed and reused since: not this connection
            self.cuts += 1
            self._cut_log.add(self.clock(), f"cut a connection to the agent client: {why}")
        self._forget(fd)


def _source_fd(frame: zmq.Frame) -> int | None:
    """The connection a received message came from (libzmq's ZMQ_SRCFD)."""
    try:
        return frame.get(zmq.SRCFD)
    except zmq.ZMQError:
        return None

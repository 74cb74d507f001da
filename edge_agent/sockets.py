"""The agent's sockets and its serving loop: one request at a time, synchronous (README, "Wire
protocol"). What to do with a message is the caller's (`handle`, edge_agent/server.py)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import zmq
from zmq.backend import zmq_poll
from zmq.utils.monitor import recv_monitor_message

from edge_agent.config import AgentConfig
from edge_agent.host import advertise_address
from edge_agent.roles import peer_roles
from wire import protocol as P
from wire.keys import set_curve_client, set_curve_server, start_authenticator
from wire.peer_limits import CHECK_INTERVAL_S, LogTally, PeerGuard, PeerLimits

log = logging.getLogger("edge_agent")

POLL_INTERVAL_S = 0.1  # how often the loop looks at the stop flag and pending announcements
MONITOR_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                  | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                  | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_CLOSED)

# body frames, what the sender may do, (routing id frame, connection fd) or None -> reply frames
Handler = Callable[[list, frozenset, "tuple | None"], "list | None"]


class AgentSockets:
    """A ROUTER bound on `--bind` (many peers, each bounded by a PeerGuard) and/or a DEALER
    dialled out to `--basestation` (it announces the agent with HELLO on every connection)."""

    def __init__(self, config: AgentConfig, handle: Handler, info: Callable[[], dict],
                 pusher_gone: Callable[[int], None], tick: Callable[[float], None]):
        self.config = config
        self.network = config.network
        self._handle, self._info, self._pusher_gone, self._tick = handle, info, pusher_gone, tick
        self.guard: PeerGuard | None = None  # limits of the bound socket's peers
        self._router_monitor: zmq.Socket | None = None
        # The guard and the router's monitor are shared with a watchdog thread that drains the
        # monitor and checks the kernel's counters while this thread computes (a peer pushed
        # 2.3 GiB during one 3 s computation when only the loop checked): both under this lock.
        # Connections the watchdog saw close wait here for the loop (the store is its own).
        self._router_lock = threading.Lock()
        self._gone_fds: list[int] = []
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        # a flood of bad peers must not become a flood of log lines (one per 10 s at most)
        self._handshake_log, self._refused_log, self._send_log = LogTally(), LogTally(), LogTally()
        self.ctx: zmq.Context | None = None
        self.router: zmq.Socket | None = None
        self.dealer: zmq.Socket | None = None
        self.authenticator = None  # ZAP for the bound socket (with keys)
        keys = self.network.keys
        # public key -> what it may do; None without keys (everyone may do everything)
        self._roles_by_key = keys.roles_by_key() if keys else None
        self.monitors: dict = {}  # monitor socket -> the socket it watches
        self.bound_endpoint: str | None = None
        self.advertised: str | None = None  # set by open()
        self.hello_pending = False

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Raises zmq.ZMQError when the bind address is taken or invalid."""
        network = self.network
        self.ctx = zmq.Context()
        keys = network.keys
        if network.bind:
            self.router = self.ctx.socket(zmq.ROUTER)
            P.configure_socket(self.router, network.sockets)
            # No receive HWM here: the PeerGuard bounds each peer's bytes instead. With one,
            # a peer that fills its queue and hangs up aborts the process at the next
            # heartbeat (libzmq 4.3.5 "Assertion failed: !_io_error", stream_engine_base.cpp
            # 310: measured with 3,000 requests, then close).
            self.router.setsockopt(zmq.RCVHWM, 0)
            if keys is not None:
                self.authenticator = start_authenticator(self.ctx, keys.admitted)
                set_curve_server(self.router, keys.keypair)
            self.router.bind(network.bind)
            self.bound_endpoint = self.router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.advertised = network.advertise or advertise_address(self.bound_endpoint)
            self._router_monitor = self._watch(self.router)
            self.guard = PeerGuard(network.limits or PeerLimits.for_message_cap(
                network.sockets.max_message_bytes), curve=keys is not None)
            self._watchdog = threading.Thread(target=self._watch_router, daemon=True,
                                              name="agent-peer-guard")
            self._watchdog.start()
        if network.basestation:
            self.dealer = self.ctx.socket(zmq.DEALER)
            self.dealer.setsockopt(zmq.ROUTING_ID, self.config.agent_id.encode()[:255])
            P.configure_socket(self.dealer, network.sockets)
            if keys is not None:
                set_curve_client(self.dealer, keys.keypair, network.basestation_key)
            self.dealer.connect(network.basestation)
            self._watch(self.dealer)
            self.hello_pending = True
        if not self.advertised:
            self.advertised = network.advertise

    def _watch(self, sock: zmq.Socket) -> zmq.Socket:
        monitor = sock.get_monitor_socket(MONITOR_EVENTS)
        self.monitors[monitor] = sock
        return monitor

    def close(self) -> None:
        if self._watchdog is not None:  # before the sockets it reads are closed
            self._watchdog_stop.set()
            self._watchdog.join()
        for monitor, sock in self.monitors.items():
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            monitor.close(linger=0)
        for sock in (self.router, self.dealer):
            if sock is not None:
                sock.close(linger=0)

    def term(self) -> None:
        """After close and after everyone else's sockets in the context are closed."""
        if self.authenticator is not None:
            self.authenticator.stop()  # its sockets live in ctx: term() would wait for them
        if self.ctx is not None:
            self.ctx.term()

    def where(self) -> str:
        parts = []
        if self.bound_endpoint:
            parts.append(f"serving {self.bound_endpoint} (advertised {self.advertised})")
        if self.network.basestation:
            parts.append(f"dialling {self.network.basestation}")
        return ", ".join(parts)

    # -- serving ------------------------------------------------------------------------------

    def run(self, stop_requested: Callable[[], bool]) -> None:
        # Hot path: right after a wake-up every Python and torch call on the way runs several
        # times slower than in a hot loop (README, Performance), so it does as few as it can:
        # one zmq_poll over a fixed list, one message per ready socket per turn (round-robin
        # between sockets). The caller turns off autograd.
        served = [s for s in (self.router, self.dealer) if s is not None]
        # monitors first: a connection's close is known before its successor's first message
        # (the router's is the watchdog's, drained before each of the router's messages)
        items = [(m, zmq.POLLIN) for m in self.monitors if m is not self._router_monitor] \
            + [(s, zmq.POLLIN) for s in served]
        timeout_ms = int(min(POLL_INTERVAL_S, CHECK_INTERVAL_S) * 1000)
        next_check_s = 0.0
        while not stop_requested():
            if self.hello_pending:
                self._send_hello()
            for sock, _ in zmq_poll(items, timeout_ms):
                if sock in self.monitors:
                    self._on_monitor(sock)
                else:
                    self._serve_one(sock)
            now_s = time.monotonic()
            if now_s >= next_check_s:  # after the reply went out: off the hot path
                next_check_s = now_s + CHECK_INTERVAL_S
                if self._router_monitor is not None:
                    self.router_events()
                self._tick(now_s)

    def _watch_router(self) -> None:
        """The watchdog thread: the router's connection events and the per-peer limits, every
        CHECK_INTERVAL_S, whatever the loop is doing."""
        while not self._watchdog_stop.wait(CHECK_INTERVAL_S):
            with self._router_lock:
                try:
                    self._on_monitor(self._router_monitor)
                except zmq.ZMQError:  # the context is going away: nothing left to guard
                    return
                self.guard.check()

    def router_events(self) -> None:
        """Take the router's connection events now (the loop, before a router message; a push
        that begins, so a pusher that just left frees the store)."""
        if self._router_monitor is None:
            return
        with self._router_lock:
            if self._router_monitor.get(zmq.EVENTS) & zmq.POLLIN:
                self._on_monitor(self._router_monitor)
            gone, self._gone_fds = self._gone_fds, []
        for fd in gone:
            self._pusher_gone(fd)

    def _serve_one(self, sock: zmq.Socket) -> None:
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        fd, sender = None, None
        if sock is self.router:  # [routing id, *body]; every frame names its connection
            fd = _source_fd(frames[0])
            self.router_events()
            with self._router_lock:
                self.guard.received(fd, frames[1:])
            sender = (frames[0], fd)  # a Pusher only if it pushes: not on the hot path
        route = frames[:1] if sock.type == zmq.ROUTER else []
        roles = peer_roles(sock is self.dealer, self._roles_by_key, frames[0])
        reply = self._handle(frames[len(route):], roles, sender)
        if reply is None:
            return
        if fd is not None:
            with self._router_lock:
                allowed = self.guard.reply_allowed(fd, reply)
            if not allowed:  # this peer does not read what it asked for: dropped (logged)
                return
        try:
            sock.send_multipart(route + reply, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._send_log.add(time.monotonic(), "dropped a reply: the peer is not reading "
                                                 "(send queue full)")
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer left (or was cut) meanwhile
            self._send_log.add(time.monotonic(), f"dropped a reply: {e.strerror}")

    # -- dial-in and connection events ------------------------------------------------------

    def _send_hello(self) -> None:
        try:
            self.dealer.send(P.pack(P.HELLO, 0, info=self._info()), flags=zmq.NOBLOCK)
            self.hello_pending = False
            log.info("announced to %s", self.network.basestation)
        except zmq.Again:  # not connected yet (IMMEDIATE): the next connect event retries
            pass

    def _on_monitor(self, monitor: zmq.Socket) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            kind, endpoint = event["event"], event.get("endpoint", b"").decode(errors="replace")
            watched, fd = self.monitors[monitor], int(event.get("value") or 0)  # fd, or 0
            if kind == zmq.EVENT_ACCEPTED and watched is self.router:
                self.guard.accepted(fd)  # may cut the connection idle longest (the cap)
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED) and watched is self.router:
                self._gone_fds.append(fd)  # the store learns it in the loop (router_events)
                # Not cut by us: most often a pusher or probe that is done. libzmq reports a
                # frame over MAXMSGSIZE with the very same event (measured on 4.3.5), so this
                # line cannot name the cause; the cap is in the agent's INFO for senders.
                if self.guard.closed(fd) and kind == zmq.EVENT_DISCONNECTED:
                    log.info("peer disconnected on %s", endpoint)
            elif kind in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                          zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._handshake_log.add(time.monotonic(), (
                    f"dropped a connection on {endpoint}: ZMTP handshake failed (not a ZeroMQ "
                    "peer, garbage on the port, or "
                    f"{'a peer without keys' if self.network.keys else 'a peer with keys'})"))
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                if watched is self.dealer:
                    log.warning("the base station at %s refused this agent's key (%s must "
                                "be in its trusted/ folder)", endpoint,
                                self.network.keys.keypair.path.removesuffix("_secret"))
                else:
                    self._refused_log.add(time.monotonic(), (
                        f"refused a peer on {endpoint}: its key is not in "
                        f"{self.network.keys.folder}/trusted/ or pushers/"))
            elif kind == zmq.EVENT_DISCONNECTED:
                log.info("disconnected from the base station at %s (it closed, or its "
                         "heartbeats stopped); reconnecting", endpoint)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED and watched is self.dealer:
                self.hello_pending = True  # (re)connected to the base station: announce again


def _source_fd(frame: zmq.Frame) -> int | None:
    """The connection a received message came from (libzmq's ZMQ_SRCFD)."""
    try:
        return frame.get(zmq.SRCFD)
    except zmq.ZMQError:
        return None

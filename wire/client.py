"""A small synchronous client for agents: the base station's dispatcher, push and probes use it.

One ROUTER socket talks to many agents at once, in both directions (see protocol.py):
`connect(endpoint)` for listening agents, `bind(endpoint)` for agents that dial in and announce
themselves with HELLO. Send several requests, then `wait` for their ids; replies to requests
that were given up on arrive later and are discarded by id (counted in `late_replies`).
With a keypair, each link can be CurveZMQ (wire/keys.py): `connect` names the agent's
public key, `bind` the keys of the agents allowed to dial in.
Every connection is bounded and a message counts only from the connection its agent's name is
bound to (wire/client_guard.py): a dial-in agent's HELLO binds its routing id to its
connection, and no other connection can take that id over. Connect every listening agent
before `bind`: libzmq aborts the process on a connect under a name a dial-in peer holds.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import zmq
from zmq.backend import zmq_poll

from wire import messages as M
from wire import protocol as P
from wire.client_guard import ClientLimits, LinkGuard
from wire.keys import (
    Keypair,
    set_curve_client,
    set_curve_server,
    set_plain,
    start_authenticator,
)

DEFAULT_TIMEOUT_S = 5.0
RECENT_IDS = 1 << 16  # request ids remembered to never repeat: far more than can be pending


class RequestIds:
    """Request ids that cannot be guessed: 64 random bits from the OS's CSPRNG per request (a
    counter let any peer answer, or pre-empt, another agent's request by id), never one of the
    last RECENT_IDS (at least) again. Drawn 512 at a time, one `os.urandom` call: 0.6 us an
    id here, against 1.2 us for `secrets.randbits(64)` (measured)."""

    _WORDS = struct.Struct("<512Q")

    def __init__(self) -> None:
        self._batch: list[int] = []
        self._current: set[int] = set()  # two generations: between N and 2N ids remembered
        self._previous: set[int] = set()

    def next(self) -> int:
        while True:
            if not self._batch:
                self._batch = list(self._WORDS.unpack(os.urandom(self._WORDS.size)))
            request_id = self._batch.pop()
            if request_id not in self._current and request_id not in self._previous:
                break
        self._current.add(request_id)
        if len(self._current) >= RECENT_IDS:
            self._previous, self._current = self._current, set()
        return request_id


class AgentError(Exception):
    """An agent answered with an ERROR reply."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class PeerUnreachable(Exception):
    """No connection to that agent now (never connected, gone, or its send queue is full)."""


@dataclass(slots=True)  # not frozen: a frozen dataclass pays for its __init__ on every reply
class Reply:
    peer: bytes
    header: dict  # unpacked (protocol.unpack: version, kind and id checked), nothing more
    frames: list  # payload frames (zmq.Frame), wrapped without copies by `tensor()`
    _message: M.Message | None = field(default=None, init=False, repr=False)

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def id(self) -> int | None:
        return self.header.get("id")

    @property
    def message(self) -> M.Message:
        """The typed message (wire/messages.py), decoded and checked on first use: a reply
        nobody reads, such as a late one, costs nothing. Raises ProtocolError."""
        message = self._message
        if message is None:
            header = self.header
            if header["kind"] == P.EXPERT_REPLY:  # the base station's hot path: one call less
                message = M.ExpertReply.decode(header, self.frames)
            else:
                message = M.decode(header, self.frames)
            self._message = message
        return message

    def check(self) -> Reply:
        """Raises AgentError when this is an ERROR reply."""
        if self.kind == P.ERROR:
            error = self.message
            raise AgentError(error.code, error.message)
        return self

    def tensor(self) -> torch.Tensor:
        """The reply's [T, H] tensor. Raises ProtocolError when it does not match its header."""
        return P.decode_tensor(self.header, self.frames)


class AgentClient:
    def __init__(self, routing_id: bytes | None = None,
                 sockets: P.SocketConfig = P.SocketConfig(), ctx: zmq.Context | None = None,
                 keypair: Keypair | None = None):
        self._own_ctx = ctx is None
        self.keypair = keypair  # this side's CURVE identity; None: plain links only
        self._authenticator = None  # ZAP for a keyed bind
        self._admitted: frozenset[bytes] | None = None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTING_ID, routing_id or
                             f"bs-{os.getpid()}-{os.urandom(4).hex()}".encode())
        # IMMEDIATE stays off: with it a ROUTER ignores CONNECT_ROUTING_ID (libzmq 4.3.5)
        P.configure_socket(self.sock, sockets, immediate=False)
        # No receive HWM: with one, a peer that fills its queue and hangs up aborts the process
        # (libzmq 4.3.5 "!_io_error" with heartbeats on); the guard bounds bytes instead.
        self.sock.setsockopt(zmq.RCVHWM, 0)
        # A second connection with a routing id in use must not take it over (a dial-in
        # hijack): libzmq then ignores that connection, and the guard cuts it if it lingers.
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 0)
        self.guard = LinkGuard(self.sock, ClientLimits.for_message_cap(sockets.max_message_bytes))
        self._listening = False
        self._ids = RequestIds()
        self._poll_items = [(self.sock, zmq.POLLIN)]  # zmq_poll: Socket.poll builds a Poller
        self.hellos: dict[bytes, dict] = {}  # dial-in agents: routing id -> latest info
        self.late_replies = 0
        self.endpoints: dict[str, bytes] = {}  # connected endpoint -> alias

    # -- connections ------------------------------------------------------------------------

    def connect(self, endpoint: str, alias: bytes | None = None,
                server_key: bytes | None = None) -> bytes:
        """Connect to a listening agent; returns the peer name to send to (default: endpoint).
        `server_key`: the agent's CURVE public key (Z85), for an encrypted link to that agent
        only; None: a plain link."""
        alias = alias or endpoint.encode()
        # A second connect with an alias already in use aborts the process (libzmq 4.3.5
        # router.cpp assertion, measured): connect each endpoint once, reuse its alias.
        if endpoint in self.endpoints:
            if self.endpoints[endpoint] != alias:
                raise ValueError(f"{endpoint} is already connected as {self.endpoints[endpoint]!r}")
            return alias
        if alias in self.endpoints.values():
            raise ValueError(f"alias {alias!r} is already used for another endpoint")
        # A dial-in peer may already hold the alias as its routing id, and libzmq aborts the
        # process on a connect under a name in use (router.cpp "!has_out_pipe", measured).
        if self._listening:
            raise ValueError(f"connect {endpoint} before listening: a dial-in peer could hold "
                             "its name")
        if server_key is None:
            set_plain(self.sock)
        else:
            set_curve_client(self.sock, self._require_keypair(), server_key)
        self.guard.dialling(endpoint, alias, curve=server_key is not None)
        self.sock.setsockopt(zmq.CONNECT_ROUTING_ID, alias)
        self.sock.connect(endpoint)
        self.endpoints[endpoint] = alias
        return alias

    def bind(self, endpoint: str, admitted: frozenset[bytes] | None = None) -> str:
        """Listen for dial-in agents; returns the bound endpoint (resolves a `*` port).
        `admitted`: the public keys (Z85) of the agents that may dial in, over CurveZMQ; None:
        plain, anyone. One allow-list per client; connect every listening agent first. Raises
        zmq.ZMQError, ValueError."""
        if self._listening and admitted != self._admitted:
            raise ValueError("this client already listens with another allow-list")
        if admitted is None:
            set_plain(self.sock)
        else:
            keypair = self._require_keypair()
            if self._authenticator is None:  # before the bind: no ZAP handler admits any key
                self._authenticator = start_authenticator(self.ctx, admitted)
            self._admitted = admitted
            set_curve_server(self.sock, keypair)
        self.guard.listening(curve=admitted is not None)
        self.sock.bind(endpoint)
        self._listening = True
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _require_keypair(self) -> Keypair:
        if self.keypair is None:
            raise ValueError("a CurveZMQ link needs this side's keypair (AgentClient(keypair=))")
        return self.keypair

    def close(self) -> None:
        self.guard.close()
        self.sock.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()  # its sockets live in ctx: term() would wait for them
            self._authenticator = None
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connected(self, peer: bytes) -> bool:
        """Whether that agent's connection is up now (LinkGuard.connected): slow is not gone."""
        return self.guard.connected(peer)

    def count_late(self) -> None:
        """A reply its receiver did not wait for (given up on, or not from the agent asked)."""
        self.late_replies += 1

    # -- sending ----------------------------------------------------------------------------

    def send(self, peer: bytes, kind: str, frames: Sequence = (), **fields) -> int:
        """Send one request; returns its id. Raises PeerUnreachable."""
        if not self.guard.may_send(peer):  # a routing id no open connection has announced
            raise PeerUnreachable(f"{peer!r}: not connected")
        request_id = self._ids.next()
        try:
            self.sock.send_multipart([peer, P.pack(kind, request_id, **fields), *frames],
                                     flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise PeerUnreachable(f"{peer!r}: send queue full (agent not reading)") from None
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                raise PeerUnreachable(f"{peer!r}: not connected") from None
            raise
        return request_id

    def send_expert(self, peer: bytes, layer: int, x: torch.Tensor,
                    counts: Sequence[tuple[int, int]], wire_dtype: str | None = None,
                    reply_dtype: str | None = None, prefetch: dict | None = None) -> int:
        """x [T, H]: the tokens of each (expert id, tokens) in `counts`, in that order.
        `prefetch`: a hint carried along (protocol.prefetch_fields), for a budgeted agent."""
        dtype = wire_dtype or P.DTYPE_NAME[x.dtype]
        frames, fields = P.encode_tensor(x, dtype)
        if reply_dtype:
            fields["reply_dtype"] = reply_dtype
        if prefetch:
            fields["prefetch"] = prefetch
        return self.send(peer, P.EXPERT, frames, layer=layer,
                         experts=[[int(e), int(n)] for e, n in counts], **fields)

    # -- receiving --------------------------------------------------------------------------

    def recv(self, timeout_s: float) -> Reply | None:
        """The next reply from any agent, or None at the deadline. HELLOs are recorded in
        `hellos` and not returned; malformed messages, and messages not from the connection
        their sender's name is bound to, are skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not zmq_poll(self._poll_items, left_ms):
                self.guard.drained(time.monotonic())
                return None
            frames = self.sock.recv_multipart(copy=False)
            try:
                header = P.unpack(frames[1]) if len(frames) > 1 else None
            except P.ProtocolError:
                header = None
            hello = header is not None and header["kind"] == P.HELLO
            if not self.guard.admit(frames, hello) or header is None:
                continue  # its bytes are counted as read either way
            if hello:
                try:
                    info = M.Hello.decode(header, frames[2:]).info
                except P.ProtocolError:  # an info that is not a map: nothing it says is known
                    info = {}
                self.hellos[frames[0].bytes] = info
                continue
            return Reply(frames[0].bytes, header, frames[2:])

    def wait(self, request_ids: set[int], timeout_s: float) -> dict[int, Reply]:
        """Replies to these ids (as many as arrive before the deadline); others are discarded."""
        pending, replies = set(request_ids), {}
        deadline = time.monotonic() + timeout_s
        while pending:
            reply = self.recv(max(0.0, deadline - time.monotonic()))
            if reply is None:
                break
            if reply.id in pending:
                pending.discard(reply.id)
                replies[reply.id] = reply
            else:
                self.late_replies += 1
        return replies

    def wait_hello(self, timeout_s: float, peer: bytes | None = None) -> bytes | None:
        """Wait until a dial-in agent (or this one) announces itself; returns its routing id."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = [p for p in self.hellos if peer is None or p == peer]
            if ready:
                return ready[0]
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            reply = self.recv(min(left, 0.1))
            if reply is not None:
                self.late_replies += 1

    # -- one call, for probes and tools ---------------------------------------------------

    def call(self, peer: bytes, kind: str, frames: Sequence = (),
             timeout_s: float = DEFAULT_TIMEOUT_S, **fields) -> Reply:
        """Send and wait. Raises TimeoutError, PeerUnreachable, AgentError."""
        request_id = self.send(peer, kind, frames, **fields)
        reply = self.wait({request_id}, timeout_s).get(request_id)
        if reply is None:
            raise TimeoutError(f"{peer!r}: no reply to {kind} within {timeout_s} s")
        return reply.check()

    def expert(self, peer: bytes, layer: int, x: torch.Tensor,
               counts: Sequence[tuple[int, int]], timeout_s: float = DEFAULT_TIMEOUT_S,
               **dtypes) -> tuple[torch.Tensor, Reply]:
        """One expert call. Raises TimeoutError, PeerUnreachable, AgentError, ProtocolError."""
        request_id = self.send_expert(peer, layer, x, counts, **dtypes)
        reply = self.wait({request_id}, timeout_s).get(request_id)
        if reply is None:
            raise TimeoutError(f"{peer!r}: no reply to layer {layer} within {timeout_s} s")
        return reply.check().tensor(), reply

    def info(self, peer: bytes, timeout_s: float = DEFAULT_TIMEOUT_S) -> dict:
        """That agent's info. Raises TimeoutError, PeerUnreachable, AgentError, ProtocolError
        (a reply that is not an info map)."""
        reply = self.call(peer, P.INFO, timeout_s=timeout_s)
        if reply.kind != P.INFO_REPLY:
            raise P.ProtocolError(P.ERR_MALFORMED, f"a {P.shown(reply.kind)} reply to INFO")
        return reply.message.info

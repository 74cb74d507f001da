"""Why an agent does not answer: its ZMTP greeting read by hand, then one short-lived ZeroMQ
connection whose handshake is watched through a socket monitor, turned into a one-line hint for
the user (`basestation status`).

The greeting comes first because libzmq's events alone are ambiguous (measured on 4.3.5, DEALER
to a ROUTER agent): a plain client of a CURVE agent sees HANDSHAKE_FAILED_PROTOCOL
(MECHANISM_MISMATCH) or, as often, HANDSHAKE_FAILED_NO_DETAIL (the agent hung up first), which
is also what any port that accepts and closes gives. The greeting names the agent's mechanism
(NULL or CURVE) without a race. Between two CURVE ends the events are steady (30 of 30 tries):
    our key not in its trusted/   HANDSHAKE_FAILED_AUTH, ZAP status 400
    a wrong agent public key      HANDSHAKE_FAILED_NO_DETAIL (EPIPE: it cannot decrypt our
                                  HELLO and hangs up)
    keys right                    HANDSHAKE_SUCCEEDED
"""

from __future__ import annotations

import socket
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from wire.keys import Keypair, set_curve_client

DIAGNOSE_TIMEOUT_S = 2.0  # a CURVE handshake takes ~1.5 ms here; the rest is for slow links
RECONNECT_IVL_MS = 100

# ZMTP 3.0: our signature and major version are all a libzmq peer needs to send its whole
# 64-byte greeting (signature, version, 20-byte mechanism name, as-server, filler)
GREETING_START = b"\xff" + bytes(7) + b"\x01\x7f" + bytes([3])
GREETING_BYTES = 64
MECHANISM_SLICE = slice(12, 32)
NOT_ZMTP = "not ZMTP"  # what read_mechanism returns for a peer whose greeting is not ZMTP 3

HINT_NEEDS_CURVE = ("the agent speaks CurveZMQ: give its public key (roster public_key/"
                    "certificate or --agent EXPERTS=ENDPOINT@CERT, with --keys)")
HINT_REFUSED_OUR_KEY = ("the agent refused our key: copy the base station's certificate "
                        "(its NAME.key) into the agent's trusted/ folder and restart the agent")
HINT_WRONG_SERVER_KEY = "handshake failed: the public key given for it is probably wrong"
HINT_AGENT_IS_PLAIN = ("the agent is plain but we sent CURVE: remove its key from the roster, "
                       "or start it with --keys")
HINT_NOT_ZMTP = "what answers there does not speak ZeroMQ: not an edge_agent?"
HINT_LINK_UP = ("the handshake succeeds, but the agent did not answer: busy, still loading, "
                "or not an edge_agent")

_HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def hint_for(mechanism: str | None, curve: bool, event: int | None = None,
             value: int = 0) -> str | None:
    """The hint, from the agent's greeting `mechanism` (NULL, CURVE, NOT_ZMTP; None: no
    greeting), whether we connect with CURVE, and, for a CURVE agent we reach with CURVE, the
    first handshake `event` of our connection with its `value`. None: nothing learned."""
    if mechanism is None:
        return None
    if mechanism not in ("NULL", "CURVE"):
        return HINT_NOT_ZMTP if mechanism == NOT_ZMTP else \
            f"the agent uses ZeroMQ's {mechanism[:20]} mechanism: not an edge_agent?"
    if mechanism == "CURVE" and not curve:
        return HINT_NEEDS_CURVE
    if mechanism == "NULL":
        return HINT_AGENT_IS_PLAIN if curve else HINT_LINK_UP
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return HINT_REFUSED_OUR_KEY
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL or (
            event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC):
        return HINT_WRONG_SERVER_KEY
    if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
        return HINT_LINK_UP
    return None


def diagnose(endpoint: str, keypair: Keypair | None, server_key: bytes | None,
             timeout_s: float = DIAGNOSE_TIMEOUT_S) -> str | None:
    """A one-line hint on why the agent at `endpoint` does not answer a base station with this
    `keypair` that names it `server_key` (CURVE when both are given, else plain), or None when
    nothing is learned (nothing listens there, or no greeting within the deadline). At most
    about 2 × `timeout_s`; sends no message to the agent. Raises nothing."""
    mechanism = read_mechanism(endpoint, timeout_s)
    curve = keypair is not None and server_key is not None
    event, value = None, 0
    if mechanism == "CURVE" and curve:
        event, value = first_handshake_event(endpoint, keypair, server_key, timeout_s)
    return hint_for(mechanism, curve, event, value)


def read_mechanism(endpoint: str, timeout_s: float) -> str | None:
    """The security mechanism a ZeroMQ peer at `endpoint` (tcp:// or ipc://) announces in its
    greeting: "NULL", "CURVE", …; NOT_ZMTP for bytes that are not a ZMTP 3 greeting; None when
    it cannot be reached, sends nothing within `timeout_s`, or the scheme is another."""
    address = _socket_address(endpoint)
    if address is None:
        return None
    family, where = address
    deadline_s = time.monotonic() + timeout_s
    try:
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(where)
        else:
            sock = socket.create_connection(where, timeout=timeout_s)
    except (OSError, ValueError):  # refused, unreachable, a name that does not resolve
        return None
    with sock:
        greeting = b""
        try:
            sock.sendall(GREETING_START)
            while len(greeting) < GREETING_BYTES:
                sock.settimeout(max(0.001, deadline_s - time.monotonic()))
                chunk = sock.recv(GREETING_BYTES - len(greeting))
                if not chunk:
                    break
                greeting += chunk
        except OSError:  # a timeout or a reset: judged on what came
            pass
    if not greeting:
        return None  # accepted and closed, or silent: as good as not there
    if len(greeting) < GREETING_BYTES or greeting[0] != 0xFF or greeting[9] != 0x7F \
            or greeting[10] < 3:
        return NOT_ZMTP
    return greeting[MECHANISM_SLICE].rstrip(b"\0").decode("ascii", errors="replace") or NOT_ZMTP


def first_handshake_event(endpoint: str, keypair: Keypair, server_key: bytes,
                          timeout_s: float) -> tuple[int | None, int]:
    """(event, value) of the first handshake outcome of a CURVE DEALER connecting to
    `endpoint`, or (None, 0) at the deadline. Raises nothing."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    monitor = None
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
        set_curve_client(sock, keypair, server_key)
        monitor = sock.get_monitor_socket(_HANDSHAKE_EVENTS)
        sock.connect(endpoint)
        if monitor.poll(max(1, int(timeout_s * 1000))):
            event = recv_monitor_message(monitor)
            return int(event["event"]), int(event["value"] or 0)
        return None, 0
    except zmq.ZMQError:  # an endpoint libzmq refuses: nothing learned
        return None, 0
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
        ctx.term()


def _socket_address(endpoint: str) -> tuple[int, object] | None:
    """(family, address) for Python's socket of a tcp:// or ipc:// endpoint; None otherwise."""
    scheme, _, rest = endpoint.partition("://")
    if scheme == "ipc" and rest:
        return socket.AF_UNIX, ("\0" + rest[1:] if rest.startswith("@") else rest)  # abstract
    if scheme != "tcp":
        return None
    host, _, port = rest.rpartition(":")
    host = host.rpartition(";")[2].strip("[]")  # libzmq's "source;host:port" form
    if not host or not port.isdigit():
        return None
    return socket.AF_UNSPEC, (host, int(port))  # create_connection picks IPv4 or IPv6

"""The edge-agent wire protocol: one module, one version, shared by agent, pusher and base station.

Socket roles (README, "Wire protocol"):
    base station   one ROUTER socket for every agent, both directions at once:
                   - listening agents (`edge_agent --bind`): the ROUTER *connects* to the agent,
                     naming the peer with CONNECT_ROUTING_ID (the alias, e.g. the address);
                   - dial-in agents (`edge_agent --basestation`): the same ROUTER *binds*; the
                     agent's DEALER connects with a fixed routing id and announces itself (HELLO).
                   Requests to many agents are in flight at once; replies carry the request id.
    agent          ROUTER bound on `--bind` (it may have several peers: base station, pusher,
                   probes, so replies must be addressed), and/or a DEALER dialled out to
                   `--basestation` (exactly one peer).
    pusher         DEALER connected to an agent's ROUTER (`shard_tool push`).
Never REQ/REP: one lost reply wedges it.
Security (wire/keys.py): with keys, every link is CurveZMQ; the bound side admits listed
public keys only, and an agent answers EXPERT to compute keys and PUSH_* to pusher keys only.

Message = multipart [header, *payload]; ROUTER sockets add the peer's routing id in front.
    header    msgpack map; always "v" (PROTOCOL_VERSION), "kind", "id" (request id, int; a reply
              echoes it so late replies can be discarded).
    payload   raw tensor bytes, C order, no pickle: frame 0 = data, frame 1 = per-token float32
              scales when dtype is "int8".
Kinds and their extra header fields (each kind decoded and checked once: wire/messages.py):
    EXPERT        layer, experts [[expert_id, tokens], ...] (tokens of each expert, in frame
                  order), dtype (wire dtype of this tensor), shape [tokens, hidden],
                  reply_dtype (optional; default: dtype), prefetch (optional: a PREFETCH's
                  fields as a map {layer, experts, percent}: the hint for the agent's next
                  layer, carried by this request instead of a message of its own; taken once
                  the request's units are in hand; a malformed one is dropped, never fails the
                  request; agents before it ignore it, so no version change)
    EXPERT_REPLY  layer, experts, dtype, shape, compute_s (time spent computing on the box);
                  cache (only from an agent with --memory-budget): CACHE_FIELDS, in that order,
                  counted since the agent started (compute_s includes this request's stall)
    PREFETCH      layer, experts [expert_id, ...] (at most MAX_PREFETCH_EXPERTS): a hint that
                  these experts of that layer are needed soon; percent (optional) [0..100, ...]
                  how likely each is; fire-and-forget: no reply, ever (a wrong or garbled one
                  is dropped), no payload; sent only to agents whose info has memory_budget
                  (and its prefetch not false), and only to those the layer does not call
    PING          reply_bytes (optional: answer with that many bytes; else echo the payload)
    PONG          bytes
    INFO / INFO_REPLY   info {experts, layers, hidden, dtype, device, fingerprint, ...}
    HELLO         info: a dial-in agent's announcement (sent on every (re)connection)
    PUSH_BEGIN / PUSH_CHUNK / PUSH_END / PUSH_ACK   shard upload, see edge_agent/store.py
                  (optional fields, ignored by older peers, so no version change: PUSH_BEGIN
                  restart, PUSH_ACK prefix_sha256 of the bytes a resume would keep)
    ERROR         code (one of ERR_*), message; id is None when the request had none
"""

from __future__ import annotations

import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch
import zmq

from common.dtypes import canonical_dtype

PROTOCOL_VERSION = 1

# Message kinds
EXPERT = "expert"
EXPERT_REPLY = "expert_reply"
PING = "ping"
PONG = "pong"
INFO = "info"
INFO_REPLY = "info_reply"
HELLO = "hello"
PUSH_BEGIN = "push_begin"
PUSH_CHUNK = "push_chunk"
PUSH_END = "push_end"
PUSH_ACK = "push_ack"
ERROR = "error"
PREFETCH = "prefetch"
PUSH_KINDS = (PUSH_BEGIN, PUSH_CHUNK, PUSH_END)
REQUEST_KINDS = (EXPERT, PING, INFO, *PUSH_KINDS)
NO_REPLY_KINDS = (PREFETCH,)  # a message of these kinds that unpacks is never answered

# Memory-budgeted agents (edge_agent/expert_cache.py): a hint names at most this many experts
# (a layer of the largest MoE has 256); the reply's `cache` list holds these, in this order
MAX_PREFETCH_EXPERTS = 256
CACHE_FIELDS = ("hits", "misses", "stall_us", "loads", "evictions", "resident_bytes",
                "hinted_hits")

# Error codes carried by ERROR replies
ERR_MALFORMED = "malformed"
ERR_VERSION = "version"
ERR_UNKNOWN_KIND = "unknown_kind"
ERR_UNKNOWN_LAYER = "unknown_layer"
ERR_UNKNOWN_EXPERT = "unknown_expert"
ERR_SHAPE = "shape"
ERR_DTYPE = "dtype"
ERR_TOO_LARGE = "too_large"
ERR_NOT_READY = "not_ready"  # waiting for a pushed shard
ERR_PUSH = "push_refused"
ERR_NOT_ALLOWED = "not_allowed"  # the sender's key may not do this here (--keys roles)
ERR_INTERNAL = "internal"
ERR_NOT_FINITE = "not_finite"  # NaN or inf in an expert request's activations

# What an error reply or a log line repeats of a peer's value: its repr, cut to this (a
# 200,000-int `layer` was echoed whole, a 1.49 MB reply and log line)
SHOWN_CHARS = 80
MAX_ERROR_MESSAGE_CHARS = 400  # a whole error message, whatever it quotes

# Wire dtypes (the paper's epsilon: bytes per activation element)
WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int8": torch.int8,
}
DTYPE_NAME = {v: k for k, v in WIRE_DTYPES.items()}

# Liveness and flow control (measured values and reasons in the README, "Wire protocol")
HEARTBEAT_INTERVAL_S = 0.2
# A peer silent this long (no ZMTP traffic: libzmq's I/O thread answers heartbeats even while
# the agent computes) is gone. It is what tells dead from slow, so it sits above the stalls a
# live box has: a loaded CPU, a throttling GPU, a Wi-Fi retransmission burst, a process
# stopped for a few seconds (at 1 s, a SIGSTOP of 3 s cut the link and cost a fault drop).
# A box that closes or resets its connection (a crash, a kill) is noticed at once.
HEARTBEAT_TIMEOUT_S = 5.0
RECONNECT_INTERVAL_S = 0.1
RECONNECT_INTERVAL_MAX_S = 2.0  # capped exponential backoff (libzmq doubles up to this)
HWM_MESSAGES = 16  # HWM counts messages, not bytes: keep it small so a stalled peer costs little
# A frame's cap (libzmq's MAXMSGSIZE is per frame) and, checked by the agent, a whole message's;
# bytes in flight per peer are bounded from it (wire/peer_limits.py)
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_PAYLOAD_FRAMES = 2  # int8 activations (data + scales); every other kind carries 0 or 1


class ProtocolError(Exception):
    """A message that breaks the protocol. `code` is one of ERR_*; sent back as an ERROR reply."""

    def __init__(self, code: str, message: str):
        if len(message) > MAX_ERROR_MESSAGE_CHARS:
            message = message[:MAX_ERROR_MESSAGE_CHARS] + "..."
        super().__init__(message)
        self.code = code
        self.message = message


# reprlib cuts lists, maps, strings and nesting while it goes (a whole repr of a huge value
# is itself the slow part)
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel = 3
_SHOWN.maxtuple = _SHOWN.maxlist = _SHOWN.maxdict = _SHOWN.maxset = 8
_SHOWN.maxstring = _SHOWN.maxother = SHOWN_CHARS
_SHOWN.maxlong = 40


def shown(value: Any) -> str:
    """A peer's value as an error message or log line quotes it: repr, at most SHOWN_CHARS."""
    text = _SHOWN.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 3] + "..."


@dataclass(frozen=True)
class SocketConfig:
    heartbeat_interval_s: float = HEARTBEAT_INTERVAL_S
    heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S
    reconnect_interval_s: float = RECONNECT_INTERVAL_S
    reconnect_interval_max_s: float = RECONNECT_INTERVAL_MAX_S
    hwm_messages: int = HWM_MESSAGES
    max_message_bytes: int = MAX_MESSAGE_BYTES


def configure_socket(sock: zmq.Socket, config: SocketConfig = SocketConfig(),
                     immediate: bool = True) -> None:
    """Apply the options every socket of this system needs, before bind/connect."""
    sock.setsockopt(zmq.LINGER, 0)  # default linger is infinite: term() would hang
    sock.setsockopt(zmq.SNDHWM, config.hwm_messages)
    sock.setsockopt(zmq.RCVHWM, config.hwm_messages)
    sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
    sock.setsockopt(zmq.HEARTBEAT_IVL, int(config.heartbeat_interval_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(config.heartbeat_timeout_s * 1000))
    sock.setsockopt(zmq.HEARTBEAT_TTL, int(config.heartbeat_timeout_s * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL, int(config.reconnect_interval_s * 1000))
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(config.reconnect_interval_max_s * 1000))
    # IMMEDIATE: no queueing for peers that are not there (requests would arrive stale).
    # Measured on libzmq 4.3.5: a ROUTER with IMMEDIATE=1 ignores CONNECT_ROUTING_ID, so the
    # base station's ROUTER turns it off and relies on request ids + small HWM instead.
    sock.setsockopt(zmq.IMMEDIATE, 1 if immediate else 0)
    if sock.type == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to a gone peer raises, not vanishes
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer with the same id takes over


# ---------------------------------------------------------------------------------------------
# Header and frames


def pack(kind: str, request_id: int | None, **fields: Any) -> bytes:
    fields.update(v=PROTOCOL_VERSION, kind=kind, id=request_id)
    return msgpack.packb(fields)


def unpack(frame) -> dict:
    """Decode and check a header frame. Raises ProtocolError (malformed, version)."""
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 (msgpack raises many types on garbage)
        raise ProtocolError(ERR_MALFORMED, "header is not msgpack") from None
    if not isinstance(header, dict):
        raise ProtocolError(ERR_MALFORMED, "header is not a map")
    version = header.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # not True, not 1.0
        raise ProtocolError(ERR_VERSION, f"protocol version {shown(version)} is not "
                                         f"{PROTOCOL_VERSION}")
    if not isinstance(header.get("kind"), str):
        raise ProtocolError(ERR_MALFORMED, "header has no kind")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, int):
        raise ProtocolError(ERR_MALFORMED, "request id is not an integer")
    header["id"] = request_id  # readers index it: a header without one has None (fuzzer find)
    return header


def check_frames(frames: Sequence, max_message_bytes: int) -> None:
    """A received message's shape before anything reads it: a header and at most
    MAX_PAYLOAD_FRAMES, `max_message_bytes` in all (libzmq's MAXMSGSIZE caps each frame only).
    Raises ProtocolError (ERR_MALFORMED, ERR_TOO_LARGE)."""
    if len(frames) > 1 + MAX_PAYLOAD_FRAMES:
        raise ProtocolError(ERR_MALFORMED, f"{len(frames)} frames; a message is a header and at "
                                           f"most {MAX_PAYLOAD_FRAMES} payload frames")
    total = sum(len(f) for f in frames)
    if total > max_message_bytes:
        raise ProtocolError(ERR_TOO_LARGE, f"a message of {total} bytes, over the "
                                           f"{max_message_bytes}-byte cap")


def request_id_of(frame) -> int | None:
    """Best-effort request id of a header that failed to unpack (for the error reply)."""
    try:
        header = msgpack.unpackb(frame, raw=False)
        request_id = header.get("id") if isinstance(header, dict) else None
        return request_id if isinstance(request_id, int) else None
    except Exception:  # noqa: BLE001 (garbage: no id)
        return None


def wire_dtype_name(name: str) -> str:
    """Canonical wire dtype name. Raises ProtocolError(ERR_DTYPE)."""
    if type(name) is str and name in WIRE_DTYPES:  # the common case: already canonical
        return name
    name = canonical_dtype(name) if isinstance(name, str) else name
    if not isinstance(name, str) or name not in WIRE_DTYPES:  # a list or map: not a name
        raise ProtocolError(ERR_DTYPE, f"unknown wire dtype {str(name)[:40]!r}")
    return name


def _bytes_view(tensor: torch.Tensor):
    """A contiguous tensor's bytes as a buffer, without a copy (numpy has no bfloat16)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()


def encode_tensor(x: torch.Tensor, dtype: str) -> tuple[list, dict]:
    """[T, H] activations -> (payload frames, header fields) in wire dtype `dtype`.

    int8 is symmetric per token: x ~= q * scale, scale = max|x| / 127 (frame 1: float32 [T]).
    """
    dtype = wire_dtype_name(dtype)
    fields = {"dtype": dtype, "shape": list(x.shape)}
    if not x.is_cpu:
        x = x.cpu()
    if dtype == "int8":
        xf = x.float()
        scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127.0  # [T, 1]
        q = torch.round(xf / scale).clamp_(-127, 127).to(torch.int8)
        return [_bytes_view(q), _bytes_view(scale.reshape(-1))], fields
    wire = WIRE_DTYPES[dtype]
    if x.dtype != wire:
        x = x.to(wire)
    if wire is not torch.bfloat16 and x.is_contiguous():
        return [x.numpy()], fields  # the common case, one call: numpy shares the memory
    return [_bytes_view(x)], fields


# wire dtypes numpy has: numpy wraps and shapes their frames, ~3 us a reply less than
# torch.frombuffer and view (measured on decode's [1, 256] replies); torch shares the memory
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int8: np.int8}


def _frame_tensor(frame, dtype: torch.dtype, shape: tuple[int, int]
                  ) -> tuple[torch.Tensor, bool]:
    """(tensor of `shape`, whether it is a view of the frame's memory rather than a copy)."""
    # a received zmq.Frame, or any buffer (bytes, a numpy array: flattened to its bytes)
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame).cast("B")
    itemsize = dtype.itemsize
    count = shape[0] * shape[1]
    if buffer.nbytes != count * itemsize:
        raise ProtocolError(ERR_SHAPE, f"payload is {buffer.nbytes} bytes, header implies "
                                       f"{count * itemsize}")
    if count == 0:
        return torch.empty(shape, dtype=dtype), False
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is not None:
        array = np.frombuffer(buffer, numpy_dtype)  # no copy: wraps the received frame
        if array.flags.aligned:
            return torch.from_numpy(array.reshape(shape)), not buffer.readonly
    tensor = torch.frombuffer(buffer, dtype=dtype)  # no copy: wraps the received frame
    if tensor.data_ptr() % itemsize:  # tiny frames live inside the message struct, unaligned
        return tensor.clone().view(shape), False
    return tensor.view(shape), not buffer.readonly


def decode_tensor(header: dict, frames: Sequence, hidden: int | None = None) -> torch.Tensor:
    """Payload frames -> [T, H] tensor (wire dtype; int8 is dequantised to float32).

    Raises ProtocolError (ERR_DTYPE, ERR_SHAPE, ERR_MALFORMED) on any mismatch.
    """
    return decode_tensor_view(header, frames, hidden)[0]


def decode_tensor_view(header: dict, frames: Sequence, hidden: int | None = None
                       ) -> tuple[torch.Tensor, bool]:
    """decode_tensor, and whether the tensor is a view of frame 0's memory (writable when the
    frame is a received zmq.Frame: the agent answers in it)."""
    return frames_tensor(wire_dtype_name(header.get("dtype")), header.get("shape"), frames,
                         hidden)


def frames_tensor(dtype: str, shape, frames: Sequence, hidden: int | None = None
                  ) -> tuple[torch.Tensor, bool]:
    """decode_tensor_view of a canonical wire dtype (wire_dtype_name) and a header's shape.
    Raises ProtocolError (ERR_SHAPE, ERR_MALFORMED)."""
    # spelt out, not all(...) over a generator: this runs for every request and reply;
    # type() is int, not True (view() raises on a bool)
    if (type(shape) is not list or len(shape) != 2 or type(shape[0]) is not int
            or type(shape[1]) is not int or shape[0] < 0 or shape[1] < 0):
        raise ProtocolError(ERR_SHAPE, f"shape {shown(shape)} is not [tokens, hidden]")
    tokens, width = shape
    if hidden is not None and width != hidden:
        raise ProtocolError(ERR_SHAPE, f"hidden size {width} is not {hidden}")
    expected_frames = 2 if dtype == "int8" else 1
    if len(frames) != expected_frames:
        raise ProtocolError(ERR_MALFORMED, f"{len(frames)} payload frames, {dtype} needs "
                                           f"{expected_frames}")
    x, is_view = _frame_tensor(frames[0], WIRE_DTYPES[dtype], (tokens, width))
    if dtype == "int8":
        scale = _frame_tensor(frames[1], torch.float32, (tokens, 1))[0]
        return x.float() * scale, False
    return x, is_view


def prefetch_fields(layer: int, experts, percent=None) -> dict:
    """The header fields of a PREFETCH (AgentClient.send(peer, PREFETCH, **fields))."""
    fields = {"layer": int(layer),
              "experts": [int(e) for e in experts][:MAX_PREFETCH_EXPERTS]}
    if percent is not None:
        fields["percent"] = [min(100, max(0, int(p))) for p in percent][:MAX_PREFETCH_EXPERTS]
    return fields


def cache_figures(value) -> dict | None:
    """An expert reply's `cache` list as {CACHE_FIELDS name: int}, or None when it is absent or
    malformed (figures for humans: a bad one is ignored, not an error)."""
    if (not isinstance(value, list) or len(value) != len(CACHE_FIELDS)
            or not all(type(v) is int and v >= 0 for v in value)):  # inline: per reply
        return None
    return dict(zip(CACHE_FIELDS, value))


def error_header(request_id: int | None, code: str, message: str) -> bytes:
    if len(message) > MAX_ERROR_MESSAGE_CHARS:
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "..."
    return pack(ERROR, request_id, code=code, message=message)

"""Typed wire messages: each kind decoded once, every field checked, from (header, payload).

`protocol.unpack` checks what every message has (version, kind, id); `decode` (or a class's
own `decode`) checks the rest of one kind and returns a frozen message whose fields readers use
as they are. A check that fails raises ProtocolError with the code and message the agent sends
back in its ERROR reply. Encoding stays `protocol.pack(kind, id, **fields)`: the wire format
(msgpack maps, raw tensor frames) is the same for peers that never heard of these classes.
Requests are checked against what the receiving agent serves (`Bounds`); replies need nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

from wire import protocol as P
from wire.protocol import (
    ERR_MALFORMED,
    ERR_NOT_FINITE,
    ERR_PUSH,
    ERR_SHAPE,
    ERR_TOO_LARGE,
    ERR_UNKNOWN_EXPERT,
    ERR_UNKNOWN_KIND,
    ERR_UNKNOWN_LAYER,
    MAX_MESSAGE_BYTES,
    MAX_PREFETCH_EXPERTS,
    ProtocolError,
    cache_figures,
    frames_tensor,
    shown,
    wire_dtype_name,
)

EXPERTS_SHAPE = "experts must be [[expert_id, tokens], ...]"


@dataclass(frozen=True, slots=True)
class Bounds:
    """What an agent checks requests against. `experts`: the ones it hosts (quoted in
    errors); `moe_layers` and `hidden`: its model's, once loaded (empty, None before)."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    experts: tuple[int, ...] = ()
    moe_layers: tuple[int, ...] = ()
    hidden: int | None = None


# -- requests ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpertRequest:
    id: int | None
    layer: int
    experts: list  # [[expert_id, tokens], ...] as received (the reply echoes it)
    dtype: str  # canonical wire dtype of `x`
    shape: list  # [tokens, hidden] as received
    reply_dtype: str
    prefetch: Any  # the next layer's hint as carried (a map), unchecked: see Prefetch.decode
    x: torch.Tensor  # [T, D] (int8 dequantised to float32)
    x_is_view: bool  # `x` is frame 0's memory (writable for a received zmq.Frame)

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds) -> ExpertRequest:
        """Raises ProtocolError (unknown_layer, malformed, unknown_expert, shape, dtype,
        not_finite), in that order of checks."""
        layer, experts = header.get("layer"), header.get("experts")
        if not _plain_int(layer) or layer not in bounds.moe_layers:
            raise ProtocolError(ERR_UNKNOWN_LAYER, f"layer {shown(layer)} has no routed experts "
                                                   f"(MoE layers: {list(bounds.moe_layers)})")
        if not isinstance(experts, list) or not experts:
            raise ProtocolError(ERR_MALFORMED, EXPERTS_SHAPE)
        total_tokens = 0
        for entry in experts:
            if not isinstance(entry, list) or len(entry) != 2:
                raise ProtocolError(ERR_MALFORMED, EXPERTS_SHAPE)
            expert, tokens = entry
            if not _plain_int(expert) or expert not in bounds.experts:
                raise ProtocolError(ERR_UNKNOWN_EXPERT, f"expert {shown(expert)} is not hosted "
                                                        f"here (hosted: {list(bounds.experts)})")
            if not _plain_int(tokens) or tokens < 0:
                raise ProtocolError(ERR_SHAPE, f"token count {shown(tokens)} of expert {expert}")
            total_tokens += tokens
        dtype, shape = wire_dtype_name(header.get("dtype")), header.get("shape")
        x, is_view = frames_tensor(dtype, shape, frames, bounds.hidden)
        if total_tokens != x.shape[0]:
            raise ProtocolError(ERR_SHAPE, f"token counts sum to {total_tokens}, shape has "
                                           f"{x.shape[0]} tokens")
        # NaN or inf anywhere makes the sum so (one reduction, not a mask): a peer's NaN was
        # computed and returned. A finite sum past float range is no activation either.
        if not math.isfinite(float(x.sum(dtype=torch.float32))):
            raise ProtocolError(ERR_NOT_FINITE, "the activations hold NaN or inf; refused")
        reply_dtype = wire_dtype_name(header.get("reply_dtype") or dtype)
        return cls(header["id"], layer, experts, dtype, shape, reply_dtype,
                   header.get("prefetch"), x, is_view)


@dataclass(frozen=True, slots=True)
class Prefetch:
    """A hint (PREFETCH, or an EXPERT's `prefetch` map): these experts of `layer` are needed
    soon. Fire-and-forget, so no id: nothing answers it."""

    layer: int
    experts: tuple[int, ...]
    percent: tuple[int, ...] | None = None  # how likely each expert is; None: sure

    @classmethod
    def decode(cls, header: Any, frames: Sequence = (), bounds: Bounds | None = None
               ) -> Prefetch:
        """Raises ProtocolError (malformed, too_large)."""
        if not isinstance(header, dict):
            raise ProtocolError(ERR_MALFORMED, "a prefetch hint must be a map")
        layer, experts = header.get("layer"), header.get("experts")
        if frames:
            raise ProtocolError(ERR_MALFORMED, "a prefetch hint carries no payload")
        if not _plain_int(layer) or layer < 0:
            raise ProtocolError(ERR_MALFORMED, f"prefetch layer {str(layer)[:20]!r} is not a "
                                               "layer")
        if not isinstance(experts, list):
            raise ProtocolError(ERR_MALFORMED, "prefetch experts must be [expert_id, ...]")
        if len(experts) > MAX_PREFETCH_EXPERTS:
            raise ProtocolError(ERR_TOO_LARGE, f"a prefetch hint of {len(experts)} experts (at "
                                               f"most {MAX_PREFETCH_EXPERTS})")
        if not all(_plain_int(e) and e >= 0 for e in experts):
            raise ProtocolError(ERR_MALFORMED, "prefetch experts must be [expert_id, ...]")
        percent = header.get("percent")
        if percent is not None and (not isinstance(percent, list) or len(percent) != len(experts)
                                    or not all(_plain_int(p) and 0 <= p <= 100 for p in percent)):
            raise ProtocolError(ERR_MALFORMED, "prefetch percent must be [0..100, ...], one per "
                                               "expert")
        return cls(layer, tuple(experts), None if percent is None else tuple(percent))


@dataclass(frozen=True, slots=True)
class Ping:
    id: int | None
    reply_bytes: int | None  # answer with that many zero bytes; None: echo the payload
    payload: list

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds = Bounds()) -> Ping:
        """Raises ProtocolError (too_large: a reply over the receiver's message cap)."""
        reply_bytes = header.get("reply_bytes")
        if reply_bytes is not None and (not _plain_int(reply_bytes)  # True is not 1 byte
                                        or not 0 <= reply_bytes <= bounds.max_message_bytes):
            raise ProtocolError(ERR_TOO_LARGE, f"reply_bytes {shown(reply_bytes)} is out of "
                                               "range")
        return cls(header["id"], reply_bytes, list(frames))


@dataclass(frozen=True, slots=True)
class Info:
    id: int | None

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds | None = None) -> Info:
        return cls(header["id"])


@dataclass(frozen=True, slots=True)
class PushBegin:
    id: int | None
    expert: int
    manifest: bytes  # manifest.json as pushed (edge_agent/store.py checks what it says)
    restart: bool = False  # drop what the store holds of this shard, start at 0

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds) -> PushBegin:
        """Raises ProtocolError(push_refused)."""
        expert = _pushed_expert(header, bounds)
        if len(frames) != 1:
            raise ProtocolError(ERR_PUSH, "push_begin carries the manifest as one frame")
        return cls(header["id"], expert, bytes(_buffer(frames[0])),
                   header.get("restart") is True)


@dataclass(frozen=True, slots=True)
class PushChunk:
    id: int | None
    expert: int
    offset: int
    sha256: str  # of `data`, hex
    data: Any  # a buffer (memoryview or bytes): the frame's memory, not a copy

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds) -> PushChunk:
        """Raises ProtocolError(push_refused)."""
        expert = _pushed_expert(header, bounds)
        offset, digest = header.get("offset"), header.get("sha256")
        if len(frames) != 1 or not isinstance(offset, int) or not isinstance(digest, str):
            raise ProtocolError(ERR_PUSH, "push_chunk needs offset, sha256 and one data frame")
        return cls(header["id"], expert, offset, digest, _buffer(frames[0]))


@dataclass(frozen=True, slots=True)
class PushEnd:
    id: int | None
    expert: int

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds) -> PushEnd:
        """Raises ProtocolError(push_refused)."""
        return cls(header["id"], _pushed_expert(header, bounds))


# -- replies and announcements ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExpertReply:
    id: int | None
    layer: Any  # echoes of the request, not checked (the sender knows what it asked)
    experts: Any
    dtype: str  # wire dtype the agent answered in
    compute_s: float  # seconds on the box (a number; whether believable is the caller's call)
    cache: dict | None  # a memory-budgeted agent's counters (protocol.cache_figures); else None
    tensor: torch.Tensor  # [T, H], a view of the reply's frame where the dtype allows

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds | None = None
               ) -> ExpertReply:
        """Raises ProtocolError (malformed, dtype, shape)."""
        compute_s = header.get("compute_s")
        if type(compute_s) is not float and not _plain_int(compute_s):
            raise ProtocolError(ERR_MALFORMED, f"compute_s {shown(compute_s)} is not a number")
        dtype = wire_dtype_name(header.get("dtype"))
        tensor = frames_tensor(dtype, header.get("shape"), frames)[0]
        # cls(...), at half the cost: see _slot_setters
        reply = _new(cls)
        _reply_id(reply, header["id"])
        _reply_layer(reply, header.get("layer"))
        _reply_experts(reply, header.get("experts"))
        _reply_dtype(reply, dtype)
        _reply_compute_s(reply, compute_s)
        _reply_cache(reply, cache_figures(header["cache"]) if "cache" in header else None)
        _reply_tensor(reply, tensor)
        return reply


def _slot_setters(cls: type) -> tuple:
    """The setters of a frozen dataclass's slots, in field order. Its generated __init__ sets
    each field through object.__setattr__; setting the slots directly halves the cost of an
    ExpertReply's 7 fields (measured), and the base station builds hundreds a second."""
    return tuple(cls.__dict__[f.name].__set__ for f in dataclasses.fields(cls))


_new = object.__new__
(_reply_id, _reply_layer, _reply_experts, _reply_dtype, _reply_compute_s, _reply_cache,
 _reply_tensor) = _slot_setters(ExpertReply)


@dataclass(frozen=True, slots=True)
class Pong:
    id: int | None
    bytes: int
    payload: list

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds | None = None) -> Pong:
        """Raises ProtocolError(malformed)."""
        size = header.get("bytes")
        if not _plain_int(size) or size < 0:
            raise ProtocolError(ERR_MALFORMED, f"pong bytes {shown(size)} is not a size")
        return cls(header["id"], size, list(frames))


@dataclass(frozen=True, slots=True)
class InfoReply:
    id: int | None
    info: dict  # what the agent reports of itself (edge_agent/host.py): read, never trusted

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds | None = None) -> InfoReply:
        """Raises ProtocolError(malformed)."""
        info = header.get("info")
        if not isinstance(info, dict):
            raise ProtocolError(ERR_MALFORMED, f"{header['kind']} info is not a map")
        return cls(header["id"], info)


@dataclass(frozen=True, slots=True)
class Hello:
    """A dial-in agent's announcement; its info as INFO_REPLY's ({} when it sent none)."""

    id: int | None
    info: dict

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds | None = None) -> Hello:
        """Raises ProtocolError(malformed)."""
        if header.get("info") is None:
            return cls(header["id"], {})
        return cls(header["id"], InfoReply.decode(header, frames).info)


@dataclass(frozen=True, slots=True)
class PushAck:
    id: int | None
    expert: Any  # echoed
    offset: int  # bytes the agent holds: where the next chunk starts
    bytes: int | None  # the whole shard's size
    complete: bool  # checked and in place
    prefix_sha256: str | None  # of the `offset` bytes a resume keeps (None: older agents)
    serving: bool  # (PUSH_END) the agent loaded all its experts and serves

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds | None = None) -> PushAck:
        """Raises ProtocolError(malformed)."""
        offset, size, prefix = header.get("offset"), header.get("bytes"), \
            header.get("prefix_sha256")
        if not _plain_int(offset) or offset < 0 or (size is not None and not _plain_int(size)):
            raise ProtocolError(ERR_MALFORMED, f"push ack offset {shown(offset)} of "
                                               f"{shown(size)} bytes is not a byte offset")
        if prefix is not None and not isinstance(prefix, str):
            raise ProtocolError(ERR_MALFORMED, "push ack prefix_sha256 is not a hex digest")
        return cls(header["id"], header.get("expert"), offset, size,
                   bool(header.get("complete")), prefix, bool(header.get("serving")))


@dataclass(frozen=True, slots=True)
class Error:
    id: int | None
    code: str  # one of protocol.ERR_* from a sound peer; whatever it sent, as text
    message: str

    @classmethod
    def decode(cls, header: dict, frames: Sequence, bounds: Bounds | None = None) -> Error:
        """Never raises: an error reply is an error whatever its fields hold."""
        return cls(header["id"], str(header.get("code")), str(header.get("message")))


Message = Union[ExpertRequest, Prefetch, Ping, Info, PushBegin, PushChunk, PushEnd,
                ExpertReply, Pong, InfoReply, Hello, PushAck, Error]

DECODERS: dict[str, Callable[..., Message]] = {
    P.EXPERT: ExpertRequest.decode, P.PREFETCH: Prefetch.decode, P.PING: Ping.decode,
    P.INFO: Info.decode, P.PUSH_BEGIN: PushBegin.decode, P.PUSH_CHUNK: PushChunk.decode,
    P.PUSH_END: PushEnd.decode, P.EXPERT_REPLY: ExpertReply.decode, P.PONG: Pong.decode,
    P.INFO_REPLY: InfoReply.decode, P.HELLO: Hello.decode, P.PUSH_ACK: PushAck.decode,
    P.ERROR: Error.decode,
}


def decode(header: dict, frames: Sequence = (), bounds: Bounds = Bounds()) -> Message:
    """An unpacked header (protocol.unpack) and its payload frames -> the typed message of its
    kind; requests are checked against `bounds`. Raises ProtocolError (unknown_kind, and the
    codes of each kind's decode)."""
    decoder = DECODERS.get(header["kind"])
    if decoder is None:
        raise ProtocolError(ERR_UNKNOWN_KIND, f"unknown message kind {shown(header['kind'])}")
    return decoder(header, frames, bounds)


def _pushed_expert(header: dict, bounds: Bounds) -> int:
    expert = header.get("expert")
    if not isinstance(expert, int) or expert not in bounds.experts:
        raise ProtocolError(ERR_PUSH, f"this agent hosts experts {list(bounds.experts)}, not "
                                      f"{shown(expert)}")
    return expert


def _buffer(frame):
    """A received zmq.Frame's memory, or any buffer, without a copy."""
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _plain_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is not layer 1

"""Random and mutated protocol messages for tests/test_fuzz.py. A fixed seed gives the same
cases on every run; each case is a list of frames a DEALER sends (or raw bytes for ZMTP).

A case starts as a valid message of some kind and then, most of the time, is broken in one to
three ways: a header field dropped, retyped or added; the version, kind or id changed; payload
frames dropped, added, cut short, grown or flipped; the packed header itself damaged; too many
frames; a message over the whole-message cap. Issue 20 added: `v` as true or 1.0, NaN and inf
in an expert request's activations, and fields so long that echoing them whole is the bug.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import struct

import msgpack
import torch
import zmtp_raw

from shard_tool.manifest import Manifest
from wire import protocol as P

REQUEST_KINDS = (P.EXPERT, P.PING, P.INFO, P.PUSH_BEGIN, P.PUSH_CHUNK, P.PUSH_END)
# what arrives at a base station's dial-in port
REPLY_KINDS = (P.HELLO, P.EXPERT_REPLY, P.PONG, P.INFO_REPLY, P.PUSH_ACK, P.ERROR)
ALL_KINDS = REQUEST_KINDS + REPLY_KINDS


class MessageFuzzer:
    """`hidden`, `experts`, `layers`: the model the valid messages address; `manifests`:
    manifest.json bytes a PUSH_BEGIN may carry; `shard`: bytes a PUSH_CHUNK may carry;
    `frame_cap`: libzmq's per-frame cap on the receiver (a frame over it only drops the
    connection, so cases stay under it); `info`: a valid HELLO / INFO_REPLY body."""

    def __init__(self, seed: int, hidden: int, experts: tuple[int, ...], layers: int,
                 frame_cap: int, manifests: tuple[bytes, ...] = (), shard: bytes = b"",
                 info: dict | None = None):
        self.rng = random.Random(seed)
        self.hidden, self.experts, self.layers = hidden, experts, layers
        self.frame_cap = frame_cap
        self.manifests, self.shard = manifests, shard
        self.info = info or {}
        self.next_id = 1

    # -- values -----------------------------------------------------------------------------

    def junk(self, depth: int = 0):
        """Any value msgpack can carry, biased to the ones code forgets."""
        r = self.rng
        pick = r.randrange(14 if depth < 2 else 10)
        if pick == 0:
            return None
        if pick == 1:
            return r.choice([True, False])
        if pick == 2:
            return r.choice([0, -1, 1, 2**31, -2**31, 2**63 - 1, -2**63, 2**64 - 1])
        if pick == 3:
            return r.randrange(-1000, 1000)
        if pick == 4:
            return r.choice([math.nan, math.inf, -math.inf, -0.0, 1e308, 1e-300, 0.5])
        if pick == 5:
            return r.choice(["", "float32", "int8", "bfloat16", "complex64", "x" * 300,
                             "\u00e9\u0000\u2603", P.EXPERT, P.PING, P.PUSH_BEGIN])
        if pick == 6:
            return r.randbytes(r.randrange(0, 40))
        if pick in (7, 8):
            return r.randrange(0, 10)
        if pick == 9:
            return "".join(chr(r.randrange(32, 0x3000)) for _ in range(r.randrange(0, 12)))
        if pick == 10:
            return [self.junk(depth + 1) for _ in range(r.randrange(0, 4))]
        if pick == 11:
            return [[self.junk(depth + 1), self.junk(depth + 1)] for _ in range(r.randrange(1, 3))]
        if pick == 12:
            return {str(self.junk(depth + 1))[:20]: self.junk(depth + 1)
                    for _ in range(r.randrange(0, 3))}
        return [r.randrange(-2, 70) for _ in range(r.randrange(0, 3))]

    # -- valid messages ----------------------------------------------------------------------

    def valid(self, kind: str) -> tuple[dict, list[bytes]]:
        """Header fields beyond v/kind/id, and payload frames, of a valid `kind` message."""
        r = self.rng
        if kind in (P.EXPERT, P.EXPERT_REPLY):
            tokens = r.randrange(0, 9)
            dtype = r.choice(list(P.WIRE_DTYPES))
            x = torch.randn(tokens, self.hidden)
            if kind == P.EXPERT and tokens and r.random() < 0.1:  # int8: its scale turns NaN
                x[r.randrange(tokens), r.randrange(self.hidden)] = r.choice(
                    [math.nan, math.inf, -math.inf])
            frames, fields = P.encode_tensor(x, dtype)
            if len(self.experts) > 1 and r.random() < 0.5:  # two experts' tokens back to back
                first, second = r.sample(self.experts, 2)
                split = r.randrange(0, tokens + 1)
                experts = [[first, split], [second, tokens - split]]
            else:
                experts = [[r.choice(self.experts), tokens]]
            fields.update(layer=r.randrange(self.layers), experts=experts)
            if kind == P.EXPERT_REPLY:
                fields["compute_s"] = r.random() * 1e-3
            elif r.random() < 0.3:
                fields["reply_dtype"] = r.choice(list(P.WIRE_DTYPES))
            if kind == P.EXPERT and r.random() < 0.3:  # the next layer's hint, carried along
                hinted = r.sample(self.experts, r.randrange(1, len(self.experts) + 1))
                fields["prefetch"] = self.junk() if r.random() < 0.3 else P.prefetch_fields(
                    r.randrange(self.layers), hinted, [r.randrange(101) for _ in hinted])
            return fields, [f.tobytes() for f in frames]  # numpy arrays
        if kind in (P.PING, P.PONG):
            if kind == P.PING and r.random() < 0.3:
                return {"reply_bytes": r.randrange(0, 4096)}, []
            payload = [r.randbytes(r.randrange(0, 2048))] if r.random() < 0.5 else []
            return {"bytes": sum(map(len, payload))} if kind == P.PONG else {}, payload
        if kind in (P.INFO_REPLY, P.HELLO):
            return {"info": dict(self.info)}, []
        if kind == P.PUSH_BEGIN:
            return {"expert": r.choice(self.experts)}, [self.manifest()]
        if kind == P.PUSH_CHUNK:
            offset = r.choice([0, 0, 65536, r.randrange(0, max(1, len(self.shard)))])
            data = self.shard[offset:offset + r.randrange(1, 65537)] if self.shard and \
                r.random() < 0.5 else r.randbytes(r.randrange(0, 65536))
            return {"expert": r.choice(self.experts), "offset": offset,
                    "sha256": hashlib.sha256(data).hexdigest()}, [data]
        if kind in (P.PUSH_END, P.PUSH_ACK):
            return {"expert": r.choice(self.experts)}, []
        if kind == P.ERROR:
            return {"code": r.choice([P.ERR_MALFORMED, P.ERR_INTERNAL, "x"]),
                    "message": "fuzz"}, []
        return {}, []  # INFO

    def manifest(self) -> bytes:
        """A manifest: a given one, one with an entry changed (fingerprint kept consistent or
        not), broken JSON, or not JSON."""
        r = self.rng
        if not self.manifests:
            return r.randbytes(r.randrange(0, 200))
        data = r.choice(self.manifests)
        pick = r.randrange(6)
        if pick <= 1:
            return data
        if pick == 2:
            return data[:r.randrange(len(data))]
        if pick == 3:
            return r.randbytes(r.randrange(0, 300))
        if pick == 4:  # an entry changed, the fingerprint left as it was
            doc = json.loads(data)
            entry = r.choice(doc["files"])
            entry[r.choice(["bytes", "sha256", "path", "expert", "role"])] = self.junk()
            return json.dumps(doc, default=str).encode()
        # an entry changed and the fingerprint made to match: the forger's best try
        manifest = Manifest.from_json(json.loads(data))
        victim = r.choice(manifest.files)
        changed = {r.choice(["bytes", "sha256", "path", "expert"]): self.junk()}
        if r.random() < 0.5:
            changed = {"bytes": r.choice([0, 1, 2**40, 2**63 - 1, victim.bytes + 1])}
        files = tuple(dataclasses.replace(e, **changed) if e is victim else e
                      for e in manifest.files)
        try:
            return json.dumps(dataclasses.replace(manifest, files=files).to_json()).encode()
        except (TypeError, ValueError):  # a value JSON cannot hold, or paths that do not sort
            return data

    # -- one case ---------------------------------------------------------------------------

    def case(self, kinds: tuple[str, ...] = REQUEST_KINDS, valid_share: float = 0.25
             ) -> list[bytes]:
        r = self.rng
        kind = r.choice(kinds) if r.random() < 0.97 else r.choice(ALL_KINDS + ("teleport",))
        fields, payload = self.valid(kind)
        request_id = self.next_id
        self.next_id += 1
        header = {"v": P.PROTOCOL_VERSION, "kind": kind, "id": request_id, **fields}
        if r.random() < valid_share:
            return [msgpack.packb(header)] + payload
        for _ in range(r.randrange(1, 4)):
            pick = r.randrange(10)
            if pick <= 2 and header:
                key = r.choice(list(header))
                if r.random() < 0.3:
                    del header[key]
                else:
                    header[key] = self.junk()
            elif pick == 3:
                header[str(self.junk())[:20]] = self.junk()
            elif pick == 4:
                key = r.choice(["v", "kind", "id"])
                header[key] = r.choice([True, 1.0]) if key == "v" and r.random() < 0.3 \
                    else self.junk()
                if r.random() < 0.02:  # a value whose whole repr is ~1 MB
                    header[r.choice(["layer", "kind", "experts", "v"])] = list(range(100_000))
            elif pick == 5 and payload:
                payload.pop(r.randrange(len(payload)))
            elif pick == 6:
                payload.insert(r.randrange(len(payload) + 1), r.randbytes(r.randrange(0, 300)))
            elif pick == 7 and payload:
                i = r.randrange(len(payload))
                frame = payload[i]
                payload[i] = frame[:r.randrange(len(frame) + 1)] if r.random() < 0.5 else \
                    frame + r.randbytes(r.randrange(1, 64))
            elif pick == 8 and payload and payload[0]:
                i = r.randrange(len(payload[0]))
                payload[0] = payload[0][:i] + bytes([payload[0][i] ^ 0xFF]) + payload[0][i + 1:]
            else:
                payload.extend(r.randbytes(r.randrange(0, 64)) for _ in range(r.randrange(1, 5)))
        try:
            packed = msgpack.packb(header)
        except (TypeError, ValueError, OverflowError):
            packed = msgpack.packb({"v": P.PROTOCOL_VERSION, "kind": kind})
        if r.random() < 0.15:  # damage the encoding itself
            pick = r.randrange(4)
            if pick == 0:
                packed = packed[:r.randrange(len(packed) + 1)]
            elif pick == 1 and packed:
                i = r.randrange(len(packed))
                packed = packed[:i] + bytes([r.randrange(256)]) + packed[i + 1:]
            elif pick == 2:
                packed = r.randbytes(r.randrange(0, 64))
            else:
                packed = msgpack.packb([header.get("v"), kind]) if r.random() < 0.5 else b""
        if r.random() < 0.01:  # over the whole-message cap, each frame under the frame cap
            payload = [bytes(self.frame_cap - 1024)] * 2
        return [packed] + payload


def raw_zmtp_case(rng: random.Random) -> tuple[str, bytes, bool]:
    """(name, bytes to send on a fresh TCP connection, whether to finish the handshake first)."""
    pick = rng.randrange(9)
    if pick == 0:
        return "random bytes", rng.randbytes(rng.randrange(1, 4096)), False
    if pick == 1:
        greeting = bytearray(zmtp_raw.GREETING)
        greeting[rng.randrange(len(greeting))] ^= 1 << rng.randrange(8)
        return "damaged greeting", bytes(greeting) + zmtp_raw.ready(), False
    if pick == 2:
        return "greeting cut short", zmtp_raw.GREETING[:rng.randrange(1, 64)], False
    if pick == 3:
        return "garbage after the handshake", rng.randbytes(rng.randrange(1, 2048)), True
    if pick == 4:  # a frame that says it is enormous: libzmq's frame cap drops the connection
        size = rng.choice([2**31, 2**40, 2**63 - 1, 2**64 - 1])
        return "enormous frame size", bytes([zmtp_raw.FLAG_LONG]) + struct.pack(">Q", size), True
    if pick == 5:  # a frame cut short, then the connection closes
        return "frame cut short", bytes([0, 200]) + rng.randbytes(rng.randrange(0, 200)), True
    if pick == 6:  # ZMTP commands, known and unknown, with any body
        name = rng.choice([b"PING", b"PONG", b"READY", b"ERROR", b"SUBSCRIBE", b"CANCEL",
                           rng.randbytes(rng.randrange(0, 20))])
        return "command", zmtp_raw.command(name, rng.randbytes(rng.randrange(0, 300))), True
    if pick == 7:  # many tiny frames of one message, never finished
        return "unfinished tiny frames", zmtp_raw.frame(b"x", more=True) * rng.randrange(1, 4000), \
            True
    return "a message split at any byte", zmtp_raw.message(
        [msgpack.packb({"v": P.PROTOCOL_VERSION, "kind": P.PING, "id": 1}),
         rng.randbytes(rng.randrange(0, 500))]), True

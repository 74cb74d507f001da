"""wire/messages.py: every kind decodes from what `protocol.pack` writes (the wire format is
the same maps and frames), each request's field checks raise the code the agent answers with,
and a reply's tensor stays a view of its frame."""

from __future__ import annotations

import pytest
import torch
import zmq

from wire import messages as M
from wire import protocol as P

BOUNDS = M.Bounds(max_message_bytes=1 << 20, experts=(0, 3), moe_layers=(1, 2), hidden=8)


def received(kind: str, request_id, frames=(), **fields) -> tuple[dict, list]:
    """(header, payload) as a receiver has them: unpacked, frames as zmq delivers them."""
    return P.unpack(P.pack(kind, request_id, **fields)), [
        zmq.Frame(bytes(memoryview(f).cast("B"))) for f in frames]


def expert_request(x: torch.Tensor, dtype: str = "float32", **changes) -> tuple[dict, list]:
    frames, fields = P.encode_tensor(x, dtype)
    fields = {"layer": 1, "experts": [[0, 2], [3, x.shape[0] - 2]], **fields, **changes}
    return received(P.EXPERT, 7, frames, **fields)


def test_every_kind_decodes_from_what_pack_writes():
    x = torch.randn(5, 8)
    request = M.decode(*expert_request(x, reply_dtype="bf16", prefetch={"layer": 2}), BOUNDS)
    assert isinstance(request, M.ExpertRequest) and request.id == 7 and request.layer == 1
    assert request.experts == [[0, 2], [3, 3]] and request.shape == [5, 8]
    assert (request.dtype, request.reply_dtype) == ("float32", "bfloat16")
    assert request.prefetch == {"layer": 2} and request.x_is_view
    assert torch.equal(request.x, x)

    frames, fields = P.encode_tensor(x, "bfloat16")
    reply = M.decode(*received(P.EXPERT_REPLY, 7, frames, layer=1, experts=[[0, 5]],
                               compute_s=0.25, cache=[1, 2, 3, 4, 5, 6, 7], **fields))
    assert isinstance(reply, M.ExpertReply) and reply.compute_s == 0.25
    assert reply.cache == dict(zip(P.CACHE_FIELDS, range(1, 8), strict=True))
    assert reply.tensor.dtype == torch.bfloat16 and torch.equal(reply.tensor,
                                                                x.to(torch.bfloat16))
    assert M.decode(*received(P.EXPERT_REPLY, 1, frames, compute_s=1, **fields)).cache is None

    assert M.decode(*received(P.PING, 1, [b"abc"]), BOUNDS).reply_bytes is None
    assert M.decode(*received(P.PING, 1, reply_bytes=10), BOUNDS).reply_bytes == 10
    assert M.decode(*received(P.PONG, 1, [b"abc"], bytes=3)).bytes == 3
    assert M.decode(*received(P.INFO, 4), BOUNDS) == M.Info(4)
    assert M.decode(*received(P.INFO_REPLY, 4, info={"experts": [3]})).info == {"experts": [3]}
    assert M.decode(*received(P.HELLO, 0)).info == {}
    assert M.decode(*received(P.PREFETCH, None, **P.prefetch_fields(2, [3, 0], [90, 10])),
                    BOUNDS) == M.Prefetch(2, (3, 0), (90, 10))
    begin = M.decode(*received(P.PUSH_BEGIN, 5, [b"{}"], expert=3, restart=True), BOUNDS)
    assert begin == M.PushBegin(5, 3, b"{}", True)
    chunk = M.decode(*received(P.PUSH_CHUNK, 5, [b"data"], expert=3, offset=4, sha256="ab"),
                     BOUNDS)
    assert (chunk.offset, chunk.sha256, bytes(chunk.data)) == (4, "ab", b"data")
    assert M.decode(*received(P.PUSH_END, 5, expert=3), BOUNDS) == M.PushEnd(5, 3)
    ack = M.decode(*received(P.PUSH_ACK, 5, expert=3, offset=4, bytes=9, prefix_sha256="ab"))
    assert ack == M.PushAck(5, 3, 4, 9, False, "ab", False)
    assert M.decode(*received(P.ERROR, None, code=P.ERR_SHAPE, message="no")) == M.Error(
        None, P.ERR_SHAPE, "no")


@pytest.mark.parametrize("changes,code,words", [
    ({"layer": 0}, P.ERR_UNKNOWN_LAYER, "layer 0 has no routed experts (MoE layers: [1, 2])"),
    ({"layer": True}, P.ERR_UNKNOWN_LAYER, "layer True"),
    ({"experts": []}, P.ERR_MALFORMED, "experts must be [[expert_id, tokens], ...]"),
    ({"experts": [[0, 2, 3]]}, P.ERR_MALFORMED, "experts must be"),
    ({"experts": [[5, 5]]}, P.ERR_UNKNOWN_EXPERT, "expert 5 is not hosted here (hosted: [0, 3])"),
    ({"experts": [[0, -1]]}, P.ERR_SHAPE, "token count -1 of expert 0"),
    ({"experts": [[0, 4]]}, P.ERR_SHAPE, "token counts sum to 4, shape has 5 tokens"),
    ({"dtype": "complex64"}, P.ERR_DTYPE, "unknown wire dtype"),
    ({"shape": [5, 9]}, P.ERR_SHAPE, "hidden size 9 is not 8"),
    ({"shape": [True, 8], "experts": [[0, 1]]}, P.ERR_SHAPE, "is not [tokens, hidden]"),
    ({"shape": [6, 8]}, P.ERR_SHAPE, "payload is 160 bytes, header implies 192"),
    ({"reply_dtype": "complex64"}, P.ERR_DTYPE, "unknown wire dtype"),
])
def test_an_expert_request_is_refused_with_the_code_the_agent_answers(changes, code, words):
    with pytest.raises(P.ProtocolError) as e:
        M.decode(*expert_request(torch.randn(5, 8), **changes), BOUNDS)
    assert e.value.code == code and words in e.value.message, e.value.message


def test_field_checks_of_the_other_kinds():
    x = torch.randn(3, 8)
    x[1, 2] = float("nan")
    cases = [
        (expert_request(x), P.ERR_NOT_FINITE),
        (received(P.PING, 1, reply_bytes=(1 << 20) + 1), P.ERR_TOO_LARGE),
        (received(P.PING, 1, reply_bytes="10"), P.ERR_TOO_LARGE),
        (received(P.PUSH_BEGIN, 1, [b"{}"], expert=5), P.ERR_PUSH),
        (received(P.PUSH_BEGIN, 1, expert=3), P.ERR_PUSH),
        (received(P.PUSH_CHUNK, 1, [b"x"], expert=3, offset="0", sha256="ab"), P.ERR_PUSH),
        (received(P.PUSH_END, 1, expert=[3]), P.ERR_PUSH),
        (received(P.PREFETCH, None, layer=1, experts=[1], percent=[101]), P.ERR_MALFORMED),
        (received(P.EXPERT_REPLY, 1, compute_s="0.1", dtype="float32", shape=[0, 8]),
         P.ERR_MALFORMED),
        (received(P.INFO_REPLY, 1, info=[1]), P.ERR_MALFORMED),
        (received(P.PUSH_ACK, 1, offset=-1), P.ERR_MALFORMED),
        (received(P.PONG, 1), P.ERR_MALFORMED),
        (received("gossip", 1), P.ERR_UNKNOWN_KIND),
    ]
    for (header, frames), code in cases:
        with pytest.raises(P.ProtocolError) as e:
            M.decode(header, frames, BOUNDS)
        assert e.value.code == code, (header, e.value.message)


def test_messages_are_frozen():
    message = M.decode(*received(P.PUSH_END, 5, expert=3), BOUNDS)
    with pytest.raises(AttributeError):
        message.expert = 0


def test_a_ping_carries_a_payload_and_asks_for_a_reply_size_at_once():
    """What `testbed linkcheck` measures one way with: a payload down and an empty PONG back
    (reply_bytes=0), or no payload and reply_bytes up; reply_bytes up to the receiver's cap."""
    ping = M.decode(*received(P.PING, 1, [b"x" * 1000], reply_bytes=0), BOUNDS)
    assert ping.reply_bytes == 0 and [bytes(f.buffer) for f in ping.payload] == [b"x" * 1000]
    assert M.decode(*received(P.PING, 1, reply_bytes=1 << 20), BOUNDS).reply_bytes == 1 << 20
    for bad in (-1, True, 1.5, [1]):
        with pytest.raises(P.ProtocolError) as e:
            M.decode(*received(P.PING, 1, reply_bytes=bad), BOUNDS)
        assert e.value.code == P.ERR_TOO_LARGE, bad
    pong = M.decode(*received(P.PONG, 1, [b""], bytes=0))
    assert pong.bytes == 0 and [len(f) for f in pong.payload] == [0]

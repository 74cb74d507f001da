"""Expert math and wire encoding, in process: checked against transformers' own Mixtral experts."""

from __future__ import annotations

import pytest
import torch
import zmq

from edge_agent.expert_math import ExpertWeights, expert_forward, swiglu
from edge_agent.shards import load_experts
from wire import protocol as P


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def transformers_expert(hf_model, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The library's MixtralExperts forward, routing every token to `expert` with weight 1."""
    experts = hf_model.model.layers[layer].mlp.experts
    index = torch.full((x.shape[0], 1), expert, dtype=torch.long)
    with torch.no_grad():
        return experts(x, index, torch.ones(x.shape[0], 1))


def assert_close_rel(actual, expected, rel=1e-5):
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert error <= rel * scale, f"max error {error} vs scale {scale}"


def test_swiglu_by_hand():
    # D = 1, F = 1: w2 * silu(w1 x) * w3 x with silu(a) = a * sigmoid(a)
    x, w1, w2, w3 = (torch.tensor([[v]]) for v in (2.0, 0.5, 3.0, -1.0))
    silu = 1.0 * torch.sigmoid(torch.tensor(1.0))
    assert torch.allclose(swiglu(x, w1, w2, w3), 3.0 * silu * -2.0)
    fused = ExpertWeights.from_w123(w1, w2, w3)
    assert torch.allclose(expert_forward(x, fused), swiglu(x, w1, w2, w3))


def test_loaded_expert_matches_transformers(tiny_split, hf_model):
    loaded = load_experts(tiny_split, [0, 5], device="cpu")
    assert loaded.experts == [0, 5] and loaded.dtype == torch.float32
    torch.manual_seed(1)
    x = torch.randn(7, loaded.hidden_size)
    assert loaded.moe_layers == tuple(range(loaded.num_layers))  # Mixtral: every layer
    for layer in loaded.moe_layers:
        for expert in (0, 5):
            ours = expert_forward(x, loaded.weights[expert][layer])
            assert_close_rel(ours, transformers_expert(hf_model, layer, expert, x))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_tensor_framing_round_trip_without_copies(dtype):
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://framing")
        b.connect("inproc://framing")
        x = torch.randn(300, 64)
        frames, fields = P.encode_tensor(x, dtype)
        a.send_multipart([P.pack(P.EXPERT, 1, **fields), *frames], copy=False)
        got = b.recv_multipart(copy=False)
        header = P.unpack(got[0].buffer)
        y = P.decode_tensor(header, got[1:], hidden=64)
        tolerance = {"float32": 0, "bfloat16": 1e-2, "float16": 1e-3, "int8": 1e-2}[dtype]
        if tolerance:
            assert_close_rel(y, x, rel=tolerance)
        else:
            assert torch.equal(y, x)
        if dtype != "int8":  # the tensor wraps the received frame's memory
            assert y.data_ptr() == torch.frombuffer(got[1].buffer, dtype=torch.uint8).data_ptr()
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_header_checks():
    with pytest.raises(P.ProtocolError) as e:
        P.unpack(b"\xc1garbage")
    assert e.value.code == P.ERR_MALFORMED
    import msgpack

    with pytest.raises(P.ProtocolError) as e:
        P.unpack(msgpack.packb({"v": 99, "kind": P.PING, "id": 1}))
    assert e.value.code == P.ERR_VERSION
    with pytest.raises(P.ProtocolError) as e:
        P.decode_tensor({"dtype": "complex64", "shape": [1, 1]}, [b"x" * 8])
    assert e.value.code == P.ERR_DTYPE
    with pytest.raises(P.ProtocolError) as e:
        P.decode_tensor({"dtype": "float32", "shape": [2, 4]}, [b"x" * 8])
    assert e.value.code == P.ERR_SHAPE


@pytest.mark.parametrize("wire,reply,in_place", [("float32", None, True),
                                                 ("bfloat16", None, True),
                                                 ("float32", "bfloat16", False),
                                                 ("int8", None, False)])
def test_agent_answers_in_the_request_frame_when_the_dtype_is_kept(tiny_split, hf_model, wire,
                                                                    reply, in_place):
    from edge_agent.server import Agent, AgentConfig

    agent = Agent(AgentConfig(experts=(0, 3), shards_dir=tiny_split, self_benchmark=False))
    agent.load(tiny_split)
    torch.manual_seed(3)
    x = torch.randn(5, agent.loaded.hidden_size)
    frames, fields = P.encode_tensor(x, wire)
    payload = [zmq.Frame(bytes(memoryview(f).cast("B"))) for f in frames]  # writable, as received
    sent = bytes(payload[0].buffer)
    header = P.pack(P.EXPERT, 7, layer=1, experts=[[0, 2], [3, 3]], **fields,
                    **({"reply_dtype": reply} if reply else {}))
    with torch.inference_mode():
        out = agent.handle([zmq.Frame(header), *payload])
    got = P.unpack(out[0])
    assert got["kind"] == P.EXPERT_REPLY and got["dtype"] == (reply or wire)
    assert (out[1] is payload[0]) == in_place  # the request's frame went back
    assert (bytes(payload[0].buffer) != sent) == in_place  # ...holding the answer, or untouched
    y = P.decode_tensor(got, out[1:])
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2, "int8": 5e-2}[reply or wire]
    assert_close_rel(y[:2], transformers_expert(hf_model, 1, 0, x[:2]), rel=tolerance)
    assert_close_rel(y[2:], transformers_expert(hf_model, 1, 3, x[2:]), rel=tolerance)


def test_agent_never_answers_in_place_over_inproc(tiny_split):
    # over inproc a zero-copy frame may be the sender's own tensor: it must stay untouched
    from edge_agent.config import AgentConfig, NetworkConfig
    from edge_agent.server import Agent

    agent = Agent(AgentConfig(experts=(0,), shards_dir=tiny_split,
                              network=NetworkConfig(bind="inproc://agent"),
                              self_benchmark=False))
    agent.load(tiny_split)
    x = torch.randn(3, agent.loaded.hidden_size)
    frames, fields = P.encode_tensor(x, "float32")
    payload = zmq.Frame(bytes(memoryview(frames[0]).cast("B")))
    sent = bytes(payload.buffer)
    with torch.inference_mode():
        out = agent.handle([zmq.Frame(P.pack(P.EXPERT, 1, layer=0, experts=[[0, 3]], **fields)),
                            payload])
    assert out[1] is not payload and bytes(payload.buffer) == sent
    assert torch.allclose(P.decode_tensor(P.unpack(out[0]), out[1:]),
                          expert_forward(x, agent.loaded.weights[0][0]))

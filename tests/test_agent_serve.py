"""A real agent process on loopback TCP: expert calls, several experts, wire dtypes, ping, info."""

from __future__ import annotations

import pytest
import torch
from agent_fixtures import client, start_agent, start_module_agent  # noqa: F401
from test_agent_math import assert_close_rel, hf_model, transformers_expert  # noqa: F401

from shard_tool.manifest import load_manifest
from wire import protocol as P

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def agent(start_module_agent, tiny_split):
    return start_module_agent("--expert", "0,3", "--shards", tiny_split,
                              "--bind", "tcp://127.0.0.1:*")


@pytest.fixture
def peer(client, agent):
    return client.connect(agent.endpoint)


def test_ready_line_says_what_it_serves(agent):
    line = agent.last_line
    assert agent.endpoint.startswith("tcp://127.0.0.1:")
    for part in ("experts 0,3", "layers 2", "device cpu", "dtype float32"):
        assert part in line, line


def test_several_experts_in_one_request_match_transformers(client, peer, hf_model):
    torch.manual_seed(2)
    x = torch.randn(9, 64)
    for layer in (0, 1):
        out, reply = client.expert(peer, layer, x, [(0, 4), (3, 5)])
        assert out.shape == (9, 64) and out.dtype == torch.float32
        assert_close_rel(out[:4], transformers_expert(hf_model, layer, 0, x[:4]))
        assert_close_rel(out[4:], transformers_expert(hf_model, layer, 3, x[4:]))
        assert reply.header["compute_s"] > 0
        assert reply.header["experts"] == [[0, 4], [3, 5]] and reply.header["layer"] == layer


def test_expert_range_and_zero_tokens(start_agent, tiny_split, client, hf_model):
    agent = start_agent("--expert", "1-2", "--shards", tiny_split, "--bind",
                        "tcp://127.0.0.1:*", "--no-self-benchmark")
    peer = client.connect(agent.endpoint)
    assert client.info(peer)["experts"] == [1, 2]
    x = torch.randn(3, 64)
    out, _ = client.expert(peer, 1, x, [(1, 0), (2, 3)])
    assert_close_rel(out, transformers_expert(hf_model, 1, 2, x))


@pytest.mark.parametrize("wire,tolerance", [("bfloat16", 2e-2), ("float16", 2e-3),
                                            ("int8", 5e-2)])
def test_wire_dtype_is_a_per_request_choice(client, peer, hf_model, wire, tolerance):
    x = torch.randn(6, 64)
    out, reply = client.expert(peer, 0, x, [(3, 6)], wire_dtype=wire)
    assert reply.header["dtype"] == wire
    assert_close_rel(out, transformers_expert(hf_model, 0, 3, x), rel=tolerance)
    out32, reply = client.expert(peer, 0, x, [(3, 6)], wire_dtype=wire, reply_dtype="float32")
    assert reply.header["dtype"] == "float32"


def test_requests_in_flight_keep_their_ids(client, peer, hf_model):
    xs = [torch.randn(n, 64) for n in (1, 2, 3, 4)]
    ids = [client.send_expert(peer, 1, x, [(0, x.shape[0])]) for x in xs]
    replies = client.wait(set(ids), timeout_s=10)
    assert set(replies) == set(ids)
    for request_id, x in zip(ids, xs):
        assert_close_rel(replies[request_id].tensor(), transformers_expert(hf_model, 1, 0, x))


def test_ping_echoes_or_sends_the_payload_size_asked(client, peer):
    reply = client.call(peer, P.PING, [b"abc" * 1000])
    assert reply.kind == P.PONG and bytes(reply.frames[0].buffer) == b"abc" * 1000
    reply = client.call(peer, P.PING, reply_bytes=100_000)
    assert reply.header["bytes"] == 100_000 and len(reply.frames[0].buffer) == 100_000
    assert client.call(peer, P.PING).kind == P.PONG


def test_info(client, peer, tiny_split):
    info = client.info(peer)
    assert info["experts"] == [0, 3] and info["layers"] == 2 and info["hidden"] == 64
    assert info["fingerprint"] == load_manifest(tiny_split).fingerprint
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["memory_bytes"] > 0
    assert info["throughput"]["tokens_per_s"] > 0 and info["throughput"]["flop_per_s"] > 0
    assert info["advertise"].startswith("tcp://127.0.0.1:")
    assert info["protocol"] == P.PROTOCOL_VERSION and info["serving"] is True


def test_advertise_from_interfaces_and_override(start_agent, tiny_split, client):
    agent = start_agent("--expert", "0", "--shards", tiny_split, "--bind", "tcp://0.0.0.0:*",
                        "--insecure", "--no-self-benchmark")  # beyond loopback without keys
    port = agent.endpoint.rsplit(":", 1)[1]
    info = client.info(client.connect(f"tcp://127.0.0.1:{port}"))
    assert info["advertise"].endswith(f":{port}") and "0.0.0.0" not in info["advertise"]
    agent = start_agent("--expert", "0", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--advertise", "tcp://edge-7.example:5600", "--no-self-benchmark")
    assert client.info(client.connect(agent.endpoint))["advertise"] == "tcp://edge-7.example:5600"

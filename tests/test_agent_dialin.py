"""Dial-in mode: the agent connects out to the base station's ROUTER and announces itself.

The base-station side is a plain AgentClient (one ROUTER socket) bound in the test.
"""

from __future__ import annotations

import pytest
import torch

from agent_fixtures import start_agent, client, free_port  # noqa: F401
from edge_agent import protocol as P
from edge_agent.client import AgentClient, PeerUnreachable
from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from shard_tool.manifest import load_manifest
from test_agent_math import assert_close_rel

pytestmark = pytest.mark.integration
HELLO_TIMEOUT_S = 30.0


def test_dial_in_announces_serves_and_reannounces(start_agent, tiny_split):
    reference = load_experts(tiny_split, [1], device="cpu")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    basestation = AgentClient()
    try:
        basestation.bind(endpoint)
        with pytest.raises(PeerUnreachable):  # not dialled in yet: refused at once, not queued
            basestation.send(b"edge-test", P.PING)
        args = ("--expert", "1", "--shards", tiny_split, "--basestation", endpoint,
                "--id", "edge-test", "--no-self-benchmark")
        agent = start_agent(*args)
        peer = basestation.wait_hello(HELLO_TIMEOUT_S)
        assert peer == b"edge-test"
        hello = basestation.hellos[peer]
        assert hello["experts"] == [1] and hello["serving"]
        assert hello["fingerprint"] == load_manifest(tiny_split).fingerprint
        assert "int8" in hello["capabilities"]["wire_dtypes"]
        x = torch.randn(3, 64)
        out, _ = basestation.expert(peer, 0, x, [(1, 3)])
        assert_close_rel(out, expert_forward(x, reference.weights[1][0]))

        # the agent restarts: it dials in and announces again; the same socket serves it
        agent.kill()
        basestation.hellos.clear()
        start_agent(*args)
        assert basestation.wait_hello(HELLO_TIMEOUT_S) == b"edge-test"
        out, _ = basestation.expert(peer, 1, x, [(1, 3)])
        assert_close_rel(out, expert_forward(x, reference.weights[1][1]))

        # the base station restarts: the agent reconnects (backoff) and announces again
        basestation.close()
        basestation = AgentClient()
        basestation.bind(endpoint)
        assert basestation.wait_hello(HELLO_TIMEOUT_S) == b"edge-test"
        out, _ = basestation.expert(peer, 1, x, [(1, 3)])
        assert_close_rel(out, expert_forward(x, reference.weights[1][1]))
    finally:
        basestation.close()


def test_one_socket_serves_a_listening_and_a_dial_in_agent_at_once(start_agent, tiny_split,
                                                                    client):
    reference = load_experts(tiny_split, [0, 2], device="cpu")
    listen_endpoint = client.bind("tcp://127.0.0.1:*")
    dial_in = start_agent("--expert", "0", "--shards", tiny_split, "--basestation",
                          listen_endpoint, "--id", "edge-a", "--no-self-benchmark")
    listening = start_agent("--expert", "2", "--shards", tiny_split, "--bind",
                            "tcp://127.0.0.1:*", "--no-self-benchmark")
    assert dial_in.alive()
    a = client.wait_hello(HELLO_TIMEOUT_S)
    b = client.connect(listening.endpoint)
    x = torch.randn(5, 64)
    ids = {client.send_expert(a, 1, x, [(0, 5)]): 0, client.send_expert(b, 1, x, [(2, 5)]): 2}
    replies = client.wait(set(ids), timeout_s=10)
    assert set(replies) == set(ids)
    for request_id, expert in ids.items():
        assert_close_rel(replies[request_id].tensor(),
                         expert_forward(x, reference.weights[expert][1]))

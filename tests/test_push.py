"""`shard_tool push` to an agent started with `--store`: resumable, checked, refused when wrong."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from agent_fixtures import REPO_ROOT, client, start_agent  # noqa: F401
from test_agent_faults import corrupt_copy

from common.errors import ShardError
from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from shard_tool.manifest import load_manifest
from shard_tool.push import PushFaults, push
from testbed.models.make_model import ModelSpec
from wire import protocol as P
from wire.client import AgentError

pytestmark = pytest.mark.integration
CHUNK_BYTES = 64 * 1024  # an expert shard of the tiny model is ~200 KiB: several chunks


def store_agent(start_agent, store: str, experts: str = "3"):
    agent = start_agent("--expert", experts, "--store", store, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark", ready="edge_agent waiting")
    assert agent.endpoint
    return agent


def assert_serves_expert_3(client, endpoint: str, tiny_split: str) -> None:
    reference = load_experts(tiny_split, [3], device="cpu")
    x = torch.randn(4, 64)
    out, _ = client.expert(client.connect(endpoint), 1, x, [(3, 4)], timeout_s=10)
    assert torch.allclose(out, expert_forward(x, reference.weights[3][1]), rtol=1e-5, atol=1e-6)


def test_store_agent_waits_then_serves_after_a_push(start_agent, tiny_split, tmp_path, client):
    agent = store_agent(start_agent, str(tmp_path / "store"))
    peer = client.connect(agent.endpoint)
    info = client.info(peer)
    assert info["serving"] is False and info["missing"] == [3]
    with pytest.raises(AgentError, match=P.ERR_NOT_READY):
        client.expert(peer, 0, torch.randn(1, 64), [(3, 1)])
    result = push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES)
    assert result.serving and result.resumed_from == 0 and result.sent_bytes == result.bytes
    agent.wait_line("edge_agent ready", timeout_s=30)
    assert client.info(peer)["fingerprint"] == load_manifest(tiny_split).fingerprint
    assert_serves_expert_3(client, agent.endpoint, tiny_split)
    # a second push of the same shard is a no-op
    assert push(tiny_split, 3, agent.endpoint).resumed_from == result.bytes


def test_interrupted_push_resumes_across_agent_restart(start_agent, tiny_split, tmp_path,
                                                       client):
    store = str(tmp_path / "store")
    agent = store_agent(start_agent, store)
    with pytest.raises(ShardError, match="interrupted"):
        push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES,
             faults=PushFaults(stop_after_chunks=2))
    assert agent.stop(signal.SIGTERM) == 0  # the agent keeps the partial file and its target
    assert os.path.getsize(os.path.join(store, "experts", "expert-003.safetensors.partial")) \
        == 2 * CHUNK_BYTES
    agent = store_agent(start_agent, store)
    result = push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES)
    assert result.resumed_from == 2 * CHUNK_BYTES
    assert result.sent_bytes == result.bytes - 2 * CHUNK_BYTES and result.serving
    assert not os.path.exists(os.path.join(store, "experts", "expert-003.safetensors.partial"))
    assert_serves_expert_3(client, agent.endpoint, tiny_split)
    # restarted on a complete store, it serves without a push
    agent.stop()
    agent = start_agent("--expert", "3", "--store", store, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark")
    assert_serves_expert_3(client, agent.endpoint, tiny_split)


def test_corrupted_chunk_is_refused_then_push_resumes(start_agent, tiny_split, tmp_path):
    agent = store_agent(start_agent, str(tmp_path / "store"))
    with pytest.raises(ShardError, match="corrupted"):
        push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES,
             faults=PushFaults(corrupt_chunk=1))
    result = push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES)
    assert result.resumed_from == CHUNK_BYTES and result.serving


def test_corrupt_shard_is_refused_and_discarded(start_agent, tiny_split, tmp_path):
    bad = corrupt_copy(tiny_split, str(tmp_path / "bad"))
    os.replace(os.path.join(bad, "experts", "expert-000.safetensors"),
               os.path.join(bad, "experts", "expert-003.safetensors"))
    agent = store_agent(start_agent, str(tmp_path / "store"))
    with pytest.raises(ShardError, match="failed its check"):
        push(bad, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES)
    assert push(tiny_split, 3, agent.endpoint).resumed_from == 0  # the bad bytes were dropped


def test_push_of_a_different_model_is_refused(start_agent, tiny_split, tmp_path,
                                              checkpoint_factory):
    from shard_tool.split import split

    other = str(tmp_path / "other")
    split(checkpoint_factory(ModelSpec(seed=7)), other)
    agent = store_agent(start_agent, str(tmp_path / "store"))
    push(tiny_split, 3, agent.endpoint)
    with pytest.raises(ShardError, match="different model"):
        push(other, 3, agent.endpoint)
    with pytest.raises(ShardError, match="hosts experts"):
        push(tiny_split, 2, agent.endpoint)


def test_push_cli(start_agent, tiny_split, tmp_path, run_cli):
    agent = store_agent(start_agent, str(tmp_path / "store"), experts="2,3")
    done = run_cli("shard_tool", "push", tiny_split, "--expert", "2-3", "--to", agent.endpoint,
                   "--chunk-mb", "0.0625")
    assert done.returncode == 0, done.stderr
    assert "pushed expert 3" in done.stdout and "serving" in done.stdout
    agent.wait_line("edge_agent ready", timeout_s=30)
    nobody = run_cli("shard_tool", "push", tiny_split, "--expert", "3", "--to",
                     "tcp://127.0.0.1:9", "--timeout-s", "0.5")
    assert nobody.returncode == 2 and "no answer" in nobody.stderr
    assert len(nobody.stderr.strip().splitlines()) == 1

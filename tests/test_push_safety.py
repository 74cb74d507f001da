"""Pushes write nothing until the pusher is allowed and the manifest is the model the agent was
told to accept, declared sizes fit the disk, and a failed push leaves nothing behind (issue #13).

Regressions, each measured before the fix: anyone could push a different model into an empty
store and it was served; one PUSH_BEGIN wrote the manifest before any check and locked the
store across restarts; a forged manifest could declare more than the disk holds; junk chunks
with matching hashes from a second connection poisoned a real push and its resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess

import pytest
import torch
from agent_fixtures import start_agent  # noqa: F401

from common.errors import ShardError
from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from shard_tool.manifest import MANIFEST_NAME, Manifest, load_manifest
from shard_tool.push import push
from testbed.models.make_model import ModelSpec
from wire import protocol as P
from wire.client import AgentClient, AgentError

pytestmark = pytest.mark.integration
CHUNK_BYTES = 64 * 1024
TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def other_split(checkpoint_factory, tmp_path_factory) -> str:
    from shard_tool.split import split

    out = str(tmp_path_factory.mktemp("other") / "shards")
    split(checkpoint_factory(ModelSpec(seed=7)), out)
    return out


def store_agent(start_agent, store: str, *extra: str, bind: str = "tcp://127.0.0.1:*"):
    return start_agent("--expert", "3", "--store", store, "--bind", bind, "--no-self-benchmark",
                       *extra, ready="edge_agent waiting")


def files_in(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, name), folder)
                  for root, _, names in os.walk(folder) for name in names)


def forged(split: str, expert: int, **changes) -> bytes:
    """The split's manifest with expert `expert`'s file entry changed, fingerprint and all
    consistent (what anyone who read the real one can make)."""
    manifest = load_manifest(split)
    files = tuple(dataclasses.replace(e, **changes) if e.role == "expert" and e.expert == expert
                  else e for e in manifest.files)
    return json.dumps(Manifest.to_json(dataclasses.replace(manifest, files=files))).encode()


def manifest_bytes(split: str) -> bytes:
    with open(os.path.join(split, MANIFEST_NAME), "rb") as f:
        return f.read()


def shard_bytes(split: str, expert: int = 3) -> bytes:
    with open(os.path.join(split, "experts", f"expert-{expert:03d}.safetensors"), "rb") as f:
        return f.read()


def send_chunk(client, peer, data: bytes, offset: int, expert: int = 3) -> dict:
    return client.call(peer, P.PUSH_CHUNK, [data], timeout_s=TIMEOUT_S, expert=expert,
                       offset=offset, sha256=hashlib.sha256(data).hexdigest()).header


def assert_serves_expert_3(endpoint: str, split: str) -> None:
    x = torch.randn(4, 64)
    with AgentClient() as client:
        out, _ = client.expert(client.connect(endpoint), 1, x, [(3, 4)], timeout_s=TIMEOUT_S)
    reference = load_experts(split, [3], device="cpu").weights[3][1]
    assert torch.allclose(out, expert_forward(x, reference), rtol=1e-5, atol=1e-6)


def exits_with_one_line(agent, timeout_s: float = 60.0) -> str:
    try:
        agent.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the agent started; it should have refused:\n{agent.stderr()}")
    err = agent.stderr().strip()
    assert agent.proc.returncode == 2 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("edge_agent: error:"), err
    return err


def test_a_store_that_can_be_reached_from_outside_must_be_told_its_model(start_agent,
                                                                         tiny_split, tmp_path):
    """Safe by default: an empty store beyond loopback accepts no push until it is told which
    model (the fingerprint `shard_tool split` prints); loopback trusts the first push."""
    empty = str(tmp_path / "store")
    agent = start_agent("--expert", "3", "--store", empty, "--bind", "tcp://0.0.0.0:*",
                        "--insecure", "--no-self-benchmark", ready=None)
    assert "--accept-fingerprint" in exits_with_one_line(agent)
    agent = start_agent("--expert", "3", "--store", empty, "--bind", "tcp://127.0.0.1:*",
                        "--accept-fingerprint", "not-hex", "--no-self-benchmark", ready=None)
    assert "--accept-fingerprint" in exits_with_one_line(agent)
    # a store that holds a model refuses to be told another one
    held = str(tmp_path / "held")
    os.makedirs(os.path.join(held, "experts"))
    shutil.copy(os.path.join(tiny_split, MANIFEST_NAME), held)
    other_fp = hashlib.sha256(b"another model").hexdigest()
    agent = start_agent("--expert", "3", "--store", held, "--bind", "tcp://127.0.0.1:*",
                        "--accept-fingerprint", other_fp, "--no-self-benchmark", ready=None)
    assert "holds model" in exits_with_one_line(agent)
    fingerprint = load_manifest(tiny_split).fingerprint
    agent = start_agent("--expert", "3", "--store", empty, "--bind", "tcp://0.0.0.0:*",
                        "--insecure", "--accept-fingerprint", fingerprint[:16],
                        "--no-self-benchmark", ready="edge_agent waiting")
    assert agent.alive()


def test_a_push_of_another_model_is_refused_and_writes_nothing(start_agent, tiny_split,
                                                               other_split, tmp_path):
    store = str(tmp_path / "store")
    agent = store_agent(start_agent, store, "--accept-fingerprint",
                        load_manifest(tiny_split).fingerprint[:16])
    with pytest.raises(ShardError, match="accepts model"):
        push(other_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES)
    assert files_in(store) == []
    result = push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES)
    assert result.serving
    assert_serves_expert_3(agent.endpoint, tiny_split)


def test_push_begin_alone_neither_writes_a_manifest_nor_locks_the_store(start_agent,
                                                                        tiny_split,
                                                                        other_split, tmp_path):
    store = str(tmp_path / "store")
    agent = store_agent(start_agent, store)  # loopback: the first completed push decides
    with AgentClient() as client:
        ack = client.call(client.connect(agent.endpoint), P.PUSH_BEGIN,
                          [manifest_bytes(other_split)], timeout_s=TIMEOUT_S, expert=3).header
        assert ack["offset"] == 0
    assert not os.path.exists(os.path.join(store, MANIFEST_NAME))
    assert agent.stop(signal.SIGTERM) == 0
    agent = store_agent(start_agent, store)
    result = push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES)
    assert result.serving
    assert load_manifest(store).fingerprint == load_manifest(tiny_split).fingerprint
    assert_serves_expert_3(agent.endpoint, tiny_split)


def test_declared_sizes_must_fit_the_disk_and_a_failed_push_leaves_nothing(start_agent,
                                                                           tiny_split,
                                                                           tmp_path):
    store = str(tmp_path / "store")
    agent = store_agent(start_agent, store)
    huge = shutil.disk_usage(tmp_path).free + (1 << 40)
    with AgentClient() as client:
        peer = client.connect(agent.endpoint)
        # more than the disk holds, or than the model's tensors take (issue 20: 40 GiB was
        # accepted): refused before anything is written
        for size in (huge, 40 * 2**30):
            with pytest.raises(AgentError, match="this model's shard takes"):
                client.call(peer, P.PUSH_BEGIN, [forged(tiny_split, 3, bytes=size)],
                            timeout_s=TIMEOUT_S, expert=3)
        assert files_in(store) == []
        # the real size, filled with junk whose chunk hashes match: refused at the end
        size = load_manifest(tiny_split).expert_file(3).bytes
        client.call(peer, P.PUSH_BEGIN, [manifest_bytes(tiny_split)],
                    timeout_s=TIMEOUT_S, expert=3)
        for offset in range(0, size, CHUNK_BYTES):
            send_chunk(client, peer, os.urandom(min(CHUNK_BYTES, size - offset)), offset)
        with pytest.raises(AgentError, match="failed its check"):
            client.call(peer, P.PUSH_END, timeout_s=TIMEOUT_S, expert=3)
    assert files_in(store) == []
    assert push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES).serving


def test_junk_chunks_do_not_poison_a_concurrent_push_or_its_resume(start_agent, tiny_split,
                                                                   tmp_path):
    data = shard_bytes(tiny_split)
    agent = store_agent(start_agent, str(tmp_path / "store"))
    with AgentClient() as real, AgentClient() as junk:
        real_peer, junk_peer = real.connect(agent.endpoint), junk.connect(agent.endpoint)
        assert real.call(real_peer, P.PUSH_BEGIN, [manifest_bytes(tiny_split)],
                         timeout_s=TIMEOUT_S, expert=3).header["offset"] == 0
        assert send_chunk(real, real_peer, data[:CHUNK_BYTES], 0)["offset"] == CHUNK_BYTES
        with pytest.raises(AgentError, match="push"):  # not its push
            send_chunk(junk, junk_peer, os.urandom(CHUNK_BYTES), CHUNK_BYTES)
        with pytest.raises(AgentError, match="in progress"):
            junk.call(junk_peer, P.PUSH_BEGIN, [manifest_bytes(tiny_split)],
                      timeout_s=TIMEOUT_S, expert=3)
        offset = CHUNK_BYTES
        while offset < len(data):
            offset = send_chunk(real, real_peer, data[offset:offset + CHUNK_BYTES],
                                offset)["offset"]
        assert real.call(real_peer, P.PUSH_END, timeout_s=TIMEOUT_S, expert=3).header["serving"]
    assert_serves_expert_3(agent.endpoint, tiny_split)

    # the resume: junk staged by a pusher that went away is found and replaced, not resumed
    agent = store_agent(start_agent, str(tmp_path / "store2"))
    with AgentClient() as junk:
        peer = junk.connect(agent.endpoint)
        junk.call(peer, P.PUSH_BEGIN, [manifest_bytes(tiny_split)], timeout_s=TIMEOUT_S,
                  expert=3)
        for offset in (0, CHUNK_BYTES):
            send_chunk(junk, peer, os.urandom(CHUNK_BYTES), offset)
    result = push(tiny_split, 3, agent.endpoint, chunk_bytes=CHUNK_BYTES)
    assert result.resumed_from == 0 and result.serving
    assert_serves_expert_3(agent.endpoint, tiny_split)

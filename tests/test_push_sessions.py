"""edge_agent/store.py in-process, time passed in: one push session at a time, which model a
store takes, and where a pushed shard may go. (The same rules over real sockets:
tests/test_push_safety.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import pytest
import zmq

from common.errors import ShardError
from edge_agent.store import PUSH_IDLE_S, Pusher, ShardStore
from shard_tool.manifest import MANIFEST_NAME, Manifest, load_manifest
from wire.messages import Bounds, PushBegin, PushChunk
from wire.protocol import ProtocolError

A, B = Pusher(b"pusher-a", 10), Pusher(b"pusher-b", 11)
BOUNDS = Bounds(experts=(3,))  # the stores' experts, as the agent decodes pushes for them


def manifest_frame(split: str, **changes) -> zmq.Frame:
    manifest = load_manifest(split)
    if changes:
        files = tuple(dataclasses.replace(e, **changes) if e.expert == 3 else e
                      for e in manifest.files)
        manifest = dataclasses.replace(manifest, files=files)
    return zmq.Frame(json.dumps(Manifest.to_json(manifest)).encode())


def push_begin(manifest: zmq.Frame, **fields) -> PushBegin:
    return PushBegin.decode({"id": 1, "expert": 3, **fields}, [manifest], BOUNDS)


def chunk(data: bytes, offset: int) -> PushChunk:
    return PushChunk.decode({"id": 1, "expert": 3, "offset": offset,
                             "sha256": hashlib.sha256(data).hexdigest()}, [zmq.Frame(data)],
                            BOUNDS)


def test_one_push_at_a_time_until_its_pusher_leaves_or_goes_quiet(tiny_split, tmp_path):
    store = ShardStore(str(tmp_path), [3], trust_first_push=True)
    assert store.begin(push_begin(manifest_frame(tiny_split)), A, now=0.0)["offset"] == 0
    assert store.chunk(chunk(b"x" * 10, 0), A, now=1.0)["offset"] == 10
    with pytest.raises(ProtocolError, match="another push"):
        store.begin(push_begin(manifest_frame(tiny_split)), B, now=2.0)
    with pytest.raises(ProtocolError, match="no push of expert 3 in progress from this pusher"):
        store.chunk(chunk(b"y" * 10, 10), B, now=2.0)
    with pytest.raises(ProtocolError, match="another push"):  # A's chunk at 1 s kept it
        store.begin(push_begin(manifest_frame(tiny_split)), B, now=1.0 + PUSH_IDLE_S / 2)
    ack = store.begin(push_begin(manifest_frame(tiny_split)), B, now=1.1 + PUSH_IDLE_S)
    # B resumes what A staged, and learns the hash of it, to compare with its own file
    assert ack["offset"] == 10 and ack["prefix_sha256"] == hashlib.sha256(b"x" * 10).hexdigest()
    with pytest.raises(ProtocolError, match="from this pusher"):  # A's push is over
        store.chunk(chunk(b"y" * 10, 10), A, now=70.0)
    assert store.begin(push_begin(manifest_frame(tiny_split), restart=True), B,
                       now=71.0)["offset"] == 0
    store.pusher_gone(B.fd)  # its connection closed: the store is free at once
    assert store.begin(push_begin(manifest_frame(tiny_split)), A, now=72.0)["offset"] == 0
    store.close()


def test_which_model_a_store_takes(tiny_split, tmp_path):
    fingerprint = load_manifest(tiny_split).fingerprint
    with pytest.raises(ShardError, match="--accept-fingerprint"):
        ShardStore(str(tmp_path / "a"), [3]).check_start()  # beyond loopback, no model named
    ShardStore(str(tmp_path / "a"), [3], trust_first_push=True).check_start()
    told = ShardStore(str(tmp_path / "b"), [3], accept_fingerprint=fingerprint[:16].upper())
    told.check_start()
    with pytest.raises(ProtocolError, match="accepts model"):
        told.begin(push_begin(manifest_frame(tiny_split, sha256="0" * 64)), A, 0.0)
    assert os.listdir(tmp_path / "b" / "experts") == []  # refused: nothing written
    assert told.begin(push_begin(manifest_frame(tiny_split)), A, 0.0)["offset"] == 0
    told.close()
    # a store holding a model: told another one, it does not start
    held = tmp_path / "c"
    (held / "experts").mkdir(parents=True)
    with open(os.path.join(tiny_split, MANIFEST_NAME), "rb") as f:
        (held / MANIFEST_NAME).write_bytes(f.read())
    (held / "experts" / "expert-003.safetensors.partial").write_bytes(b"of another model")
    (held / "experts" / "expert-003.safetensors.partial.json").write_text(
        json.dumps({"sha256": "0" * 64, "bytes": 16}))
    with pytest.raises(ShardError, match="holds model"):
        ShardStore(str(held), [3], accept_fingerprint="ab" * 8).check_start()
    ShardStore(str(held), [3]).check_start()  # it takes its own model: the stray partial goes
    assert os.listdir(held / "experts") == []


def test_a_shard_goes_to_its_own_path_and_fits_the_disk(tiny_split, tmp_path, monkeypatch):
    store = ShardStore(str(tmp_path), [3], trust_first_push=True)
    with pytest.raises(ProtocolError, match="puts expert 3 at"):
        store.begin(push_begin(manifest_frame(tiny_split, path=MANIFEST_NAME)), A, 0.0)
    with pytest.raises(ProtocolError, match="this model's shard takes"):
        store.begin(push_begin(manifest_frame(tiny_split, bytes=2**62)), A, 0.0)
    real = load_manifest(tiny_split).expert_file(3).bytes
    monkeypatch.setattr("edge_agent.store.shutil.disk_usage",
                        lambda _: shutil._ntuple_diskusage(1 << 40, 1 << 40, real))
    with pytest.raises(ProtocolError, match="free"):  # a real size, a full disk
        store.begin(push_begin(manifest_frame(tiny_split)), A, 0.0)
    assert os.listdir(tmp_path / "experts") == [] and not os.path.exists(
        tmp_path / MANIFEST_NAME)

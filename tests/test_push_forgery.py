"""Pushes cannot destroy or fill (issue 20), in-process with time passed in.

Regressions, each measured before the fix: the fingerprint hashed only `path:sha256`, so a
manifest carrying the real fingerprint and a forged `bytes` or `tensors` field made a store
that held the model delete its verified shard; a forged 40 GiB size was accepted and junk
stayed on disk; a pusher trickling 1 KiB every 5 s held the store for ever.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import pytest
import zmq

from common.errors import ShardError
from edge_agent.store import MIN_PUSH_BYTES_PER_S, PUSH_IDLE_S, Pusher, ShardStore, session_over
from shard_tool.manifest import MANIFEST_NAME, Manifest, expert_file_path, load_manifest
from wire.messages import Bounds, PushBegin, PushChunk
from wire.protocol import ProtocolError

A, B = Pusher(b"pusher-a", 10), Pusher(b"pusher-b", 11)
BEGIN = {"id": 1, "expert": 3}
BOUNDS = Bounds(experts=(3,))  # the stores' experts, as the agent decodes pushes for them


def manifest_doc(split: str) -> dict:
    with open(os.path.join(split, MANIFEST_NAME)) as f:
        return json.load(f)


def expert_3(doc: dict) -> dict:
    return next(f for f in doc["files"] if f.get("expert") == 3)


def frame(doc: dict) -> zmq.Frame:
    return zmq.Frame(json.dumps(doc).encode())


def begin(manifest: zmq.Frame) -> PushBegin:
    return PushBegin.decode(BEGIN, [manifest], BOUNDS)


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def holding_store(tiny_split, tmp_path) -> ShardStore:
    """A store that holds the tiny model with expert 3's shard checked and in place."""
    folder = tmp_path / "store"
    (folder / "experts").mkdir(parents=True)
    shutil.copy(os.path.join(tiny_split, MANIFEST_NAME), folder)
    shutil.copy(os.path.join(tiny_split, expert_file_path(3)), folder / "experts")
    store = ShardStore(str(folder), [3])
    store.check_start()
    yield store
    store.close()


@pytest.mark.parametrize("field,value", [("bytes", 1 << 20),
                                         ("tensors", {"x": {"dtype": "F32", "shape": [1]}})])
def test_a_forged_entry_with_the_real_fingerprint_deletes_nothing(holding_store, tiny_split,
                                                                  field, value):
    shard = os.path.join(holding_store.folder, expert_file_path(3))
    before = sha256_of(shard)
    doc = manifest_doc(tiny_split)
    expert_3(doc)[field] = value  # the fingerprint left as the real one
    with pytest.raises(ProtocolError, match="fingerprint does not match"):
        holding_store.begin(begin(frame(doc)), A, 0.0)
    # labelled as an old format, whose fingerprint covered only path and sha256: it loads,
    # but it is another model than the one held
    doc["format_version"] = 1
    doc["fingerprint"] = Manifest.from_json(manifest_doc(tiny_split)).legacy_fingerprint
    assert Manifest.from_json(doc).fingerprint != load_manifest(tiny_split).fingerprint
    with pytest.raises(ProtocolError, match="different model"):
        holding_store.begin(begin(frame(doc)), A, 0.0)
    assert sha256_of(shard) == before
    assert os.listdir(os.path.dirname(shard)) == ["expert-003.safetensors"]
    # the real manifest: the shard is in place, nothing to send
    assert holding_store.begin(begin(frame(manifest_doc(tiny_split))), A, 0.0)["complete"]


def test_a_forged_size_is_refused_before_anything_is_written(tiny_split, tmp_path):
    store = ShardStore(str(tmp_path), [3], trust_first_push=True)
    manifest = load_manifest(tiny_split)
    for changes in ({"bytes": 40 * 2**30}, {"bytes": 8},
                    {"tensors": {**manifest.expert_file(3).tensors,
                                 "extra": {"dtype": "F32", "shape": [2**20]}}}):
        files = tuple(dataclasses.replace(e, **changes) if e.expert == 3 else e
                      for e in manifest.files)
        forged = dataclasses.replace(manifest, files=files).to_json()  # fingerprint consistent
        with pytest.raises(ProtocolError, match="manifest is invalid"):
            store.begin(begin(frame(forged)), A, 0.0)
    assert os.listdir(tmp_path / "experts") == []
    assert store.begin(begin(frame(manifest.to_json())), A, 0.0)["offset"] == 0
    store.close()


def test_a_trickling_pusher_does_not_hold_the_store(tiny_split, tmp_path):
    store = ShardStore(str(tmp_path), [3], trust_first_push=True)
    doc = manifest_doc(tiny_split)
    assert store.begin(begin(frame(doc)), A, now=0.0)["offset"] == 0
    now, offset = 0.0, 0
    while store.session is not None:  # 1 KiB every 5 s: never silent, far too slow
        now += 5.0
        data = os.urandom(1024)
        store.chunk(PushChunk.decode({**BEGIN, "offset": offset,
                                      "sha256": hashlib.sha256(data).hexdigest()},
                                     [zmq.Frame(data)], BOUNDS), A, now)
        offset += len(data)
        store.expire(now + 0.05)  # the agent's loop checks between messages
        assert now <= 2 * PUSH_IDLE_S, "the trickle still holds the store"
    assert now >= PUSH_IDLE_S  # a slow start is not cut at once
    assert store.begin(begin(frame(doc)), B, now=now + 1.0)["offset"] == offset  # B's turn
    store.pusher_gone(B.fd)
    with pytest.raises(ProtocolError, match="too slow"):  # A waits its turn
        store.begin(begin(frame(doc)), A, now=now + 2.0)
    assert store.begin(begin(frame(doc)), A, now=now + 1.0 + PUSH_IDLE_S)["offset"] == offset
    store.close()


def test_when_a_push_session_is_over():
    """session_over by hand: silence, then the average rate once it has lasted PUSH_IDLE_S."""
    from edge_agent.store import _Session

    open_file = object()  # a stand-in: session_over never touches it

    def session(last_s, moved, started_s=0.0, file=open_file):
        return _Session(A, 3, None, None, file, 100 + moved, last_s, started_s, 100)

    assert session_over(session(0.0, 0), PUSH_IDLE_S) is None
    assert "silent" in session_over(session(0.0, 0), PUSH_IDLE_S + 0.1)
    lasted_s = PUSH_IDLE_S + 10.0
    fast_enough = int(MIN_PUSH_BYTES_PER_S * lasted_s)
    assert session_over(session(lasted_s, fast_enough), lasted_s) is None
    assert "too slow" in session_over(session(lasted_s, fast_enough - 1), lasted_s)
    # a shard already in place moves nothing and is not slow
    assert session_over(session(lasted_s, 0, file=None), lasted_s) is None


def test_manifests_of_older_versions_still_load(tiny_split, tmp_path):
    """Format 1 (16-bit) and 2 (quantised) stored the path:sha256 fingerprint; they load, and
    their fingerprint in memory is the one this version writes for the same split."""
    doc = manifest_doc(tiny_split)
    manifest = Manifest.from_json(doc)
    assert doc["format_version"] == 3 and doc["fingerprint"] == manifest.fingerprint
    old = {**doc, "format_version": 1, "fingerprint": manifest.legacy_fingerprint}
    assert Manifest.from_json(old).fingerprint == manifest.fingerprint
    old["fingerprint"] = manifest.fingerprint  # a new fingerprint under an old version: edited
    with pytest.raises(ShardError, match="fingerprint"):
        Manifest.from_json(old)
    with pytest.raises(ShardError, match="format"):
        Manifest.from_json({**doc, "format_version": True})

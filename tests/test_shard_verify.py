"""verify catches corruption; inspect describes every shard; the family table round-trips."""

from __future__ import annotations

import os
import shutil

import pytest

from shard_tool.families import DOWN, MIXTRAL, family_for_config
from shard_tool.manifest import load_manifest


@pytest.fixture
def split_copy(tiny_split, tmp_path) -> str:
    out = str(tmp_path / "shards")
    shutil.copytree(tiny_split, out)
    return out


@pytest.mark.integration
def test_verify_accepts_a_fresh_split(tiny_split, run_cli):
    result = run_cli("shard_tool", "verify", tiny_split)
    assert result.returncode == 0, result.stderr
    assert "14 files match" in result.stdout


@pytest.mark.integration
@pytest.mark.parametrize("rel_path", ["experts/expert-005.safetensors",
                                      "basestation/model.safetensors",
                                      "basestation/tokenizer.json"])
def test_verify_catches_a_flipped_byte(split_copy, run_cli, rel_path):
    path = os.path.join(split_copy, rel_path)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    result = run_cli("shard_tool", "verify", split_copy)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{rel_path}: sha256 does not match" in result.stderr


@pytest.mark.integration
def test_verify_catches_a_missing_shard(split_copy, run_cli):
    os.remove(os.path.join(split_copy, "experts", "expert-002.safetensors"))
    result = run_cli("shard_tool", "verify", split_copy)
    assert result.returncode == 2
    assert "experts/expert-002.safetensors: missing" in result.stderr


@pytest.mark.integration
def test_verify_rejects_an_edited_manifest(split_copy, run_cli):
    path = os.path.join(split_copy, "manifest.json")
    text = open(path).read().replace('"top_k": 2', '"top_k": 3')
    open(path, "w").write(text)
    result = run_cli("shard_tool", "verify", split_copy)
    assert result.returncode == 2 and "fingerprint does not match" in result.stderr


@pytest.mark.integration
def test_verify_not_a_split(tmp_path, run_cli):
    result = run_cli("shard_tool", "verify", str(tmp_path))
    assert result.returncode == 2 and "no manifest.json" in result.stderr


@pytest.mark.integration
def test_inspect_lists_every_shard(tiny_split, run_cli):
    result = run_cli("shard_tool", "inspect", tiny_split)
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(tiny_split)
    for entry in manifest.files:
        if entry.tensors:
            row = next(line for line in result.stdout.splitlines()
                       if line.startswith(entry.path))
            assert int(row.split()[1]) == len(entry.tensors)
    assert "total" in result.stdout and manifest.fingerprint[:16] in result.stdout


def test_family_table_round_trips():
    config = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 300}
    family = family_for_config(config)
    assert family is MIXTRAL
    shape = family.shape_from_config(config)
    assert shape.moe_layers == (0, 1, 2) and (shape.expert_kind, shape.activation) == (
        "swiglu", "silu")
    expected = family.expected(shape)
    # the table lists routed experts only: per layer 8 experts x 3 projections
    assert len(expected) == 3 * 24
    for name in expected:
        ref = family.parse(name)
        assert ref is not None and ref.tensor.disk_name(ref.layer, ref.expert) == name
    ref = family.parse("model.layers.2.block_sparse_moe.experts.7.w2.weight")
    assert (ref.layer, ref.expert, ref.tensor.part) == (2, 7, DOWN)
    # the router is not a routed expert: it stays with the base station
    assert family.parse("model.layers.1.block_sparse_moe.gate.weight") is None
    assert not family.looks_like_expert("model.layers.1.block_sparse_moe.gate.weight")
    # an experts layout the table does not know is flagged, never passed to the base station
    assert family.parse("model.layers.1.mlp.experts.gate_up_proj") is None
    assert family.looks_like_expert("model.layers.1.mlp.experts.gate_up_proj")
    assert expected["model.layers.0.block_sparse_moe.experts.0.w2.weight"][0] == (64, 128)
    assert family_for_config({"model_type": "llama"}) is None

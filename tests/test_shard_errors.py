"""Bad input: one line on stderr, exit 2, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from safetensors.torch import load_file, save_file

from testbed.models.make_model import ModelSpec


def copy_checkpoint(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def break_missing_tensor(ckpt: str) -> None:
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.block_sparse_moe.experts.5.w2.weight"]
    save_file(tensors, path, metadata={"format": "pt"})


def break_not_mixtral(ckpt: str) -> None:
    path = os.path.join(ckpt, "config.json")
    config = json.load(open(path))
    config["model_type"] = "llama"
    json.dump(config, open(path, "w"))


def break_shape(ckpt: str) -> None:
    path = os.path.join(ckpt, "config.json")
    config = json.load(open(path))
    config["intermediate_size"] = 96
    json.dump(config, open(path, "w"))


def break_truncate(ckpt: str) -> None:
    path = os.path.join(ckpt, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 1000)


def break_header(ckpt: str) -> None:
    path = os.path.join(ckpt, "model.safetensors")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage\xff" * 4)


def break_header_length(ckpt: str) -> None:
    path = os.path.join(ckpt, "model.safetensors")
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 1 << 40))


def break_no_weights(ckpt: str) -> None:
    os.remove(os.path.join(ckpt, "model.safetensors"))


CASES = {
    "missing tensor": (break_missing_tensor, "experts.5.w2.weight is missing"),
    "not mixtral": (break_not_mixtral, "'llama' is not a supported MoE (supported: "),
    "shape contradicts config": (break_shape, "config.json implies"),
    "truncated file": (break_truncate, "truncated"),
    "corrupt header": (break_header, "corrupt safetensors header"),
    "absurd header length": (break_header_length, "corrupt or truncated"),
    "no weights": (break_no_weights, "no model.safetensors"),
}


def assert_clean_failure(result, message: str, parent) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shard_tool: error:"), result.stderr
    assert message in lines[0], lines[0]
    assert not os.path.exists(os.path.join(parent, "out"))
    assert not [n for n in os.listdir(parent) if ".partial" in n]


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_checkpoint(case, tiny_checkpoint, tmp_path, run_cli):
    breaker, message = CASES[case]
    ckpt = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    breaker(ckpt)
    result = run_cli("shard_tool", "split", ckpt, str(tmp_path / "out"))
    assert_clean_failure(result, message, tmp_path)


@pytest.mark.integration
def test_missing_source(tmp_path, run_cli):
    result = run_cli("shard_tool", "split", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert_clean_failure(result, "no such checkpoint folder", tmp_path)


@pytest.mark.integration
def test_index_lists_absent_tensor(checkpoint_factory, tmp_path, run_cli):
    ckpt = copy_checkpoint(checkpoint_factory(ModelSpec(max_shard_size="100KB")), tmp_path / "c")
    index_path = os.path.join(ckpt, "model.safetensors.index.json")
    index = json.load(open(index_path))
    name = "model.layers.0.block_sparse_moe.experts.2.w1.weight"
    wrong_file = next(f for n, f in index["weight_map"].items() if f != index["weight_map"][name])
    index["weight_map"][name] = wrong_file
    json.dump(index, open(index_path, "w"))
    result = run_cli("shard_tool", "split", ckpt, str(tmp_path / "out"))
    assert_clean_failure(result, f"index lists {name} in {wrong_file}, but it is absent", tmp_path)


@pytest.mark.integration
def test_index_lists_missing_file(checkpoint_factory, tmp_path, run_cli):
    ckpt = copy_checkpoint(checkpoint_factory(ModelSpec(max_shard_size="100KB")), tmp_path / "c")
    second_file = sorted(f for f in os.listdir(ckpt) if f.startswith("model-"))[1]
    os.remove(os.path.join(ckpt, second_file))
    result = run_cli("shard_tool", "split", ckpt, str(tmp_path / "out"))
    assert_clean_failure(result, "which is missing", tmp_path)

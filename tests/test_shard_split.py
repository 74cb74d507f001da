"""shard_tool split: every source tensor lands exactly once, bit-identical, in the right shard."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from shard_tool.manifest import load_manifest
from shard_tool.split import split
from testbed.models.make_model import ModelSpec

EXPERT_NAME = re.compile(r"\.experts\.(\d+)\.w[123]\.weight$")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# runs `shard_tool split ARGS...` in a fresh interpreter, then prints the heavy packages loaded
SPLIT_THEN_LIST_MODULES = (
    "import sys; from shard_tool.cli import main; rc = main(['split', *sys.argv[1:]]); "
    "print(sorted(m for m in sys.modules if m in ('torch', 'transformers'))); sys.exit(rc)")


def source_tensors(checkpoint: str) -> dict[str, torch.Tensor]:
    files = [f for f in os.listdir(checkpoint) if f.endswith(".safetensors")]
    tensors = {}
    for file_name in files:
        with safe_open(os.path.join(checkpoint, file_name), framework="pt") as f:
            for name in f.keys():
                assert name not in tensors
                tensors[name] = f.get_tensor(name)
    return tensors


def split_tensors(out: str) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """name -> [(file, tensor)] over every safetensors file the split wrote."""
    found: dict[str, list] = {}
    for folder, _, names in os.walk(out):
        for file_name in names:
            if file_name.endswith(".safetensors"):
                rel = os.path.relpath(os.path.join(folder, file_name), out)
                for name, tensor in load_file(os.path.join(folder, file_name)).items():
                    found.setdefault(name, []).append((rel, tensor))
    return found


@pytest.mark.parametrize("dtype,max_shard_size", [
    ("fp32", None), ("bf16", None), ("fp32", "100KB"), ("bf16", "60KB")])
def test_split_is_exact_and_complete(checkpoint_factory, tmp_path, dtype, max_shard_size):
    checkpoint = checkpoint_factory(ModelSpec(dtype=dtype, max_shard_size=max_shard_size))
    sharded = os.path.exists(os.path.join(checkpoint, "model.safetensors.index.json"))
    assert sharded == (max_shard_size is not None)
    out = str(tmp_path / "out")
    manifest = split(checkpoint, out)

    source = source_tensors(checkpoint)
    found = split_tensors(out)
    assert set(found) == set(source)
    for name, tensor in source.items():
        assert len(found[name]) == 1, f"{name} written {len(found[name])} times"
        file_name, copy = found[name][0]
        assert copy.dtype == tensor.dtype and torch.equal(copy.view(torch.uint8),
                                                          tensor.view(torch.uint8))
        match = EXPERT_NAME.search(name)
        expected_file = (f"experts/expert-{int(match.group(1)):03d}.safetensors" if match
                         else "basestation/model.safetensors")
        assert file_name == expected_file
    assert manifest.model["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert manifest.model["num_experts"] == 8 and manifest.model["top_k"] == 2
    for aux in ("config.json", "generation_config.json", "tokenizer.json"):
        assert os.path.exists(os.path.join(out, "basestation", aux))
    assert load_manifest(out).fingerprint == manifest.fingerprint
    # nothing but OUT was created beside it
    assert os.listdir(tmp_path) == ["out"]


def test_split_converts_dtype(checkpoint_factory, tmp_path):
    checkpoint = checkpoint_factory(ModelSpec())
    out = str(tmp_path / "out")
    manifest = split(checkpoint, out, dtype="bfloat16")
    source = source_tensors(checkpoint)
    found = split_tensors(out)
    for name, tensor in source.items():
        assert torch.equal(found[name][0][1], tensor.to(torch.bfloat16))
    assert manifest.model["dtype"] == "bfloat16"
    with open(os.path.join(out, "basestation", "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_split_is_deterministic(tiny_checkpoint, tmp_path):
    first = split(tiny_checkpoint, str(tmp_path / "a"))
    second = split(tiny_checkpoint, str(tmp_path / "b"))
    assert first.fingerprint == second.fingerprint


def test_expert_shard_holds_every_layer(tiny_split):
    manifest = load_manifest(tiny_split)
    entry = manifest.expert_file(3)
    want = {f"model.layers.{layer}.block_sparse_moe.experts.3.{proj}.weight"
            for layer in range(manifest.num_layers) for proj in ("w1", "w2", "w3")}
    assert set(entry.tensors) == want


@pytest.mark.integration
def test_existing_out_needs_force(tiny_checkpoint, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("shard_tool", "split", tiny_checkpoint, str(out))
    assert result.returncode == 2 and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = run_cli("shard_tool", "split", tiny_checkpoint, str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


@pytest.mark.integration
def test_a_16_bit_split_never_imports_torch(tiny_checkpoint, tmp_path):
    """Regression: quant.py imported torch at the top, and the 16-bit split imports it for the
    shard layout: a 25 MB model's split peaked at 228 MB RSS (32 MB without torch)."""
    result = subprocess.run([sys.executable, "-c", SPLIT_THEN_LIST_MODULES, tiny_checkpoint,
                             str(tmp_path / "out")], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
    assert (tmp_path / "out" / "manifest.json").exists()


def test_interrupted_split_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    from shard_tool import safetensors_io

    calls = {"n": 0}
    real_copy = safetensors_io.StreamingWriter.copy_from

    def interrupt_later(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt
        return real_copy(self, *args, **kwargs)

    monkeypatch.setattr(safetensors_io.StreamingWriter, "copy_from", interrupt_later)
    with pytest.raises(KeyboardInterrupt):
        split(tiny_checkpoint, str(tmp_path / "out"))
    assert calls["n"] == 20
    assert os.listdir(tmp_path) == []

"""Shared fixtures: small Mixtral checkpoints made by transformers, and their splits."""

from __future__ import annotations

import os
import sys

import pytest

from testbed.models.make_model import ModelSpec, make_model

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(spec) -> folder of a checkpoint; each distinct spec is built once per session."""
    made: dict[ModelSpec, str] = {}

    def make(spec: ModelSpec = ModelSpec()) -> str:
        if spec not in made:
            out = str(tmp_path_factory.mktemp("ckpt") / "model")
            make_model(out, spec)
            made[spec] = out
        return made[spec]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> str:
    return checkpoint_factory(ModelSpec())


@pytest.fixture(scope="session")
def tiny_split(tiny_checkpoint, tmp_path_factory) -> str:
    from shard_tool.split import split

    out = str(tmp_path_factory.mktemp("split") / "shards")
    split(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def run_cli():
    """run_cli("shard_tool", "split", ...): a console script as a real process, with a deadline."""
    import subprocess

    def run(*args: str, timeout_s: float = 120, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                              timeout=timeout_s, cwd=REPO_ROOT, **kwargs)

    return run

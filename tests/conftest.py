"""Shared fixtures: small Mixtral checkpoints made by transformers, and their splits."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import pytest

# This run's own testbed state folders, so a second `make test` beside this one (CI runs two
# clones as root) never shares /tmp/wdmoe-testbed or /run/wdmoe/shape with it. Set here, before
# any test module imports testbed.links.state: its DEFAULT_STATE_DIR is read at import time.
# Processes the tests start (`testbed …` CLIs) inherit them.
RUN_STATE_DIR = tempfile.mkdtemp(prefix="wdmoe-tests-")
os.environ["WDMOE_TESTBED_STATE"] = os.path.join(RUN_STATE_DIR, "testbed")
os.environ["WDMOE_SHAPE_STATE"] = os.path.join(RUN_STATE_DIR, "shape")

from testbed.models.make_model import ModelSpec, make_model  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_unconfigure(config) -> None:
    """RUN_STATE_DIR goes when pytest ends (after a --collect-only too)."""
    shutil.rmtree(RUN_STATE_DIR, ignore_errors=True)


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

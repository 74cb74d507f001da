"""The state of `testbed shape`: STATE_DIR/<DEV>.json and the work folder STATE_DIR/<DEV>/.

Owns where the state lives (the default state folder, the file and folder of each DEV), reading
and writing the state file (whole or not at all), recording a step there *before* it is made
(so `unshape` finds whatever follows, also after a `kill -9`), and removing it all.
"""

from __future__ import annotations

import json
import os
import shutil

from common.staging import write_file_atomic
from testbed.links.spec import TestbedError

STATE_ENV = "WDMOE_SHAPE_STATE"


def default_state_dir() -> str:
    """$WDMOE_SHAPE_STATE, else /run/wdmoe/shape as root, else $XDG_RUNTIME_DIR/wdmoe-shape or
    /tmp/wdmoe-shape-<uid>: per user, as every user's shaping is their own."""
    if os.environ.get(STATE_ENV):
        return os.environ[STATE_ENV]
    if os.geteuid() == 0:
        return "/run/wdmoe/shape"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "wdmoe-shape")
    return f"/tmp/wdmoe-shape-{os.getuid()}"


def state_file(state_dir: str, dev: str) -> str:
    return os.path.join(state_dir, f"{dev}.json")


def work_dir(state_dir: str, dev: str) -> str:
    """DEV's folder for the relays' settings and logs and the rewritten roster."""
    return os.path.join(state_dir, dev)


def load_state(state_dir: str, dev: str) -> dict | None:
    """DEV's state, or None when nothing is shaped on it. Raises TestbedError when unreadable."""
    path = state_file(state_dir, dev)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TestbedError(f"{path}: unreadable ({e})") from None


def save_state(state_dir: str, state: dict) -> None:
    # a crash leaves the old state or the new, never half
    write_file_atomic(state_file(state_dir, state["dev"]), json.dumps(state, indent=1).encode())


def record_step(state: dict, state_dir: str, key: str, value) -> None:
    """Record in STATE that step KEY (what unshape must undo) is about to be made, and save."""
    state["made"][key] = value
    save_state(state_dir, state)


def remove_state(state_dir: str, dev: str) -> None:
    """DEV's work folder and state file gone (a leftover .tmp too); nothing there is fine."""
    shutil.rmtree(work_dir(state_dir, dev), ignore_errors=True)
    for path in (state_file(state_dir, dev), state_file(state_dir, dev) + ".tmp"):
        try:
            os.remove(path)
        except FileNotFoundError:
            pass

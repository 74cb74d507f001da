"""The testbed's state file: everything `up` makes is recorded here *before* it is made, so
`down` cleans up after a crash or a `kill -9` of `up`."""

from __future__ import annotations

import json
import os

from common.staging import write_file_atomic
from testbed.links.plan import LOOPBACK, ROOT
from testbed.links.spec import LinkShape, TestbedError

# Per user when not root: on a shared server each user's testbed is their own. An empty
# WDMOE_TESTBED_STATE counts as unset (it would put state.json in the working folder).
DEFAULT_STATE_DIR = os.environ.get("WDMOE_TESTBED_STATE") or (
    "/tmp/wdmoe-testbed" if os.geteuid() == 0 else f"/tmp/wdmoe-testbed-{os.getuid()}")
STATE_NAME = "state.json"


def state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_NAME)


def load_state(state_dir: str) -> dict | None:
    """The state, or None when no testbed is up there. Raises TestbedError when unreadable."""
    try:
        with open(state_path(state_dir)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TestbedError(f"{state_path(state_dir)}: unreadable ({e}); remove it and run "
                           "`testbed down --all`") from None


def save_state(state_dir: str, state: dict) -> None:
    write_file_atomic(state_path(state_dir), json.dumps(state, indent=1).encode())


def require_state(state_dir: str) -> dict:
    state = load_state(state_dir)
    if state is None:
        raise TestbedError(f"no testbed is up in {state_dir} (run `testbed up` first)")
    return state


def find_agent(state: dict, agent_index: int) -> dict:
    for agent in state["agents"]:
        if agent["index"] == agent_index:
            return agent
    raise TestbedError(f"no agent {agent_index} (agents 0-{len(state['agents']) - 1})")


def agent_hosting(state: dict, expert: int) -> int:
    for agent in state["agents"]:
        if expert in agent["experts"]:
            return agent["index"]
    raise TestbedError(f"no agent hosts expert {expert}")


def shape_of(agent: dict) -> LinkShape:
    return LinkShape(**agent.get("shape", {}))


def mode_of(state: dict) -> str:
    """Where the links live; state files written before modes existed say it by their slot."""
    return state.get("mode") or (ROOT if state.get("slot") is not None else LOOPBACK)

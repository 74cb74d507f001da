"""The relays of `testbed shape`: one delaying TCP relay (testbed/links/relay.py) per box on
127.0.0.1, and the rewritten roster that dials the boxes through them.

Owns what a relay does for a shape under each backend, starting the relays (each recorded in
the state before and after it starts), changing a relay's settings, recognising and stopping
ours, and writing the roster the base station dials. Used by the htb+nft+relay backend (delay
and jitter) and the relays backend (also rate and down).
"""

from __future__ import annotations

import os
import sys

from testbed.boxes.state import save_state, work_dir
from testbed.boxes.tc_plan import RELAYS
from testbed.links.plan import LOCALHOST, relay_command
from testbed.links.procs import cmdline, free_port, pid_is_ours, spawn, stop_pids
from testbed.links.relay import APPLY_TIMEOUT_S, write_settings
from testbed.links.spec import LinkShape, TestbedError


def relay_settings(backend: str, shape: LinkShape) -> dict:
    """What the relay does for SHAPE: delay and jitter always; with the relays backend also
    the rate (serialised per direction) and down, which tc does otherwise. The fallback's
    relay also serialises a direction's own wire rate, as testbed/links does (htb's burst lets
    a small message through at once)."""
    if backend == RELAYS:
        return {"delay_ms": shape.delay_ms, "jitter_ms": shape.jitter_ms,
                "wire_down_mbit": shape.down_rate_mbit, "wire_up_mbit": shape.up_rate_mbit,
                "down": shape.down}
    return {"delay_ms": shape.delay_ms, "jitter_ms": shape.jitter_ms,
            "wire_down_mbit": shape.wire_down_mbit, "wire_up_mbit": shape.wire_up_mbit,
            "down": False}


def set_relay(state: dict, box: dict, shape: LinkShape) -> None:
    """BOX's relay runs with SHAPE once this returns. Raises TestbedError when it does not
    take the settings within the relay's APPLY_TIMEOUT_S."""
    relay = box["relay"]
    if not write_settings(relay["settings"], wait=True,
                          **relay_settings(state["backend"], shape)):
        raise TestbedError(f"link {box['index']}'s relay did not take its settings within "
                           f"{APPLY_TIMEOUT_S:g} s (see {relay['log']})")


def start_relays(state: dict, state_dir: str) -> None:
    """One relay per box of STATE, listening on a free port of 127.0.0.1, each recorded in the
    state before it starts (its port, files) and after (its pid). Returns once every relay
    runs with its box's shape. Raises TestbedError."""
    work = work_dir(state_dir, state["dev"])
    for box in state["boxes"]:
        port = free_port()
        settings = os.path.join(work, f"relay-{box['index']}.json")
        log = os.path.join(work, f"relay-{box['index']}.log")
        write_settings(settings, **relay_settings(state["backend"], LinkShape(**box["shape"])))
        box["relay"] = {"pid": None, "port": port, "settings": settings, "log": log}
        cmd = relay_command(sys.executable, f"{box['address']}:{box['port']}",
                            listen=f"{LOCALHOST}:{port}", settings=settings)
        save_state(state_dir, state)
        box["relay"]["pid"] = spawn(cmd, log)
        save_state(state_dir, state)
    for box in state["boxes"]:
        set_relay(state, box, LinkShape(**box["shape"]))  # returns once each relay runs


def write_relayed_roster(state: dict, state_dir: str, agents, keys: str | None) -> None:
    """The roster the base station dials: each agent at its relay, same experts and keys.
    Sets STATE's roster_path to it (the caller saves the state)."""
    from basestation.roster import RosterAgent, format_roster

    relayed = [RosterAgent(a.experts, f"tcp://{LOCALHOST}:{b['relay']['port']}", a.public_key)
               for a, b in zip(agents, state["boxes"])]
    path = os.path.join(work_dir(state_dir, state["dev"]), "roster.toml")
    with open(path, "w") as f:
        f.write(format_roster(relayed, f"{state['roster_source']} through the relays of "
                              f"`testbed shape --dev {state['dev']}`", keys=keys))
    state["roster_path"] = path


def is_our_relay(pid: int, settings: str) -> bool:
    """PID runs our relay with SETTINGS (not a recycled pid, not another shaping's relay)."""
    return pid_is_ours(pid) and settings.encode() in cmdline(pid)


def stop_relays(state: dict) -> list[int]:
    """Stop the relays STATE records that are still ours; returns their pids."""
    pids = [b["relay"]["pid"] for b in state["boxes"] if (b.get("relay") or {}).get("pid")
            and is_our_relay(b["relay"]["pid"], b["relay"]["settings"])]
    stop_pids(pids)
    return pids

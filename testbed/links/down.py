"""`testbed down`: stop every process a testbed started and remove what it made, from its
state file, also after a crash or a `kill -9` of `up` (the state is written before each step).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from testbed.links import netns, userns
from testbed.links.plan import NS_PREFIX, ROOT, USERNS
from testbed.links.procs import OUR_MODULES, alive, cmdline, pid_is_ours, stop_pids
from testbed.links.relay import applied_path
from testbed.links.state import STATE_NAME, load_state, mode_of

# A process `up` forked just before it was killed is not recorded and may still be on its way
# into a namespace (nsenter, `ip netns exec`): look again after this long, up to this often.
STRAY_SETTLE_S = 0.2
STRAY_ROUNDS = 5


@dataclass
class _Where:
    """Where this testbed's processes are, taken before any is stopped (a holder's namespace
    cannot be named once the holder is gone)."""
    holders: list[int]  # user namespace holders (not root)
    userns_ids: set[str]  # their namespaces: everything inside is ours
    recorded_userns: str | None  # the state's, for a dead holder: only our modules count
    root_namespaces: set[str]  # as root
    marks: list[bytes]  # command-line pieces of processes still entering a namespace


def _where(state: dict, state_dir: str, everything: bool, root_side: bool) -> _Where:
    holder = state.get("holder") or {}
    holders = set(userns.find_holders(None if everything else state_dir))
    if holder.get("pid") and userns.is_holder(holder["pid"], tag=state.get("tag")):
        holders.add(holder["pid"])
    ours = userns.namespace_id(os.getpid())
    # A holder not yet unshared is in our own namespace: then only the holder itself counts.
    ids = {userns.namespace_id(pid) for pid in holders} - {None, ours}
    recorded = holder.get("userns") if holder.get("userns") not in (None, ours) else None
    marks = [f"--target={pid}\0".encode() for pid in holders]
    root_namespaces: set[str] = set()
    if root_side:
        agents, tag = state.get("agents", []), state.get("tag")
        mine = mode_of(state) == ROOT  # a userns state's names are not on this host
        root_namespaces = netns.our_namespaces(
            (), {a["ns"] for a in agents if a.get("ns")} if mine else set(),
            tag if mine else None, everything)
        prefix = NS_PREFIX if everything else f"{NS_PREFIX}{tag}-"
        if everything or (mine and tag):
            marks.append(f"\0netns\0exec\0{prefix}".encode())
    return _Where(sorted(holders), ids, recorded, root_namespaces, marks)


def _alive_of(where: _Where, state: dict, everything: bool, first: bool) -> list[int]:
    """This testbed's live processes. After the first round only our own modules count: a
    namespace id, once its processes are gone, may come to name someone else's."""
    pids = [p for a in state.get("agents", []) for p in a.get("pids", []) if pid_is_ours(p)]
    pids += [p for p in where.holders if alive(p)]
    for ns_id in where.userns_ids:
        pids += [p for p in userns.pids_in_namespace(ns_id) if first or pid_is_ours(p)]
    if where.recorded_userns:
        pids += [p for p in userns.pids_in_namespace(where.recorded_userns) if pid_is_ours(p)]
    pids += [p for p in netns.pids_in((), where.root_namespaces) if first or pid_is_ours(p)]
    ours = userns.namespace_id(os.getpid())
    for pid in userns.processes_of_user():
        line = cmdline(pid)
        if not any(m in line for m in OUR_MODULES):
            continue
        if any(m in line for m in where.marks) or \
                (everything and userns.namespace_id(pid) not in (None, ours)):
            pids.append(pid)  # entering a namespace of ours, or left in one (everything)
    return [p for p in dict.fromkeys(pids) if p != os.getpid()]



def down(state_dir: str, everything: bool, root: bool) -> list[str]:
    """Remove every process, namespace, veth, route and rule (nft tables live in the
    namespaces) `up` made in state_dir, also after a crash; `everything` also removes every
    leftover of any testbed of ours (root: every `wdm-*` namespace; any user: every user
    namespace of ours; ROOT: whether we are). Safe to run twice. Returns what it removed."""
    state_dir = os.path.abspath(state_dir)
    state = load_state(state_dir) if os.path.isdir(state_dir) else None
    if state is None and not everything:
        return []
    state = state or {}
    agents, tag, mode = state.get("agents", []), state.get("tag"), mode_of(state)
    root_side = root and (mode == ROOT or everything)
    where = _where(state, state_dir, everything, root_side)
    stopped: list[int] = []
    for round_index in range(STRAY_ROUNDS):
        pids = _alive_of(where, state, everything, first=round_index == 0)
        if round_index and not pids:
            break
        stop_pids(pids)
        stopped += [p for p in pids if p not in stopped]
        time.sleep(STRAY_SETTLE_S)
    removed = [f"process {p}" for p in stopped]
    if root_side:
        removed += netns.remove((), where.root_namespaces, tag if mode == ROOT else None,
                                state.get("slot") if mode == ROOT else None, everything)
    if mode == USERNS and (where.userns_ids or where.recorded_userns):
        # The namespaces went with their last process.
        removed += [f"namespace {a['ns']} (user namespace)" for a in agents if a.get("ns")]
    stashes = [(state.get("holder") or {}).get("stash")]
    if everything:
        stashes += [os.path.join("/tmp", n) for n in os.listdir("/tmp")
                    if n.startswith("wdmoe-run-")]
    for stash in filter(None, stashes):
        try:
            os.rmdir(stash)  # empty outside the holder's mount namespace
        except OSError:
            pass
    if state:
        for agent in agents:
            if agent.get("relay_settings"):
                for path in (agent["relay_settings"], applied_path(agent["relay_settings"])):
                    if os.path.exists(path):
                        os.remove(path)
        os.remove(os.path.join(state_dir, STATE_NAME))
    return removed

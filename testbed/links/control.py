"""Agents behind real, shaped links: `up`, `degrade`, `status`, `restart`, `down`.

`up` gathers the facts (the model's experts, the mode), plans the agents as data (plan.py:
names, addresses, experts, shapes), then runs the steps, recording each in the state file
before making it (state.py, up.py): one network namespace and veth pair per agent (netns.py)
— on this machine as root, inside an unprivileged user namespace otherwise (userns.py) — the
agents and, where needed, a relay (procs.py, relay.py); then it shapes the links (shaping.py)
and writes a roster for `basestation --agents`. Without root the roster names relays on
127.0.0.1 that reach into the user namespace, so the base station runs on this machine
unchanged. Where neither root nor user namespaces are available the agents run on loopback
without shaping. `down` is down.py.
`up(secure=True)` (`testbed up --secure`) makes a CurveZMQ keypair for the base station and
each agent under STATE_DIR/keys, starts every agent with `--keys`, trusting the base station
only, and writes a roster that carries each agent's public key and the base station's key
folder: `basestation … --agents ROSTER` alone talks to them encrypted; nothing else gets an
answer. `down` removes the keys.

The names callers import from `testbed.links.control` are all here (see __all__).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from testbed.links import down as links_down
from testbed.links import netns, shaping, userns
from testbed.links import up as links_up
from testbed.links.plan import (
    AGENT_INNER_PORT,
    AGENT_PORT,
    LINK_PREFIX,
    LOOPBACK,
    MAX_AGENTS,
    MODES,
    NS_PREFIX,
    ROOT,
    SUBNET,
    USERNS,
    UpPlan,
    assign_experts,
    choose_mode,
    experts_spec,
    plan_up,
    roster_toml,
)
from testbed.links.procs import alive, pid_is_ours, spawn, stop_pids
from testbed.links.relay import APPLY_TIMEOUT_S, write_settings
from testbed.links.spec import LinkShape, TestbedError
from testbed.links.state import (
    DEFAULT_STATE_DIR,
    STATE_NAME,
    agent_hosting,
    find_agent,
    load_state,
    mode_of,
    require_state,
    save_state,
    shape_of,
)
from testbed.links.up import INFO_TIMEOUT_S, KEYS_DIR

__all__ = [
    "AGENT_INNER_PORT", "AGENT_PORT", "DEFAULT_STATE_DIR", "INFO_TIMEOUT_S", "LINK_PREFIX",
    "LOOPBACK", "MAX_AGENTS", "MODES", "NS_PREFIX", "ROOT", "STATE_NAME", "SUBNET",
    "UP_TIMEOUT_S", "USERNS", "LinkShape", "LinkStatus", "Testbed", "TestbedError",
    "agent_for_expert", "assign_experts", "degrade", "down", "experts_spec", "host_command",
    "is_root", "link_mode", "load_state", "restart", "roster_toml", "save_state", "shape_of",
    "shaping", "status", "up",
]

UP_TIMEOUT_S = 180.0  # N agents importing torch on a busy 2-core machine


def is_root() -> bool:
    return os.geteuid() == 0


def link_mode() -> tuple[str, str | None]:
    """(where `up` puts the links by default, why they are not shaped or None): root, else a
    user namespace where this kernel allows one, else loopback."""
    root = is_root()
    return choose_mode(root, None if root else userns.unavailable_reason())


def _resolve_mode(mode: str | None) -> str:
    """MODE checked against what this process can do (default: `link_mode`). Raises
    TestbedError."""
    if mode is None:
        return link_mode()[0]
    if mode not in MODES:
        raise TestbedError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == ROOT and not is_root():
        raise TestbedError("mode root needs root (mode userns works without)")
    if mode == USERNS and (reason := userns.unavailable_reason()):
        raise TestbedError(f"user namespaces are unavailable here: {reason}")
    return mode


def _enter(state: dict) -> tuple[str, ...]:
    """The prefix that runs a command where the host ends of this testbed's veths are. Raises
    TestbedError when its user namespace is gone."""
    if mode_of(state) != USERNS:
        return ()
    pid = (state.get("holder") or {}).get("pid")
    if not pid or not userns.is_holder(pid, tag=state["tag"]):
        raise TestbedError("this testbed's user namespace is gone (its holder process exited); "
                           "run `testbed down` and `testbed up` again")
    return userns.enter(pid)


def host_command(state_dir: str, *cmd: str) -> list[str]:
    """CMD as a command line that runs where the host ends of the links are (so it can reach
    the agents' veth addresses): CMD itself as root, inside the user namespace otherwise.
    Raises TestbedError."""
    return [*_enter(require_state(state_dir)), *cmd]


# -- the testbed ------------------------------------------------------------------------------

@dataclass
class Testbed:
    __test__ = False  # not a pytest test class, despite the name
    state_dir: str
    roster_path: str
    backend: str
    endpoints: dict[int, str]  # expert id -> endpoint the base station dials
    agent_of: dict[int, int]  # expert id -> agent index
    basestation_keys: str | None = None  # secure: the base station's key folder (--keys)

    def degrade(self, agent_index: int, shape: LinkShape) -> None:
        degrade(self.state_dir, agent_index, shape)

    def restart(self, agent_index: int) -> int:
        return restart(self.state_dir, agent_index)

    def down(self) -> list[str]:
        return down(self.state_dir)


def _testbed_from_state(state_dir: str, state: dict) -> Testbed:
    endpoints, agent_of = {}, {}
    for agent in state["agents"]:
        for expert in agent["experts"]:
            endpoints[expert] = agent["endpoint"]
            agent_of[expert] = agent["index"]
    keys = state.get("keys")
    return Testbed(state_dir, state["roster_path"], state["backend"], endpoints, agent_of,
                   keys["basestation"] if keys else None)


def roster_text(state: dict) -> str:
    """The roster `up` writes: endpoints only, or with --secure each agent's public key and
    the base station's key folder too."""
    keys = state.get("keys")
    if not keys:
        return roster_toml({tuple(a["experts"]): a["endpoint"] for a in state["agents"]})
    from basestation.roster import RosterAgent, format_roster

    agents = [RosterAgent(tuple(a["experts"]), a["endpoint"], keys["public"][a["index"]].encode())
              for a in state["agents"]]
    return format_roster(agents, "written by `testbed up --secure`", keys=keys["basestation"])


def up(shards: str, num_agents: int, shapes: dict[int, LinkShape] | None = None,
       state_dir: str = DEFAULT_STATE_DIR, roster_path: str | None = None,
       agent_args: Sequence[str] | Mapping[int, Sequence[str]] | None = None,
       timeout_s: float = UP_TIMEOUT_S, mode: str | None = None,
       secure: bool = False) -> Testbed:
    """Bring up num_agents agents behind shaped links and write the roster; returns when every
    agent answers INFO.

    agent_args: extra edge_agent arguments, a list for every agent or {agent index: list}
    (recorded in the state: `status` shows them, `restart` keeps them). mode: root, userns or
    loopback (default: `link_mode`). secure: CurveZMQ keys for the base station and every
    agent (see above). Raises TestbedError (after removing everything it made).
    """
    from common.errors import ShardError
    from shard_tool.manifest import load_manifest

    # the facts the plan needs, then the plan (pure), then the steps
    try:
        num_experts = load_manifest(shards).num_experts
    except ShardError as e:
        raise TestbedError(str(e)) from None
    mode = _resolve_mode(mode)
    plan = plan_up(num_experts=num_experts, num_agents=num_agents, shapes=shapes,
                   agent_args=agent_args, mode=mode,
                   unshaped_reason=link_mode()[1] if mode == LOOPBACK else None,
                   shards=shards, state_dir=state_dir, roster_path=roster_path,
                   tag=_unused_tag(mode))
    return _make(plan, timeout_s, secure)


def _unused_tag(mode: str) -> str:
    """A random tag that no namespace or veth on this host carries (as root): `down` removes
    whatever has its tag, so a testbed up beside this one must never share it."""
    taken = " ".join(netns.list_netns(()) + netns.list_links(())) if mode == ROOT else ""
    while True:
        tag = os.urandom(2).hex()
        if f"{NS_PREFIX}{tag}-" not in taken and f"{LINK_PREFIX}{tag}" not in taken:
            return tag


def _make(plan: UpPlan, timeout_s: float, secure: bool) -> Testbed:
    """Runs PLAN's steps, each recorded in the state before it is made; removes everything on
    any error or Ctrl-C. Raises TestbedError."""
    state_dir = plan.state_dir
    os.makedirs(state_dir, exist_ok=True)
    if load_state(state_dir) is not None:
        raise TestbedError(f"a testbed is already up in {state_dir}; run `testbed down "
                           f"--state-dir {state_dir}` first")
    state = {"tag": plan.tag, "mode": plan.mode, "slot": None, "holder": None,
             "shaper": None, "backend": shaping.LOOPBACK, "shards": plan.shards,
             "roster_path": plan.roster_path, "agents": [], "keys": None}
    save_state(state_dir, state)  # first, so `down` finds whatever follows
    try:
        if secure:
            state["keys"] = links_up.make_keys(state_dir, len(plan.groups))
            save_state(state_dir, state)
        if plan.mode == LOOPBACK:
            links_up.start_loopback_agents(plan, state)
        else:
            links_up.make_namespaced_agents(plan, state)
        links_up.wait_ready(state, state["agents"], timeout_s)
        for index, shape in plan.shapes.items():
            agent = state["agents"][index]
            _apply(state, agent, shape)
            agent["shape"] = dataclasses.asdict(shape)
        save_state(state_dir, state)
        with open(plan.roster_path, "w") as f:
            f.write(roster_text(state))
    except BaseException:
        down(state_dir)
        raise
    return _testbed_from_state(state_dir, state)


def _apply(state: dict, agent: dict, shape: LinkShape, old: LinkShape | None = None) -> None:
    """Shape one link; with OLD (what it has now), touch only the parts that change: a
    scenario re-applies shapes every epoch, and each tc/nft call costs a process and can
    drop what a replaced qdisc held."""
    shaper = state.get("shaper") or state["backend"]  # older state files have no "shaper"
    try:
        shaping.apply(shaper, agent["ns"], agent["host_dev"], agent["ns_dev"], shape, old,
                      enter=_enter(state))
    except shaping.ShapingError as e:
        raise TestbedError(str(e)) from None
    relayed = (shape.delay_ms, shape.jitter_ms, shape.wire_down_mbit, shape.wire_up_mbit)
    relay_same = old is not None and relayed == (old.delay_ms, old.jitter_ms,
                                                 old.wire_down_mbit, old.wire_up_mbit)
    if agent.get("relay_settings") and not relay_same and not write_settings(
            agent["relay_settings"], shape.delay_ms, shape.jitter_ms, wait=True,
            wire_down_mbit=shape.wire_down_mbit, wire_up_mbit=shape.wire_up_mbit):
        raise TestbedError(f"agent {agent['index']}'s relay did not take the new delay within "
                           f"{APPLY_TIMEOUT_S:g} s (see {agent['relay_settings'][:-5]}.log)")


def agent_for_expert(state_dir: str, expert: int) -> int:
    """The index of the agent hosting EXPERT. Raises TestbedError."""
    return agent_hosting(require_state(state_dir), expert)


def degrade(state_dir: str, agent: int, shape: LinkShape, *, by_expert: bool = False) -> None:
    """Replace the shape of one agent's link (by agent index, or by an expert it hosts) while
    everything runs. Raises TestbedError."""
    state = require_state(state_dir)
    index = agent_hosting(state, agent) if by_expert else agent
    entry = find_agent(state, index)
    if mode_of(state) == LOOPBACK:
        raise TestbedError("links cannot be shaped: agents are on loopback (neither root nor "
                           "user namespaces)")
    _apply(state, entry, shape.check(), old=shape_of(entry))
    entry["shape"] = dataclasses.asdict(shape)
    save_state(state_dir, state)


def restart(state_dir: str, agent_index: int, timeout_s: float = UP_TIMEOUT_S) -> int:
    """Stop agent AGENT_INDEX's edge_agent and start it again with the command recorded by `up`
    (its extra arguments included) behind the same link; returns the new pid once it answers
    INFO. Raises TestbedError."""
    state = require_state(state_dir)
    agent = find_agent(state, agent_index)
    if not agent.get("agent_command"):
        raise TestbedError("this testbed was started by an older version (no agent command "
                           "recorded): run `testbed down` and `testbed up`")
    _enter(state)  # the user namespace must still be there to start anything in it
    old = agent.get("agent_pid")
    if old and pid_is_ours(old):
        stop_pids([old])
    agent["pids"] = [p for p in agent["pids"] if p != old]
    agent["agent_pid"] = spawn(agent["agent_command"], agent["log"])
    agent["pids"].append(agent["agent_pid"])
    save_state(state_dir, state)
    links_up.wait_ready(state, [agent], timeout_s)
    return agent["agent_pid"]


@dataclass(frozen=True)
class LinkStatus:
    index: int
    experts: tuple[int, ...]
    namespace: str | None
    endpoint: str
    backend: str
    shape: LinkShape
    alive: bool  # every process of this agent (agent, relay) is running
    answers: bool  # answered INFO through its link within INFO_TIMEOUT_S
    agent_args: tuple[str, ...] = ()  # extra edge_agent arguments given to `up`


def status(state_dir: str) -> list[LinkStatus]:
    """Each link's shape and its agent's state. Raises TestbedError when nothing is up."""
    from wire.info import ask_info

    state = require_state(state_dir)
    out = []
    with links_up.open_client(state) as client:
        peers = {a["index"]: links_up.connect(client, state, a) for a in state["agents"]}
        infos = ask_info(client, peers.values(), INFO_TIMEOUT_S).infos
        answered = {i for i, peer in peers.items() if peer in infos}
    for agent in state["agents"]:
        out.append(LinkStatus(agent["index"], tuple(agent["experts"]), agent.get("ns"),
                              agent["endpoint"], state["backend"], shape_of(agent),
                              bool(agent["pids"]) and all(alive(p) for p in agent["pids"]),
                              agent["index"] in answered, tuple(agent.get("agent_args", ()))))
    return out


def down(state_dir: str = DEFAULT_STATE_DIR, everything: bool = False) -> list[str]:
    """Remove every process, namespace, veth, route and rule `up` made in state_dir, also after
    a crash; `everything` also removes every leftover of any testbed of ours. Safe to run
    twice. Returns what it removed (see links_down.down), and the keys of `up --secure`."""
    removed = links_down.down(state_dir, everything, is_root())
    keys = os.path.join(state_dir, KEYS_DIR)
    if os.path.isdir(keys):
        shutil.rmtree(keys, ignore_errors=True)
        removed.append(keys)
    return removed

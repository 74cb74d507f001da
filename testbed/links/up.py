"""The steps of `testbed up`: the keys (`--secure`), the user namespace (not root), each agent's
namespace and veth, its relay and agent processes, and the wait until every agent answers.
Namespaces and veths are recorded in the state before they are made, processes as soon as they
start (`down` also finds one that `up` started just before it was killed); links.up runs the
steps and tears down on error.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import sys

from testbed.links import netns, shaping, userns
from testbed.links.plan import (
    AGENT_INNER_PORT,
    AGENT_PORT,
    LOCALHOST,
    SUBNET,
    USERNS,
    UpPlan,
    backend_name,
    edge_agent_command,
    plan_loopback_agents,
    plan_namespaced_agents,
    relay_command,
)
from testbed.links.procs import alive, free_port, log_tail, spawn
from testbed.links.relay import LISTEN_BACKLOG, write_settings
from testbed.links.spec import TestbedError
from testbed.links.state import save_state

INFO_TIMEOUT_S = 3.0  # how long `testbed status` waits for INFO: past one lost SYN (TCP's first
# retransmit comes after 1 s), so one lost packet on a lossy link is not "not answering"
KEYS_DIR = "keys"  # STATE_DIR/keys/: `up --secure`'s key folders, removed by `down`
BASESTATION_KEY_NAME = "basestation"


@functools.cache
def agent_takes_insecure() -> bool:
    """Whether this edge_agent has --insecure (versions with CurveZMQ keys refuse a bind beyond
    loopback without keys or it)."""
    from edge_agent.cli import build_parser

    return "--insecure" in build_parser()._option_string_actions


# -- keys (`up --secure`) ---------------------------------------------------------------------


def key_folders(state_dir: str, num_agents: int) -> dict:
    """Where `up --secure` keeps each identity (pure): STATE_DIR/keys/basestation and
    STATE_DIR/keys/agent-I, as the state records them."""
    root = os.path.join(os.path.abspath(state_dir), KEYS_DIR)
    return {"basestation": os.path.join(root, BASESTATION_KEY_NAME),
            "agents": [os.path.join(root, f"agent-{i}") for i in range(num_agents)]}


def make_keys(state_dir: str, num_agents: int) -> dict:
    """A keypair for the base station and one per agent, each agent trusting the base station
    and the base station every agent (should it listen for them). Returns key_folders plus
    "public": each agent's public key (Z85 text). Raises TestbedError."""
    from wire.keys import SECRET_SUFFIX, TRUSTED_DIR, KeysError, keygen, load_keypair, trust

    folders = key_folders(state_dir, num_agents)
    shutil.rmtree(os.path.dirname(folders["basestation"]), ignore_errors=True)  # a stale run's
    try:
        keygen(folders["basestation"], BASESTATION_KEY_NAME, (TRUSTED_DIR,))
        bs_secret = os.path.join(folders["basestation"], BASESTATION_KEY_NAME + SECRET_SUFFIX)
        public = []
        for i, folder in enumerate(folders["agents"]):
            _, agent_secret = keygen(folder, f"agent-{i}", (TRUSTED_DIR,))
            trust(folder, bs_secret)
            trust(folders["basestation"], agent_secret)
            public.append(load_keypair(folder).public.decode())
    except KeysError as e:
        raise TestbedError(f"--secure: {e}") from None
    return {**folders, "public": public}


def keyed_args(state: dict, index: int) -> list[str]:
    """The edge_agent arguments of agent INDEX's keys (none when the testbed is plain)."""
    keys = state.get("keys")
    return ["--keys", keys["agents"][index]] if keys else []


def open_client(state: dict):
    """An AgentClient for this testbed's agents: with the base station's keypair when it is
    secure. Raises TestbedError."""
    from wire.client import AgentClient
    from wire.keys import KeysError, load_keypair

    keys = state.get("keys")
    try:
        keypair = load_keypair(keys["basestation"], "basestation") if keys else None
    except KeysError as e:
        raise TestbedError(f"this testbed's keys: {e}") from None
    return AgentClient(keypair=keypair)


def connect(client, state: dict, agent: dict) -> bytes:
    """Connect `client` (open_client) to AGENT: over CurveZMQ to its key when secure."""
    keys = state.get("keys")
    key = keys["public"][agent["index"]].encode() if keys else None
    return client.connect(agent["endpoint"], server_key=key)


# -- links and agents -------------------------------------------------------------------------


def start_holder(state_dir: str, state: dict) -> tuple[str, ...]:
    """The user namespace the links live in when not root; returns its command prefix."""
    log_path = os.path.join(state_dir, "userns.log")
    try:
        proc = userns.spawn_holder(state["tag"], state_dir, log_path)
        state["holder"] = {"pid": proc.pid, "log": log_path}
        save_state(state_dir, state)
        ready = userns.wait_ready(proc, log_path)
    except userns.UsernsError as e:
        raise TestbedError(str(e)) from None
    state["holder"].update(userns=userns.namespace_id(proc.pid), stash=ready.get("stash"))
    save_state(state_dir, state)
    return userns.enter(proc.pid)


def make_namespaced_agents(plan: UpPlan, state: dict) -> None:
    """Each agent's namespace and veth (in the user namespace when not root), the backend
    this kernel allows, then each agent's processes. Raises TestbedError."""
    state_dir = plan.state_dir
    enter = start_holder(state_dir, state) if plan.mode == USERNS else ()
    for _ in range(256):  # another testbed may claim the same free slot at once: the next
        slot = netns.free_slot(enter)
        state["slot"] = slot
        save_state(state_dir, state)
        if netns.fence_slot(enter, slot):
            break
        state["slot"] = None  # the other testbed's: never ours to remove
        save_state(state_dir, state)
    else:
        raise TestbedError(f"no /24 of {SUBNET}.0.0/16 could be claimed (run `testbed down "
                           "--all`)")
    for agent in plan_namespaced_agents(plan, slot):
        state["agents"].append(agent)
        save_state(state_dir, state)
        netns.make_link(enter, agent)
    shaper = shaping.NETEM if shaping.has_netem(state["agents"][0]["host_dev"], enter) else \
        shaping.FALLBACK
    state["shaper"], state["backend"] = shaper, backend_name(state["mode"], shaper)
    if shaper == shaping.FALLBACK:
        try:
            shaping.ensure_nft()
        except shaping.ShapingError as e:
            raise TestbedError(str(e)) from None
    for agent in state["agents"]:
        start_agent(state_dir, state, agent, enter)
        save_state(state_dir, state)


def start_agent(state_dir: str, state: dict, agent: dict, enter: tuple[str, ...]) -> None:
    """The agent in its namespace and, where needed, its relay: in the namespace in front of
    the agent (root, no netem), or where the veth's host end is, listening on this machine's
    127.0.0.1 (user namespace: the only way in from here)."""
    python, index = sys.executable, agent["index"]
    in_ns = [*enter, shaping.tool("ip"), "netns", "exec", agent["ns"]]
    relay_log = os.path.join(state_dir, f"relay-{index}.log")
    if state["shaper"] == shaping.FALLBACK:
        agent["relay_settings"] = os.path.join(state_dir, f"relay-{index}.json")
        write_settings(agent["relay_settings"], 0, 0)
    if state["mode"] == USERNS:
        bind = f"tcp://{agent['ns_addr']}:{AGENT_PORT}"
        with socket.create_server((LOCALHOST, 0), backlog=LISTEN_BACKLOG) as listener:
            agent["endpoint"] = f"tcp://{LOCALHOST}:{listener.getsockname()[1]}"
            agent["pids"].append(spawn(
                [*enter, *relay_command(python, f"{agent['ns_addr']}:{AGENT_PORT}",
                                        listen_fd=listener.fileno(),
                                        settings=agent.get("relay_settings"))],
                relay_log, pass_fds=(listener.fileno(),)))
    elif agent.get("relay_settings"):
        bind = f"tcp://{LOCALHOST}:{AGENT_INNER_PORT}"
        agent["pids"].append(spawn(
            in_ns + relay_command(python, f"{LOCALHOST}:{AGENT_INNER_PORT}",
                                  listen=f"{agent['ns_addr']}:{AGENT_PORT}",
                                  settings=agent["relay_settings"]), relay_log))
    else:
        bind = agent["endpoint"]
    # A veth address of ours is reached only through this machine (the user namespace's only
    # from inside it): without --secure the testbed's agents serve unencrypted, as on loopback.
    insecure = not state.get("keys") and not bind.startswith(f"tcp://{LOCALHOST}:") \
        and agent_takes_insecure()
    agent["agent_command"] = in_ns + edge_agent_command(python, agent, state["shards"], bind,
                                                        insecure) + keyed_args(state, index)
    agent["agent_pid"] = spawn(agent["agent_command"], agent["log"])
    agent["pids"].append(agent["agent_pid"])


def start_loopback_agents(plan: UpPlan, state: dict) -> None:
    """Each agent on 127.0.0.1, on a port free now."""
    ports = [free_port() for _ in plan.groups]
    for agent in plan_loopback_agents(plan, ports):
        agent["agent_command"] = edge_agent_command(sys.executable, agent, plan.shards,
                                                    agent["endpoint"]) + \
            keyed_args(state, agent["index"])
        state["agents"].append(agent)
        agent["agent_pid"] = spawn(agent["agent_command"], agent["log"])
        agent["pids"].append(agent["agent_pid"])
        save_state(plan.state_dir, state)


def wait_ready(state: dict, agents: list[dict], timeout_s: float) -> None:
    """Until each of AGENTS answers INFO through its link (keyed when the testbed is secure).
    Raises TestbedError."""
    from wire.info import InfoAnswers, ask_info

    with open_client(state) as client:
        by_peer = {connect(client, state, a): a for a in agents}

        def all_answered(answers: InfoAnswers) -> bool:
            """Raises TestbedError as soon as a silent agent's process is gone."""
            for peer in answers.silent:
                agent = by_peer[peer]
                if not all(alive(p) for p in agent["pids"]):
                    raise TestbedError(f"agent {agent['index']} exited: {log_tail(agent['log'])}")
            return not answers.silent

        answers = ask_info(client, by_peer, timeout_s, until=all_answered)
    if answers.silent:
        late = ", ".join(str(by_peer[p]["index"]) for p in answers.silent)
        raise TestbedError(f"agents {late} did not answer within {timeout_s:g} s "
                           f"(logs in {os.path.dirname(state['roster_path'])})")

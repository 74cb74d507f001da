"""Agents behind real, shaped links: one network namespace per agent, joined to the host by veth.

`up` makes namespace `wdm-TAG-I` for agent I, a veth pair `wdmTAGhI` (host) ↔ `wdmTAGnI`
(namespace) addressed 10.213.S.(4I+1)/30 ↔ 10.213.S.(4I+2)/30 (S: a /24 slot free on this host),
starts the agent inside (behind the delaying relay when the kernel has no netem), shapes the link
(testbed/shaping.py) and writes a roster for `basestation --agents`. Everything it makes is
recorded in `STATE_DIR/state.json` *before* it is made, so `down` cleans up after a crash or a
`kill -9` of `up`. Without root it falls back to loopback agents without shaping.

Only loopback and addresses inside our namespaces are ever contacted; an `unreachable` route for
the slot's /24 keeps traffic for a vanished veth from following the default route out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from testbed import shaping
from testbed.relay import APPLY_TIMEOUT_S, applied_path, write_settings

NS_PREFIX = "wdm-"  # every namespace we make; `down --all` removes all of them
LINK_PREFIX = "wdm"  # every host-side veth we make
SUBNET = "10.213"  # private range reserved for our namespaces (10.213.0.0/16)
MAX_AGENTS = 63  # /30 per agent inside one /24 slot
AGENT_PORT = 5600  # what the base station dials (the relay, or the agent itself with netem)
AGENT_INNER_PORT = 5601  # the agent on the namespace's loopback, behind the relay
DEFAULT_STATE_DIR = os.environ.get("WDMOE_TESTBED_STATE", "/tmp/wdmoe-testbed")
STATE_NAME = "state.json"
UP_TIMEOUT_S = 180.0  # N agents importing torch on a busy 2-core machine
INFO_TIMEOUT_S = 1.0  # one INFO round while waiting or in status
STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long
LOG_TAIL_LINES = 5


class TestbedError(Exception):
    """Something the user can fix; the message is one line."""

    __test__ = False  # not a pytest test class, despite the name


@dataclass(frozen=True)
class LinkShape:
    delay_ms: float = 0  # one-way, each direction
    jitter_ms: float = 0  # uniform ± around delay_ms
    loss_pct: float = 0  # each direction
    rate_mbit: float | None = None  # each direction; None = unlimited
    down: bool = False  # no packet passes (the agent stays alive)

    def check(self) -> "LinkShape":
        """Raises TestbedError for values no backend can apply."""
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise TestbedError("delay and jitter must be >= 0 ms")
        if not 0 <= self.loss_pct <= 100:
            raise TestbedError("loss must be within 0-100 %")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise TestbedError("rate must be > 0 mbit (or unlimited)")
        return self

    def describe(self) -> str:
        if self.down:
            return "DOWN"
        jitter = f" ±{self.jitter_ms:g}" if self.jitter_ms else ""
        parts = [f"delay {self.delay_ms:g} ms{jitter}",
                 f"loss {self.loss_pct:g} %",
                 f"rate {self.rate_mbit:g} mbit" if self.rate_mbit else "rate unlimited"]
        return ", ".join(parts)


# -- pure planning ----------------------------------------------------------------------------

def assign_experts(num_experts: int, num_agents: int) -> list[tuple[int, ...]]:
    """Contiguous expert ids per agent: 8 on 2 -> (0-3), (4-7); 8 on 3 -> 3, 3, 2."""
    if not 1 <= num_agents <= num_experts:
        raise TestbedError(f"--agents must be within 1-{num_experts} (the model has "
                           f"{num_experts} experts)")
    base, extra = divmod(num_experts, num_agents)
    out, start = [], 0
    for i in range(num_agents):
        size = base + (1 if i < extra else 0)
        out.append(tuple(range(start, start + size)))
        start += size
    return out


def experts_spec(experts: tuple[int, ...]) -> str:
    """(0, 1, 2, 3) -> '0-3'; (5,) -> '5' (the roster's and edge_agent's syntax)."""
    if len(experts) > 1 and experts == tuple(range(experts[0], experts[-1] + 1)):
        return f"{experts[0]}-{experts[-1]}"
    return ",".join(str(e) for e in experts)


def roster_toml(endpoints: dict[tuple[int, ...], str]) -> str:
    lines = ["# written by `testbed up`", "[agents]"]
    lines += [f'"{experts_spec(ids)}" = "{ep}"' for ids, ep in endpoints.items()]
    return "\n".join(lines) + "\n"


def is_root() -> bool:
    return os.geteuid() == 0


# -- state file -------------------------------------------------------------------------------

def _state_path(state_dir: str) -> str:
    return os.path.join(state_dir, STATE_NAME)


def load_state(state_dir: str) -> dict | None:
    try:
        with open(_state_path(state_dir)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise TestbedError(f"{_state_path(state_dir)}: unreadable ({e}); remove it and run "
                           "`testbed down --all`") from None


def save_state(state_dir: str, state: dict) -> None:
    path = _state_path(state_dir)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def shape_of(agent: dict) -> LinkShape:
    return LinkShape(**agent.get("shape", {}))


# -- processes --------------------------------------------------------------------------------

def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        return shaping.run(["ip", *args], check=check)
    except shaping.ShapingError as e:
        raise TestbedError(str(e)) from None


def _pid_is_ours(pid: int) -> bool:
    """Alive and running one of our modules (guards against a recycled pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"edge_agent" in cmdline or b"testbed.relay" in cmdline


def _stop_pids(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL whatever is left after STOP_GRACE_S."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if os.path.exists(f"/proc/{p}")]
        for pid in live:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while live and time.monotonic() < deadline:
            for pid in live:
                try:  # reap our own children so they do not linger as zombies
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            live = [p for p in live if _alive(p)]
            time.sleep(0.05)
        if not live:
            return


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _spawn(cmd: list[str], log_path: str) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # many agents share few cores
    with open(log_path, "ab") as log:
        # A new session: the agents outlive `testbed up` and a Ctrl-C in its terminal.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def _log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- network ----------------------------------------------------------------------------------

def _list_netns() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _list_links() -> list[str]:
    out = _ip("-o", "link", "show", check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _our_routes() -> list[str]:
    out = _ip("route", "show", "type", "unreachable", check=False).stdout
    return [line.split()[1] for line in out.splitlines() if f" {SUBNET}." in f" {line}"]


def _free_slot() -> int:
    used = _ip("-o", "addr", check=False).stdout + _ip("route", "show", "table", "all",
                                                       check=False).stdout
    for slot in range(256):
        if f"{SUBNET}.{slot}." not in used:
            return slot
    raise TestbedError(f"no free /24 left in {SUBNET}.0.0/16 (run `testbed down --all`)")


def _make_link(agent: dict) -> None:
    ns, host_dev, ns_dev = agent["ns"], agent["host_dev"], agent["ns_dev"]
    _ip("netns", "add", ns)
    _ip("link", "add", host_dev, "type", "veth", "peer", "name", ns_dev, "netns", ns)
    _ip("addr", "add", f"{agent['host_addr']}/30", "dev", host_dev)
    _ip("link", "set", host_dev, "up")
    _ip("-n", ns, "addr", "add", f"{agent['ns_addr']}/30", "dev", ns_dev)
    _ip("-n", ns, "link", "set", ns_dev, "up")
    _ip("-n", ns, "link", "set", "lo", "up")  # the relay reaches the agent on loopback


def _apply(state: dict, agent: dict, shape: LinkShape, old: LinkShape | None = None) -> None:
    """Shape one link; with OLD (what it has now), touch only the parts that change: a
    scenario re-applies shapes every epoch, and each tc/nft call costs a process and can
    drop what a replaced qdisc held."""
    try:
        shaping.apply(state["backend"], agent["ns"], agent["host_dev"], agent["ns_dev"], shape,
                      old)
    except shaping.ShapingError as e:
        raise TestbedError(str(e)) from None
    relay_same = old is not None and (old.delay_ms, old.jitter_ms) == (shape.delay_ms,
                                                                        shape.jitter_ms)
    if agent.get("relay_settings") and not relay_same:
        if not write_settings(agent["relay_settings"], shape.delay_ms, shape.jitter_ms,
                              wait=True):
            raise TestbedError(f"agent {agent['index']}'s relay did not take the new delay "
                               f"within {APPLY_TIMEOUT_S:g} s (see "
                               f"{agent['relay_settings'][:-5]}.log)")


# -- the testbed ------------------------------------------------------------------------------

@dataclass
class Testbed:
    __test__ = False  # not a pytest test class, despite the name
    state_dir: str
    roster_path: str
    backend: str
    endpoints: dict[int, str]  # expert id -> endpoint the base station dials
    agent_of: dict[int, int]  # expert id -> agent index

    def degrade(self, agent_index: int, shape: LinkShape) -> None:
        degrade(self.state_dir, agent_index, shape)

    def down(self) -> list[str]:
        return down(self.state_dir)


def _testbed_from_state(state_dir: str, state: dict) -> Testbed:
    endpoints, agent_of = {}, {}
    for agent in state["agents"]:
        for expert in agent["experts"]:
            endpoints[expert] = agent["endpoint"]
            agent_of[expert] = agent["index"]
    return Testbed(state_dir, state["roster_path"], state["backend"], endpoints, agent_of)


def up(shards: str, num_agents: int, shapes: dict[int, LinkShape] | None = None,
       state_dir: str = DEFAULT_STATE_DIR, roster_path: str | None = None,
       agent_args: list[str] = (), timeout_s: float = UP_TIMEOUT_S) -> Testbed:
    """Bring up num_agents agents behind shaped links and write the roster; returns when every
    agent answers INFO. Raises TestbedError (after removing everything it made)."""
    from shard_tool.errors import ShardError
    from shard_tool.manifest import load_manifest

    try:
        num_experts = load_manifest(shards).num_experts
    except ShardError as e:
        raise TestbedError(str(e)) from None
    groups = assign_experts(num_experts, num_agents)
    if num_agents > MAX_AGENTS:
        raise TestbedError(f"at most {MAX_AGENTS} agents")
    shapes = {int(i): s.check() for i, s in (shapes or {}).items()}
    if any(i not in range(num_agents) for i in shapes):
        raise TestbedError(f"shapes given for agents outside 0-{num_agents - 1}")
    state_dir = os.path.abspath(state_dir)
    os.makedirs(state_dir, exist_ok=True)
    if load_state(state_dir) is not None:
        raise TestbedError(f"a testbed is already up in {state_dir}; run `testbed down "
                           f"--state-dir {state_dir}` first")
    roster_path = os.path.abspath(roster_path or os.path.join(state_dir, "roster.toml"))
    root = is_root()
    state = {"tag": os.urandom(2).hex(), "slot": None, "backend": shaping.LOOPBACK,
             "shards": os.path.abspath(shards), "roster_path": roster_path, "agents": []}
    save_state(state_dir, state)  # first, so `down` finds whatever follows
    try:
        if root:
            _up_namespaces(state_dir, state, groups, list(agent_args))
        else:
            _up_loopback(state_dir, state, groups, list(agent_args))
        _wait_ready(state, timeout_s)
        for agent in state["agents"]:
            shape = shapes.get(agent["index"], LinkShape())
            if shape != LinkShape():
                if not root:
                    raise TestbedError("link shapes need root (network namespaces); run as "
                                       "root or without a scenario")
                _apply(state, agent, shape)
                agent["shape"] = dataclasses.asdict(shape)
        save_state(state_dir, state)
        with open(roster_path, "w") as f:
            f.write(roster_toml({tuple(a["experts"]): a["endpoint"] for a in state["agents"]}))
    except BaseException:
        down(state_dir)
        raise
    return _testbed_from_state(state_dir, state)


def _up_namespaces(state_dir: str, state: dict, groups: list[tuple[int, ...]],
                   agent_args: list[str]) -> None:
    slot, tag = _free_slot(), state["tag"]
    state["slot"] = slot
    save_state(state_dir, state)
    # Traffic for a vanished veth must not follow the default route out of this machine.
    _ip("route", "add", "unreachable", f"{SUBNET}.{slot}.0/24")
    for i, experts in enumerate(groups):
        agent = {"index": i, "experts": list(experts), "ns": f"{NS_PREFIX}{tag}-{i}",
                 "host_dev": f"{LINK_PREFIX}{tag}h{i}", "ns_dev": f"{LINK_PREFIX}{tag}n{i}",
                 "host_addr": f"{SUBNET}.{slot}.{4 * i + 1}",
                 "ns_addr": f"{SUBNET}.{slot}.{4 * i + 2}", "pids": [],
                 "log": os.path.join(state_dir, f"agent-{i}.log"), "shape": {}}
        agent["endpoint"] = f"tcp://{agent['ns_addr']}:{AGENT_PORT}"
        state["agents"].append(agent)
        save_state(state_dir, state)
        _make_link(agent)
    backend = shaping.NETEM if shaping.has_netem(state["agents"][0]["host_dev"]) else \
        shaping.FALLBACK
    state["backend"] = backend
    if backend == shaping.FALLBACK:
        try:
            shaping.ensure_nft()
        except shaping.ShapingError as e:
            raise TestbedError(str(e)) from None
    for agent in state["agents"]:
        ns, ns_addr = agent["ns"], agent["ns_addr"]
        exec_ns = ["ip", "netns", "exec", ns, sys.executable, "-m"]
        if backend == shaping.FALLBACK:
            agent["relay_settings"] = os.path.join(state_dir, f"relay-{agent['index']}.json")
            write_settings(agent["relay_settings"], 0, 0)
            agent["pids"].append(_spawn(
                exec_ns + ["testbed.relay", "--listen", f"{ns_addr}:{AGENT_PORT}", "--target",
                           f"127.0.0.1:{AGENT_INNER_PORT}", "--settings", agent["relay_settings"]],
                os.path.join(state_dir, f"relay-{agent['index']}.log")))
            bind = f"tcp://127.0.0.1:{AGENT_INNER_PORT}"
        else:
            bind = agent["endpoint"]
        agent["pids"].append(_spawn(
            exec_ns + ["edge_agent", "--expert", experts_spec(tuple(agent["experts"])),
                       "--shards", state["shards"], "--bind", bind,
                       "--advertise", agent["endpoint"], *agent_args], agent["log"]))
        save_state(state_dir, state)


def _up_loopback(state_dir: str, state: dict, groups: list[tuple[int, ...]],
                 agent_args: list[str]) -> None:
    for i, experts in enumerate(groups):
        endpoint = f"tcp://127.0.0.1:{_free_port()}"
        agent = {"index": i, "experts": list(experts), "ns": None, "endpoint": endpoint,
                 "pids": [], "log": os.path.join(state_dir, f"agent-{i}.log"), "shape": {}}
        state["agents"].append(agent)
        agent["pids"].append(_spawn(
            [sys.executable, "-m", "edge_agent", "--expert", experts_spec(experts), "--shards",
             state["shards"], "--bind", endpoint, *agent_args], agent["log"]))
        save_state(state_dir, state)


def _wait_ready(state: dict, timeout_s: float) -> None:
    """Until every agent answers INFO through its link. Raises TestbedError."""
    from edge_agent.client import AgentClient, PeerUnreachable

    deadline = time.monotonic() + timeout_s
    with AgentClient() as client:
        peers = {a["index"]: client.connect(a["endpoint"]) for a in state["agents"]}
        pending = {a["index"]: a for a in state["agents"]}
        while pending:
            for i, agent in pending.items():
                if not all(_alive(p) for p in agent["pids"]):
                    raise TestbedError(f"agent {i} exited: {_log_tail(agent['log'])}")
            sent = {}
            for i in pending:
                try:
                    sent[client.send(peers[i], "info")] = i
                except PeerUnreachable:
                    pass  # not connected yet: ask again next round
            for reply in client.wait(set(sent), INFO_TIMEOUT_S).values():
                if reply.kind != "error":
                    pending.pop(sent[reply.id], None)
            if pending and time.monotonic() > deadline:
                late = ", ".join(str(i) for i in pending)
                raise TestbedError(f"agents {late} did not answer within {timeout_s:g} s "
                                   f"(logs in {os.path.dirname(state['roster_path'])})")
            if pending and not sent:
                time.sleep(0.2)


def _find(state: dict, agent_index: int) -> dict:
    for agent in state["agents"]:
        if agent["index"] == agent_index:
            return agent
    raise TestbedError(f"no agent {agent_index} (agents 0-{len(state['agents']) - 1})")


def agent_for_expert(state_dir: str, expert: int) -> int:
    state = _require_state(state_dir)
    for agent in state["agents"]:
        if expert in agent["experts"]:
            return agent["index"]
    raise TestbedError(f"no agent hosts expert {expert}")


def _require_state(state_dir: str) -> dict:
    state = load_state(state_dir)
    if state is None:
        raise TestbedError(f"no testbed is up in {state_dir} (run `testbed up` first)")
    return state


def degrade(state_dir: str, agent: int, shape: LinkShape, *, by_expert: bool = False) -> None:
    """Replace the shape of one agent's link (by agent index, or by an expert it hosts) while
    everything runs. Raises TestbedError."""
    state = _require_state(state_dir)
    index = agent_for_expert(state_dir, agent) if by_expert else agent
    entry = _find(state, index)
    if state["backend"] == shaping.LOOPBACK:
        raise TestbedError("links cannot be shaped: agents are on loopback (not root)")
    _apply(state, entry, shape.check(), old=shape_of(entry))
    entry["shape"] = dataclasses.asdict(shape)
    save_state(state_dir, state)


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


def status(state_dir: str) -> list[LinkStatus]:
    """Each link's shape and its agent's state. Raises TestbedError when nothing is up."""
    from edge_agent.client import AgentClient, PeerUnreachable

    state = _require_state(state_dir)
    out = []
    with AgentClient() as client:
        sent = {}
        peers = {a["index"]: client.connect(a["endpoint"]) for a in state["agents"]}
        time.sleep(0.1)  # give the connections a moment before asking
        for agent in state["agents"]:
            try:
                sent[client.send(peers[agent["index"]], "info")] = agent["index"]
            except PeerUnreachable:
                pass
        replies = client.wait(set(sent), INFO_TIMEOUT_S)
        answered = {sent[r] for r in replies if replies[r].kind != "error"}
    for agent in state["agents"]:
        out.append(LinkStatus(agent["index"], tuple(agent["experts"]), agent.get("ns"),
                              agent["endpoint"], state["backend"], shape_of(agent),
                              bool(agent["pids"]) and all(_alive(p) for p in agent["pids"]),
                              agent["index"] in answered))
    return out


def down(state_dir: str = DEFAULT_STATE_DIR, everything: bool = False) -> list[str]:
    """Remove every namespace, veth, route, rule (nft tables live in the namespaces) and process
    `up` made in state_dir, also after a crash; `everything` also removes every `wdm-*` leftover
    of any testbed. Safe to run twice. Returns what it removed."""
    state = load_state(state_dir) if os.path.isdir(state_dir) else None
    removed: list[str] = []
    tag = state["tag"] if state else None
    if state is None and not everything:
        return removed
    if not is_root():
        pids = [p for a in (state or {}).get("agents", []) for p in a.get("pids", [])
                if _pid_is_ours(p)]
        _stop_pids(pids)
        removed += [f"process {p}" for p in pids]
    else:
        ns_prefix = NS_PREFIX if everything else f"{NS_PREFIX}{tag}-"
        namespaces = {a["ns"] for a in (state or {}).get("agents", []) if a.get("ns")}
        namespaces = {ns for ns in _list_netns() if ns in namespaces or ns.startswith(ns_prefix)}
        # Every process inside our namespaces is one we started (agents, relays, probes).
        pids = [int(p) for ns in namespaces
                for p in _ip("netns", "pids", ns, check=False).stdout.split()]
        pids += [p for a in (state or {}).get("agents", []) for p in a.get("pids", [])
                 if _pid_is_ours(p) and p not in pids]
        _stop_pids(pids)
        removed += [f"process {p}" for p in pids]
        for ns in sorted(namespaces):
            _ip("netns", "del", ns, check=False)
            removed.append(f"namespace {ns}")
        # Deleting a namespace deletes its veth end and so the pair; catch any half-made one.
        link_prefix = LINK_PREFIX if everything else f"{LINK_PREFIX}{tag}"
        for link in _list_links():
            if link.startswith(link_prefix) and (everything or len(link) > len(link_prefix)):
                if _ip("link", "del", link, check=False).returncode == 0:
                    removed.append(f"link {link}")
        slot = (state or {}).get("slot")
        for route in _our_routes():
            if everything or (slot is not None and route == f"{SUBNET}.{slot}.0/24"):
                _ip("route", "del", "unreachable", route, check=False)
                removed.append(f"route unreachable {route}")
    if state is not None:
        for agent in state.get("agents", []):
            if agent.get("relay_settings"):
                for path in (agent["relay_settings"], applied_path(agent["relay_settings"])):
                    if os.path.exists(path):
                        os.remove(path)
        os.remove(_state_path(state_dir))
    return removed

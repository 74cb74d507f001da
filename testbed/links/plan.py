"""Pure planning for `testbed up`: where the links live, which agent hosts which experts, the
names, addresses and command lines of each agent, as data (no I/O); `control.up` gathers the
facts a plan needs (the model's experts, the mode, a free address slot) and `up.py` makes it.

Modes (where the links live):
- root: namespaces `wdm-TAG-I` on this machine, veth `wdmTAGhI` (host) ↔ `wdmTAGnI`
  (namespace) addressed 10.213.S.(4I+1)/30 ↔ 10.213.S.(4I+2)/30, S a /24 slot free here;
- userns (not root): the same namespaces, veths and addresses inside an unprivileged user +
  network + mount namespace (testbed/links/userns.py); the base station dials a relay per agent on
  this machine's 127.0.0.1, which forwards (and delays) into that namespace;
- loopback: agents on 127.0.0.1 without shaping, where neither is possible.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from testbed.links.spec import LinkShape, TestbedError

ROOT, USERNS, LOOPBACK = "root", "userns", "loopback"
MODES = (ROOT, USERNS, LOOPBACK)
NS_PREFIX = "wdm-"  # every namespace we make; `down --all` removes all of them
LINK_PREFIX = "wdm"  # every host-side veth we make
SUBNET = "10.213"  # private range reserved for our namespaces (10.213.0.0/16)
MAX_AGENTS = 63  # /30 per agent inside one /24 slot
AGENT_PORT = 5600  # what is dialled on the veth: the relay (root, no netem) or the agent
AGENT_INNER_PORT = 5601  # the agent on the namespace's loopback, behind the relay (root)
LOCALHOST = "127.0.0.1"


def choose_mode(root: bool, userns_unavailable: str | None) -> tuple[str, str | None]:
    """(mode, why links are not shaped or None): root if we are, else a user namespace where
    the kernel allows one (userns_unavailable is None), else loopback."""
    if root:
        return ROOT, None
    if userns_unavailable is None:
        return USERNS, None
    return LOOPBACK, f"not root and user namespaces are unavailable ({userns_unavailable})"


def backend_name(mode: str, shaper: str) -> str:
    """What records and `status` call the backend: the shaper ('netem', 'tbf+nft+relay'),
    prefixed 'userns+' (and '+relay' where the shaper has none) inside a user namespace."""
    if mode != USERNS:
        return shaper
    return f"{USERNS}+{shaper}" + ("" if shaper.endswith("+relay") else "+relay")


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


def _str_list(value, what: str) -> list[str]:
    # A bare string would become one argument per character: refuse it.
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or \
            not all(isinstance(a, str) for a in value):
        raise TestbedError(f"{what} must be a list of strings, not {value!r}")
    return list(value)


def agent_args_by_index(agent_args: Sequence[str] | Mapping[int, Sequence[str]] | None,
                        num_agents: int) -> dict[int, list[str]]:
    """Extra edge_agent arguments per agent index: None -> none; a list -> the same for every
    agent; {i: [...]} -> agent i's. Raises TestbedError."""
    if agent_args is None:
        return {i: [] for i in range(num_agents)}
    if not isinstance(agent_args, Mapping):
        common = _str_list(agent_args, "agent_args")
        return {i: list(common) for i in range(num_agents)}
    out = {i: [] for i in range(num_agents)}
    for key, value in agent_args.items():
        if not isinstance(key, int) or key not in out:
            raise TestbedError(f"agent_args for agent {key!r}: agents are 0-{num_agents - 1}")
        out[key] = _str_list(value, f"agent_args[{key}]")
    return out


@dataclass(frozen=True)
class UpPlan:
    """What `testbed up` makes, decided before anything is made."""
    mode: str  # ROOT, USERNS or LOOPBACK
    tag: str  # in every name this testbed's namespaces and veths get
    shards: str  # absolute
    state_dir: str  # absolute
    roster_path: str  # absolute
    groups: tuple[tuple[int, ...], ...]  # the experts of each agent index
    agent_args: dict[int, list[str]]  # extra edge_agent arguments per agent index
    shapes: dict[int, LinkShape]  # links shaped once every agent answers; the rest stay plain


def plan_up(*, num_experts: int, num_agents: int, shapes: Mapping[int, LinkShape] | None,
            agent_args: Sequence[str] | Mapping[int, Sequence[str]] | None, mode: str,
            unshaped_reason: str | None, shards: str, state_dir: str,
            roster_path: str | None, tag: str) -> UpPlan:
    """`testbed up`'s plan from its arguments and the facts gathered for it: the model's
    NUM_EXPERTS, the MODE chosen and, in loopback mode, why links cannot be shaped. Raises
    TestbedError for a request that cannot be made."""
    groups = assign_experts(num_experts, num_agents)
    if num_agents > MAX_AGENTS:
        raise TestbedError(f"at most {MAX_AGENTS} agents")
    extra_args = agent_args_by_index(agent_args, num_agents)
    checked = {int(i): s.check() for i, s in (shapes or {}).items()}
    if any(i not in range(num_agents) for i in checked):
        raise TestbedError(f"shapes given for agents outside 0-{num_agents - 1}")
    if mode == LOOPBACK and any(s != LinkShape() for s in checked.values()):
        why = unshaped_reason or "mode loopback"
        raise TestbedError(f"link shapes need network namespaces ({why}); run without a "
                           "scenario")
    state_dir = os.path.abspath(state_dir)
    return UpPlan(mode=mode, tag=tag, shards=os.path.abspath(shards), state_dir=state_dir,
                  roster_path=os.path.abspath(roster_path or
                                              os.path.join(state_dir, "roster.toml")),
                  groups=tuple(groups), agent_args=extra_args,
                  shapes={i: s for i, s in sorted(checked.items()) if s != LinkShape()})


def plan_namespaced_agents(plan: UpPlan, slot: int) -> list[dict]:
    """Every agent's state record once the /24 SLOT is known (plan_namespaced_agent)."""
    return [plan_namespaced_agent(i, experts, plan.tag, slot, plan.state_dir,
                                  plan.agent_args[i]) for i, experts in enumerate(plan.groups)]


def plan_loopback_agents(plan: UpPlan, ports: Sequence[int]) -> list[dict]:
    """Every agent's state record on 127.0.0.1, agent I on PORTS[I]."""
    return [plan_loopback_agent(i, experts, ports[i], plan.state_dir, plan.agent_args[i])
            for i, experts in enumerate(plan.groups)]


def plan_namespaced_agent(index: int, experts: tuple[int, ...], tag: str, slot: int,
                          state_dir: str, extra_args: list[str]) -> dict:
    """Agent INDEX's record in the state file: its namespace, veth, addresses and log; `up`
    fills in endpoint, relay and processes as it makes them."""
    return {"index": index, "experts": list(experts), "ns": f"{NS_PREFIX}{tag}-{index}",
            "host_dev": f"{LINK_PREFIX}{tag}h{index}", "ns_dev": f"{LINK_PREFIX}{tag}n{index}",
            "host_addr": f"{SUBNET}.{slot}.{4 * index + 1}",
            "ns_addr": f"{SUBNET}.{slot}.{4 * index + 2}",
            "endpoint": f"tcp://{SUBNET}.{slot}.{4 * index + 2}:{AGENT_PORT}",
            "agent_args": list(extra_args), "pids": [], "agent_pid": None,
            "log": os.path.join(state_dir, f"agent-{index}.log"), "shape": {}}


def plan_loopback_agent(index: int, experts: tuple[int, ...], port: int, state_dir: str,
                        extra_args: list[str]) -> dict:
    return {"index": index, "experts": list(experts), "ns": None,
            "endpoint": f"tcp://{LOCALHOST}:{port}", "agent_args": list(extra_args),
            "pids": [], "agent_pid": None,
            "log": os.path.join(state_dir, f"agent-{index}.log"), "shape": {}}


def edge_agent_command(python: str, agent: dict, shards: str, bind: str,
                       insecure: bool = False) -> list[str]:
    """The agent's command line; the base station dials agent['endpoint']. INSECURE: say that a
    bind beyond loopback is meant to be unencrypted (edge_agent refuses one otherwise)."""
    return [python, "-m", "edge_agent", "--expert", experts_spec(tuple(agent["experts"])),
            "--shards", shards, "--bind", bind, "--advertise", agent["endpoint"],
            *(["--insecure"] if insecure else []), *agent["agent_args"]]


def relay_command(python: str, target: str, *, listen: str | None = None,
                  listen_fd: int | None = None, settings: str | None = None) -> list[str]:
    """testbed.links.relay accepting on LISTEN (HOST:PORT) or on an inherited listening socket."""
    where = ["--listen", listen] if listen else ["--listen-fd", str(listen_fd)]
    return [python, "-m", "testbed.links.relay", *where, "--target", target,
            *(["--settings", settings] if settings else [])]

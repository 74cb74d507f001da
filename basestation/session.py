"""A live base station: roster in, agents found and checked, model loaded, ready to generate.

This module is the wiring: it builds the runtime from the roster (basestation/roster.py), the
agents found (basestation/discovery.py) and the shards. Callers build a roster with
`build_roster` and open a session with `open_session`; both raise RosterError for the user.
"""

from __future__ import annotations

from dataclasses import dataclass

from basestation.agents import AgentTable
from basestation.discovery import connect_agents, open_links
from basestation.dispatch import Dispatcher
from basestation.liveness import AgentLink, Prober
from basestation.moe_layer import MoeRuntime
from basestation.roster import Roster, RosterError, build_roster
from common.devices import resolve_device, resolve_dtype
from common.errors import ShardError
from common.expert_ids import format_expert_ids as _ids
from common.expert_ids import parse_expert_ids
from shard_tool.manifest import load_manifest
from wire import protocol as P
from wire.client import AgentClient


@dataclass
class Session:
    client: AgentClient
    runtime: MoeRuntime  # the MoE layers' shared state: agents, dispatcher, stats
    base: object  # basestation.model.BaseModel
    theta: float = 0.0  # the default θ of requests that do not say

    @property
    def agents(self) -> list[AgentLink]:
        return self.runtime.agents

    @property
    def dispatcher(self) -> Dispatcher:
        return self.runtime.dispatcher

    def poll_probes(self, timeout_s: float = 0.0) -> None:
        self.runtime.prober.poll(timeout_s)

    def close(self) -> None:
        self.client.close()


def open_session(shards: str, roster: Roster, theta: float = 0.0, latency: str = "measured",
                 dtype: str = "auto", wire_dtype: str | None = None, wait_s: float = 30.0,
                 allow_missing: bool = False, local_fallback: str | None = None,
                 channel=None, device: str = "auto", progress: bool = True) -> Session:
    """Raises RosterError or ShardError with a message for the user."""
    from basestation.model import load_base_model

    manifest = load_manifest(shards)
    num_experts = manifest.num_experts
    hidden = int(manifest.model["hidden_size"])
    try:
        wire = P.WIRE_DTYPES[P.wire_dtype_name(wire_dtype)] if wire_dtype else \
            resolve_dtype(dtype, manifest.model.get("dtype"), resolve_device(device))
    except P.ProtocolError:
        raise RosterError(f"--wire-dtype {wire_dtype}: one of {', '.join(P.WIRE_DTYPES)}") \
            from None
    fallback = None
    if local_fallback:
        from edge_agent.shards import load_experts

        try:
            ids = list(range(num_experts)) if local_fallback == "all" else \
                list(parse_expert_ids(local_fallback))
        except ValueError as e:
            raise RosterError(f"--local-fallback {e}") from None
        fallback = load_experts(shards, ids, device="cpu", dtype=dtype)
    client = open_links(roster)
    try:
        agents = connect_agents(client, roster, manifest.fingerprint, num_experts, wait_s,
                                need_all=not allow_missing and fallback is None,
                                progress=progress)
        if fallback is not None and not allow_missing:
            covered = {e for a in agents for e in a.experts} | set(fallback.weights)
            if len(covered) < num_experts:
                raise RosterError(f"no agent or fallback for experts "
                                  f"{_ids(sorted(set(range(num_experts)) - covered))}")
        moe_layers = manifest.model.get("moe_layers") or [0]
        table = AgentTable(agents, num_experts, hidden, element_bytes=wire.itemsize,
                           fallback=fallback)
        prober = Prober(client, table, probe_layer=int(moe_layers[0]), wire_dtype=wire_dtype)
        dispatcher = Dispatcher(client, table, prober, wire_dtype=wire_dtype)
        runtime = MoeRuntime(table, dispatcher, prober, int(manifest.model["ffn_size"]),
                             latency=latency, scenario=channel)
        base = load_base_model(shards, runtime, dtype=dtype, device=device)
        prober.calibrate()
    except BaseException:
        client.close()
        raise
    return Session(client=client, runtime=runtime, base=base, theta=theta)


# build a roster, open a session, catch the two errors: the names a caller needs
__all__ = ["Roster", "RosterError", "Session", "ShardError", "build_roster", "open_session"]

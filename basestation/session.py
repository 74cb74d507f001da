"""A live base station: roster in, agents found and checked, model loaded, ready to generate.

Agents that listen are connected to (`--agent 3=tcp://HOST:PORT`, `--agents FILE`); agents
that dial in are listened for (`--listen tcp://0.0.0.0:PORT`). Every expert id must end up with
a live agent serving this model's fingerprint (or a local fallback), else a one-line error,
unless `--allow-missing`.

With `--keys DIR` every link can be CurveZMQ (wire/keys.py): a roster entry carries its
agent's public key, and DIR/trusted/ holds the agents allowed to dial in. Roster file (TOML):
    [basestation]
    keys = "keys/basestation"      (optional: --keys when the command gives none)
    [agents]
    "0-3" = "tcp://10.0.0.2:5600"
    "4-7" = { endpoint = "tcp://10.0.0.3:5600", public_key = "<the 40 Z85 characters>" }
    "8" = { endpoint = "tcp://10.0.0.4:5600", certificate = "keys/edge-4.key" }
The first form is a plain link; `certificate` and `keys` are paths relative to the roster file.
"""

from __future__ import annotations

import json
import os
import sys
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field

import zmq

from basestation.dispatch import Dispatcher
from basestation.liveness import AgentLink, Prober
from basestation.moe_layer import MoeRuntime
from wire import protocol as P
from wire.client import AgentClient, PeerUnreachable
from wire.keys import (
    KeyFolder,
    KeysError,
    is_loopback_endpoint,
    load_key_folder,
    parse_public_key,
    read_certificate,
    refuse_unprotected_bind,
)
from common.errors import ShardError
from common.expert_ids import format_expert_ids as _ids
from common.expert_ids import parse_expert_ids
from shard_tool.manifest import load_manifest

INFO_RETRY_S = 0.5  # re-ask an agent that has not answered INFO yet


class RosterError(Exception):
    """The roster or the agents it names cannot make a working base station."""


@dataclass(frozen=True)
class RosterAgent:
    """One listening agent of the roster."""

    experts: tuple[int, ...]
    endpoint: str
    public_key: bytes | None = None  # its CURVE public key (Z85): the link is encrypted to it


@dataclass(frozen=True)
class Roster:
    endpoints: dict[str, tuple[int, ...]]  # listening agent endpoint -> expert ids it should host
    listen: str | None = None  # where dial-in agents connect
    public_keys: dict[str, bytes] = field(default_factory=dict)  # endpoint -> agent's public key
    keys: KeyFolder | None = None  # --keys: our keypair; trusted/ = who may dial in


def parse_agent_flag(value: str) -> tuple[tuple[int, ...], str]:
    """'3=tcp://h:p' or '0-3=tcp://h:p' -> (ids, endpoint). Raises RosterError."""
    spec, sep, endpoint = value.partition("=")
    if not sep or not endpoint.startswith(("tcp://", "ipc://")):
        raise RosterError(f"--agent {value!r}: expected EXPERTS=tcp://HOST:PORT (e.g. 3=tcp://"
                          "10.0.0.3:5600)")
    try:
        return parse_expert_ids(spec), endpoint
    except ValueError as e:  # its message names the ids, cut short, and what is wrong
        raise RosterError(f"--agent {endpoint[:80]!r}: {e}") from None


ROSTER_ENTRY_FIELDS = ("endpoint", "public_key", "certificate")
ROSTER_BASESTATION_FIELDS = ("keys",)


def _load_roster(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise RosterError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise RosterError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:  # tomllib decodes first: a binary file is not a TOMLDecodeError
        raise RosterError(f"{path}: not valid TOML: not UTF-8 text") from None


def _beside(path: str, relative: str) -> str:
    """A path the roster file names, relative to the roster's own folder."""
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)), relative))


def read_roster_keys(path: str) -> str | None:
    """The key folder a roster's [basestation] table names (`keys = "DIR"`, relative to the
    roster file), or None. Raises RosterError."""
    table = _load_roster(path).get("basestation")
    if table is None:
        return None
    if not isinstance(table, dict) or set(table) - set(ROSTER_BASESTATION_FIELDS) \
            or not isinstance(table.get("keys"), str):
        raise RosterError(f'{path}: [basestation] takes keys = "DIR" only (the base '
                          "station's key folder)")
    return _beside(path, table["keys"])


def read_roster_agents(path: str) -> list[RosterAgent]:
    """A TOML roster: an [agents] table of "EXPERTS" = "tcp://HOST:PORT", or = { endpoint = …,
    public_key = "Z85" } or { endpoint = …, certificate = "PATH.key" } (relative to the roster
    file). Raises RosterError."""
    agents = _load_roster(path).get("agents")
    if not isinstance(agents, dict) or not agents:
        raise RosterError(f'{path}: needs an [agents] table, e.g. "3" = "tcp://10.0.0.3:5600"')
    return [_roster_agent(path, spec, value) for spec, value in agents.items()]


def _roster_agent(path: str, spec: str, value) -> RosterAgent:
    if isinstance(value, str):
        return RosterAgent(*parse_agent_flag(f"{spec}={value}"))
    where = f"{path}: agent {spec!r}"
    if not isinstance(value, dict) or not isinstance(value.get("endpoint"), str):
        raise RosterError(f'{where}: expected "tcp://HOST:PORT" or {{ endpoint = "tcp://…", '
                          'public_key = "…" }')
    unknown = sorted(set(value) - set(ROSTER_ENTRY_FIELDS))
    if unknown or ("public_key" in value and "certificate" in value):
        raise RosterError(f"{where}: fields are endpoint and one of public_key, certificate"
                          f"{' (not ' + ', '.join(unknown) + ')' if unknown else ''}")
    try:
        if "public_key" in value:
            key = parse_public_key(value["public_key"])
        elif "certificate" in value:
            key = read_certificate(_beside(path, str(value["certificate"])))
        else:
            key = None
    except KeysError as e:
        raise RosterError(f"{where}: {e}") from None
    return RosterAgent(*parse_agent_flag(f"{spec}={value['endpoint']}"), public_key=key)


def read_roster_file(path: str) -> list[tuple[tuple[int, ...], str]]:
    """The roster's (expert ids, endpoint) pairs, keys left out. Raises RosterError."""
    return [(agent.experts, agent.endpoint) for agent in read_roster_agents(path)]


def format_roster(agents: Iterable[RosterAgent], comment: str | None = None,
                  keys: str | None = None) -> str:
    """A roster file's text (what read_roster_agents reads): one entry per agent, with its
    public key when it has one, and `keys`, the base station's key folder (absolute, or
    relative to the roster file), when given (for tools that write rosters, such as the
    testbed)."""
    lines = [f"# {comment}"] if comment else []
    if keys is not None:
        lines += ["[basestation]", f"keys = {json.dumps(keys)}", ""]
    lines.append("[agents]")
    for agent in agents:
        spec, endpoint = json.dumps(_ids(agent.experts)), json.dumps(agent.endpoint)
        if agent.public_key is None:
            lines.append(f"{spec} = {endpoint}")
        else:  # TOML basic strings are JSON's for this text (Z85 has no quote or backslash)
            lines.append(f"{spec} = {{ endpoint = {endpoint}, public_key = "
                         f"{json.dumps(agent.public_key.decode())} }}")
    return "\n".join(lines) + "\n"


def build_roster(agent_flags: list[str], agents_file: str | None, listen: str | None,
                 keys_dir: str | None = None, insecure: bool = False) -> Roster:
    """The agents to reach and how (--agent, --agents, --listen, --keys, --insecure; without
    --keys, the roster's [basestation] keys). Protected by default: --listen beyond loopback
    needs keys, and with keys every agent beyond loopback needs its public key, unless
    `insecure`. Raises RosterError."""
    entries = [RosterAgent(*parse_agent_flag(v)) for v in agent_flags or []]
    if agents_file:
        entries += read_roster_agents(agents_file)
        keys_dir = keys_dir or read_roster_keys(agents_file)
    if not entries and not listen:
        raise RosterError("no agents: give --agent EXPERTS=tcp://HOST:PORT, --agents FILE "
                          "or --listen tcp://0.0.0.0:PORT")
    endpoints: dict[str, tuple[int, ...]] = {}
    public_keys: dict[str, bytes] = {}
    claimed: dict[int, str] = {}
    for agent in entries:
        endpoint = agent.endpoint
        for expert in agent.experts:
            if expert in claimed and claimed[expert] != endpoint:
                raise RosterError(f"expert {expert} is given to both {claimed[expert]} and "
                                  f"{endpoint}")
            claimed[expert] = endpoint
        endpoints[endpoint] = tuple(sorted(set(endpoints.get(endpoint, ())) | set(agent.experts)))
        if agent.public_key is not None and \
                public_keys.setdefault(endpoint, agent.public_key) != agent.public_key:
            raise RosterError(f"{endpoint} is given two different public keys")
    try:
        keys = load_key_folder(keys_dir, "basestation") if keys_dir else None
        if listen:
            refuse_unprotected_bind(listen, keys, insecure, "basestation", "--listen")
    except KeysError as e:
        raise RosterError(str(e)) from None
    if public_keys and keys is None:
        raise RosterError(f"the roster gives {next(iter(public_keys))} a public key: the base "
                          "station needs its own keypair too (--keys DIR; `basestation keygen "
                          "DIR` makes one)")
    if keys is not None:
        if listen and not keys.trusted:
            raise RosterError(f"--listen with --keys {keys_dir}: its trusted/ folder holds no "
                              "agent certificate, so no agent could dial in")
        plain = [e for e in endpoints if e not in public_keys and not is_loopback_endpoint(e)]
        if plain and not insecure:
            raise RosterError(f"{plain[0]} has no public key in the roster: give it one "
                              "(public_key = … or certificate = \"….key\") or pass --insecure "
                              "to reach it unencrypted")
    return Roster(endpoints=endpoints, listen=listen, public_keys=public_keys, keys=keys)


def open_links(roster: Roster) -> AgentClient:
    """A client socket connected to every roster agent (CurveZMQ to those with a public key)
    and listening for dial-ins (CurveZMQ, admitting DIR/trusted/, with --keys). Raises
    RosterError."""
    keys = roster.keys
    client = AgentClient(keypair=keys.keypair if keys else None)
    try:
        for endpoint in roster.endpoints:
            client.connect(endpoint, server_key=roster.public_keys.get(endpoint))
        if roster.listen:
            try:
                client.bind(roster.listen, admitted=keys.trusted if keys else None)
            except zmq.ZMQError as e:
                raise RosterError(f"cannot listen on {roster.listen}: {e.strerror}") from None
    except BaseException:
        client.close()
        raise
    return client


def connect_agents(client: AgentClient, roster: Roster, fingerprint: str, num_experts: int,
                   wait_s: float, need_all: bool, progress: bool = True) -> list[AgentLink]:
    """Find every agent of the roster (and dial-ins) on `client` (from open_links), check it
    serves this model, wait for the experts up to `wait_s` with a countdown. Raises
    RosterError."""
    found: dict[bytes, AgentLink] = {}
    refused: set[bytes] = set()
    asked: dict[int, tuple[bytes, float]] = {}
    deadline = time.monotonic() + wait_s
    shown = None
    while True:
        now = time.monotonic()
        for endpoint in roster.endpoints:
            peer = endpoint.encode()
            if peer in found or any(p == peer and now - t < INFO_RETRY_S
                                    for p, t in asked.values()):
                continue
            try:
                asked[client.send(peer, P.INFO)] = (peer, now)
            except PeerUnreachable:
                pass
        for peer, info in list(client.hellos.items()):
            if peer not in found and peer not in refused and isinstance(info, dict) \
                    and info.get("serving"):
                try:  # a dial-in is anyone who can reach the port: refuse it, don't stop
                    found[peer] = _agent_from_info(peer.decode(errors="replace"), peer, info,
                                                   fingerprint, None, num_experts)
                except RosterError as e:
                    refused.add(peer)
                    print(f"basestation: ignoring dial-in agent: {e}", file=sys.stderr)
        covered = {e for a in found.values() for e in a.experts}
        missing = sorted(set(range(num_experts)) - covered)
        if not missing or now >= deadline:
            break
        left = int(deadline - now) + 1
        if progress and shown != (left, tuple(missing)):
            print(f"\rwaiting for experts {_ids(missing)} ({left} s left) ", end="",
                  file=sys.stderr, flush=True)
            shown = (left, tuple(missing))
        reply = client.recv(min(0.1, max(0.0, deadline - now)))
        if reply is None or reply.id not in asked:
            continue
        peer, _ = asked.pop(reply.id)
        if reply.kind == P.ERROR:
            raise RosterError(f"{peer.decode()}: {reply.header.get('message')}")
        if reply.kind == P.INFO_REPLY and peer not in found:
            info = reply.header.get("info") or {}
            if not isinstance(info, dict) or not info.get("serving"):
                continue  # waiting for a pushed shard: ask again
            found[peer] = _agent_from_info(peer.decode(), peer, info, fingerprint,
                                           roster.endpoints[peer.decode()], num_experts)
    if shown is not None:
        print(file=sys.stderr)
    if missing and need_all:
        silent = [e for e in roster.endpoints if e.encode() not in found]
        hint = f"; no answer from {', '.join(silent)}" if silent else ""
        raise RosterError(f"no agent for experts {_ids(missing)} after {wait_s:g} s{hint} "
                          "(--allow-missing runs without them)")
    return sorted(found.values(), key=lambda a: a.experts)


def _agent_from_info(name: str, peer: bytes, info: dict, fingerprint: str,
                     expected: tuple[int, ...] | None, num_experts: int) -> AgentLink:
    if info.get("fingerprint") != fingerprint:
        raise RosterError(f"{name} serves a different model (fingerprint "
                          f"{str(info.get('fingerprint'))[:16]}, ours {fingerprint[:16]})")
    raw = info.get("experts")
    if not isinstance(raw, list) or not raw or not all(
            isinstance(e, int) and not isinstance(e, bool) and 0 <= e < num_experts for e in raw):
        raise RosterError(f"{name} announced a malformed expert list {str(raw)[:40]}")
    experts = tuple(sorted(set(raw)))
    if expected is not None and not set(expected) <= set(experts):
        raise RosterError(f"{name} hosts experts {_ids(experts)}, the roster says "
                          f"{_ids(expected)}")
    return AgentLink(name=name, peer=peer, experts=experts, info=info)


def read_channel_file(path: str):
    """The [paper] table of a scenario file, for --latency model. Raises RosterError."""
    from basestation.channel_model import ChannelScenario

    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)["paper"]
        return ChannelScenario.from_dict(table)
    except OSError as e:
        raise RosterError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise RosterError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise RosterError(f"{path}: not valid TOML: not UTF-8 text") from None
    except (KeyError, TypeError, ValueError) as e:
        raise RosterError(f"{path}: needs a [paper] table with the channel ({e})") from None


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
        self.dispatcher.prober.poll(timeout_s)

    def close(self) -> None:
        self.client.close()


def open_session(shards: str, roster: Roster, theta: float = 0.0, latency: str = "measured",
                 dtype: str = "auto", wire_dtype: str | None = None, wait_s: float = 30.0,
                 allow_missing: bool = False, local_fallback: str | None = None,
                 channel=None, device: str = "auto", progress: bool = True) -> Session:
    """Raises RosterError or ShardError with a message for the user."""
    from basestation.model import load_base_model
    from edge_agent.shards import resolve_device, resolve_dtype

    manifest = load_manifest(shards)
    num_experts = manifest.num_experts
    hidden = int(manifest.model["hidden_size"])
    try:
        wire = P.WIRE_DTYPES[P.wire_dtype_name(wire_dtype)] if wire_dtype else \
            resolve_dtype(dtype, manifest, resolve_device(device))
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
        prober = Prober(client, agents, hidden, probe_layer=int(moe_layers[0]),
                        wire_dtype=wire_dtype, element_bytes=wire.itemsize)
        dispatcher = Dispatcher(client, agents, hidden, prober, wire_dtype=wire_dtype,
                                element_bytes=wire.itemsize, fallback=fallback)
        runtime = MoeRuntime(dispatcher, num_experts, hidden, int(manifest.model["ffn_size"]),
                             latency=latency, scenario=channel)
        base = load_base_model(shards, runtime, dtype=dtype, device=device)
        prober.calibrate()
    except BaseException:
        client.close()
        raise
    return Session(client=client, runtime=runtime, base=base, theta=theta)


__all__ = ["Roster", "RosterAgent", "RosterError", "Session", "ShardError", "build_roster",
           "format_roster", "open_links", "open_session", "read_roster_agents",
           "read_roster_keys"]

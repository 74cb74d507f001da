"""The roster: which agents the base station reaches, how, and the key policy.

Agents that listen are connected to (`--agent 3=tcp://HOST:PORT`, with its key
`--agent 3=tcp://HOST:PORT@edge-3.key` or `…@<40 Z85 characters>`, `--agents FILE`); agents
that dial in are listened for (`--listen tcp://0.0.0.0:PORT`).
With `--keys DIR` every link can be CurveZMQ (wire/keys.py): a roster entry carries its
agent's public key, and DIR/trusted/ holds the agents allowed to dial in. Roster file (TOML):
    [basestation]
    keys = "keys/basestation"      (optional: --keys when the command gives none)
    [agents]
    "0-3" = "tcp://10.0.0.2:5600"
    "4-7" = { endpoint = "tcp://10.0.0.3:5600", public_key = "<the 40 Z85 characters>" }
    "8" = { endpoint = "tcp://10.0.0.4:5600", certificate = "keys/edge-4.key" }
    "4-7" = ["tcp://10.0.0.3:5600", { endpoint = "tcp://10.0.0.5:5600", public_key = "…" }]
The first form is a plain link; `certificate` and `keys` are paths relative to the roster file.
An expert named for several agents (a list, as for 4-7 above, or in several entries) has
replicas: each layer asks the one expected to answer first, and a failed one's tokens go to
another (basestation/replicas.py, agents.py).
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field

from common.expert_ids import format_expert_ids as _ids
from common.expert_ids import parse_expert_ids
from wire.keys import (
    Z85_KEY_CHARS,
    KeyFolder,
    KeysError,
    is_loopback_endpoint,
    load_key_folder,
    parse_public_key,
    read_certificate,
    refuse_unprotected_bind,
)


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


def parse_agent_arg(value: str) -> RosterAgent:
    """--agent: 'EXPERTS=ENDPOINT', or 'EXPERTS=ENDPOINT@KEY' where KEY is the agent's
    certificate file (its NAME.key) or its public key (40 Z85 characters). A tcp:// endpoint
    holds no '@', so the first one after it starts KEY; an ipc:// path may hold '@', so there
    KEY is the last 40 characters after an '@', else what follows the last '@'. Raises
    RosterError."""
    spec, _, target = value.partition("=")
    scheme, sep, rest = target.partition("://")
    if scheme == "tcp":
        at = rest.find("@")
    elif len(rest) > Z85_KEY_CHARS and rest[-Z85_KEY_CHARS - 1] == "@":
        at = len(rest) - Z85_KEY_CHARS - 1
    else:
        at = rest.rfind("@")
    if not sep or at <= 0:  # no key; '@' leading an ipc path is Linux's abstract namespace
        return RosterAgent(*parse_agent_flag(value))
    endpoint, key_text = f"{scheme}://{rest[:at]}", rest[at + 1:]
    experts, endpoint = parse_agent_flag(f"{spec}={endpoint}")
    return RosterAgent(experts, endpoint, public_key=_agent_key(endpoint, key_text))


def _agent_key(endpoint: str, key_text: str) -> bytes:
    """The key after --agent's '@': a certificate file when one is there, else key text."""
    where = f"--agent {endpoint[:80]}@{key_text[:80]}"
    try:
        if os.path.isfile(key_text):
            return read_certificate(key_text)
        if len(key_text) == Z85_KEY_CHARS:  # Z85 holds '/' and '@' too: no other test
            return parse_public_key(key_text)
    except KeysError as e:
        raise RosterError(f"{where}: {e}") from None
    raise RosterError(f"{where}: no such certificate file, nor a public key (40 Z85 "
                      "characters): give the agent's NAME.key from `edge_agent keygen`")


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
    file), or a list of those (replicas: every agent in it holds EXPERTS). Raises
    RosterError."""
    agents = _load_roster(path).get("agents")
    if not isinstance(agents, dict) or not agents:
        raise RosterError(f'{path}: needs an [agents] table, e.g. "3" = "tcp://10.0.0.3:5600"')
    found = []
    for spec, value in agents.items():
        if isinstance(value, list):
            if not value:
                raise RosterError(f"{path}: agent {spec!r}: an empty list (give the replicas' "
                                  "endpoints)")
            found += [_roster_agent(path, spec, one) for one in value]
        else:
            found.append(_roster_agent(path, spec, value))
    return found


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
    by_spec: dict[str, list[str]] = {}  # TOML keys are unique: replicas share a list
    for agent in agents:
        endpoint = json.dumps(agent.endpoint)
        # TOML basic strings are JSON's for this text (Z85 has no quote or backslash)
        by_spec.setdefault(json.dumps(_ids(agent.experts)), []).append(
            endpoint if agent.public_key is None else
            f"{{ endpoint = {endpoint}, public_key = {json.dumps(agent.public_key.decode())} }}")
    for spec, values in by_spec.items():
        lines.append(f"{spec} = {values[0]}" if len(values) == 1 else
                     f"{spec} = [{', '.join(values)}]")
    return "\n".join(lines) + "\n"


def build_roster(agent_flags: list[str], agents_file: str | None, listen: str | None,
                 keys_dir: str | None = None, insecure: bool = False) -> Roster:
    """The agents to reach and how (--agent, --agents, --listen, --keys, --insecure; without
    --keys, the roster's [basestation] keys). Protected by default: --listen beyond loopback
    needs keys, and with keys every agent beyond loopback needs its public key, unless
    `insecure`. Raises RosterError."""
    entries = [parse_agent_arg(v) for v in agent_flags or []]
    if agents_file:
        entries += read_roster_agents(agents_file)
        keys_dir = keys_dir or read_roster_keys(agents_file)
    if not entries and not listen:
        raise RosterError("no agents: give --agent EXPERTS=tcp://HOST:PORT, --agents FILE "
                          "or --listen tcp://0.0.0.0:PORT")
    endpoints: dict[str, tuple[int, ...]] = {}
    public_keys: dict[str, bytes] = {}
    for agent in entries:  # an expert given to several agents has replicas (agents.py)
        endpoint = agent.endpoint
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
                              "(public_key = … or certificate = \"….key\", or --agent "
                              "EXPERTS=ENDPOINT@CERT.key) or pass --insecure to reach it "
                              "unencrypted")
    return Roster(endpoints=endpoints, listen=listen, public_keys=public_keys, keys=keys)



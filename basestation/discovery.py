"""Finding the roster's agents: links opened, every agent asked for INFO until a deadline
(wire/info.py), each answer checked against this model, dial-ins taken from their HELLOs.
Every expert id must end up with a live agent serving this model's fingerprint, else a one-line
error, unless the caller allows missing ones.
"""

from __future__ import annotations

import sys
import time

import zmq

from basestation.liveness import AgentLink
from basestation.roster import Roster, RosterError
from common.expert_ids import format_expert_ids as _ids
from wire.client import AgentClient
from wire.info import InfoAnswers, ask_info


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


# once every expert has an agent, how long the rest of the roster (replicas) is waited for
REPLICA_GRACE_S = 2.0


def connect_agents(client: AgentClient, roster: Roster, fingerprint: str, num_experts: int,
                   wait_s: float, need_all: bool, progress: bool = True) -> list[AgentLink]:
    """Find every agent of the roster (and dial-ins) on `client` (from open_links), check it
    serves this model, wait for the experts up to `wait_s` with a countdown. Raises
    RosterError."""
    expected = {endpoint.encode(): experts for endpoint, experts in roster.endpoints.items()}
    found: dict[bytes, AgentLink] = {}
    refused: set[bytes] = set()
    missing = list(range(num_experts))
    deadline_s = time.monotonic() + wait_s
    shown = None
    covered_s = None  # when every expert first had an agent

    def covered(answers: InfoAnswers) -> bool:
        """Every expert has an agent, and every roster agent answered (a replica), or
        REPLICA_GRACE_S passed since the experts were covered; meanwhile the countdown.
        Raises RosterError."""
        nonlocal missing, shown, covered_s
        for peer, message in answers.errors.items():
            raise RosterError(f"{peer.decode()}: {message}")
        for peer, info in answers.infos.items():
            if peer not in found:
                found[peer] = _agent_from_info(peer.decode(), peer, info, fingerprint,
                                               expected[peer], num_experts)
        for peer, info in list(client.hellos.items()):
            if peer not in found and peer not in refused and isinstance(info, dict) \
                    and info.get("serving"):
                try:  # a dial-in is anyone who can reach the port: refuse it, don't stop
                    found[peer] = _agent_from_info(peer.decode(errors="replace"), peer, info,
                                                   fingerprint, None, num_experts)
                except RosterError as e:
                    refused.add(peer)
                    print(f"basestation: ignoring dial-in agent: {e}", file=sys.stderr)
        missing = sorted(set(range(num_experts)) - {e for a in found.values() for e in a.experts})
        left_s = deadline_s - time.monotonic()
        if missing and progress and left_s > 0 and shown != (int(left_s) + 1, tuple(missing)):
            shown = (int(left_s) + 1, tuple(missing))
            print(f"\rwaiting for experts {_ids(missing)} ({shown[0]} s left) ", end="",
                  file=sys.stderr, flush=True)
        if missing:
            return False
        covered_s = covered_s or time.monotonic()
        return all(peer in found for peer in expected) or \
            time.monotonic() - covered_s >= REPLICA_GRACE_S

    # an agent still waiting for a pushed shard answers, but not serving: it is asked again
    ask_info(client, expected, wait_s, ready=lambda info: bool(info.get("serving")),
             until=covered)
    if shown is not None:
        print(file=sys.stderr)
    late = [peer.decode() for peer in expected if peer not in found]
    if not missing and late:  # their experts have other holders: run without these replicas
        print(f"basestation: no answer yet from {', '.join(late)}: running on the other "
              "replicas of their experts", file=sys.stderr)
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
    if expected is not None:  # it is asked for what the roster gives it: with replicas, an
        experts = tuple(sorted(set(expected)))  # agent hosting more is not one for the rest
    return AgentLink(name=name, peer=peer, experts=experts, info=info)

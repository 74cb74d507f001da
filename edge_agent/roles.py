"""Which key may do what on this agent (keys.ROLE_*): computing is for the base stations in
trusted/, pushing shards for the keys in pushers/; without keys everyone may do everything."""

from __future__ import annotations

import zmq

from wire import protocol as P
from wire.keys import ALL_ROLES, ROLE_COMPUTE, ROLE_PUSH, peer_public_key

# The base station this agent dials in to may compute (with keys CURVE checked its public
# key); shards are pushed to the bound socket only, where the store knows who pushes.
DIALLED_ROLES = frozenset({ROLE_COMPUTE})


def peer_roles(dialled: bool, roles_by_key: dict[str, frozenset[str]] | None,
               frame: zmq.Frame) -> frozenset[str]:
    """What the sender of a message may do: `dialled`, it came from the base station this agent
    dialled; `roles_by_key`, public key -> roles (None: no keys); `frame`, its first frame."""
    if dialled:
        return DIALLED_ROLES
    if roles_by_key is None:
        return ALL_ROLES
    # on the CURVE server socket ZAP stamped every message with its sender's public key
    return roles_by_key.get(peer_public_key(frame), frozenset())


def check_allowed(kind: str, roles: frozenset[str]) -> None:
    """Raises ProtocolError(ERR_NOT_ALLOWED) when `roles` may not send a request of `kind`.
    (A PREFETCH from a key that may not compute is dropped, not answered: see may_hint.)"""
    if kind == P.EXPERT and ROLE_COMPUTE not in roles:
        raise P.ProtocolError(P.ERR_NOT_ALLOWED, "this key may not compute here (it is not in "
                                                 "the agent's trusted/ folder)")
    if kind in P.PUSH_KINDS and ROLE_PUSH not in roles:
        raise P.ProtocolError(P.ERR_NOT_ALLOWED, "this key may not push shards here (it is not "
                                                 "in the agent's pushers/ folder)")


def may_hint(roles: frozenset[str]) -> bool:
    """A prefetch hint loads weights: only a key that may compute gives one."""
    return ROLE_COMPUTE in roles

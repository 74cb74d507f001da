"""Ask agents for INFO until a deadline: the one loop the base station, its status table and the
testbed use to find out who is there and what each one serves."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from wire import protocol as P
from wire.client import AgentClient, PeerUnreachable

INFO_RETRY_S = 0.5  # re-ask an agent that has not answered INFO yet
POLL_S = 0.1  # longest wait for one reply: how often `until` is asked


@dataclass(frozen=True)
class InfoAnswers:
    infos: dict[bytes, dict]  # peer -> the info it answered (and `ready` accepted)
    silent: tuple[bytes, ...]  # the peers with no accepted answer, in the order asked
    errors: dict[bytes, str]  # silent peers whose last answer was an ERROR: its message


def ask_info(client: AgentClient, peers: Iterable[bytes], timeout_s: float, *,
             retry_s: float = INFO_RETRY_S, ready: Callable[[dict], bool] | None = None,
             until: Callable[[InfoAnswers], bool] | None = None,
             clock: Callable[[], float] = time.monotonic) -> InfoAnswers:
    """Send INFO to every peer and collect the replies for at most `timeout_s`, asking again
    every `retry_s` those that have not answered (not connected yet, silent, an ERROR, or an
    info that `ready` refuses, such as an agent still waiting for its shards). Ends early when
    `until(answers so far)` is true (default: every peer answered); `until` is asked at least
    every POLL_S and may raise to stop the wait. Dial-in agents' HELLOs land in
    `client.hellos` meanwhile. `clock`: seconds, for tests. Never raises on the agents'
    account."""
    peers = list(dict.fromkeys(peers))
    infos: dict[bytes, dict] = {}
    errors: dict[bytes, str] = {}
    asked: dict[int, bytes] = {}  # request id -> the peer asked
    last_asked_s: dict[bytes, float] = {}
    deadline_s = clock() + timeout_s
    while True:
        now_s = clock()
        answers = InfoAnswers(dict(infos), tuple(p for p in peers if p not in infos),
                              {p: m for p, m in errors.items() if p not in infos})
        if (until(answers) if until is not None else not answers.silent) or now_s >= deadline_s:
            return answers
        for peer in answers.silent:
            if peer in last_asked_s and now_s - last_asked_s[peer] < retry_s:
                continue
            try:
                asked[client.send(peer, P.INFO)] = peer
                last_asked_s[peer] = now_s
            except PeerUnreachable:
                pass  # not connected yet: asked again on the next pass
        reply = client.recv(min(POLL_S, deadline_s - now_s))
        if reply is None or reply.id not in asked or asked[reply.id] != reply.peer:
            continue
        peer = asked.pop(reply.id)
        if peer in infos:
            continue
        if reply.kind == P.ERROR:
            errors[peer] = reply.message.message
        elif reply.kind == P.INFO_REPLY:
            try:
                info = reply.message.info
            except P.ProtocolError:  # an info that is not a map: no answer
                continue
            if isinstance(info, dict) and (ready is None or ready(info)):
                infos[peer] = info

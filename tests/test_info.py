"""Asking agents for INFO until a deadline (wire/info.py), against a scripted client on a clock
the test moves: who is asked when, what counts as an answer, and when the wait ends."""

from __future__ import annotations

import pytest

from wire import info as I
from wire import protocol as P
from wire.client import PeerUnreachable, Reply

A, B = b"tcp://a:1", b"tcp://b:1"


class ScriptedClient:
    """send/recv of AgentClient. `answer(peer, request_id)` -> a reply header, or None (silent);
    a reply comes on the next recv, and a recv with nothing to give moves the clock by its
    timeout."""

    def __init__(self, answer, unreachable: set[bytes] = frozenset()):
        self.answer, self.unreachable = answer, set(unreachable)
        self.now_s = 0.0
        self.sent: list[tuple[float, bytes]] = []
        self.queue: list[Reply] = []

    def send(self, peer: bytes, kind: str) -> int:
        assert kind == P.INFO
        if peer in self.unreachable:
            raise PeerUnreachable(peer)
        self.sent.append((self.now_s, peer))
        header = self.answer(peer, len(self.sent))
        if header is not None:
            self.queue.append(Reply(header.pop("from", peer), {"id": len(self.sent), **header},
                                    []))
        return len(self.sent)

    def clock(self) -> float:
        return self.now_s

    def recv(self, timeout_s: float) -> Reply | None:
        if self.queue:
            return self.queue.pop(0)
        self.now_s += timeout_s
        return None


@pytest.fixture(autouse=True)
def exact_polls(monkeypatch):
    """Binary-exact times: retries at 0.25 s and polls of 0.125 s add up without rounding."""
    monkeypatch.setattr(I, "POLL_S", 0.125)


def test_every_peer_answers_once_asked():
    client = ScriptedClient(
        lambda peer, _: {"kind": P.INFO_REPLY, "info": {"name": peer.decode()}})
    answers = I.ask_info(client, [A, B, A], timeout_s=1.0, clock=client.clock)
    assert answers.infos == {A: {"name": "tcp://a:1"}, B: {"name": "tcp://b:1"}}
    assert answers.silent == () and answers.errors == {}
    assert client.sent == [(0.0, A), (0.0, B)]  # each asked once, though named twice
    assert client.now_s == 0.0  # no wait once all answered


def test_a_silent_peer_is_asked_every_retry_until_the_deadline():
    client = ScriptedClient(
        lambda peer, _: {"kind": P.INFO_REPLY, "info": {}} if peer == A else None)
    answers = I.ask_info(client, [A, B], timeout_s=1.0, retry_s=0.25, clock=client.clock)
    assert answers.infos == {A: {}} and answers.silent == (B,)
    assert [t for t, peer in client.sent if peer == B] == [0.0, 0.25, 0.5, 0.75]  # not at 1.0
    assert client.now_s == 1.0


def test_errors_refusals_and_strangers_are_not_answers():
    """An ERROR, an info `ready` refuses and a reply from another peer under A's request id
    leave A silent and asked again; its third answer counts."""
    script = {1: {"kind": P.ERROR, "message": "version 9"},
              2: {"kind": P.INFO_REPLY, "info": {"serving": False}},
              3: {"kind": P.INFO_REPLY, "info": {"serving": True}, "from": B},
              4: {"kind": P.INFO_REPLY, "info": {"serving": True}}}
    seen = []

    def until(answers: I.InfoAnswers) -> bool:
        seen.append(answers.errors)
        return not answers.silent

    client = ScriptedClient(lambda _, request_id: script[request_id])
    answers = I.ask_info(client, [A], timeout_s=2.0, retry_s=0.25,
                         ready=lambda info: info["serving"], until=until,
                         clock=client.clock)
    assert answers.infos == {A: {"serving": True}}
    assert {A: "version 9"} in seen and answers.errors == {}
    assert [t for t, _ in client.sent] == [0.0, 0.25, 0.5, 0.75]


def test_unreachable_peers_are_tried_on_every_poll_and_until_can_stop_the_wait():
    client = ScriptedClient(lambda *_: None, unreachable={A})
    rounds = []

    def until(answers: I.InfoAnswers) -> bool:
        rounds.append(client.now_s)
        if len(rounds) == 3:
            client.unreachable.clear()
        if len(rounds) == 5:
            raise RuntimeError("stop")
        return False

    with pytest.raises(RuntimeError, match="stop"):
        I.ask_info(client, [A], timeout_s=10.0, retry_s=5.0, until=until, clock=client.clock)
    assert rounds == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert client.sent == [(0.25, A)]  # sent once reachable; not again within retry_s

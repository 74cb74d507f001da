"""Probes, by hand and with a fake socket: idle or avoided agents get work probes at a bounded
rate, dead ones pings with capped backoff, and a valid answer brings an agent back."""

from __future__ import annotations

import itertools

from basestation.agents import AgentTable
from basestation.liveness import (
    IDLE_REFRESH_AFTER_S,
    REFRESH_AFTER_S,
    TICK_S,
    AgentLink,
    Backoff,
    Prober,
    sane_compute_s,
)
from wire import protocol as P
from wire.client import Reply


class FakeClient:
    def __init__(self):
        self.ids = itertools.count(1)
        self.sent: list[tuple[bytes, str]] = []

    def send(self, peer, kind, frames=(), **fields):
        self.sent.append((peer, kind))
        return next(self.ids)

    def send_expert(self, peer, layer, x, counts, wire_dtype=None):
        self.sent.append((peer, P.EXPERT))
        return next(self.ids)


def prober_for(*agents):
    client = FakeClient()
    table = AgentTable(list(agents), num_experts=2, hidden_size=8, element_bytes=4)
    prober = Prober(client, table, probe_layer=1, wire_dtype=None)
    return prober, client, table


def test_backoff_doubles_to_its_cap():
    backoff = Backoff(base_s=0.05, cap_s=0.2)
    backoff.reset(10.0)
    assert backoff.next_s == 10.05 and not backoff.due(10.04) and backoff.due(10.05)
    delays = []
    for _ in range(4):
        backoff.step(10.0)
        delays.append(backoff.delay_s)
    assert delays == [0.1, 0.2, 0.2, 0.2]


def test_an_avoided_agent_gets_one_work_probe_at_a_time():
    used = AgentLink("used", b"u", (0,), last_used_s=100.0)
    avoided = AgentLink("avoided", b"a", (1,), last_used_s=100.0 - REFRESH_AFTER_S - 0.01)
    prober, client, _ = prober_for(used, avoided)
    prober.tick(100.0)
    assert client.sent == [(b"a", P.EXPERT)] and avoided.probes == 1
    prober.tick(100.0 + TICK_S)  # still in flight: no second probe
    assert len(client.sent) == 1


def test_idle_polling_probes_less_often():
    agent = AgentLink("a", b"a", (0,), last_used_s=100.0)
    prober, client, _ = prober_for(agent)
    prober.tick(100.0 + REFRESH_AFTER_S + 0.01, IDLE_REFRESH_AFTER_S)
    assert client.sent == []
    prober.tick(100.0 + IDLE_REFRESH_AFTER_S + 0.01, IDLE_REFRESH_AFTER_S)
    assert client.sent == [(b"a", P.EXPERT)]


def test_a_dead_agent_is_pinged_and_a_pong_brings_it_back():
    agent = AgentLink("a", b"a", (0,))
    prober, client, table = prober_for(agent)
    assert agent.mark_failed(50.0) and not agent.alive and agent.failures == 1
    prober.tick(50.0 + agent.backoff.delay_s)
    assert client.sent == [(b"a", P.PING)]
    probe_id = agent.probe_id
    other = Reply(b"someone-else", {"kind": P.PONG, "id": probe_id}, [])
    assert prober.take(other, 50.2) and not agent.alive  # not from that agent: no evidence
    agent.probe_id = probe_id
    prober.in_flight[probe_id] = agent
    assert prober.take(Reply(b"a", {"kind": P.PONG, "id": probe_id}, []), 50.2)
    assert agent.alive and table.liveness_changes == 1 and agent.state.samples == 1


def test_sane_compute_time():
    assert sane_compute_s(0.001, 0.002) == 0.001
    for bad in ("abc", float("nan"), float("inf"), -1.0, 1e300, True, None):
        assert sane_compute_s(bad, 0.002) is None, bad
    assert sane_compute_s(0.01, 0.002) is None  # longer than the round trip that held it

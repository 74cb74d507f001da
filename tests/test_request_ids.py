"""Request ids cannot be guessed (issue #13): 64 random bits each, never repeated.

Regression: ids were 1, 2, 3, … per client, so any peer that saw one request knew the ids of
the requests around it (to other agents too) and could answer them, or pre-empt them."""

from __future__ import annotations

import itertools

import pytest
import zmq
from waiting import wait_until

from wire import protocol as P
from wire.client import RECENT_IDS, AgentClient, PeerUnreachable, RequestIds


def test_ids_are_random_64_bit_and_never_repeat():
    ids = RequestIds()
    drawn = [ids.next() for _ in range(3 * RECENT_IDS)]
    assert len(set(drawn)) == len(drawn)
    assert all(0 <= i < 2**64 for i in drawn)
    steps = {b - a for a, b in itertools.pairwise(drawn)}
    assert len(steps) == len(drawn) - 1  # no pattern between neighbours, no counter
    assert sum(i >= 2**63 for i in drawn) > len(drawn) // 3  # the top bit is used


@pytest.mark.integration
def test_a_peer_sees_unrelated_ids():
    """What an agent receives: the ids of one client's requests, in order, with no step in
    common between neighbours."""
    ctx = zmq.Context()
    agent = ctx.socket(zmq.ROUTER)
    agent.setsockopt(zmq.LINGER, 0)
    port = agent.bind_to_random_port("tcp://127.0.0.1")
    sent, seen = [], []
    try:
        with AgentClient() as client:
            peer = client.connect(f"tcp://127.0.0.1:{port}")
            def all_sent() -> bool:
                try:
                    sent.append(client.send(peer, P.PING))
                except PeerUnreachable:  # not connected yet
                    pass
                return len(sent) == 50

            wait_until(all_sent, 60, interval_s=0.001, what="50 pings sent")
            while len(seen) < len(sent) and agent.poll(5000):
                seen.append(P.unpack(agent.recv_multipart()[1])["id"])
    finally:
        agent.close()
        ctx.term()
    assert len(seen) == 50 and seen == sent
    assert len({b - a for a, b in itertools.pairwise(seen)}) == len(seen) - 1

"""The AgentClient's connection book (wire/client_guard.py), pure parts with hand-made
connections: who may speak for which routing id, and which connections are over a bound."""

from __future__ import annotations

from wire.client_guard import ACCEPT, CUT, DROP, ClientLimits, Link, judge, over_limits
from wire.peer_limits import Peer

KEY_A, KEY_B = "A" * 40, "B" * 40


def link(fd: int, alias: bytes | None = None, announced: bytes | None = None,
         in_flight: int = 0, accepted_s: float = 0.0, last_message_s: float | None = None,
         counted: bool = True) -> Link:
    peer = Peer(fd=fd, address=None, accepted_s=accepted_s, last_message_s=last_message_s,
                received=1000 + in_flight, consumed=1000, counted=counted)
    return Link(peer=peer, alias=alias, curve=False, announced=announced)


def test_a_dialled_connection_speaks_for_its_alias_only():
    dialled = link(5, alias=b"tcp://a:1")
    assert judge(b"tcp://a:1", False, 5, dialled, {}, {}, None, {b"tcp://a:1"})[0] == ACCEPT
    assert judge(b"tcp://a:1", True, 5, dialled, {}, {}, None, {b"tcp://a:1"})[0] == DROP
    assert judge(b"x", False, 9, None, {}, {}, None, ())[0] == DROP  # a connection not known


def test_an_accepted_connection_binds_a_name_by_hello_and_keeps_it():
    owner = {b"edge-x": 7}
    stranger, holder = link(8), link(7, announced=b"edge-x")
    assert judge(b"edge-y", True, 8, stranger, owner, {}, None, ())[0] == ACCEPT
    assert judge(b"edge-x", False, 7, holder, owner, {}, None, ())[0] == ACCEPT
    assert judge(b"edge-x", True, 7, holder, owner, {}, None, ())[0] == ACCEPT  # again
    # the name from another connection: its replies do not count, its HELLO is cut
    assert judge(b"edge-x", False, 8, stranger, owner, {}, None, ())[0] == DROP
    assert judge(b"edge-x", True, 8, stranger, owner, {}, None, ())[0] == CUT
    # a name nobody announced: a reply does not count before the HELLO
    assert judge(b"edge-z", False, 8, stranger, owner, {}, None, ())[0] == DROP
    # a dialled agent's name, claimed by a peer that dialled in
    verdict, why = judge(b"tcp://a:1", True, 8, stranger, owner, {}, None, {b"tcp://a:1"})
    assert verdict == CUT and "dialled" in why


def test_over_curve_a_name_stays_with_the_key_it_announced_with():
    keys = {b"edge-x": KEY_A}
    back = link(9)  # its old connection closed: the name is free, its key is not
    assert judge(b"edge-x", True, 9, back, {}, keys, KEY_A, ())[0] == ACCEPT
    verdict, why = judge(b"edge-x", True, 9, back, {}, keys, KEY_B, ())
    assert verdict == CUT and "another key" in why


def test_limits_cut_strangers_over_their_bytes_agents_over_theirs():
    limits = ClientLimits(agent_in_flight_bytes=100, max_accepted=10,
                          stranger_in_flight_bytes=10, strangers_in_flight_bytes=15)
    links = [link(1, in_flight=12),  # one stranger over its 10
             link(2, in_flight=6), link(3, in_flight=8),  # together 14, under 15
             link(4, announced=b"a", in_flight=99), link(5, alias=b"d", in_flight=101),
             link(6, announced=b"b", in_flight=101)]
    assert sorted(link.peer.fd for link, _ in over_limits(links, limits, 0.0)) == [1, 5, 6]
    links.append(link(7, in_flight=2))  # strangers now 16 together: the largest goes
    assert sorted(link.peer.fd for link, _ in over_limits(links, limits, 0.0)) == [1, 3, 5, 6]
    uncounted = [link(8, in_flight=10**9, counted=False)]  # ipc: no kernel counters
    assert over_limits(uncounted, limits, 0.0) == []


def test_limits_cap_accepted_connections_and_cut_silent_strangers():
    limits = ClientLimits(agent_in_flight_bytes=100, max_accepted=2, hello_deadline_s=5.0)
    links = [link(1, alias=b"d"),  # dialled: not counted in the cap
             link(2, announced=b"a", accepted_s=0.0, last_message_s=9.0),
             link(3, accepted_s=1.0), link(4, accepted_s=2.0)]
    # three accepted over a cap of two: the stranger that connected first goes
    assert [(link.peer.fd, "cap" in why) for link, why in over_limits(links, limits, 0.0)] \
        == [(3, True)]
    # the client read everything up to 6.9 s: a stranger accepted at 2 s still has time;
    # up to 7.5 s, it has not said HELLO within 5 s of connecting
    assert over_limits(links[:2] + links[3:], limits, 6.9) == []
    cuts = over_limits(links[:2] + links[3:], limits, 7.5)
    assert [(link.peer.fd, "no HELLO" in why) for link, why in cuts] == [(4, True)]

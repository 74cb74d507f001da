"""wire/peer_limits.py: the pure rules with hand-checked numbers, and the ledger on a real
loopback TCP connection (no ZeroMQ): the kernel's counters, a cut, a dropped reply."""

from __future__ import annotations

import socket
import sys

import pytest
from waiting import wait_until

from wire.peer_limits import (
    DESCRIPTOR_RESERVE,
    IN_FLIGHT_SLACK_BYTES,
    Peer,
    PeerGuard,
    PeerLimits,
    frame_wire_bytes,
    message_wire_bytes,
    over_budget,
    over_cap,
    peer_cap,
    reply_fits,
    tcp_counters,
)


def test_wire_bytes_of_a_frame_are_what_tcp_info_counted():
    """Measured on libzmq 4.3.5 against tcpi_bytes_received, heartbeats off."""
    for nbytes, plain, curve in ((0, 2, 35), (1, 3, 36), (222, 224, 257), (223, 225, 265),
                                 (255, 257, 297), (256, 265, 298), (100_000, 100_009, 100_042)):
        assert frame_wire_bytes(nbytes, curve=False) == plain
        assert frame_wire_bytes(nbytes, curve=True) == curve
    assert message_wire_bytes([b"abc", bytes(70_000), memoryview(bytes(5))], curve=True) == 70_120


def test_limits_from_the_message_cap():
    limits = PeerLimits.for_message_cap(2**20, max_peers=8)
    per_peer = 2**20 + IN_FLIGHT_SLACK_BYTES
    assert limits == PeerLimits(8, per_peer, 2 * per_peer, per_peer, 2 * per_peer)


def test_the_cap_cuts_the_idlest_never_a_recent_talker():
    peers = [Peer(fd=10, address=None, accepted_s=1.0, last_message_s=50.0),  # talked lately
             Peer(fd=11, address=None, accepted_s=2.0),  # never talked, oldest
             Peer(fd=12, address=None, accepted_s=3.0, last_message_s=4.0),  # talked long ago
             Peer(fd=13, address=None, accepted_s=60.0)]  # never talked, just came
    assert [p.fd for p in over_cap(peers, 4)] == []
    assert [p.fd for p in over_cap(peers, 3)] == [11]
    assert [p.fd for p in over_cap(peers, 1)] == [11, 13, 12]


def test_bytes_in_flight_per_peer_then_the_largest_while_all_are_over():
    limits = PeerLimits(max_peers=10, in_flight_bytes=100, in_flight_total_bytes=150)

    def peer(fd: int, in_flight: int) -> Peer:
        return Peer(fd=fd, address=None, accepted_s=0.0, received=1000 + in_flight,
                    consumed=1000)

    cuts = over_budget([peer(1, 101), peer(2, 60), peer(3, 50), peer(4, 30)], limits)
    # 101 is over its own 100; the rest hold 140 <= 150: nobody else
    assert [(p.fd, why.split(",")[0]) for p, why in cuts] == [(1, "101 bytes in flight")]
    cuts = over_budget([peer(2, 90), peer(3, 50), peer(4, 30)], limits)  # 170 > 150
    assert [p.fd for p, _ in cuts] == [2]  # the largest goes: 80 left
    # consumed ahead of a stale kernel reading is not negative in flight
    assert Peer(fd=5, address=None, accepted_s=0.0, received=10, consumed=20).in_flight == 0


def test_a_reply_fits_its_peers_budget_and_everyones():
    limits = PeerLimits(unread_bytes=100, unread_total_bytes=150)
    assert reply_fits(unread=60, unread_total=60, nbytes=40, limits=limits)
    assert not reply_fits(unread=61, unread_total=61, nbytes=40, limits=limits)
    assert not reply_fits(unread=0, unread_total=120, nbytes=40, limits=limits)
    assert reply_fits(10**12, 10**12, 10**12, PeerLimits())  # 0: not enforced


def test_the_cap_stays_under_the_descriptor_limit():
    assert peer_cap(64, 1024) == 64
    assert peer_cap(64, DESCRIPTOR_RESERVE + 20) == 20
    assert peer_cap(64, 10) == 1


def arrived(fd: int, nbytes: int, acked: bool = False) -> None:
    """Wait until the kernel counted `nbytes` received (or acknowledged)."""
    wait_until(lambda: tcp_counters(fd)[0 if acked else 1] >= nbytes, 30, interval_s=0.001,
               what=f"{nbytes} bytes {'acknowledged' if acked else 'received'} on the loopback")


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="TCP_INFO byte counters")
def test_the_ledger_on_a_real_connection_cuts_and_drops():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname(), timeout=5)
        accepted, _ = server.accept()
        try:
            clock = [100.0]
            guard = PeerGuard(PeerLimits(max_peers=4, in_flight_bytes=50_000,
                                         unread_bytes=20_000), curve=False,
                              clock=lambda: clock[0])
            guard.accepted(accepted.fileno())
            assert tcp_counters(accepted.fileno()) is not None
            start = tcp_counters(accepted.fileno())[1]
            client.sendall(bytes(30_000))
            arrived(accepted.fileno(), start + 30_000)
            guard.check()
            assert guard.peers[accepted.fileno()].in_flight == 30_000 and guard.cuts == 0
            guard.received(accepted.fileno(), [bytes(29_991)])  # as one 29,991-byte frame
            client.sendall(bytes(60_000))
            arrived(accepted.fileno(), start + 90_000)
            guard.check()
            assert guard.cuts == 1 and accepted.fileno() not in guard.peers
            client.settimeout(5)
            while client.recv(65536):  # the cut connection reaches end of file
                pass

            # replies: counted until the peer's TCP acknowledged them
            other = socket.create_connection(server.getsockname(), timeout=5)
            second, _ = server.accept()
            with other, second:
                guard.accepted(second.fileno())
                assert guard.reply_allowed(second.fileno(), [bytes(15_000)])
                assert not guard.reply_allowed(second.fileno(), [bytes(15_000)])  # 30 KB > 20 KB
                assert guard.dropped_replies == 1
                start = tcp_counters(second.fileno())[0]
                second.sendall(bytes(15_009))  # now sent, and acknowledged by other's kernel
                arrived(second.fileno(), start + 15_009, acked=True)
                assert guard.reply_allowed(second.fileno(), [bytes(15_000)])
        finally:
            client.close()
            accepted.close()


def test_heartbeats_never_get_a_long_lived_connection_cut():
    """Regression: ZMTP heartbeats reach the kernel's byte count but never the reader's, so a
    healthy keyed connection (410 B/s of heartbeats) crossed the 16 MiB slack after ~11 h and
    was cut. Its budget now grows with its age; a flood still goes at once."""
    from wire.peer_limits import HEARTBEAT_ALLOWANCE_BYTES_PER_S, Peer

    limits = PeerLimits(in_flight_bytes=1000)
    day_s = 86_400.0
    old = Peer(fd=1, address=None, accepted_s=0.0, received=410 * int(day_s))
    assert over_budget([old], limits)  # without the clock: the old rule, cut
    assert over_budget([old], limits, now_s=day_s) == []
    flood = Peer(fd=2, address=None, accepted_s=day_s - 1,
                 received=1000 + 2 * HEARTBEAT_ALLOWANCE_BYTES_PER_S)
    assert [p.fd for p, _ in over_budget([old, flood], limits, now_s=day_s)] == [2]


@pytest.mark.integration
def test_counters_read_from_many_threads_are_each_threads_own():
    """Regression: one module-wide ctypes buffer served every guard's watchdog thread, so a
    thread read another connection's counters, took it for a reused descriptor and forgot a
    live connection (a bench with three sessions in one process lost an agent's replies)."""
    import threading

    from wire.peer_limits import tcp_counters

    pairs, expected = [], []
    for nbytes in (10, 100_000):
        server = socket.create_server(("127.0.0.1", 0))
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
        server.close()
        a.sendall(b"x" * nbytes)
        wait_until(lambda b=b, nbytes=nbytes: (tcp_counters(b.fileno()) or (nbytes, nbytes))[1]
                   >= nbytes, 30,
                   what=f"{nbytes} bytes received on the loopback")  # None: skipped below
        pairs.append((a, b))
        expected.append(tcp_counters(b.fileno()))
    if expected[0] is None:
        pytest.skip("no TCP_INFO byte counters on this kernel")
    wrong = []

    def read(fd: int, want: tuple[int, int]) -> None:
        for _ in range(20_000):
            got = tcp_counters(fd)
            if got != want:
                wrong.append(got)

    threads = [threading.Thread(target=read, args=(b.fileno(), want))
               for (_, b), want in zip(pairs, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in pairs:
        a.close()
        b.close()
    assert wrong == []

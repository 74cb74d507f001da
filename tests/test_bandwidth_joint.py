"""The testbed's `joint` policy at the base station (issue 23): what JointAllocator tells the
cell, on a real UDP socket standing for the cell's control port, and WLR on the allocation's
latencies for θ > 0 (select_and_allocate through MoeRuntime.box_latency_override)."""

from __future__ import annotations

import socket

import pytest
import torch

from basestation.bandwidth import BoxLink, LinearRate, select_and_allocate
from basestation.selector import select
from testbed import scenarios
from testbed.experiments.cell_bed import cell_settings
from testbed.experiments.joint_alloc import JointAllocator, percent_shares
from testbed.links.cell_policy import parse_allocation

BOXES = 8
BYTES_PER_TOKEN = 2048
RECEIVE_S = 5.0  # a datagram on loopback arrives at once; generous on a loaded machine


class Bed:
    """What JointAllocator reads of a CellBed: the cell's settings and control address."""

    def __init__(self, current: dict, control: str):
        self.current, self.control = current, control


class Boxes:
    def __init__(self, n: int):
        self.box_of_expert = torch.arange(n)
        self.available = None


class Clock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def cell_port():
    """A UDP socket in place of the cell's control port; yields (socket, "HOST:PORT")."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(RECEIVE_S)
    try:
        yield sock, "127.0.0.1:%d" % sock.getsockname()[1]
    finally:
        sock.close()


def paper_bed(control: str, pacing: dict | None = None) -> tuple[Bed, dict]:
    scenario = scenarios.with_total_bandwidth(scenarios.load("paper"), 20e6)
    settings = cell_settings(scenario.paper, 0, ["127.0.0.1:1"] * BOXES,
                             ["127.0.0.1:1"] * BOXES, 8.0, "joint")
    return Bed(settings, control), pacing or scenarios.agent_pacing_us(scenario, BOXES)


def allocator_on(control: str, clock=None, pacing=None, base=None) -> JointAllocator:
    bed, pace = paper_bed(control, pacing)
    allocator = JointAllocator(bed, list(range(BOXES)) + [None],
                               lambda tokens: tokens * BYTES_PER_TOKEN, pace,
                               base_latency_s=base, **({"clock": clock} if clock else {}))
    allocator.active = True
    return allocator


def received(sock) -> dict[int, float]:
    seq, shares = parse_allocation(sock.recv(4096), BOXES)
    return shares


def nothing_waiting(sock) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
        return False
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(RECEIVE_S)


def test_percent_shares_sum_to_100_and_keep_every_called_link():
    assert percent_shares({0: 1 / 3, 1: 2 / 3}) == {0: 33, 1: 67}
    assert percent_shares({3: 0.5, 5: 0.5}) == {3: 50, 5: 50}
    # a share below 1 % still gets 1 % (the cell would hold it back otherwise)
    tiny = percent_shares({0: 0.001, 1: 0.499, 2: 0.5})
    assert tiny[0] == 1 and sum(tiny.values()) == 100 and all(v >= 1 for v in tiny.values())
    # boxes not called (share 0) are not in the message at all
    assert percent_shares({0: 0.0, 1: 0.25, 2: 0.75}) == {1: 25, 2: 75}
    assert percent_shares({}) == {} and percent_shares({0: 0.0}) == {}


def test_joint_tells_the_cell_shares_for_the_called_boxes_only(cell_port):
    sock, address = cell_port
    allocator = allocator_on(address)
    try:
        box_of_expert = torch.arange(BOXES)
        keep = torch.ones(2, 2, dtype=torch.bool)
        keep[1, 1] = False  # a slot WLR dropped: its box is not called
        experts = torch.tensor([[1, 6], [1, 3]])
        allocator(0, box_of_expert, experts, keep)
        shares = received(sock)
        assert set(shares) == {1, 6}  # box 3's only slot was dropped: no bandwidth
        assert all(share > 0 for share in shares.values())
        assert sum(shares.values()) == pytest.approx(1.0)
    finally:
        allocator.close()


def test_an_unchanged_allocation_is_not_sent_again_until_half_its_ttl(cell_port):
    sock, address = cell_port
    clock = Clock()
    allocator = allocator_on(address, clock=clock)
    try:
        box_of_expert, keep = torch.arange(BOXES), torch.ones(1, 2, dtype=torch.bool)
        allocator(0, box_of_expert, torch.tensor([[2, 5]]), keep)
        first = received(sock)
        allocator(1, box_of_expert, torch.tensor([[5, 2]]), keep)  # the same boxes
        assert nothing_waiting(sock) and allocator.sent == 1 and allocator.unchanged == 1
        allocator(0, box_of_expert, torch.tensor([[2, 7]]), keep)  # another pair: sent
        assert set(received(sock)) == {2, 7}
        allocator(0, box_of_expert, torch.tensor([[2, 5]]), keep)  # back: the cell has {2, 7}
        assert received(sock) == first
        ttl_s = allocator.bed.current["allocation_ttl_s"]
        clock.now_s += ttl_s / 2  # the cell's copy is half way to expiring: refreshed
        allocator(0, box_of_expert, torch.tensor([[2, 5]]), keep)
        assert received(sock) == first and allocator.sent == 4 and allocator.layers == 5
    finally:
        allocator.close()


def test_an_inactive_allocator_sends_nothing(cell_port):
    sock, address = cell_port
    allocator = allocator_on(address)
    allocator.active = False
    try:
        allocator(0, torch.arange(BOXES), torch.tensor([[0, 1]]),
                  torch.ones(1, 2, dtype=torch.bool))
        assert nothing_waiting(sock) and allocator.sent == 0
    finally:
        allocator.close()


def test_select_and_allocate_returns_the_latencies_its_selection_was_made_on():
    links = {q: BoxLink(1e-3 * (q % 3), 2e-3 + 1e-3 * q, 65536, 65536, LinearRate(1.0 + q),
                        LinearRate(2.0)) for q in range(BOXES)}
    torch.manual_seed(0)
    for _ in range(50):
        experts = torch.stack([torch.randperm(BOXES)[:2] for _ in range(3)])
        weights = torch.softmax(torch.randn(3, 2), dim=-1)
        for theta in (0.0, 0.1, 0.3):
            joint = select_and_allocate(experts, weights, torch.arange(BOXES),
                                        [3e-3] * BOXES + [1e-3], theta, links, 20e6)
            again = select(experts, weights, torch.arange(BOXES), joint.latency_s, theta)
            assert torch.equal(again.keep, joint.selection.keep)


def test_wlr_drops_a_box_whose_fixed_cost_alone_is_too_high_and_feeds_it_nothing(cell_port):
    """θ > 0 under joint: box 4 computes for 200 ms a call; WLR drops it on the allocation's
    latencies, and the datagram gives the cell's bandwidth to the box kept only."""
    sock, address = cell_port
    pacing = {q: (2000.0, 2000.0) for q in range(BOXES)}
    pacing[4] = (200000.0, 200000.0)
    allocator = allocator_on(address, pacing=pacing,
                             base=lambda boxes, experts: [3e-3] * BOXES + [1e-3])
    try:
        boxes, experts = Boxes(BOXES), torch.tensor([[1, 4]])
        weights = torch.tensor([[0.55, 0.45]])
        t = allocator.box_latencies(0, boxes, experts, weights, 0.2)
        selection = select(experts, weights, boxes.box_of_expert, t, 0.2)
        assert selection.keep.tolist() == [[True, False]]  # box 4 dropped, not fed
        allocator(0, boxes.box_of_expert, experts, selection.keep)
        assert received(sock) == {1: 1.0}
        # θ = 0 keeps every selected expert whatever the latencies: both boxes get a share
        t = allocator.box_latencies(1, boxes, experts, weights, 0.0)
        selection = select(experts, weights, boxes.box_of_expert, t, 0.0)
        assert selection.keep.all()
        allocator(1, boxes.box_of_expert, experts, selection.keep)
        shares = received(sock)
        assert set(shares) == {1, 4} and all(share > 0 for share in shares.values())
    finally:
        allocator.close()

"""A shared cell on real boxes (issue 23): `testbed shape --cell-mbit B` puts every box's HTB
class under one parent of B, each way. Boxes on a bridge (tests/bridge_boxes.py): one box alone
borrows the whole cell, two busy boxes share it, and the bridge is put back exactly."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_boxes_shape import DEADLINE_S, Pinger, _cli, _text, boxes, snapshot  # noqa: F401

from testbed.boxes import tc_plan
from testbed.boxes.shaper import load_shaped
from testbed.links.procs import free_port
from testbed.links.spec import LinkShape

CELL_MBIT = 16.0
NUM_BOXES = 2
TRANSFER_BYTES = 1_000_000  # one way: 0.5 s alone at 16 Mbit/s, 1 s each when shared by two
TOLERANCE = 0.3  # generous: the rate is measured end to end, through TCP and CurveZMQ
START_TIMEOUT_S = 30.0  # both transfer threads at the starting line


def transfer_mbit_per_s(pinger: Pinger, index: int, way: str) -> float:
    """Move TRANSFER_BYTES one way to or from box INDEX (a ping that carries them down and
    answers empty, or asks them back up) and return the rate it took."""
    if way == "down":
        frames, reply_bytes = [bytes(TRANSFER_BYTES)], 0
    else:
        frames, reply_bytes = [], TRANSFER_BYTES
    start_s = time.monotonic()
    pinger.client.call(pinger.peers[index], "ping", frames, timeout_s=DEADLINE_S,
                       reply_bytes=reply_bytes)
    return TRANSFER_BYTES * 8 / (time.monotonic() - start_s) / 1e6


def together_mbit_per_s(pingers: list[Pinger], way: str) -> list[float]:
    """Each box's rate when all move TRANSFER_BYTES the same way at the same time (each
    through its own client: sockets are not thread-safe)."""
    ready = threading.Barrier(len(pingers))

    def one(index: int) -> float:
        ready.wait(timeout=START_TIMEOUT_S)
        return transfer_mbit_per_s(pingers[index], index, way)

    with ThreadPoolExecutor(len(pingers)) as pool:
        return list(pool.map(one, range(len(pingers))))


def assert_near(rate_mbit: float, expected_mbit: float, what: str) -> None:
    low, high = (1 - TOLERANCE) * expected_mbit, (1 + TOLERANCE) * expected_mbit
    assert low <= rate_mbit <= high, f"{what}: {rate_mbit:.1f} Mbit/s, expected {low:.1f}-" \
        f"{high:.1f}"


def box_classes(dev: str) -> str:
    return _text("tc", "class", "show", "dev", dev)


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a bridge, tc, nftables)")
def test_cell_lends_an_idle_share_and_splits_a_busy_one(boxes, tmp_path):  # noqa: F811
    """16 Mbit/s shared by 2: box 0 alone moves at ≈16 each way (well above its guaranteed 8),
    both at once get ≈8 each; a degrade keeps the box in the cell, capped by its own rate; down()
    restores the bridge exactly."""
    state = str(tmp_path / "state")
    before = snapshot(boxes.dev)
    done = _cli("shape", "--roster", boxes.roster, "--dev", boxes.dev, "--state-dir", state,
                "--scenario", "uniform", "--cell-mbit", f"{CELL_MBIT:g}")
    pingers: list[Pinger] = []
    shaped = None
    try:
        assert done.returncode == 0, done.stderr
        assert ("cell: 16 mbit shared by 2 boxes (each guaranteed 8, may borrow up to 16)"
                in done.stdout), done.stdout
        shaped = load_shaped(boxes.dev, state)
        assert shaped.cell_mbit == CELL_MBIT
        ifb = tc_plan.ifb_name(boxes.dev)
        for dev in (boxes.dev, ifb):  # each direction its own cell
            classes = box_classes(dev)
            assert "class htb 1:1 root rate 16Mbit ceil 16Mbit" in classes, classes
            assert "class htb 1:10 parent 1:1 " in classes and "1:11 parent 1:1 " in classes

        pingers = [Pinger(shaped.roster_path) for _ in range(NUM_BOXES)]
        for index, pinger in enumerate(pingers):
            pinger.rtt_ms(index)  # the connection (and CurveZMQ handshake) first
        for way in ("down", "up"):
            assert_near(transfer_mbit_per_s(pingers[0], 0, way), CELL_MBIT, f"box 0 alone {way}")
        for way in ("down", "up"):
            for index, rate in enumerate(together_mbit_per_s(pingers, way)):
                assert_near(rate, CELL_MBIT / NUM_BOXES, f"box {index} shared {way}")

        shaped.degrade(0, LinkShape(rate_mbit=4))  # the cell comes from the state
        for dev in (boxes.dev, ifb):
            assert "class htb 1:10 parent 1:1 leaf 10: prio 0 rate 4Mbit ceil 4Mbit" \
                in box_classes(dev)
    finally:
        for pinger in pingers:
            pinger.close()
        removed = (shaped.down() if shaped else
                   _cli("unshape", "--dev", boxes.dev, "--state-dir", state).stdout)
    assert removed and snapshot(boxes.dev) == before
    assert not os.path.exists(os.path.join(state, f"{boxes.dev}.json"))


def test_cell_refused_in_one_line_by_the_relays_backend_and_when_not_a_rate(tmp_path):
    """One relay per box cannot share a medium: `--backend relays --cell-mbit` is refused
    before anything is made (no agent needs to answer); so is a cell of 0."""
    roster = tmp_path / "roster.toml"
    roster.write_text(f'[agents]\n"0-7" = "tcp://127.0.0.1:{free_port()}"\n')
    state = tmp_path / "state"
    common = ["shape", "--roster", str(roster), "--dev", "lo", "--scenario", "uniform",
              "--state-dir", str(state)]
    cases = [(["--backend", "relays", "--cell-mbit", "16"], "the relays backend has one relay "
              "per box, which cannot share one medium"),
             (["--cell-mbit", "0"], "cell 0 mbit: expected > 0")]
    for args, message in cases:
        done = _cli(*common, *args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and message in lines[0], done.stderr
        assert not os.path.exists(state / "lo.json")

"""Shaping real boxes' links from the base station (testbed/boxes): boxes on a bridge
(tests/bridge_boxes.py) shaped on the bridge, checked through the roster the base station
dials, and the bridge put back exactly; and the relays backend, which needs no root."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
from agent_fixtures import REPO_ROOT, start_agent  # noqa: F401
from waiting import wait_until

from testbed.boxes import tc_plan
from testbed.boxes.shaper import shape_boxes
from testbed.links.procs import cmdline, free_port
from testbed.links.spec import LinkShape, TestbedError

PINGS = 10
DELAY_MS = 30.0
RATE_MBIT = 8.0
TRANSFER_BYTES = 1_000_000  # echoed: 2 x 1 s on the wire at 8 Mbit/s
DEADLINE_S = 60.0


def _text(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout


def snapshot(dev: str) -> tuple:
    """What shaping may touch, limited to DEV and our names (other tests run beside us)."""
    ours = (dev, tc_plan.ifb_name(dev), tc_plan.nft_table(dev))
    links = [ln.split("link/")[0] for ln in _text("ip", "-o", "link").splitlines()
             if any(name in ln for name in ours)]
    tables = [t for t in _text("nft", "list", "tables").splitlines() if ours[2] in t]
    return _text("tc", "qdisc", "show", "dev", dev), tables, links


def relay_pids(state_dir: str) -> list[int]:
    """Our relays (any relay whose settings file is under state_dir)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            line = cmdline(int(name))
            if b"testbed.links.relay" in line and str(state_dir).encode() in line:
                found.append(int(name))
    return found


class Pinger:
    """AgentClient pings through a roster, as the base station dials it (its keys)."""

    def __init__(self, roster_path: str):
        from basestation.roster import build_roster
        from wire.client import AgentClient

        roster = build_roster([], roster_path, None)
        self.client = AgentClient(keypair=roster.keys.keypair if roster.keys else None)
        self.peers = [self.client.connect(e, server_key=roster.public_keys.get(e))
                      for e in roster.endpoints]

    def rtt_ms(self, index: int, payload: bytes = b"", timeout_s: float = DEADLINE_S) -> float:
        start = time.monotonic()
        self.client.call(self.peers[index], "ping", [payload] if payload else [],
                         timeout_s=timeout_s)
        return (time.monotonic() - start) * 1000

    def median_ms(self, index: int) -> float:
        self.rtt_ms(index)  # the connection (and CurveZMQ handshake) first
        return statistics.median(self.rtt_ms(index) for _ in range(PINGS))

    def answers(self, index: int) -> bool:
        try:
            self.rtt_ms(index, timeout_s=1.0)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.client.close()


def class_sent_bytes(dev: str, classid: str) -> int:
    text = _text("tc", "-s", "class", "show", "dev", dev, "classid", classid)
    return int(text.split("Sent ")[1].split()[0]) if "Sent " in text else 0


@pytest.fixture(scope="module")
def boxes(tiny_split, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (a bridge and namespaces)")
    from bridge_boxes import BridgeBoxes

    with BridgeBoxes(tiny_split, num_agents=2, workdir=tmp_path_factory.mktemp("boxes")) as b:
        yield b


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a bridge, tc, nftables)")
def test_shape_delay_rate_down_and_restore_exactly(boxes, tmp_path):
    """Box 0 at 30 ms one-way, box 1 at 8 Mbit/s, then down and up; down() puts the bridge,
    the ruleset and the links back as they were."""
    before = snapshot(boxes.dev)
    shaped = shape_boxes(boxes.roster, boxes.dev,
                         {0: LinkShape(delay_ms=DELAY_MS), 1: LinkShape(rate_mbit=RATE_MBIT)},
                         state_dir=str(tmp_path / "state"))
    pinger = None
    try:
        assert shaped.backend in (tc_plan.NETEM, tc_plan.FALLBACK)
        assert shaped.endpoints == boxes.endpoints
        assert snapshot(boxes.dev) != before
        pinger = Pinger(shaped.roster_path)
        # one-way delay each way: the round trip takes twice; box 1 has no delay at all
        assert pinger.median_ms(0) >= 2 * DELAY_MS
        assert pinger.median_ms(1) < DELAY_MS
        # the rate holds both ways, on the relay's own TCP to the box too (its address)
        ifb = tc_plan.ifb_name(boxes.dev)
        sent_before = [class_sent_bytes(d, "1:11") for d in (boxes.dev, ifb)]
        took_ms = pinger.rtt_ms(1, bytes(TRANSFER_BYTES))
        wire_ms = 2 * TRANSFER_BYTES * 8 / (RATE_MBIT * 1e3)
        assert took_ms >= 0.7 * wire_ms, f"{took_ms:.0f} ms for {wire_ms:.0f} ms of wire"
        sent_after = [class_sent_bytes(d, "1:11") for d in (boxes.dev, ifb)]
        assert all(a - b >= TRANSFER_BYTES for a, b in zip(sent_after, sent_before))

        shaped.degrade(1, LinkShape(down=True))
        wait_until(lambda: not pinger.answers(1), DEADLINE_S, what="box 1 to stop answering")
        assert pinger.answers(0)
        shaped.degrade(1, LinkShape(loss_pct=100))
        assert not pinger.answers(1)
        shaped.degrade(1, LinkShape())
        wait_until(lambda: pinger.answers(1), DEADLINE_S, what="box 1 to answer again")
    finally:
        if pinger:
            pinger.close()
        removed = shaped.down()
    assert removed and snapshot(boxes.dev) == before
    assert relay_pids(tmp_path) == []
    assert not os.path.exists(tmp_path / "state" / f"{boxes.dev}.json")
    assert shaped.down() == []  # twice is fine


def _cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed", *args], capture_output=True,
                          text=True, timeout=timeout_s, cwd=REPO_ROOT)


def _follow(common: list[str], out) -> subprocess.Popen:
    """`testbed shape --scenario flaky`, once it is shaped and following the schedule."""
    with open(out, "w") as f:
        follower = subprocess.Popen([sys.executable, "-m", "testbed", "shape", *common,
                                     "--scenario", "flaky"], stdout=f,
                                    stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    try:
        wait_until(lambda: "re-applying" in out.read_text() or follower.poll() is not None,
                   DEADLINE_S, what=lambda: f"shape to follow flaky: {out.read_text()}")
        assert follower.poll() is None, out.read_text()
    except BaseException:
        follower.kill()
        follower.wait(timeout=10)
        raise
    return follower


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a bridge, tc, nftables)")
def test_cli_shape_static_then_time_varying_killed_and_unshaped(boxes, tmp_path):
    """`testbed shape` of a static scenario exits and leaves the shaping (`degrade --roster`
    changes it); of a time-varying one it stays: SIGTERM unshapes and exits 0, and after a
    `kill -9`, `testbed unshape` restores the bridge and stops every relay."""
    state = str(tmp_path / "state")
    before = snapshot(boxes.dev)
    common = ["--roster", boxes.roster, "--dev", boxes.dev, "--state-dir", state]
    followers: list[subprocess.Popen] = []
    try:
        done = _cli("shape", *common, "--scenario", "one-bad-link")
        assert done.returncode == 0, done.stderr
        assert f"link 0  {boxes.endpoints[0]}  [delay 40 ms ±5" in done.stdout
        assert "roster: " in done.stdout and snapshot(boxes.dev) != before
        moved = _cli("degrade", *common, "--agent", boxes.endpoints[1], "--delay", "7ms")
        assert moved.returncode == 0, moved.stderr
        assert moved.stdout.startswith("link 1 (") and "delay 7 ms" in moved.stdout
        undone = _cli("unshape", "--dev", boxes.dev, "--state-dir", state)
        assert undone.returncode == 0 and "removed" in undone.stdout, undone.stderr
        assert snapshot(boxes.dev) == before and relay_pids(tmp_path) == []

        followers.append(_follow(common, tmp_path / "term.out"))
        followers[-1].send_signal(signal.SIGTERM)  # what Ctrl-C does too
        assert followers[-1].wait(timeout=DEADLINE_S) == 0
        assert snapshot(boxes.dev) == before and relay_pids(tmp_path) == []

        followers.append(_follow(common, tmp_path / "kill.out"))
        with open(os.path.join(state, f"{boxes.dev}.json")) as f:
            recorded = json.load(f)
        assert recorded["pid"] == followers[-1].pid
        if recorded["backend"] != tc_plan.NETEM:
            assert len(relay_pids(tmp_path)) == 2
        followers[-1].send_signal(signal.SIGKILL)
        followers[-1].wait(timeout=10)
        assert snapshot(boxes.dev) != before  # kill -9 left it shaped
        undone = _cli("unshape", "--dev", boxes.dev, "--state-dir", state)
        assert undone.returncode == 0, undone.stderr
        assert snapshot(boxes.dev) == before
        assert relay_pids(tmp_path) == []
        again = _cli("unshape", "--dev", boxes.dev, "--state-dir", state)
        assert again.returncode == 0 and "nothing shaped" in again.stdout
    finally:
        for follower in followers:
            if follower.poll() is None:
                follower.kill()
                follower.wait(timeout=10)
        _cli("unshape", "--dev", boxes.dev, "--state-dir", state)


@pytest.mark.root
@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a bridge, tc, nftables)")
def test_cli_refuses_bad_input_in_one_line_touching_nothing(boxes, tmp_path):
    state = str(tmp_path / "state")
    before = snapshot(boxes.dev)
    silent = tmp_path / "silent.toml"
    silent.write_text(f'[agents]\n"0-7" = "tcp://127.0.0.1:{free_port()}"\n')
    too_far = tmp_path / "five.toml"
    too_far.write_text("[links.5]\ndelay_ms = 10\n")
    cases = [
        (["--roster", boxes.roster, "--dev", "wdnosuch0", "--scenario", "uniform"],
         "no interface wdnosuch0"),
        (["--roster", str(silent), "--dev", boxes.dev, "--scenario", "uniform",
          "--answer-timeout-s", "2"], "did not answer INFO"),
        (["--roster", boxes.roster, "--dev", boxes.dev, "--scenario", str(too_far)],
         "shapes link 5, but the roster has 2"),
    ]
    for args, message in cases:
        done = _cli("shape", *args, "--state-dir", state)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1 and message in lines[0], done.stderr
        assert snapshot(boxes.dev) == before
        assert not os.path.exists(os.path.join(state, f"{boxes.dev}.json"))


# -- relays only: no root needed ---------------------------------------------------------------

def test_relays_backend_delays_and_refuses_loss(start_agent, tiny_split, tmp_path):  # noqa: F811
    """Plain agents on 127.0.0.1, delay by relays alone (DEV untouched, only naming the
    state); loss is refused in one line: relays see bytes, not packets."""
    from basestation.roster import RosterAgent, format_roster

    agents = [start_agent("--expert", spec, "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                          "--no-self-benchmark") for spec in ("0-3", "4-7")]
    roster = tmp_path / "roster.toml"
    roster.write_text(format_roster([RosterAgent(experts, a.endpoint) for experts, a
                                     in zip(((0, 1, 2, 3), (4, 5, 6, 7)), agents)]))
    state = str(tmp_path / "state")
    with pytest.raises(TestbedError, match="loss needs root"):
        shape_boxes(str(roster), "lo", {1: LinkShape(loss_pct=1)}, backend="relays",
                    state_dir=state)
    assert not os.path.exists(os.path.join(state, "lo.json"))
    lo_before = _text("tc", "qdisc", "show", "dev", "lo")
    shaped = shape_boxes(str(roster), "lo", {0: LinkShape(delay_ms=20)}, backend="relays",
                         state_dir=state)
    pinger = None
    try:
        assert shaped.backend == tc_plan.RELAYS and shaped.roster_path != str(roster)
        assert _text("tc", "qdisc", "show", "dev", "lo") == lo_before
        pinger = Pinger(shaped.roster_path)
        assert pinger.median_ms(0) >= 40
        assert pinger.median_ms(1) < 20
        with pytest.raises(TestbedError, match="loss needs root"):
            shaped.degrade(1, LinkShape(loss_pct=5))
        shaped.degrade(1, LinkShape(down=True))
        wait_until(lambda: not pinger.answers(1), DEADLINE_S, what="box 1 to stop answering")
        shaped.degrade(1, LinkShape())
        wait_until(lambda: pinger.answers(1), DEADLINE_S, what="box 1 to answer again")
    finally:
        if pinger:
            pinger.close()
        shaped.down()
    assert relay_pids(tmp_path) == [] and not os.path.exists(os.path.join(state, "lo.json"))

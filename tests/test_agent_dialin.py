"""Dial-in mode: the agent connects out to the base station's ROUTER and announces itself.

The base-station side is a plain AgentClient (one ROUTER socket) bound in the test, or in a
process of its own (tests/dialin_basestation.py) where a flood could kill it.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import zmq
import zmtp_raw
from agent_fixtures import (  # noqa: F401
    REPO_ROOT,
    ScriptedDialIn,
    client,
    free_port,
    start_agent,
)
from test_agent_limits import rss_mib
from test_agent_math import assert_close_rel
from waiting import hold_for, wait_until

from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from shard_tool.manifest import load_manifest
from wire import protocol as P
from wire.client import AgentClient, PeerUnreachable
from wire.peer_limits import MAX_PEERS

pytestmark = pytest.mark.integration
HELLO_TIMEOUT_S = 30.0


def test_dial_in_announces_serves_and_reannounces(start_agent, tiny_split):
    reference = load_experts(tiny_split, [1], device="cpu")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    basestation = AgentClient()
    try:
        basestation.bind(endpoint)
        with pytest.raises(PeerUnreachable):  # not dialled in yet: refused at once, not queued
            basestation.send(b"edge-test", P.PING)
        args = ("--expert", "1", "--shards", tiny_split, "--basestation", endpoint,
                "--id", "edge-test", "--no-self-benchmark")
        agent = start_agent(*args)
        peer = basestation.wait_hello(HELLO_TIMEOUT_S)
        assert peer == b"edge-test"
        hello = basestation.hellos[peer]
        assert hello["experts"] == [1] and hello["serving"]
        assert hello["fingerprint"] == load_manifest(tiny_split).fingerprint
        assert "int8" in hello["capabilities"]["wire_dtypes"]
        x = torch.randn(3, 64)
        out, _ = basestation.expert(peer, 0, x, [(1, 3)])
        assert_close_rel(out, expert_forward(x, reference.weights[1][0]))

        # the agent restarts: it dials in and announces again; the same socket serves it
        agent.kill()
        basestation.hellos.clear()
        start_agent(*args)
        assert basestation.wait_hello(HELLO_TIMEOUT_S) == b"edge-test"
        out, _ = basestation.expert(peer, 1, x, [(1, 3)])
        assert_close_rel(out, expert_forward(x, reference.weights[1][1]))

        # the base station restarts: the agent reconnects (backoff) and announces again
        basestation.close()
        basestation = AgentClient()
        basestation.bind(endpoint)
        assert basestation.wait_hello(HELLO_TIMEOUT_S) == b"edge-test"
        out, _ = basestation.expert(peer, 1, x, [(1, 3)])
        assert_close_rel(out, expert_forward(x, reference.weights[1][1]))
    finally:
        basestation.close()


def test_one_socket_serves_a_listening_and_a_dial_in_agent_at_once(start_agent, tiny_split,
                                                                    client):
    reference = load_experts(tiny_split, [0, 2], device="cpu")
    listening = start_agent("--expert", "2", "--shards", tiny_split, "--bind",
                            "tcp://127.0.0.1:*", "--no-self-benchmark")
    b = client.connect(listening.endpoint)  # before listening: a dial-in could hold its name
    listen_endpoint = client.bind("tcp://127.0.0.1:*")
    with pytest.raises(ValueError, match="before listening"):
        client.connect("tcp://127.0.0.1:1")
    dial_in = start_agent("--expert", "0", "--shards", tiny_split, "--basestation",
                          listen_endpoint, "--id", "edge-a", "--no-self-benchmark")
    assert dial_in.alive()
    a = client.wait_hello(HELLO_TIMEOUT_S)
    x = torch.randn(5, 64)
    ids = {client.send_expert(a, 1, x, [(0, 5)]): 0, client.send_expert(b, 1, x, [(2, 5)]): 2}
    replies = client.wait(set(ids), timeout_s=10)
    assert set(replies) == set(ids)
    for request_id, expert in ids.items():
        assert_close_rel(replies[request_id].tensor(),
                         expert_forward(x, reference.weights[expert][1]))


# -- floods on the dial-in port ------------------------------------------------------------------

FLOOD_MESSAGES = 3000  # far over the 16-message queue the client's socket used to have
FLOOD_CAP_MB = "1"  # the flooded client's per-frame cap: budgets of 1 MiB (stranger), 17 MiB
FLOOD_BOUND_MIB = 96  # its memory growth over all the floods (README, "Trusted links")
# The never-ending message's length: held whole, it grows the base station far past
# FLOOD_BOUND_MIB; cut, it stops at what arrives in a watchdog pass (~60 MiB on loopback).
NEVER_ENDING_MIB = 512
IDLE_CONNECTIONS = 80  # over the 64 accepted connections a client keeps
MAX_ACCEPTED = MAX_PEERS  # the accepted connections a client keeps
LINE_TIMEOUT_S = 30.0


class DialInBaseStation:
    """tests/dialin_basestation.py as a process, its stdout lines read with deadlines."""

    def __init__(self, shards: str):
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO_ROOT, "tests", "dialin_basestation.py"), shards,
             "--cap-mb", FLOOD_CAP_MB], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"))
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def ask(self, command: str | None, expect: str) -> str:
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        try:
            line = self.lines.get(timeout=LINE_TIMEOUT_S)
        except queue.Empty:
            line = "(silent)"
        if line is None or not line.startswith(expect):
            self.proc.kill()
            pytest.fail(f"dial-in base station: {line!r} (wanted {expect!r}); exit status "
                        f"{self.proc.wait()}; stderr:\n{self.proc.stderr.read()[-3000:]}")
        return line

    def assert_alive(self) -> None:
        if self.proc.poll() is not None:
            pytest.fail(f"dial-in base station died (exit status {self.proc.returncode}): "
                        f"{self.proc.stderr.read()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def flood_then_hang_up(ctx: zmq.Context, endpoint: str, routing_id: bytes,
                       hello: bool = False) -> None:
    """FLOOD_MESSAGES small messages the base station does not read now, then gone."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.ROUTING_ID, routing_id)
    sock.connect(endpoint)
    if hello:
        sock.send(P.pack(P.HELLO, 0, info={"serving": False, "experts": [0]}))
    for i in range(FLOOD_MESSAGES):
        sock.send_multipart([P.pack(P.PONG, i, bytes=1024), bytes(1024)])
    # The attack's shape, not synchronisation: a hang-up while much of the flood is still queued
    # somewhere. How much arrived does not matter; the checks after all floods wait on outcomes.
    time.sleep(0.5)
    sock.close(linger=0)


def raw_floods(endpoint: str) -> int:
    """Byte-level floods on fresh TCP connections, each closed after; the bytes of the
    never-ending message that went out before the base station cut it."""
    sent = 0
    more = zmtp_raw.frame(bytes(65536), more=True)
    try:  # a multipart message that never ends: cut as a stranger over its 1 MiB
        with zmtp_raw.connect(endpoint) as never_ending:
            while sent < NEVER_ENDING_MIB * 2**20:
                never_ending.sendall(more)
                sent += len(more)
    except OSError:
        pass
    try:  # one frame over the cap: libzmq drops the connection at its header
        with zmtp_raw.connect(endpoint) as huge:
            huge.sendall(zmtp_raw.frame(bytes(8 * 2**20)))
    except OSError:
        pass
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    try:  # no ZMTP at all
        with socket.create_connection((host, int(port)), timeout=5) as garbage:
            garbage.sendall(os.urandom(2**20))
    except OSError:
        pass
    idle = []
    try:  # connections that never say HELLO: over the cap, the idle longest are cut
        for _ in range(IDLE_CONNECTIONS):
            idle.append(zmtp_raw.connect(endpoint))
        hung = set()

        def count_hung_up() -> int:
            hung.update(i for i, sock in enumerate(idle)
                        if i not in hung and zmtp_raw.hung_up(sock))
            return len(hung)

        # the agent's connection and IDLE_CONNECTIONS idle ones, MAX_ACCEPTED kept
        wait_until(lambda: count_hung_up() >= IDLE_CONNECTIONS + 1 - MAX_ACCEPTED,
                   LINE_TIMEOUT_S, what="the base station to cut the idle connections over its cap")
    finally:
        for sock in idle:
            sock.close()
    return sent


@pytest.mark.integration
def test_dial_in_port_survives_floods_and_hang_ups(start_agent, tiny_split):
    """A peer that filled the base station's 16-message queue and hung up aborted the whole
    process when it read again (libzmq 4.3.5 "Assertion failed: !_io_error", SIGABRT); an
    unfinished multipart message grew it without bound. Now: no receive HWM, bytes bounded per
    connection, the agent still served, memory within FLOOD_BOUND_MIB.
    Regression (flaky under load, 99 MiB over a 96 MiB bound): a cold baseline counted the first
    check's torch warm-up, and a 64 MiB message ended about when the cut came, so it was held
    whole or not at all. The message is open-ended, cut long before its end, and what got out
    before the cut is counted."""
    bs = DialInBaseStation(tiny_split)
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    try:
        endpoint = bs.ask(None, "listening").split()[1]
        start_agent("--expert", "0,1", "--shards", tiny_split, "--basestation", endpoint,
                    "--id", "edge-real", "--no-self-benchmark")
        bs.ask(None, "agent edge-real")
        # warm-up: the check's first run loads shards and torch's kernels (tens of MiB that
        # depend on nothing here); the baseline after it leaves only what the floods make stay
        bs.ask("check 0,1", "ok")
        before = rss_mib(bs.proc.pid)
        bs.ask("pause", "paused")  # busy elsewhere: nothing is read while the floods come
        for routing_id, hello in ((b"flood-a", False),
                                  # under the agent's name: ignored by libzmq, never handed it
                                  (b"edge-real", False), (b"flood-hello", True)):
            flood_then_hang_up(ctx, endpoint, routing_id, hello)
            bs.assert_alive()
        never_ending_sent = raw_floods(endpoint)
        bs.assert_alive()
        peak = rss_mib(bs.proc.pid)
        # part of the attack, not synchronisation: the abort came on the first read after
        # libzmq had noticed a hang-up (no event of the other process reaches the test)
        hold_for(lambda: bs.proc.poll() is None, 1.5, interval_s=0.05,
                 what="the dial-in base station alive")
        bs.assert_alive()
        ok = bs.ask("check 0,1", "ok")  # reads what is left, then the real agent computes
        after = rss_mib(bs.proc.pid)
    finally:
        ctx.term()
        bs.close()
    _, cuts, refused = ok.split()
    assert int(cuts) > IDLE_CONNECTIONS - MAX_ACCEPTED and int(refused) > 0, ok
    never_ending_mib = never_ending_sent / 2**20
    assert never_ending_mib < NEVER_ENDING_MIB, "the base station took a never-ending message"
    # what got out before the cut (the kernel took it; more under load, when the watchdog runs
    # late) may stay; the queued floods and the rest stay within FLOOD_BOUND_MIB
    grown = max(peak, after) - before
    assert grown < FLOOD_BOUND_MIB + never_ending_mib, (
        f"grew {grown:.0f} MiB (peak {peak:.0f}, after {after:.0f}; the never-ending message "
        f"sent {never_ending_mib:.0f} MiB)")


# -- a second peer under a dial-in agent's name ----------------------------------------------------

PROMPT = "Return the list of items in the queue."


class Hijacker(ScriptedDialIn):
    """A peer that dials in under another agent's routing id (optionally with a key the base
    station trusts), announces itself with that agent's info and answers every expert request
    with zeros of the right shape: finite, believable and wrong."""

    hello_every_s = 0.2

    def __init__(self, endpoint: str, routing_id: bytes, info: dict, curve=None):
        self.requests = 0
        super().__init__(endpoint, routing_id, info, curve)

    def answer(self, header: dict, frames: list[bytes]) -> list[list[bytes]]:
        self.requests += 1
        if header["kind"] == P.EXPERT:
            y = torch.zeros(header["shape"], dtype=torch.float32)
            out, fields = P.encode_tensor(y, "float32")
            return [[P.pack(P.EXPERT_REPLY, header["id"], layer=header["layer"],
                             experts=header["experts"], compute_s=1e-4, **fields)] + out]
        if header["kind"] == P.PING:
            return [[P.pack(P.PONG, header["id"], bytes=0)]]
        return []


@pytest.mark.integration
def test_a_second_peer_under_a_dial_in_agents_name_takes_nothing_over(start_agent, tiny_split,
                                                                      tiny_checkpoint):
    """With ROUTER_HANDOVER on, a second connection under a dial-in agent's routing id took
    the name over: the agent's requests went to it, its zeros counted, the agent was cut off.
    Now libzmq ignores it: generation is exactly the unhijacked one (transformers' at θ=0)."""
    from test_basestation import reference_tokens

    from basestation.generate import generate
    from basestation.session import build_roster, open_session

    tokens = 8
    listening = start_agent("--expert", "0-3", "--shards", tiny_split, "--bind",
                            "tcp://127.0.0.1:*", "--no-self-benchmark")
    listen = f"tcp://127.0.0.1:{free_port()}"
    start_agent("--expert", "4-7", "--shards", tiny_split, "--basestation", listen, "--id",
                "edge-4-7", "--no-self-benchmark", ready=None)
    session = open_session(tiny_split, build_roster([f"0-3={listening.endpoint}"], None,
                                                    listen), dtype="float32", wait_s=60,
                           progress=False)
    hijacker = None
    try:
        agent = next(a for a in session.agents if a.name == "edge-4-7")
        hijacker = Hijacker(listen, b"edge-4-7", dict(agent.info, agent_id="edge-4-7"))
        assert hijacker.connected.wait(10)
        session.poll_probes(0.5)  # its HELLOs arrive, if anything lets them through
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        result = generate(session, ids, max_new_tokens=tokens, ignore_eos=True)
        session.poll_probes(0.3)
        assert hijacker.requests == 0
        assert agent.failures == 0 and agent.calls > 0
        assert session.client.hellos[b"edge-4-7"]["pid"] == agent.info["pid"]
    finally:
        if hijacker is not None:
            hijacker.stop()
        session.close()
    assert result.token_ids == reference_tokens(tiny_checkpoint, PROMPT, tokens)


@pytest.mark.integration
def test_a_trusted_key_cannot_take_another_agents_name(start_agent, tiny_split, tmp_path):
    """Over CurveZMQ a routing id is bound to the key it first announced with: another
    trusted key that takes the name while its agent is away has its HELLO refused and its
    connection cut, gets no request, and the agent gets its name back when it returns."""
    from wire.keys import TRUSTED_DIR, keygen, load_key_folder, load_keypair, trust

    folders = {}
    for name in ("bs", "edge-x", "other"):
        folders[name] = str(tmp_path / name)
        keygen(folders[name], name, (TRUSTED_DIR,))
    for name in ("edge-x", "other"):
        trust(folders["bs"], os.path.join(folders[name], f"{name}.key"))
        trust(folders[name], os.path.join(folders["bs"], "bs.key"))
    bs = load_key_folder(folders["bs"])
    args = ("--expert", "2", "--shards", tiny_split, "--id", "edge-x", "--keys",
            folders["edge-x"], "--basestation-key", os.path.join(folders["bs"], "bs.key"),
            "--no-self-benchmark")
    x = torch.randn(3, 64)
    want = expert_forward(x, load_experts(tiny_split, [2], device="cpu").weights[2][1])
    with AgentClient(keypair=bs.keypair) as basestation:
        endpoint = basestation.bind("tcp://127.0.0.1:*", admitted=bs.trusted)
        agent = start_agent("--basestation", endpoint, *args)
        assert basestation.wait_hello(HELLO_TIMEOUT_S) == b"edge-x"
        info = dict(basestation.hellos[b"edge-x"])
        agent.kill()

        def connection_gone() -> bool:
            try:
                basestation.send(b"edge-x", P.PING)
            except PeerUnreachable:
                return True
            basestation.recv(0.05)
            return False

        wait_until(connection_gone, 60, interval_s=0, what="the killed agent's connection to go")
        hijacker = Hijacker(endpoint, b"edge-x", dict(info, pid=-1),
                            curve=(load_keypair(folders["other"]), bs.keypair.public))
        try:
            # an observation window, not a wait: the hijacker's HELLOs (every 0.2 s) get 3 s
            # to win the name, and none may
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                basestation.recv(0.05)
                with pytest.raises(PeerUnreachable):
                    basestation.send(b"edge-x", P.PING)
            assert hijacker.requests == 0
            assert basestation.hellos[b"edge-x"]["pid"] == info["pid"]
            basestation.hellos.clear()
            start_agent("--basestation", endpoint, *args)  # the agent is back, name and all
            assert basestation.wait_hello(HELLO_TIMEOUT_S) == b"edge-x"
            out, _ = basestation.expert(b"edge-x", 1, x, [(2, 3)], timeout_s=10)
            assert_close_rel(out, want)
            assert hijacker.requests == 0
        finally:
            hijacker.stop()

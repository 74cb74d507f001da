"""Bad input, faults, restarts and signals against real agent processes.

Every bad message gets an ERROR reply (or, when no reply is possible, a dropped connection and
a log line), and the agent stays alive and correct afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket

import msgpack
import pytest
import torch
import zmq
from agent_fixtures import client, free_port, start_agent, start_module_agent  # noqa: F401
from test_agent_limits import in_the_faults_sleep
from test_agent_math import assert_close_rel
from waiting import wait_until

from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from wire import protocol as P
from wire.client import AgentClient

pytestmark = pytest.mark.integration
REPLY_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def reference(tiny_split):
    return load_experts(tiny_split, [0, 3], device="cpu")


@pytest.fixture(scope="module")
def agent(start_module_agent, tiny_split):
    return start_module_agent("--expert", "0,3", "--shards", tiny_split, "--bind",
                              "tcp://127.0.0.1:*", "--max-message-mb", "1",
                              "--no-self-benchmark")


@pytest.fixture
def raw(agent):
    """A bare DEALER: sends whatever frames a test makes up."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(agent.endpoint)
    yield sock
    sock.close(linger=0)
    ctx.term()


def raw_call(sock, frames) -> dict | None:
    sock.send_multipart(frames)
    if not sock.poll(int(REPLY_TIMEOUT_S * 1000)):
        return None
    reply = sock.recv_multipart()
    return msgpack.unpackb(reply[0])


def header(**fields) -> bytes:
    base = {"v": P.PROTOCOL_VERSION, "kind": P.EXPERT, "id": 42, "layer": 0,
            "experts": [[0, 2]], "dtype": "float32", "shape": [2, 64]}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None})


GOOD = bytes(2 * 64 * 4)
BAD_MESSAGES = {
    "garbage header": ([b"\xc1\x00garbage", GOOD], P.ERR_MALFORMED),
    "empty header": ([b""], P.ERR_MALFORMED),
    "header not a map": ([msgpack.packb([1, 2, 3]), GOOD], P.ERR_MALFORMED),
    "wrong version": ([header(v=99), GOOD], P.ERR_VERSION),
    "no version": ([msgpack.packb({"kind": P.PING, "id": 1})], P.ERR_VERSION),
    "request id not an int": ([header(id="x"), GOOD], P.ERR_MALFORMED),
    "unknown kind": ([header(kind="teleport")], P.ERR_UNKNOWN_KIND),
    "unknown layer": ([header(layer=7), GOOD], P.ERR_UNKNOWN_LAYER),
    "layer not an int": ([header(layer="0"), GOOD], P.ERR_UNKNOWN_LAYER),
    "unknown expert": ([header(experts=[[5, 2]]), GOOD], P.ERR_UNKNOWN_EXPERT),
    "experts not pairs": ([header(experts=[0, 2]), GOOD], P.ERR_MALFORMED),
    "negative token count": ([header(experts=[[0, -2]]), GOOD], P.ERR_SHAPE),
    "counts do not sum to shape": ([header(experts=[[0, 1]]), GOOD], P.ERR_SHAPE),
    "wrong hidden size": ([header(shape=[4, 32]), GOOD], P.ERR_SHAPE),
    "shape not a pair": ([header(shape=[128]), GOOD], P.ERR_SHAPE),
    "payload too short": ([header(), GOOD[:-4]], P.ERR_SHAPE),
    "dtype does not match payload": ([header(dtype="bfloat16"), GOOD], P.ERR_SHAPE),
    "unknown dtype": ([header(dtype="complex64"), GOOD], P.ERR_DTYPE),
    "no payload": ([header()], P.ERR_MALFORMED),
    "int8 without scales": ([header(dtype="int8"), bytes(128)], P.ERR_MALFORMED),
    "ping too large": ([header(kind=P.PING, reply_bytes=1 << 40)], P.ERR_TOO_LARGE),
    "push to an agent without --store": ([header(kind=P.PUSH_BEGIN, expert=0), b"{}"],
                                         P.ERR_PUSH),
    "expert request before layer": ([header(kind=P.EXPERT, layer=None), GOOD],
                                    P.ERR_UNKNOWN_LAYER),
}


def assert_serves_correctly(endpoint: str, reference) -> None:
    with AgentClient() as c:
        x = torch.randn(5, 64)
        out, _ = c.expert(c.connect(endpoint), 1, x, [(3, 5)], timeout_s=REPLY_TIMEOUT_S)
        assert_close_rel(out, expert_forward(x, reference.weights[3][1]))


@pytest.mark.parametrize("name", list(BAD_MESSAGES))
def test_bad_message_gets_an_error_reply(raw, agent, reference, name):
    frames, code = BAD_MESSAGES[name]
    reply = raw_call(raw, frames)
    assert reply is not None, f"no reply; stderr:\n{agent.stderr()}"
    assert reply["kind"] == P.ERROR and reply["code"] == code, reply
    assert reply["v"] == P.PROTOCOL_VERSION
    if code not in (P.ERR_MALFORMED, P.ERR_VERSION):
        assert reply["id"] == 42
    assert agent.alive()
    assert_serves_correctly(agent.endpoint, reference)


def test_random_bytes_on_the_port_are_dropped_with_a_log_line(agent, reference):
    port = int(agent.endpoint.rsplit(":", 1)[1])
    for junk in (os.urandom(4096), b"GET / HTTP/1.0\r\n\r\n", b"\xff" + bytes(8) + b"\x7f"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            try:
                s.sendall(junk)
                s.recv(1024)  # the agent answers with its greeting, then hangs up
            except OSError:
                pass
    assert_serves_correctly(agent.endpoint, reference)
    wait_until(lambda: "handshake failed" in agent.stderr(), REPLY_TIMEOUT_S,
               what="a 'handshake failed' log line")
    assert agent.alive()


def test_message_over_the_size_cap_is_dropped(raw, agent, reference):
    """MAXMSGSIZE (1 MiB here): the agent hangs up on the sender instead of allocating."""
    reply = raw_call(raw, [header(shape=[8192, 64], experts=[[0, 8192]]), bytes(8192 * 64 * 4)])
    assert reply is None or reply["kind"] == P.ERROR
    assert agent.alive()
    assert_serves_correctly(agent.endpoint, reference)


def test_bad_input_does_not_grow_memory(raw, agent, reference):
    def rss_kib() -> int:
        with open(f"/proc/{agent.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    def burst():
        for _ in range(150):
            for frames, _ in BAD_MESSAGES.values():
                raw.send_multipart(frames)
                # at most 16 in flight (HWM): read the reply of each before the next
                assert raw.poll(int(REPLY_TIMEOUT_S * 1000))
                raw.recv_multipart()

    burst()  # warm: allocator pools, logging
    before = rss_kib()
    burst()
    assert rss_kib() - before < 20 * 1024, "agent memory grew by > 20 MiB over 3450 bad messages"


def test_late_replies_are_discarded_by_request_id(start_agent, tiny_split, client, reference):
    agent = start_agent("--expert", "3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--fault", "delay=0.5", "--no-self-benchmark")
    peer = client.connect(agent.endpoint)
    x = torch.randn(2, 64)
    with pytest.raises(TimeoutError):
        client.expert(peer, 0, x, [(3, 2)], timeout_s=0.05)
    y = torch.randn(3, 64)
    out, _ = client.expert(peer, 0, y, [(3, 3)], timeout_s=REPLY_TIMEOUT_S)
    assert_close_rel(out, expert_forward(y, reference.weights[3][0]))
    assert client.late_replies == 1


def test_killed_and_restarted_agent_is_served_again_by_the_same_socket(
        start_agent, tiny_split, client, reference):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = ("--expert", "0,3", "--shards", tiny_split, "--bind", endpoint, "--no-self-benchmark")
    first = start_agent(*args)
    peer = client.connect(endpoint)
    pid_before = client.info(peer)["pid"]
    first.kill()  # SIGKILL: no goodbye on the wire
    with pytest.raises(TimeoutError):
        client.call(peer, P.PING, timeout_s=0.3)
    start_agent(*args)
    x = torch.randn(4, 64)
    out, _ = client.expert(peer, 1, x, [(0, 4)], timeout_s=30)
    assert_close_rel(out, expert_forward(x, reference.weights[0][1]))
    assert client.info(peer)["pid"] != pid_before


def test_crash_fault_exits_and_restart_serves(start_agent, tiny_split, client):
    from edge_agent.faults import CRASH_EXIT_CODE

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    agent = start_agent("--expert", "0", "--shards", tiny_split, "--bind", endpoint,
                        "--fault", "crash=2", "--no-self-benchmark")
    peer = client.connect(endpoint)
    client.expert(peer, 0, torch.randn(1, 64), [(0, 1)])
    with pytest.raises(TimeoutError):
        client.expert(peer, 0, torch.randn(1, 64), [(0, 1)], timeout_s=2)
    assert agent.proc.wait(timeout=20) == CRASH_EXIT_CODE


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_cleanly(start_agent, tiny_split, client, sig):
    agent = start_agent("--expert", "0", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark")
    peer = client.connect(agent.endpoint)
    client.call(peer, P.PING)
    assert agent.stop(sig) == 0
    assert "stopped" in agent.stderr() and "Traceback" not in agent.stderr()


def test_signal_during_a_request_finishes_it_then_exits(start_agent, tiny_split, client,
                                                       reference):
    """SIGTERM while a request computes: its reply still goes out, then the agent exits 0.
    Guards against a reply dropped at SIGTERM, or an agent that stays up after it."""
    agent = start_agent("--expert", "0", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--fault", "delay=3.0", "--no-self-benchmark")
    peer = client.connect(agent.endpoint)
    x = torch.randn(1, 64)
    request_id = client.send_expert(peer, 0, x, [(0, 1)])
    wait_until(lambda: in_the_faults_sleep(agent.proc.pid), REPLY_TIMEOUT_S,
               interval_s=0.002, what="the agent to start the request")
    agent.proc.send_signal(signal.SIGTERM)  # while it computes (a 3 s --fault delay)
    replies = client.wait({request_id}, timeout_s=REPLY_TIMEOUT_S)
    assert request_id in replies, f"no reply to the request in flight; stderr:\n{agent.stderr()}"
    assert_close_rel(replies[request_id].tensor(), expert_forward(x, reference.weights[0][0]))
    assert agent.proc.wait(timeout=REPLY_TIMEOUT_S) == 0
    assert "stopped" in agent.stderr() and "Traceback" not in agent.stderr()


def corrupt_copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "experts", "expert-000.safetensors")
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) - 10)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    return dst


@pytest.mark.parametrize("case", ["no folder", "missing shard", "corrupt shard", "bad expert",
                                  "out of range expert"])
def test_start_errors_are_one_line_and_non_zero(start_agent, tiny_split, tmp_path, case):
    shards = tiny_split
    expert = "0"
    if case == "no folder":
        shards = str(tmp_path / "nowhere")
    elif case == "missing shard":
        shards = str(tmp_path / "copy")
        shutil.copytree(tiny_split, shards)
        os.remove(os.path.join(shards, "experts", "expert-000.safetensors"))
    elif case == "corrupt shard":
        shards = corrupt_copy(tiny_split, str(tmp_path / "copy"))
    elif case == "bad expert":
        expert = "x-1"
    else:
        expert = "0,99"
    agent = start_agent("--expert", expert, "--shards", shards, "--bind", "tcp://127.0.0.1:*",
                        ready=None)
    rc = agent.proc.wait(timeout=60)
    err = agent.stderr().strip()
    assert rc != 0 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and err.startswith("edge_agent: error:"), err


def test_port_in_use_is_one_line(start_agent, agent, tiny_split):
    other = start_agent("--expert", "0", "--shards", tiny_split, "--bind", agent.endpoint,
                        ready=None)
    assert other.proc.wait(timeout=60) != 0
    err = other.stderr().strip()
    assert len(err.splitlines()) == 1 and "in use" in err, err

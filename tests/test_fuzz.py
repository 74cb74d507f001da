"""Fuzzing every port the system opens (issue #13), loopback only, a fixed seed, a case budget
and a deadline on every section:
    an agent          6,000 random and mutated messages from four connections, every one of
                      which must get exactly one well-formed reply (an ERROR is fine, the
                      `internal` one is a bug), then 400 byte-level ZMTP cases on fresh TCP
                      connections (damaged greetings, enormous frame sizes, unfinished
                      messages, garbage after the handshake);
    a pushing store   2,500 push-heavy cases: forged and broken manifests, chunks at any
                      offset with matching and wrong hashes, ends at any time, from several
                      connections at once;
    a base station    1,500 messages into its dial-in port (HELLOs and replies of every kind,
                      mutated) while it connects and generates, and a rogue dial-in agent that
                      answers every expert request with another kind of bad reply.
Afterwards every agent is alive and computes correctly, the store takes a real push, the
generation finished with exactly the tokens it gives without the rogue's experts (no bad reply
was ever used), and each agent's memory grew by less than MEMORY_BOUND_MIB (README, "Wire
protocol"). About 10,400 cases in all; well under two minutes on a 2-core machine.
"""

from __future__ import annotations

import collections
import math
import os
import random
import threading
import time

import msgpack
import pytest
import torch
import zmq
import zmtp_raw
from agent_fixtures import ScriptedDialIn, free_port, start_module_agent  # noqa: F401
from fuzz_messages import REPLY_KINDS, MessageFuzzer, raw_zmtp_case
from test_agent_limits import agent_log, rss_mib
from test_agent_math import assert_close_rel

from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from shard_tool.manifest import MANIFEST_NAME, load_manifest
from shard_tool.push import push
from wire import protocol as P
from wire.client import AgentClient

pytestmark = pytest.mark.integration

SEED = 13
AGENT_CASES = 6000
RAW_ZMTP_CASES = 400
STORE_CASES = 2500
DIALIN_CASES = 1500
HANG_UP_EVERY = 250  # dial-in cases between two hang-ups of one fuzzing connection
MIB = 1 << 20
MESSAGE_CAP_MB = "1"  # --max-message-mb of the agents under test
SECTION_DEADLINE_S = 60.0  # a fuzz section still running after this fails: bounded in time
REPLY_TIMEOUT_S = 10.0  # "no silence": a message without a reply by then fails the test
MEMORY_BOUND_MIB = 64  # an agent's RSS growth over its fuzzing (README, "Wire protocol")
CONNECTIONS = 4
IN_FLIGHT_MESSAGES = 8  # per connection, under the agent's 16-message HWM
IN_FLIGHT_BYTES = 4 * MIB  # per connection, well under the agent's in-flight budget
REPLIES = (P.ERROR, P.PONG, P.INFO_REPLY, P.EXPERT_REPLY, P.PUSH_ACK)
PROMPT = "Return the list of items in the queue."
# An ERROR reply quotes a peer's values cut short (protocol.shown): a 200,000-int `layer` was
# echoed whole, a 1.49 MB reply and log line (issue 20)
MAX_ERROR_REPLY_BYTES = 1024


@pytest.fixture(scope="module")
def agents(start_module_agent, tiny_split, tmp_path_factory):
    """The agent (experts 0-3, later the honest agent of the generation) and a pushing store
    (expert 3, told to accept the tiny model), started side by side."""
    common = ("--bind", "tcp://127.0.0.1:*", "--max-message-mb", MESSAGE_CAP_MB,
              "--no-self-benchmark")
    serve = start_module_agent("--expert", "0-3", "--shards", tiny_split, *common, ready=None)
    store_dir = str(tmp_path_factory.mktemp("fuzz-store") / "store")
    store = start_module_agent("--expert", "3", "--store", store_dir, "--accept-fingerprint",
                               load_manifest(tiny_split).fingerprint, *common, ready=None)
    serve.wait_line("edge_agent ready")
    store.wait_line("edge_agent waiting")
    store.folder = store_dir
    return {"serve": serve, "store": store}


def fuzzer(tiny_split: str, seed: int, experts: tuple[int, ...] = (0, 1, 2, 3, 5),
           **kwargs) -> MessageFuzzer:
    """Cases about the tiny model: its hidden size, an expert and a layer it lacks, its
    manifest."""
    manifest = load_manifest(tiny_split)
    with open(os.path.join(tiny_split, MANIFEST_NAME), "rb") as f:
        manifest_bytes = f.read()
    return MessageFuzzer(seed, hidden=int(manifest.model["hidden_size"]), experts=experts,
                         layers=3, frame_cap=int(MESSAGE_CAP_MB) * MIB,
                         manifests=(manifest_bytes,), **kwargs)


class Driver:
    """Sends cases from CONNECTIONS DEALER sockets, a few in flight on each, and checks that
    every one gets exactly one well-formed reply within REPLY_TIMEOUT_S."""

    def __init__(self, endpoint: str):
        self.ctx = zmq.Context()
        self.socks = []
        for _ in range(CONNECTIONS):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self.socks.append(sock)
        self.in_flight = {id(s): collections.deque() for s in self.socks}
        self.replies: collections.Counter = collections.Counter()
        self.sent = 0

    def run(self, cases, count: int, deadline_s: float) -> None:
        for i in range(count):
            if time.monotonic() > deadline_s:
                pytest.fail(f"fuzzing took longer than {SECTION_DEADLINE_S} s at case {i}")
            sock = self.socks[i % CONNECTIONS]
            frames = next(cases)
            waiting = self.in_flight[id(sock)]
            while waiting and (len(waiting) >= IN_FLIGHT_MESSAGES
                               or sum(waiting) + sum(map(len, frames)) > IN_FLIGHT_BYTES):
                self._take_reply(sock)
            sock.send_multipart(frames)
            waiting.append(sum(map(len, frames)))
            self.sent += 1
        for sock in self.socks:
            while self.in_flight[id(sock)]:
                self._take_reply(sock)

    def _take_reply(self, sock) -> None:
        if not sock.poll(int(REPLY_TIMEOUT_S * 1000)):
            pytest.fail(f"no reply within {REPLY_TIMEOUT_S} s after {self.sent} cases (silence)")
        frames = sock.recv_multipart()
        self.in_flight[id(sock)].popleft()
        header = P.unpack(frames[0])  # a reply is well-formed: raises ProtocolError if not
        assert header["kind"] in REPLIES, header
        if header["kind"] == P.ERROR:
            assert header.get("code") != P.ERR_INTERNAL, f"a bug the fuzzer found: {header}"
            assert len(frames[0]) <= MAX_ERROR_REPLY_BYTES, header
            self.replies[header.get("code")] += 1
        else:
            self.replies[header["kind"]] += 1

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.ctx.term()


def fuzz(endpoint: str, cases, count: int) -> collections.Counter:
    driver = Driver(endpoint)
    try:
        driver.run(cases, count, time.monotonic() + SECTION_DEADLINE_S)
        assert driver.sent == count
        return driver.replies
    finally:
        driver.close()


def ping(endpoint: str) -> None:
    with AgentClient() as client:
        assert client.call(client.connect(endpoint), P.PING, timeout_s=REPLY_TIMEOUT_S).kind \
            == P.PONG


def assert_computes(endpoint: str, split: str, experts: list[int]) -> None:
    reference = load_experts(split, experts, device="cpu")
    x = torch.randn(5, 64)
    with AgentClient() as client:
        peer = client.connect(endpoint)
        for expert in experts:
            out, _ = client.expert(peer, 1, x, [(expert, 5)], timeout_s=REPLY_TIMEOUT_S)
            assert_close_rel(out, expert_forward(x, reference.weights[expert][1]))


def assert_healthy(agent) -> None:
    log = agent_log(agent)
    assert agent.alive(), log
    assert "Traceback" not in log, log


# ---------------------------------------------------------------------------------------------


def test_fuzz_an_agent(agents, tiny_split):
    agent = agents["serve"]
    source = fuzzer(tiny_split, SEED)
    cases = iter(source.case, None)
    warm = 500  # allocator pools, logging, the first replies of each size
    replies = fuzz(agent.endpoint, cases, warm)
    before = rss_mib(agent.proc.pid)
    replies += fuzz(agent.endpoint, cases, AGENT_CASES - warm)

    rng = random.Random(SEED)
    seen = collections.Counter()
    deadline_s = time.monotonic() + SECTION_DEADLINE_S
    for i in range(RAW_ZMTP_CASES):
        assert time.monotonic() < deadline_s, f"raw ZMTP cases took too long (case {i})"
        name, data, handshake = raw_zmtp_case(rng)
        seen[name] += 1
        try:
            with zmtp_raw.connect(agent.endpoint, timeout_s=2.0, handshake=handshake) as sock:
                sock.sendall(data)
        except OSError:  # the agent hung up first: that is its answer
            pass
        if i % 50 == 49:
            ping(agent.endpoint)
    # a message that never ends: the agent cuts it (at 1 + 16 MiB in flight; up to 256 MiB
    # offered, so a watchdog running late on a loaded machine still cuts before the end: 64
    # MiB once all went through unanswered in CI)
    with zmtp_raw.connect(agent.endpoint) as never_ending, pytest.raises(OSError):
        for _ in range(256 * MIB // 65536):
            never_ending.sendall(zmtp_raw.frame(bytes(65536), more=True))

    grown = rss_mib(agent.proc.pid) - before
    assert grown < MEMORY_BOUND_MIB, f"agent memory grew by {grown:.0f} MiB"
    assert_healthy(agent)
    ping(agent.endpoint)
    assert_computes(agent.endpoint, tiny_split, [0, 3])
    # the cases reached every kind of answer, not one error path
    assert replies[P.EXPERT_REPLY] > 50 and replies[P.PONG] > 50 and replies[P.INFO_REPLY] > 50
    for code in (P.ERR_MALFORMED, P.ERR_VERSION, P.ERR_UNKNOWN_KIND, P.ERR_UNKNOWN_LAYER,
                 P.ERR_UNKNOWN_EXPERT, P.ERR_SHAPE, P.ERR_DTYPE, P.ERR_TOO_LARGE, P.ERR_PUSH,
                 P.ERR_NOT_FINITE):
        assert replies[code] > 0, (code, replies)
    assert sum(replies.values()) == AGENT_CASES and len(seen) == 9, seen


def test_the_message_cases_of_issue_20(agents, tiny_split):
    """Regressions: `v: true` and `v: 1.0` were taken for version 1; NaN and inf activations
    were computed and returned; a 200,000-int `layer` was echoed whole into the ERROR reply
    (1.49 MB) and the agent's log line."""
    agent = agents["serve"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(agent.endpoint)

    def ask(header: dict, payload=()) -> tuple[dict, int]:
        sock.send_multipart([msgpack.packb(header), *payload])
        assert sock.poll(int(REPLY_TIMEOUT_S * 1000)), header.get("kind")
        frames = sock.recv_multipart()
        return P.unpack(frames[0]), len(frames[0])

    try:
        for version in (True, 1.0):
            reply, _ = ask({"v": version, "kind": P.PING, "id": 1})
            assert (reply["kind"], reply["code"]) == (P.ERROR, P.ERR_VERSION), reply
        for dtype in ("float32", "bfloat16", "int8"):
            for bad in (math.nan, math.inf, -math.inf):
                x = torch.randn(3, 64)
                x[1, 7] = bad
                frames, fields = P.encode_tensor(x, dtype)
                reply, _ = ask({"v": 1, "kind": P.EXPERT, "id": 2, "layer": 1,
                                "experts": [[0, 3]], **fields}, [f.tobytes() for f in frames])
                assert (reply["kind"], reply["code"]) == (P.ERROR, P.ERR_NOT_FINITE), reply
        frames, fields = P.encode_tensor(torch.randn(3, 64), "float32")
        for key in ("layer", "experts", "kind", "v"):
            reply, size = ask({"v": 1, "kind": P.EXPERT, "id": 3, "layer": 1,
                               "experts": [[0, 3]], **fields, key: list(range(200_000))},
                              [f.tobytes() for f in frames])
            assert reply["kind"] == P.ERROR and size <= MAX_ERROR_REPLY_BYTES, (key, size)
        reply, _ = ask({"v": 1, "kind": P.EXPERT, "id": 4, "layer": 1, "experts": [[0, 3]],
                        **fields}, [f.tobytes() for f in frames])
        assert reply["kind"] == P.EXPERT_REPLY  # a good request after them is served
    finally:
        sock.close()
        ctx.term()
    longest = max(map(len, agent_log(agent).splitlines()), default=0)
    assert longest <= 2 * MAX_ERROR_REPLY_BYTES, f"a log line of {longest} characters"
    assert_healthy(agent)


def test_fuzz_a_pushing_store(agents, tiny_split):
    agent = agents["store"]
    with open(os.path.join(tiny_split, "experts", "expert-003.safetensors"), "rb") as f:
        shard = f.read()
    kinds = (P.PUSH_BEGIN, P.PUSH_BEGIN, P.PUSH_CHUNK, P.PUSH_CHUNK, P.PUSH_CHUNK, P.PUSH_CHUNK,
             P.PUSH_END, P.EXPERT, P.PING, P.INFO)
    source = fuzzer(tiny_split, SEED + 1, experts=(3, 3, 3, 5), shard=shard)
    cases = iter(lambda: source.case(kinds, valid_share=0.5), None)
    replies = fuzz(agent.endpoint, cases, 200)
    before = rss_mib(agent.proc.pid)
    replies += fuzz(agent.endpoint, cases, STORE_CASES - 200)
    grown = rss_mib(agent.proc.pid) - before
    assert grown < MEMORY_BOUND_MIB, f"store agent memory grew by {grown:.0f} MiB"
    assert replies[P.PUSH_ACK] > 50 and replies[P.ERR_PUSH] > 200, replies

    # what the cases left: at most the accepted model's files for expert 3, of bounded size
    allowed = {MANIFEST_NAME, "experts/expert-003.safetensors",
               "experts/expert-003.safetensors.partial",
               "experts/expert-003.safetensors.partial.json"}
    left = {os.path.relpath(os.path.join(root, name), agent.folder): os.path.getsize(
        os.path.join(root, name)) for root, _, names in os.walk(agent.folder) for name in names}
    assert set(left) <= allowed, left
    assert sum(left.values()) <= 2 * len(shard) + 64 * 1024, left
    if MANIFEST_NAME in left:
        assert load_manifest(agent.folder).fingerprint == load_manifest(tiny_split).fingerprint

    result = push(tiny_split, 3, agent.endpoint, chunk_bytes=64 * 1024)
    assert result.serving
    assert_computes(agent.endpoint, tiny_split, [3])
    assert_healthy(agent)


class RogueDialIn(ScriptedDialIn):
    """A dial-in agent for experts 4-7 with the right fingerprint that answers every expert
    request with the next kind of bad reply (PING and INFO correctly, so it keeps coming
    back to life and being asked again)."""

    MODES = ("nan", "inf", "more tokens", "fewer tokens", "wrong hidden", "compute text",
             "compute huge", "compute negative", "other id", "no id", "pong instead",
             "error reply", "not msgpack", "wrong version", "no payload", "extra frames",
             "unknown dtype", "int8 without scales", "payload cut short", "twice",
             "oversized", "silence")

    def __init__(self, endpoint: str, fingerprint: str, hidden: int):
        self.hidden = hidden
        self.used = collections.Counter()
        super().__init__(endpoint, b"rogue-4-7", {
            "serving": True, "fingerprint": fingerprint, "experts": [4, 5, 6, 7],
            "protocol": P.PROTOCOL_VERSION, "agent_id": "rogue"})

    def _bad_reply(self, header: dict) -> list[list[bytes]]:
        mode = self.MODES[sum(self.used.values()) % len(self.MODES)]
        self.used[mode] += 1
        request_id, tokens = header.get("id"), header["shape"][0]
        y = torch.randn(tokens, self.hidden)
        fields = {"layer": header.get("layer"), "experts": header.get("experts"),
                  "compute_s": 1e-5}
        if mode == "silence":
            return []
        if mode in ("nan", "twice") and tokens:
            y[0, 0] = float("nan")
        elif mode == "inf" or (mode in ("nan", "twice") and not tokens):
            y = torch.full((tokens, self.hidden), float("inf"))
            if not tokens:
                y = torch.randn(1, self.hidden)  # no token to spoil: answer a wrong shape
        elif mode == "more tokens":
            y = torch.randn(tokens + 1, self.hidden)
        elif mode == "fewer tokens":
            y = torch.randn(max(0, tokens - 1) if tokens else 2, self.hidden)
        elif mode == "wrong hidden":
            y = torch.randn(tokens, self.hidden + 1)
        elif mode == "oversized":
            y = torch.zeros(tokens + 16384, self.hidden)  # 4 MiB: still the wrong shape
        elif mode.startswith("compute"):
            fields["compute_s"] = {"compute text": "abc", "compute huge": 1e300,
                                   "compute negative": -1.0}[mode]
        frames, tensor_fields = P.encode_tensor(y, "float32")
        header_fields = {**fields, **tensor_fields}
        kind = P.EXPERT_REPLY
        if mode == "other id":
            request_id = (request_id or 0) + 1000
        elif mode == "no id":
            request_id = None
        elif mode == "pong instead":
            kind = P.PONG
        elif mode == "unknown dtype":
            header_fields["dtype"] = "float64"
        elif mode == "int8 without scales":
            header_fields["dtype"] = "int8"
            frames = [y.to(torch.int8).numpy()]
        elif mode == "no payload":
            frames = []
        elif mode == "extra frames":
            frames = frames + [b"x", b"y"]
        elif mode == "payload cut short":
            frames = [frames[0].tobytes()[:-4]]
        if mode == "error reply":
            reply = [P.error_header(request_id, P.ERR_INTERNAL, "rogue")]
        elif mode == "not msgpack":
            reply = [b"\xc1\xc1 not msgpack"] + frames
        elif mode == "wrong version":
            reply = [msgpack.packb({"v": 99, "kind": kind, "id": request_id, **header_fields})] \
                + frames
        else:
            reply = [P.pack(kind, request_id, **header_fields)] + frames
        return [reply, reply] if mode == "twice" else [reply]

    def answer(self, header: dict, frames: list[bytes]) -> list[list[bytes]]:
        if header["kind"] == P.PING:
            return [[P.pack(P.PONG, header["id"], bytes=0)]]
        if header["kind"] == P.INFO:
            return [[P.pack(P.INFO_REPLY, header["id"], info=self.info)]]
        if header["kind"] == P.EXPERT:
            return self._bad_reply(header)
        return []


def fuzz_dial_in(endpoint: str, cases, count: int, stop: threading.Event, sent: list) -> None:
    """Fire-and-forget cases into a base station's dial-in port from four routing ids, one of
    them hanging up and coming back under a new id every HANG_UP_EVERY cases, whatever it left
    queued (that aborted the base station while its socket had a receive HWM: libzmq 4.3.5's
    "!_io_error"; tests/test_agent_dialin.py floods it on purpose). The others stay open until
    `stop`."""
    ctx = zmq.Context()
    rng = random.Random(SEED + 2)

    def dial(i: int) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.ROUTING_ID, bytes([1 + rng.randrange(255)]) + rng.randbytes(i * 4))
        sock.connect(endpoint)
        return sock

    socks = [dial(i) for i in range(CONNECTIONS)]
    try:
        for i in range(count):
            if stop.is_set():
                return
            if i % HANG_UP_EVERY == HANG_UP_EVERY - 1:
                socks[0].close(linger=0)
                socks[0] = dial(0)
            try:
                socks[i % CONNECTIONS].send_multipart(next(cases), flags=zmq.NOBLOCK)
            except zmq.Again:
                time.sleep(0.01)  # not connected yet, or the base station is busy
                continue
            sent.append(1)
            if i % 20 == 19:
                time.sleep(0.002)  # spread over the session's life, not one burst
        stop.wait(SECTION_DEADLINE_S)
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def test_fuzz_a_basestation_dial_in_port_and_a_rogue_dial_in_agent(agents, tiny_split):
    from basestation.generate import generate
    from basestation.session import build_roster, open_session

    honest = agents["serve"]
    manifest = load_manifest(tiny_split)
    hidden = int(manifest.model["hidden_size"])
    tokens = 24
    listen = f"tcp://127.0.0.1:{free_port()}"
    rogue = RogueDialIn(listen, manifest.fingerprint, hidden)
    info = dict(rogue.info, fingerprint=manifest.fingerprint[::-1])  # never quite the model
    source = fuzzer(tiny_split, SEED + 2, info=info)
    cases = iter(lambda: source.case(REPLY_KINDS, valid_share=0.3), None)
    stop, sent = threading.Event(), []
    fuzz_thread = threading.Thread(target=fuzz_dial_in, args=(listen, cases, DIALIN_CASES, stop,
                                                              sent), daemon=True)
    fuzz_thread.start()
    session = None
    results = []
    try:
        session = open_session(tiny_split, build_roster([f"0-3={honest.endpoint}"], None,
                                                        listen), wait_s=30, progress=False)
        assert {a.name for a in session.agents} == {honest.endpoint, "rogue-4-7"}
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        deadline_s = time.monotonic() + SECTION_DEADLINE_S
        while (len(rogue.used) < len(RogueDialIn.MODES) or len(sent) < DIALIN_CASES) \
                and time.monotonic() < deadline_s:
            results.append(generate(session, ids, max_new_tokens=tokens, ignore_eos=True,
                                    output_logits=True))
        figures = {a.name: a for a in session.agents}
        assert len(sent) == DIALIN_CASES, f"only {len(sent)} dial-in cases sent in time"
    finally:
        if session is not None:
            session.close()
        stop.set()
        fuzz_thread.join(10)
        rogue.stop()

    assert set(rogue.used) == set(RogueDialIn.MODES), f"modes never used: " \
        f"{set(RogueDialIn.MODES) - set(rogue.used)}"
    # every generation finished unpoisoned: the rogue's experts were dropped each time (it
    # never had a reply taken: calls 0), so every step's logits are finite and the tokens are
    # not NaN's argmax (id 0) on repeat
    assert results
    for result in results:
        assert len(result.token_ids) == tokens and not result.interrupted
        assert all(bool(torch.isfinite(step).all()) for step in result.step_logits)
        assert len(set(result.token_ids)) > 1
    assert figures["rogue-4-7"].calls == 0 and figures["rogue-4-7"].failures >= 1
    assert figures[honest.endpoint].failures == 0 and figures[honest.endpoint].calls > 0
    assert_healthy(honest)
    assert_computes(honest.endpoint, tiny_split, [0, 1, 2, 3])

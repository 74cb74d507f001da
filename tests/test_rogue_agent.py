"""Replies are checked where they are gathered: a broken or hostile agent is that agent failing
(its experts dropped, counted, re-probed), never a crash, a hang or garbage tokens.

Regression: one NaN reply used to turn every later token into id 0 with exit 0, and so did
replies of ±1e30 (finite, so they passed); a reply of the wrong shape or a compute_s of "abc"
crashed the base station with a traceback."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq
from agent_fixtures import free_port, start_agent  # noqa: F401

from basestation.generate import generate
from basestation.session import build_roster, open_session
from wire import protocol as P

pytestmark = pytest.mark.integration
PROMPT = "Return the list of items in the queue."
SLOW_REPLY_S = 0.12  # under the first request's deadline (the 0.25 s floor) on a busy machine


class RogueAgent:
    """Speaks the protocol for experts 4-7 of the tiny split, with the right fingerprint, and
    answers every expert request wrongly in the way `mode` says."""

    def __init__(self, fingerprint: str, hidden: int, mode: str):
        self.fingerprint, self.hidden, self.mode = fingerprint, hidden, mode
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self.expert_requests = 0
        self.silent = threading.Event()  # set: no reply to anything any more
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _reply(self, header: dict, frames: list) -> list:
        request_id = header["id"]
        if header["kind"] == P.INFO:
            return [P.pack(P.INFO_REPLY, request_id, info={
                "serving": True, "fingerprint": self.fingerprint, "experts": [4, 5, 6, 7]})]
        if header["kind"] == P.PING:
            return [P.pack(P.PONG, request_id, bytes=0)]
        self.expert_requests += 1
        started_s = time.perf_counter()
        tokens = header["shape"][0]
        y = torch.randn(tokens, self.hidden)
        fields = {"layer": header["layer"], "experts": header["experts"], "compute_s": 1e-5}
        if self.mode == "nan":
            y[0, 0] = float("nan")
        elif self.mode == "inf":
            y[-1, -1] = float("inf")
        elif self.mode == "huge":  # finite, and no layer can produce it
            y = torch.full((tokens, self.hidden), 1e30) * torch.randn(tokens, self.hidden).sign()
        elif self.mode == "shape":
            y = torch.randn(tokens + 1, self.hidden)
        elif self.mode == "compute_text":
            fields["compute_s"] = "abc"
        elif self.mode == "compute_huge":
            fields["compute_s"] = 1e300
        elif self.mode == "other_id":  # answers a request id it was not asked
            request_id += 1000
        elif self.mode == "slow":  # late every time, and owns up to it: believable
            y = torch.zeros(tokens, self.hidden)
            time.sleep(SLOW_REPLY_S)  # the fault under test: a late reply, not a wait
            fields["compute_s"] = time.perf_counter() - started_s
        frames, tensor_fields = P.encode_tensor(y, "float32")
        return [P.pack(P.EXPERT_REPLY, request_id, **fields, **tensor_fields), *frames]

    def _serve(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                peer, *body = sock.recv_multipart()
                header = P.unpack(body[0])
                if not self.silent.is_set():
                    sock.send_multipart([peer, *self._reply(header, body[1:])])
        finally:
            sock.close()
            ctx.term()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("mode", ["nan", "inf", "huge", "shape", "compute_text", "compute_huge",
                                  "other_id"])
def test_a_rogue_agent_is_an_agent_failing(mode, tiny_split, start_agent):
    from shard_tool.manifest import load_manifest

    manifest = load_manifest(tiny_split)
    honest = start_agent("--expert", "0-3", "--shards", tiny_split, "--bind",
                         "tcp://127.0.0.1:*")
    rogue = RogueAgent(manifest.fingerprint, int(manifest.model["hidden_size"]), mode)
    session = open_session(tiny_split, build_roster(
        [f"0-3={honest.endpoint}", f"4-7={rogue.endpoint}"], None, None), wait_s=20,
        progress=False)
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        result = generate(session, ids, max_new_tokens=12, ignore_eos=True)
    finally:
        session.close()
        rogue.stop()
    figures = {a["agent"]: a for a in result.agents}
    assert len(result.token_ids) == 12 and not result.interrupted
    assert rogue.expert_requests >= 1
    assert figures[rogue.endpoint]["failures"] >= 1 and figures[rogue.endpoint]["calls"] == 0
    assert result.fault_drops >= 1
    assert figures[honest.endpoint]["failures"] == 0 and figures[honest.endpoint]["calls"] > 0
    # garbage never reached the model: the tokens are not NaN's argmax (id 0) on repeat
    assert len(set(result.token_ids)) > 1


def test_a_slow_agent_that_goes_silent_is_waited_for_a_bounded_time(tiny_split, start_agent):
    """Regression: the per-layer deadline came from the agent's own estimate alone. An agent
    that answers every request late, reporting a compute time just under the round trip (which
    the reply checks believe), taught the base station ~0.12 s per token; when it then fell
    silent under a 301-token prompt the base station waited 30 s for one layer (1.5 x 0.12 s x
    its tokens). Now every deadline is capped by the request's own size: 6.9 s in all."""
    from basestation import link_estimator as links
    from shard_tool.manifest import load_manifest

    manifest = load_manifest(tiny_split)
    hidden = int(manifest.model["hidden_size"])
    honest = start_agent("--expert", "0-3", "--shards", tiny_split, "--bind",
                         "tcp://127.0.0.1:*")
    rogue = RogueAgent(manifest.fingerprint, hidden, "slow")
    session = open_session(tiny_split, build_roster(
        [f"0-3={honest.endpoint}", f"4-7={rogue.endpoint}"], None, None), wait_s=20,
        dtype="float32", progress=False)
    try:
        tokenizer = session.base.tokenizer
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        generate(session, ids, max_new_tokens=12, ignore_eos=True)
        slow = next(a for a in session.agents if a.name == rogue.endpoint)
        assert slow.calls > 0 and slow.state.compute_s_per_token_expert > 0.05, slow.figures()
        rogue.silent.set()
        long_ids = tokenizer("word " * 100, return_tensors="pt").input_ids
        tokens = long_ids.shape[1]
        nbytes = tokens * hidden * 4
        assert links.expected_time_s(slow.state, nbytes, nbytes, tokens, 1) > 10  # the premise
        start_s = time.monotonic()
        result = generate(session, long_ids, max_new_tokens=4, ignore_eos=True)
        elapsed_s = time.monotonic() - start_s
    finally:
        session.close()
        rogue.stop()
    assert len(result.token_ids) == 4 and result.fault_drops >= 1
    # one layer waits for the silent agent at most the cap of the largest request (all the
    # prompt's tokens); the rest (prefill, 3 decode steps, on one honest agent) takes ~1 s
    cap_s = links.deadline_cap_s(nbytes, nbytes, tokens, 1, links.LinkEstimatorConfig())
    assert elapsed_s < cap_s + 3, (elapsed_s, cap_s)

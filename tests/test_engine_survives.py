"""The serving engine never dies: an error fails the request(s) it concerns, the others go on
and the next request is answered (issue 20).

Regressions, each of which stopped the generation thread (later requests hung, /health 503):
a prompt one token longer than a prefill chunk (BatchSampler indexed with an empty float
tensor on a step that takes no token); `temperature` 1e-300 (NaN probabilities); a dial-in
agent whose HELLO carried a malformed memory_budget (raised while finishing a request that had
already left the table: it never completed).

In-process tests run the Engine on the tiny model with every expert computed locally
(--local-fallback all); the regressions are also run through a real `basestation serve`.
"""

from __future__ import annotations

import math
import queue
import time

import pytest
import torch
from agent_fixtures import ScriptedDialIn, free_port
from test_serve import MODEL, _start, http
from waiting import wait_until

from basestation.engine import Engine
from basestation.engine_errors import GenerationFailed
from basestation.generate import Sampling, generate
from basestation.jobs import Delta, Failed, Finished, Job, Request
from basestation.liveness import AgentLink
from basestation.openai_api import Defaults, Params
from basestation.prefetch import cache_summary
from basestation.sampler import BatchSampler, RowSampler
from wire import protocol as P

WAIT_S = 120.0  # for one request on a busy 2-core machine
CHUNK_TOKENS = 256  # serve's default --prefill-chunk-tokens


# -- pure pieces ---------------------------------------------------------------------------------

GOOD_INFO_BUDGET = {"budget_bytes": 1000, "hits": 3, "misses": 1, "stall_s": 0.25, "loads": 4,
                    "evictions": 2, "resident_bytes": 512, "hinted_hits": 1, "prefetch": True}


def test_cache_summary_reads_good_figures():
    assert cache_summary(GOOD_INFO_BUDGET) == {
        "cache_hits": 3, "cache_misses": 1, "cache_hit_rate": 0.75, "cache_stall_ms": 250.0,
        "cache_loads": 4, "cache_evictions": 2, "cache_resident_bytes": 512,
        "cache_hinted_hits": 1}
    reply = dict(zip(("hits", "misses", "stall_us", "loads", "evictions", "resident_bytes",
                      "hinted_hits"), (1, 1, 1500, 0, 0, 0, 0)))
    assert cache_summary(reply)["cache_stall_ms"] == 1.5


@pytest.mark.parametrize("bad", [
    ["hits", 3], "many", 7, None,
    {**GOOD_INFO_BUDGET, "hits": "many"}, {**GOOD_INFO_BUDGET, "misses": [1]},
    {**GOOD_INFO_BUDGET, "loads": -1}, {**GOOD_INFO_BUDGET, "evictions": 1.5},
    {**GOOD_INFO_BUDGET, "hinted_hits": True}, {**GOOD_INFO_BUDGET, "stall_s": "slow"},
    {**GOOD_INFO_BUDGET, "stall_s": math.inf}, {**GOOD_INFO_BUDGET, "stall_s": math.nan},
    {**GOOD_INFO_BUDGET, "stall_s": -0.5}, {"hits": 1, "stall_us": "x"},
    {"resident_bytes": {"nested": 1}}])
def test_cache_summary_ignores_malformed_figures(bad):
    """Regression: int("many") raised on the generation thread, from a dial-in's HELLO."""
    assert cache_summary(bad) == {}


@pytest.mark.parametrize("budget", [{"hits": "many", "misses": "none"}, ["a", "list"],
                                    {"stall_s": {"x": 1}}])
def test_agent_figures_tolerate_a_malformed_hello(budget):
    agent = AgentLink("rogue", b"rogue", (0, 1), info={"memory_budget": budget,
                                                        "device": {"not": "a name"}})
    figures = agent.figures()
    assert figures["device"] == "?" and figures["experts"] == [0, 1]
    assert not any(key.startswith("cache_") for key in figures)
    good = AgentLink("good", b"good", (2,), info={"memory_budget": GOOD_INFO_BUDGET,
                                                   "device": "x" * 10_000}).figures()
    assert good["cache_hits"] == 3 and len(good["device"]) == 64


class _Config:
    do_sample, temperature, top_p, top_k = False, None, None, None


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6, -1.0, math.nan])
def test_a_vanishing_temperature_is_greedy(temperature):
    """Regression: logits / 1e-300 overflowed to inf and softmax gave NaN probabilities."""
    sampler = RowSampler(_Config(), Sampling(temperature=temperature, seed=1))
    logits = torch.tensor([0.1, 3.0, 2.9999, -1.0])
    assert sampler.greedy and sampler.pick(logits) == 1


def test_a_row_without_a_distribution_falls_back_to_its_likeliest_token():
    sampler = RowSampler(_Config(), Sampling(temperature=0.7, seed=1))
    assert not sampler.greedy
    assert sampler.pick(torch.tensor([0.0, math.inf, 1.0])) == 1  # inf - inf: NaN probs
    assert sampler.pick(torch.tensor([math.nan, 0.0, 2.0])) == 2  # NaN never wins
    assert sampler.pick(torch.full((3,), -math.inf)) in (0, 1, 2)  # no mass at all


def test_batch_sampler_takes_a_step_that_yields_no_token():
    """Regression: a prefill chunk that ends inside a prompt has no logits row; the sampler
    built an empty float tensor and indexed with it (IndexError)."""
    picked = []
    sampler = BatchSampler(lambda request_id, row: picked.append(request_id) or 0)
    sampler.prepare_tensor_args([])
    assert sampler(torch.zeros(0, 8), torch.zeros(0)).shape == (0, 8) and picked == []


# -- the engine, in process ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_split):
    from basestation.session import build_roster, open_session

    session = open_session(tiny_split, build_roster([], None, "tcp://127.0.0.1:*"), wait_s=0,
                           local_fallback="all", dtype="float32", progress=False)
    engine = Engine(session, Defaults(model_id="tiny", theta=0.0, max_tokens=16), max_queue=4,
                    max_batch=4, prefill_chunk_tokens=CHUNK_TOKENS)
    engine.start()
    yield engine
    engine.stop()
    session.close()


class Ask:
    """One request to the engine; `outcome()` waits for its last event."""

    def __init__(self, engine: Engine, prompt, tokens: int = 6, stream: bool = False,
                 temperature: float = 0.0):
        self.events: queue.Queue = queue.Queue()
        params = Params(max_tokens=tokens, temperature=temperature, top_p=None, seed=None,
                        stop=(), ignore_eos=True, theta=0.0)
        self.request = Request(Job(prompts=(prompt,), messages=None, params=params,
                                   stream=stream), emit=self.events.put)
        self.deltas: list[str] = []
        engine.submit(self.request)

    def outcome(self) -> Finished | Failed:
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"request {self.request.id}: no answer within {WAIT_S} s")
            if isinstance(event, Delta):
                self.deltas.append(event.text)
            if isinstance(event, (Finished, Failed)):
                return event

    @property
    def cb_id(self) -> str:
        return f"{self.request.id}:0"


def answer(engine: Engine, prompt, **kw) -> Finished:
    outcome = Ask(engine, prompt, **kw).outcome()
    assert isinstance(outcome, Finished), outcome
    return outcome


def assert_clean_and_alive(engine: Engine) -> None:
    """Nothing left behind (the engine's tables, the library's requests and KV cache), and
    the next request is answered."""
    wait_until(lambda: not engine._runs and not engine._sequences, what="runs left")
    processor = engine._manager.batch_processor
    wait_until(lambda: not processor.scheduler.active_requests
               and not processor.scheduler.waiting_requests, what="library requests left")
    assert all(not a.block_table for a in processor.cache.cache_allocators.values())
    assert engine.alive()
    assert answer(engine, "next one", tokens=3).completion_tokens == 3


def token_ids(count: int) -> tuple[int, ...]:
    return tuple(5 + i % 500 for i in range(count))  # within the tiny model's 512


def test_a_prompt_longer_than_a_prefill_chunk(engine):
    ids = token_ids(CHUNK_TOKENS + 1)
    out = answer(engine, ids, tokens=4)
    assert out.prompt_tokens == CHUNK_TOKENS + 1 and out.completion_tokens == 4
    assert engine.alive()
    # the same tokens as one unchunked greedy generate() (the loop parked meanwhile)
    with engine._manager.pause():
        reference = generate(engine.session, torch.tensor([ids]), max_new_tokens=4,
                             temperature=0.0, ignore_eos=True)
    assert out.choices[0].text == reference.text
    two_chunks = answer(engine, token_ids(2 * CHUNK_TOKENS + 1), tokens=2)
    assert two_chunks.prompt_tokens == 2 * CHUNK_TOKENS + 1
    assert_clean_and_alive(engine)


def test_a_vanishing_temperature_answers_greedily(engine):
    greedy = answer(engine, "hello there", tokens=5)
    tiny = answer(engine, "hello there", tokens=5, temperature=1e-300)
    assert tiny.choices[0].text == greedy.choices[0].text
    assert_clean_and_alive(engine)


PROMPTS = ("The queue holds", "Return the list of items", "a third one")


def test_a_failure_in_one_sequence_fails_only_its_request(engine):
    """Three requests decoded together; one's sampler raises at its fourth token: that request
    gets a 500 after the text it had streamed, the two others finish as they would alone."""
    alone = {p: answer(engine, p, tokens=8).choices[0].text for p in PROMPTS[:2]}
    failed_before = engine.metrics.failed
    sampler = engine._manager.logit_processor.logits_processor[0]
    rows_at_fault: list[str] = []
    with engine._manager.pause():  # all three admitted before the first step
        asks = [Ask(engine, p, tokens=8, stream=True) for p in PROMPTS]
        victim = asks[2]
        wait_until(lambda: admitted(engine, asks), what="admitted")
        row_sampler = engine._sequences[victim.cb_id].sampler
        calls = []

        def failing_pick(logits):
            calls.append(1)
            if len(calls) == 4:
                rows_at_fault.extend(sampler._rows)
                raise RuntimeError("injected fault in one sequence")
            return RowSampler.pick(row_sampler, logits)

        row_sampler.pick = failing_pick
    outcomes = [a.outcome() for a in asks]
    for a, outcome in zip(asks[:2], outcomes[:2]):
        assert isinstance(outcome, Finished), outcome
        assert outcome.choices[0].text == alone[a.request.job.prompts[0]]
    assert set(rows_at_fault) >= {a.cb_id for a in asks}  # all in the step that failed
    error = outcomes[2].error
    assert isinstance(outcomes[2], Failed) and isinstance(error, GenerationFailed)
    assert "injected fault in one sequence" in error.message
    assert "Traceback" not in error.message and len(error.message) < 400
    assert victim.deltas  # it had streamed text before it failed
    assert engine.metrics.failed == failed_before + 1
    assert_clean_and_alive(engine)


def admitted(engine, asks) -> bool:
    """Every ask is the engine's and queued in the library, with the loop paused: the next step
    takes them all. (The engine records a sequence before it hands it to the library, so its
    table alone said "admitted" too early: under load the first step took one request.)"""
    return (all(a.cb_id in engine._sequences for a in asks)
            and engine._manager.input_queue.qsize() >= len(asks))


@pytest.fixture
def failing_forward(engine):
    """arm() makes the model's next forward (one batched step) raise."""
    armed = []

    def hook(module, args, kwargs):
        if armed:
            armed.clear()
            raise RuntimeError("injected fault in the batched forward")

    handle = engine.session.base.model.register_forward_pre_hook(hook, with_kwargs=True)
    yield armed.append
    handle.remove()


def test_a_failed_batched_step_fails_its_requests_and_the_engine_goes_on(engine,
                                                                         failing_forward):
    with engine._manager.pause():
        asks = [Ask(engine, p, tokens=6) for p in PROMPTS[:2]]
        wait_until(lambda: admitted(engine, asks), what="admitted")
        failing_forward(True)
    for a in asks:
        outcome = a.outcome()
        assert isinstance(outcome, Failed), outcome
        assert isinstance(outcome.error, GenerationFailed), outcome
        assert "a decoding step it shared raised" in outcome.error.message
        assert "injected fault in the batched forward" in outcome.error.message
    assert_clean_and_alive(engine)


def test_a_generation_loop_that_died_anyway_is_started_again(engine, failing_forward,
                                                             monkeypatch):
    """Should step_guard's own clean-up raise, the library ends its loop: the engine fails
    what it held and starts the loop again."""
    restarts_before = engine._restarts

    def broken_clean_up(error):
        monkeypatch.undo()  # once
        raise RuntimeError("injected fault in the clean-up")

    with engine._manager.pause():
        ask = Ask(engine, PROMPTS[0], tokens=6)
        wait_until(lambda: admitted(engine, [ask]), what="admitted")
        # the loop's processor (paused, so running: a restart makes a new one)
        processor = engine._manager.batch_processor
        monkeypatch.setattr(processor, "handle_batch_error", broken_clean_up)
        failing_forward(True)
    outcome = ask.outcome()
    assert isinstance(outcome, Failed), outcome
    assert isinstance(outcome.error, GenerationFailed), outcome
    # the step's failure reaches the request first (step_guard tells the engine before the
    # library's clean-up), the restart after the loop ended
    wait_until(lambda: engine._restarts == restarts_before + 1, what="the loop restarted")
    wait_until(engine.alive, what="the loop started again")
    assert_clean_and_alive(engine)


def test_a_loop_that_ends_as_the_idle_engine_pauses_it_is_started_again(engine, monkeypatch):
    """Regression (CI, two test workers on two cores): the generation loop ended between the
    engine's is_running() and its idle pause; the library refused the pause, the engine's
    own thread died of it, the loop was never started again and later requests hung."""
    import contextlib

    manager = engine._manager
    restarts_before = engine._restarts
    ended = []

    @contextlib.contextmanager
    def pause_as_the_loop_ends():
        monkeypatch.undo()  # once
        manager.stop(block=True, timeout=WAIT_S)  # the loop ends in the window
        ended.append(manager.is_running())
        with manager.pause():  # the library's own refusal
            yield

    monkeypatch.setattr(manager, "pause", pause_as_the_loop_ends)
    wait_until(lambda: engine._restarts == restarts_before + 1, what="the loop restarted")
    assert ended == [False]
    outcome = Ask(engine, PROMPTS[0], tokens=4).outcome()
    assert isinstance(outcome, Finished), outcome


def test_a_request_that_fails_while_finishing_gets_its_error(engine, monkeypatch):
    """Regression: an exception while building the Finished event (after the request left the
    table) lost the request: its client waited for ever."""
    def broken(run):
        monkeypatch.undo()
        raise ValueError("injected fault while finishing")

    monkeypatch.setattr(engine, "_finished", broken)
    outcome = Ask(engine, PROMPTS[0], tokens=4).outcome()
    assert isinstance(outcome, Failed) and isinstance(outcome.error, GenerationFailed)
    assert "injected fault while finishing" in outcome.error.message
    assert_clean_and_alive(engine)


# -- the same through a real `basestation serve` ---------------------------------------------------

class ZerosDialIn(ScriptedDialIn):
    """A dial-in agent for every expert of the tiny split that answers every expert request
    with zeros (a valid output), announcing itself with `extra_info` in its HELLO."""

    def __init__(self, endpoint: str, fingerprint: str, hidden: int, extra_info: dict):
        self.hidden = hidden
        super().__init__(endpoint, b"zeros", {
            "serving": True, "fingerprint": fingerprint, "experts": list(range(8)),
            "protocol": P.PROTOCOL_VERSION, "agent_id": "zeros", **extra_info})

    def answer(self, header: dict, frames: list[bytes]) -> list[list[bytes]]:
        if header["kind"] == P.PING:
            return [[P.pack(P.PONG, header["id"], bytes=0)]]
        if header["kind"] == P.INFO:
            return [[P.pack(P.INFO_REPLY, header["id"], info=self.info)]]
        if header["kind"] != P.EXPERT:
            return []
        y = torch.zeros(header["shape"][0], self.hidden)
        tensor_frames, fields = P.encode_tensor(y, "float32")
        return [[P.pack(P.EXPERT_REPLY, header["id"], layer=header["layer"],
                        experts=header["experts"], compute_s=1e-5, **fields), *tensor_frames]]


def serve_with_dial_in(tiny_split, **extra_info):
    """`basestation serve` whose only agent is a ZerosDialIn; yields the ServerProcess."""
    from shard_tool.manifest import load_manifest

    manifest = load_manifest(tiny_split)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    agent = ZerosDialIn(endpoint, manifest.fingerprint, int(manifest.model["hidden_size"]),
                        extra_info)
    try:
        server = _start([], tiny_split, "--listen", endpoint)
    except BaseException:
        agent.stop()
        raise
    yield server
    server.stop()
    agent.stop()


@pytest.fixture(scope="module")
def server(tiny_split):
    yield from serve_with_dial_in(tiny_split)


@pytest.fixture(scope="module")
def budget_server(tiny_split):
    """Its agent's HELLO carries a memory_budget of strings (a careless or hostile agent)."""
    yield from serve_with_dial_in(tiny_split, memory_budget={
        "budget_bytes": "lots", "hits": "many", "misses": "none", "stall_s": "slow",
        "prefetch": True})


def complete(server, **body) -> tuple[int, dict]:
    return http(server.url + "/v1/completions", {"model": MODEL, "max_tokens": 4,
                                                 "temperature": 0, "ignore_eos": True, **body})


def assert_serving(server) -> None:
    status, _ = http(server.url + "/health")
    assert status == 200
    status, body = complete(server, prompt="and the next one")
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body


@pytest.mark.integration
def test_serve_a_dial_in_with_a_malformed_memory_budget(budget_server):
    """Regression: cache_summary raised on the strings while the request finished (the request
    never completed, the engine stopped), and in /health."""
    server = budget_server
    status, body = complete(server, prompt="hello there")
    assert status == 200, body
    agents = body["wdmoe"]["agents"]
    assert [a["experts"] for a in agents] == [list(range(8))]
    assert agents[0]["calls"] > 0 and not any(k.startswith("cache_") for k in agents[0])
    assert_serving(server)


@pytest.mark.integration
@pytest.mark.parametrize("prompt_tokens", [CHUNK_TOKENS, CHUNK_TOKENS + 1, 2 * CHUNK_TOKENS + 1])
def test_serve_a_prompt_longer_than_a_prefill_chunk(server, prompt_tokens):
    """Regression: 256 tokens worked, 257 gave 500 and every later request hung."""
    status, body = complete(server, prompt=list(token_ids(prompt_tokens)))
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] == prompt_tokens
    assert body["usage"]["completion_tokens"] == 4
    assert_serving(server)


@pytest.mark.integration
def test_serve_a_vanishing_temperature(server):
    """Regression: "temperature": 1e-300 passed the range check and made NaN in sampling."""
    status, greedy = complete(server, prompt="hello there", max_tokens=6)
    assert status == 200, greedy
    raw = ('{"model": "%s", "prompt": "hello there", "max_tokens": 6, "ignore_eos": true, '
           '"temperature": 1e-300}' % MODEL).encode()
    status, tiny = http(server.url + "/v1/completions", raw=raw)
    assert status == 200, tiny
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert_serving(server)


def test_a_cancelled_request_leaves_and_sends_nothing_more(engine):
    """cancel() goes through the same exit as a failure: its sequences leave the library and
    it gets no last event; the request beside it finishes."""
    cancelled_before = engine.metrics.cancelled
    with engine._manager.pause():
        gone, kept = Ask(engine, PROMPTS[0], tokens=12), Ask(engine, PROMPTS[1], tokens=12)
        wait_until(lambda: admitted(engine, [gone, kept]), what="admitted")
        engine.cancel(gone.request)
    assert isinstance(kept.outcome(), Finished)
    assert engine.metrics.cancelled == cancelled_before + 1
    assert_clean_and_alive(engine)
    assert all(not isinstance(e, (Finished, Failed)) for e in list(gone.events.queue))

"""OpenAI request parsing, stop strings, context budget and the metrics page: pure functions."""

from __future__ import annotations

import dataclasses

import pytest

from basestation import engine_errors as E
from basestation import openai_api as api
from basestation.agents import MoeStats
from basestation.engine import ledger_figures, lost_error
from basestation.ledger import RequestLedger
from basestation.metrics import EngineMetrics, Histogram, render

DEFAULTS = api.Defaults(model_id="tiny", theta=0.2, max_tokens=64)
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def error(fn, *args) -> api.ApiError:
    with pytest.raises(api.ApiError) as e:
        fn(*args)
    return e.value


def engine_error(fn, *args) -> api.ApiError:
    """The engine's own error, as the client gets it."""
    with pytest.raises(E.EngineError) as e:
        fn(*args)
    return api.api_error(e.value)


def test_chat_defaults_and_fields():
    req = api.parse_chat(CHAT, DEFAULTS)
    assert req.messages == ({"role": "user", "content": "hi"},)
    assert req.params == api.Params(max_tokens=None, temperature=None, top_p=None, seed=None,
                                    stop=(), ignore_eos=False, theta=0.2)
    assert not req.stream and not req.include_usage

    req = api.parse_chat({**CHAT, "max_tokens": 5, "max_completion_tokens": 7, "temperature": 0,
                          "top_p": 0.5, "seed": 3, "stop": "\n", "theta": 0.5,
                          "ignore_eos": True, "stream": True,
                          "stream_options": {"include_usage": True}, "user": "ignored"},
                         DEFAULTS)
    assert req.params == api.Params(max_tokens=7, temperature=0.0, top_p=0.5, seed=3,
                                    stop=("\n",), ignore_eos=True, theta=0.5)
    assert req.stream and req.include_usage
    assert not req.params.exact
    assert api.parse_chat({**CHAT, "exact": True}, DEFAULTS).params.exact
    assert api.parse_completion({"model": "tiny", "prompt": "a", "exact": True}, DEFAULTS,
                                100).params.exact

    parts = {"role": "user", "content": [{"type": "text", "text": "a"},
                                         {"type": "text", "text": "b"}]}
    assert api.parse_chat({**CHAT, "messages": [parts]}, DEFAULTS).messages[0]["content"] == "ab"


@pytest.mark.parametrize("field,value", [
    ("temperature", "hot"), ("temperature", 3), ("temperature", True), ("top_p", 0),
    ("max_tokens", 0), ("max_tokens", 1.5), ("seed", "x"), ("stop", [""]), ("stop", 3),
    ("theta", 1.5), ("ignore_eos", "yes"), ("exact", "yes"), ("exact", 1), ("stream", 1),
    ("n", 2), ("logprobs", True),
    ("messages", []), ("messages", [{"content": "no role"}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url"}]}]),
    ("stream_options", {"include_usage": True}),  # without stream
])
def test_chat_rejects(field, value):
    e = error(api.parse_chat, {**CHAT, field: value}, DEFAULTS)
    assert e.status == 400 and e.code == "invalid_value" and field in e.message
    assert e.body()["error"]["type"] == "invalid_request_error"


def test_model_and_body_errors():
    assert error(api.parse_chat, {**CHAT, "model": "gpt-4"}, DEFAULTS).status == 404
    assert error(api.parse_chat, {**CHAT, "model": None}, DEFAULTS).status == 400
    e = error(api.parse_chat, [CHAT], DEFAULTS)
    assert (e.status, e.code) == (400, "invalid_json")


def test_completion_prompts():
    def prompts(value):
        return api.parse_completion({"model": "tiny", "prompt": value}, DEFAULTS, 100).prompts

    assert prompts("a") == ("a",)
    assert prompts(["a", "b"]) == ("a", "b")
    assert prompts([1, 2, 3]) == ((1, 2, 3),)
    assert prompts([[1, 2], [3]]) == ((1, 2), (3,))
    for bad in (None, [], [1, "a"], [[1], []], [[1], "a"], [100], [True], 5):
        e = error(api.parse_completion, {"model": "tiny", "prompt": bad}, DEFAULTS, 100)
        assert e.status == 400 and "prompt" in e.param, bad

    req = api.parse_completion({"model": "tiny", "prompt": "a", "max_tokens": 0, "echo": True,
                                "logprobs": 5}, DEFAULTS, 100)
    assert (req.params.max_tokens, req.echo, req.logprobs) == (0, True, 5)
    for bad in ({"logprobs": 21}, {"echo": True, "stream": True}, {"best_of": 2},
                {"suffix": "x"}, {"max_tokens": -1}):
        e = error(api.parse_completion, {"model": "tiny", "prompt": "a", **bad}, DEFAULTS, 100)
        assert e.status == 400, bad


def test_issue_20_request_bounds():
    """Each of these was accepted before and hurt the server or another user (issue 20)."""
    def completion(**fields):
        return api.parse_completion({"model": "tiny", "prompt": "a", **fields}, DEFAULTS, 100,
                                    max_prompts=4)

    # a prompt list takes a place in the batch per prompt, as n would: 200 prompts were served
    assert len(api.parse_completion({"model": "tiny", "prompt": ["a"] * 4}, DEFAULTS, 100,
                                    max_prompts=4).prompts) == 4
    e = error(api.parse_completion, {"model": "tiny", "prompt": ["a"] * 5}, DEFAULTS, 100, 4)
    assert (e.status, e.param) == (400, "prompt") and "at most 4" in e.message
    e = error(api.parse_completion, {"model": "tiny", "prompt": [[1]] * 200}, DEFAULTS, 100,
              4)
    assert e.status == 400
    # stop strings bounded in length as in count (16 x 100k characters slowed other streams 6x)
    assert completion(stop=["x" * api.MAX_STOP_CHARS] * 16).params.stop[0] == \
        "x" * api.MAX_STOP_CHARS
    assert completion(stop=[]).params.stop == ()
    for stop in (["x" * (api.MAX_STOP_CHARS + 1)], "y" * 100_000):
        e = error(lambda stop=stop: completion(stop=stop))
        assert (e.status, e.param) == (400, "stop"), stop
    # temperatures below 1e-5 are greedy (1e-300 gave NaN in sampling)
    for tiny in (1e-300, 5e-324, 9.9e-6):
        assert completion(temperature=tiny).params.temperature == 0.0
    assert completion(temperature=1e-5).params.temperature == 1e-5
    # seeds within int64: seed + choice index stays within torch's range
    assert completion(seed=2 ** 63 - 1).params.seed == 2 ** 63 - 1
    assert completion(seed=-(2 ** 63)).params.seed == -(2 ** 63)
    for seed in (2 ** 63, 2 ** 64 - 1, -(2 ** 63) - 1):
        assert error(lambda seed=seed: completion(seed=seed)).param == "seed"
    # a refused value is quoted, not echoed whole
    for field in ("temperature", "max_tokens", "ignore_eos"):
        assert len(error(lambda field=field: completion(**{field: "z" * 1_000_000})).message) < 200
    assert len(error(lambda: completion(model="m" * 1_000_000)).message) < 300


def test_completion_budget():
    assert api.completion_budget(10, None, 64, 100) == 64
    assert api.completion_budget(90, None, 64, 100) == 10  # the default is cut to the context
    assert api.completion_budget(90, 10, 64, 100) == 10
    assert api.completion_budget(100, 0, 64, 100) == 0
    for prompt, asked in ((101, None), (101, 0), (90, 11)):
        e = engine_error(api.completion_budget, prompt, asked, 64, 100)
        assert e.status == 400 and e.code == "context_length_exceeded" and "100" in e.message


def test_stop_strings():
    assert api.cut_at_stop("hello world", ("wor", "lo")) == ("hel", True)
    assert api.cut_at_stop("hello", ("x",)) == ("hello", False)
    assert api.cut_at_stop("hello", ()) == ("hello", False)
    # trailing characters that may begin a stop string are held back from the stream
    assert api.held_back("hello wo", ("world",)) == 2
    assert api.held_back("hello w", ("world", "wx")) == 1
    assert api.held_back("hello", ("world",)) == 0
    assert api.held_back("abab", ("abc", "babx")) == 3
    assert api.held_back("x", ()) == 0


def test_logprobs_block_offsets():
    block = api.logprobs_block(["He", "llo", " w"], [None, -1.0, -2.0],
                               [None, {"llo": -1.0}, {" w": -2.0}])
    assert block["text_offset"] == [0, 2, 5]
    assert block["token_logprobs"][0] is None and block["tokens"] == ["He", "llo", " w"]


def test_agent_figures_are_the_requests_own():
    agents = [{"address": "a", "experts": [0], "alive": True, "calls": 10, "drops": 1,
               "failures": 0, "rtt_ms": 1.0, "throughput_mbit_s": 5.0,
               "compute_us_per_token": 3.0, "probes": 4}]
    ledger = RequestLedger(boxes=2, calls=[15, 2], drops=[3, 0], failures=[1, 0])
    assert ledger_figures(ledger, agents) == [{
        "address": "a", "experts": [0], "alive": True, "calls": 15, "drops": 3, "failures": 1,
        "rtt_ms": 1.0, "throughput_mbit_s": 5.0, "compute_us_per_token": 3.0}]


def test_an_exact_request_that_lost_experts_gets_503_naming_the_agents():
    agents = [{"address": "tcp://a:1", "alive": True}, {"address": "tcp://b:2", "alive": False},
              {"address": "tcp://c:3", "alive": False}]
    ledger = RequestLedger(boxes=4, fault_drops=5, failures=[0, 2, 0, 0])
    lost = lost_error(ledger, agents)
    e = api.api_error(lost)
    assert isinstance(lost, E.ExpertLost) and e.message == str(lost)
    assert (e.status, e.type, e.code) == (503, "server_error", "expert_lost")
    assert e.message.startswith("exact: 5 expert slots lost to faults on tcp://b:2 (2 failed "
                                "requests), tcp://c:3 (down): ")
    assert "tcp://a:1" not in e.message


def test_engine_errors_get_their_status_and_body_in_one_table():
    cases = [(E.BadRequest("prompt", "empty after tokenization"), 400, "invalid_request_error",
              "invalid_value", "prompt"),
             (E.ContextTooLong("too long"), 400, "invalid_request_error",
              "context_length_exceeded", None),
             (E.Overloaded("overloaded: x"), 503, "server_error", "overloaded", None),
             (E.EngineStopped("the server is shutting down"), 503, "server_error",
              "unavailable", None),
             (E.ExpertLost("exact: x"), 503, "server_error", "expert_lost", None),
             (E.GenerationFailed("generation failed: x"), 500, "server_error",
              "internal_error", None),
             (E.EngineError("unlisted"), 500, "server_error", "internal_error", None)]
    for error_, status, type_, code, param in cases:
        e = api.api_error(error_)
        assert (e.status, e.type, e.code, e.param) == (status, type_, code, param), error_
        assert e.body() == {"error": {"message": str(error_), "type": type_, "code": code,
                                      "param": param}}
    assert str(cases[0][0]) == "prompt: empty after tokenization"


def test_every_prompt_takes_a_place_in_the_batch_or_the_queue():
    """Regression: the engine counted a queued request as one place whatever its prompts."""
    E.check_room(0, 16, 16, 0)  # batch 16, no queue: 16 prompts fill it, as n: 16 would
    E.check_room(15, 1, 16, 0)
    E.check_room(16, 1, 16, 1)  # one place in line
    for held, new, queue in ((1, 16, 0), (16, 1, 0), (16, 2, 1)):
        with pytest.raises(E.Overloaded) as e:
            E.check_room(held, new, 16, queue)
        assert str(e.value) == (f"overloaded: {held} prompts are in flight (up to 16 are "
                                f"decoded together, {queue} wait); retry later")


def test_metrics_page():
    h = Histogram(bounds=(0.01, 0.1))
    for value in (0.005, 0.01, 0.05, 3.0):
        h.observe(value)
    assert h.lines("t") == ['t_bucket{le="0.01"} 2', 't_bucket{le="0.1"} 3',
                            't_bucket{le="+Inf"} 4', "t_sum 3.065", "t_count 4"]
    engine = EngineMetrics(completed=3, cancelled=1, completion_tokens=40)
    agent = {"address": 'tcp://h:1"', "experts": [0, 1], "alive": True, "rtt_ms": 1.5,
             "throughput_mbit_s": 10.0, "compute_us_per_token": 2.0, "calls": 7, "drops": 2,
             "failures": 0}
    moe = dataclasses.asdict(MoeStats(expert_calls=90, experts_dropped=12, fault_drops=5,
                                      retries=2, failed_requests=3))
    text = render(engine, {("/v1/completions", 503): 2}, 1, [agent], moe)
    assert "# TYPE wdmoe_fault_drops_total counter\nwdmoe_fault_drops_total 5\n" in text
    assert "wdmoe_retries_total 2\n" in text and "wdmoe_failed_agent_requests_total 3\n" in text
    assert "wdmoe_experts_dropped_total 12\n" in text and "wdmoe_expert_calls_total 90\n" in text
    assert 'wdmoe_requests_total{outcome="expert_lost"} 0' in text
    assert 'wdmoe_requests_total{outcome="cancelled"} 1' in text
    assert 'wdmoe_http_responses_total{path="/v1/completions",status="503"} 2' in text
    assert 'wdmoe_agent_rtt_ms{agent="tcp://h:1\\"",experts="0,1"} 1.5' in text
    assert 'wdmoe_agent_alive{agent="tcp://h:1\\"",experts="0,1"} 1.0' in text
    assert "wdmoe_queue_depth 1" in text and text.endswith("\n")


def test_sampling_falls_back_when_the_model_does_not_sample():
    """Regression: chat on the tiny model decoded greedily by default and looped on rows of
    '===='. A model whose generation_config does not sample gets temperature 0.7, top-p 0.9;
    one that samples keeps its own values; temperature 0 is greedy."""
    from transformers import GenerationConfig

    from basestation.generate import Sampling, apply_sampling

    plain = GenerationConfig()
    apply_sampling(plain, Sampling())
    assert (plain.do_sample, plain.temperature, plain.top_p) == (True, 0.7, 0.9)
    own = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.8)
    apply_sampling(own, Sampling())
    assert (own.do_sample, own.temperature, own.top_p) == (True, 0.6, 0.8)
    asked = GenerationConfig()
    apply_sampling(asked, Sampling(temperature=1.2))
    assert (asked.do_sample, asked.temperature) == (True, 1.2)
    greedy = GenerationConfig(do_sample=True, temperature=0.6)
    apply_sampling(greedy, Sampling(temperature=0))
    assert greedy.do_sample is False

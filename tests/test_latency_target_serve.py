"""A latency target in place of θ (issue 24), end to end: `basestation serve` and `generate`
over two real agents on loopback, one slowed by DELAY_S a call (edge_agent's fault injection),
so θ = 0 waits on the slow one for most tokens and θ = 0.5 mostly leaves it out.

Timing-based checks compare with the θ = 0 and θ = 0.5 means measured in the same test, on the
same agents, so a loaded machine moves all three together."""

from __future__ import annotations

import json

import pytest
from agent_fixtures import start_module_agent  # noqa: F401
from test_serve import MODEL, _start, http

DELAY_S = 0.04  # the slow agent's sleep before each expert reply: ~40 ms per call
TOKENS = 48  # decoded tokens per request: enough for the controller to settle
PROMPT = "Return the list of items in the queue."
# the figure for the achieved mean against the target
TOLERANCE = 0.15


@pytest.fixture(scope="module")
def slowed_agents(start_module_agent, tiny_split):  # noqa: F811
    """Experts 0-3 on a plain agent, 4-7 on one that sleeps DELAY_S before every reply."""
    fast = start_module_agent("--expert", "0-3", "--shards", tiny_split,
                              "--bind", "tcp://127.0.0.1:*")
    slow = start_module_agent("--expert", "4-7", "--shards", tiny_split,
                              "--bind", "tcp://127.0.0.1:*", "--fault", f"delay={DELAY_S}")
    return [f"0-3={fast.endpoint}", f"4-7={slow.endpoint}"]


@pytest.fixture(scope="module")
def server(slowed_agents, tiny_split):
    s = _start(slowed_agents, tiny_split)
    yield s
    s.stop()


def complete(server, **fields) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True, **fields}
    return http(server.url + "/v1/completions", body)


def decode_mean_ms(wdmoe: dict) -> float:
    """The mean of the tokens after the first (the first carries the prompt's prefill), as
    latency_target's achieved_mean_ms counts them."""
    tokens = wdmoe["token_latency_ms"][1:]
    return sum(tokens) / len(tokens)


@pytest.mark.integration
def test_a_target_between_two_thetas_is_met_with_fewer_drops(server):
    means, drops = {}, {}
    for theta in (0.0, 0.5):
        status, body = complete(server, theta=theta)
        assert status == 200, body
        means[theta] = decode_mean_ms(body["wdmoe"])
        drops[theta] = body["wdmoe"]["experts_dropped"]
    assert means[0.5] < means[0.0], means  # the slow agent left out: faster
    target_ms = (means[0.0] + means[0.5]) / 2

    status, body = complete(server, latency_target_ms=target_ms)
    assert status == 200, body
    wdmoe = body["wdmoe"]
    figures = wdmoe["latency_target"]
    print(f"theta 0: {means[0.0]:.1f} ms ({drops[0.0]} dropped), theta 0.5: "
          f"{means[0.5]:.1f} ms ({drops[0.5]} dropped), target {target_ms:.1f} ms: achieved "
          f"{figures['achieved_mean_ms']:.1f} ms at mean theta {wdmoe['theta']}, "
          f"{wdmoe['experts_dropped']} dropped")
    assert figures["target_ms"] == pytest.approx(target_ms)
    assert figures["feasible"] is True
    assert len(figures["thetas"]) == TOKENS == len(wdmoe["token_latency_ms"])
    assert wdmoe["theta"] == pytest.approx(sum(figures["thetas"]) / TOKENS, abs=1e-3)
    assert 0 < wdmoe["theta"] < 0.5
    assert figures["achieved_mean_ms"] == pytest.approx(decode_mean_ms(wdmoe), abs=0.01)
    assert figures["achieved_mean_ms"] == pytest.approx(target_ms, rel=TOLERANCE)
    # the mix of θs drops fewer experts than dropping at θ = 0.5 throughout, more than θ = 0
    assert drops[0.0] == 0 < wdmoe["experts_dropped"] < drops[0.5]


@pytest.mark.integration
def test_a_target_below_the_floor_answers_and_says_infeasible(server):
    status, body = complete(server, latency_target_ms=0.5)  # below any token's cost
    assert status == 200, body
    figures = body["wdmoe"]["latency_target"]
    assert figures["feasible"] is False
    # after the first tokens (exact, then learning) every token runs at the floor
    assert set(figures["thetas"][2:]) == {0.5}


@pytest.mark.integration
@pytest.mark.parametrize("fields", [{"latency_target_ms": 0}, {"latency_target_ms": -1},
                                    {"latency_target_ms": "x"},
                                    {"latency_target_ms": 600001},
                                    {"latency_target_ms": 30, "theta": 0.2}])
def test_bad_targets_are_refused(server, fields):
    status, body = complete(server, **fields)
    assert status == 400, body
    assert body["error"]["param"] == "latency_target_ms"
    assert "\n" not in body["error"]["message"]


@pytest.mark.integration
def test_chat_takes_a_target_too(server):
    status, body = http(server.url + "/v1/chat/completions",
                        {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                         "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                         "latency_target_ms": 1000})
    assert status == 200, body
    figures = body["wdmoe"]["latency_target"]
    assert figures["thetas"] == [0.0] * 6 and figures["feasible"] is True  # loose: exact
    assert body["wdmoe"]["theta"] == 0.0 and body["wdmoe"]["experts_dropped"] == 0


@pytest.mark.integration
def test_generate_with_a_target(slowed_agents, tiny_split, run_cli):
    agents = [a for flag in slowed_agents for a in ("--agent", flag)]
    result = run_cli("basestation", "generate", "--shards", tiny_split, *agents, "--dtype",
                     "float32", "--prompt", PROMPT, "--max-new-tokens", "12", "--ignore-eos",
                     "--latency-target-ms", "0.5", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    figures = out["latency_target"]
    assert figures["target_ms"] == 0.5 and figures["feasible"] is False
    assert len(figures["thetas"]) == 12 and set(figures["thetas"][2:]) == {0.5}
    assert out["experts_dropped"] > 0 and 0 < out["mean_theta"] <= 0.5

    result = run_cli("basestation", "generate", "--shards", tiny_split, *agents, "--dtype",
                     "float32", "--prompt", PROMPT, "--max-new-tokens", "4",
                     "--latency-target-ms", "1000")
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert "latency target 1000 ms: achieved" in summary and "mean theta 0.000" in summary


def test_generate_refuses_theta_and_target_together(tiny_split, run_cli):
    result = run_cli("basestation", "generate", "--shards", tiny_split, "--agent",
                     "0-7=tcp://127.0.0.1:9", "--prompt", "hi", "--theta", "0.2",
                     "--latency-target-ms", "30")
    assert result.returncode == 2
    assert result.stderr.strip() == ("basestation: error: --theta 0.2 and --latency-target-ms "
                                     "30: give one (the target picks θ per token)")
    result = run_cli("basestation", "generate", "--shards", tiny_split, "--agent",
                     "0-7=tcp://127.0.0.1:9", "--prompt", "hi", "--latency-target-ms", "0")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_pacer_leaves_the_first_token_out_and_reports_hand_numbers():
    from basestation.latency_target import Pacer, mean_theta, report, start

    pacer = Pacer(start(20.0))
    for latency_ms in (500.0, 30.0, 12.0):  # prefill, then θ = 0, then the floor
        pacer.next_theta()
        pacer.token(latency_ms)
    assert pacer.thetas == [0.0, 0.0, 0.5]
    assert (pacer.state.tokens, pacer.state.spent_ms) == (2, 42.0)
    assert report(20.0, [pacer]) == {"target_ms": 20.0, "achieved_mean_ms": 21.0,
                                     "thetas": [0.0, 0.0, 0.5], "feasible": True}
    assert mean_theta([pacer]) == pytest.approx(1 / 6, abs=1e-4)


def test_feasible_is_the_verdict_of_each_sequences_second_half():
    from basestation.latency_target import steady_feasible

    assert steady_feasible([False, True, True, True])  # learning: not a verdict
    assert not steady_feasible([True, True, True, False])
    assert steady_feasible([True]) and steady_feasible([])


def test_api_params_carry_the_target_and_start_exact():
    from basestation.openai_api import Defaults, parse_completion

    params = parse_completion({"model": MODEL, "prompt": "a", "latency_target_ms": 25},
                              Defaults(MODEL, 0.3, 16), 100).params
    assert (params.latency_target_ms, params.theta) == (25.0, 0.0)
    params = parse_completion({"model": MODEL, "prompt": "a"}, Defaults(MODEL, 0.3, 16),
                              100).params
    assert (params.latency_target_ms, params.theta) == (None, 0.3)

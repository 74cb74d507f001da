"""Replicas instead of drops (issue 24), end to end over real agent processes on loopback:
a slow box whose experts also live on a fast agent costs nothing at θ = 0, and a replica
killed mid-generation costs no expert.

Timing checks compare runs made in the same test, interleaved, so a loaded machine moves them
together; the windows are loose (the figures are bench/replicas.py's, in the README)."""

from __future__ import annotations

import statistics

import pytest
from agent_fixtures import start_agent, start_module_agent  # noqa: F401
from test_basestation import PROMPT, reference_tokens

from basestation.generate import generate
from basestation.session import build_roster, open_session

pytestmark = pytest.mark.integration

DELAY_S = 0.04  # the slow agent's sleep before each expert reply: the 40 ms a call
TOKENS = 16
ROUNDS = 4  # interleaved runs of each roster


@pytest.fixture(scope="module")
def boxes(start_module_agent, tiny_split):  # noqa: F811
    """Experts 0-3 on fast agent A; 4-7 on fast agent B and on agent S, slowed by DELAY_S."""
    def agent(spec, *extra):
        return start_module_agent("--expert", spec, "--shards", tiny_split,
                                  "--bind", "tcp://127.0.0.1:*", *extra).endpoint
    return {"A": agent("0-3"), "B": agent("4-7"),
            "S": agent("4-7", "--fault", f"delay={DELAY_S}")}


def _session(tiny_split, flags):
    return open_session(tiny_split, build_roster(flags, None, None), dtype="float32",
                        wait_s=20, progress=False)


def test_a_slow_boxs_experts_on_a_fast_replica_cost_nothing_at_theta_zero(
        boxes, tiny_split, tiny_checkpoint):
    rosters = {
        "replicas": [f"0-3={boxes['A']}", f"4-7={boxes['B']}", f"4-7={boxes['S']}"],
        "no slow agent": [f"0-3={boxes['A']}", f"4-7={boxes['B']}"],
        "replica removed": [f"0-3={boxes['A']}", f"4-7={boxes['S']}"],
    }
    sessions = {name: _session(tiny_split, flags) for name, flags in rosters.items()}
    latencies = {name: [] for name in rosters}
    try:
        ids = sessions["replicas"].base.tokenizer(PROMPT, return_tensors="pt").input_ids
        results = {}
        for _ in range(ROUNDS):
            for name, session in sessions.items():
                result = generate(session, ids, max_new_tokens=TOKENS, ignore_eos=True)
                # the first token carries the prompt
                latencies[name].append(statistics.median(result.token_latency_ms[1:]))
                results.setdefault(name, []).append(result)
        figures = {a.name: a.figures() for a in sessions["replicas"].agents}
    finally:
        for session in sessions.values():
            session.close()
    reference = reference_tokens(tiny_checkpoint, PROMPT, TOKENS)
    for name, runs in results.items():
        for result in runs:  # θ = 0 is the exact model: every run, every roster
            assert result.token_ids == reference, name
            assert result.experts_dropped == 0 and result.fault_drops == 0, name
    # each roster's best round: a burst of load on a shared machine slows some rounds, and
    # the rounds are interleaved, so every roster had its quiet ones
    median = {name: min(values) for name, values in latencies.items()}
    # the replicas run is far from waiting for the slow box: at most a quarter of what the slow
    # box costs without the replica. (The figure, within 20 % of the run without the
    # slow agent, is bench/replicas.py's on a quiet machine, in the README: here two test
    # workers share two cores, and a ~6 ms token moved by 3 ms under that load in CI.)
    no_slow, removed = median["no slow agent"], median["replica removed"]
    assert median["replicas"] <= no_slow + (removed - no_slow) / 4, median
    # without the replica the same run waits for the slow box, as before replicas
    assert median["replica removed"] >= median["replicas"] + DELAY_S * 1e3 / 2, median
    # the slow replica took almost nothing once measured; the fast one took the rest
    slow_calls = sum(figures[boxes["S"]]["replica_calls"].values())
    fast_calls = sum(figures[boxes["B"]]["replica_calls"].values())
    assert fast_calls > 10 * max(slow_calls, 1), (fast_calls, slow_calls)


def test_a_replica_killed_mid_generation_costs_no_expert(start_agent, tiny_split,  # noqa: F811
                                                         tiny_checkpoint):
    def agent(spec, *extra):
        return start_agent("--expert", spec, "--shards", tiny_split,
                           "--bind", "tcp://127.0.0.1:*", *extra)
    # two replicas of 4-7: the victim the faster, so the route keeps choosing it until it dies
    a, victim, other = agent("0-3"), agent("4-7"), agent("4-7", "--fault", "delay=0.005")
    session = _session(tiny_split, [f"0-3={a.endpoint}", f"4-7={victim.endpoint}",
                                    f"4-7={other.endpoint}"])
    at_kill = []
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        by_name = {x.name: x for x in session.agents}
        dead, survivor = by_name[victim.endpoint], by_name[other.endpoint]

        def kill_after_a_few(piece):
            if not at_kill and sum(dead.replica_calls.values()) >= 6:
                victim.kill()  # SIGKILL: no goodbye
                at_kill.append(sum(survivor.replica_calls.values()))

        result = generate(session, ids, max_new_tokens=TOKENS, ignore_eos=True,
                          on_text=kill_after_a_few)
        stats = session.runtime.stats
    finally:
        session.close()
    assert at_kill, "the faster replica was never used"
    # every token used every expert the router chose: the other replica took them
    assert result.token_ids == reference_tokens(tiny_checkpoint, PROMPT, TOKENS)
    assert result.fault_drops == 0 and result.experts_dropped == 0
    assert stats.residual_only == 0 and stats.fault_drops == 0
    assert not dead.alive
    assert sum(survivor.replica_calls.values()) > at_kill[0]


def test_a_prompts_tokens_are_spread_over_equal_replicas_and_stay_exact(
        start_agent, tiny_split, tiny_checkpoint):  # noqa: F811
    def agent(spec):
        return start_agent("--expert", spec, "--shards", tiny_split,
                           "--bind", "tcp://127.0.0.1:*")
    a, b, c = agent("0-7"), agent("4-7"), agent("4-7")
    # experts 4-7 on all three: a prompt's tokens of each go to more than one of them
    session = _session(tiny_split, [f"0-7={a.endpoint}", f"4-7={b.endpoint}",
                                    f"4-7={c.endpoint}"])
    try:
        ids = session.base.tokenizer(PROMPT * 4, return_tensors="pt").input_ids
        result = generate(session, ids, max_new_tokens=4, ignore_eos=True)
        calls = {x.name: sum(x.replica_calls.values()) for x in session.agents}
        ledger_calls = sum(x["calls"] for x in result.agents)
    finally:
        session.close()
    assert result.token_ids == reference_tokens(tiny_checkpoint, PROMPT * 4, 4)
    assert result.experts_dropped == 0
    assert sum(1 for n in calls.values() if n > 0) >= 2, calls
    assert ledger_calls == result.expert_calls


@pytest.mark.parametrize("mode", ["nan", "shape", "other_id"])
def test_a_hostile_replica_costs_no_expert(mode, start_agent, tiny_split,  # noqa: F811
                                           tiny_checkpoint):
    """A replica that answers garbage (a NaN, the wrong shape, another request's id) is that
    replica failing: its rows go to the honest replica inside the same layer, so every token
    still uses every expert the router chose."""
    from test_rogue_agent import RogueAgent

    from shard_tool.manifest import load_manifest

    manifest = load_manifest(tiny_split)
    a = start_agent("--expert", "0-3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*")
    honest = start_agent("--expert", "4-7", "--shards", tiny_split, "--bind",
                         "tcp://127.0.0.1:*")
    # the rogue answers at once (and claims 10 µs of compute): the route prefers it
    rogue = RogueAgent(manifest.fingerprint, int(manifest.model["hidden_size"]), mode)
    try:
        session = _session(tiny_split, [f"0-3={a.endpoint}", f"4-7={rogue.endpoint}",
                                        f"4-7={honest.endpoint}"])
        try:
            ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
            result = generate(session, ids, max_new_tokens=TOKENS, ignore_eos=True)
            stats = session.runtime.stats
            figures = {x.name: x.figures() for x in session.agents}
        finally:
            session.close()
    finally:
        rogue.stop()
    assert rogue.expert_requests >= 1
    assert result.token_ids == reference_tokens(tiny_checkpoint, PROMPT, TOKENS)
    assert result.fault_drops == 0 and result.experts_dropped == 0
    assert stats.replica_retries >= 1 and stats.residual_only == 0
    assert figures[rogue.endpoint]["failures"] >= 1
    assert sum(figures[honest.endpoint]["replica_calls"].values()) > 0


def test_serves_concurrent_streams_over_replicas_each_as_alone(start_agent,  # noqa: F811
                                                               tiny_split):
    """`serve`'s batches (8 sequences a step) spread each replicated expert's tokens over its
    replicas: every greedy answer is token for token what it is alone, both replicas computed,
    nothing was re-sent or dropped, and /metrics counts the replicas' tokens."""
    from test_serve import (
        CONCURRENT_PROMPTS,
        ServerProcess,
        concurrent_completions,
        http,
        stream_completion,
    )

    a, b, c = (start_agent("--expert", spec, "--shards", tiny_split, "--bind",
                           "tcp://127.0.0.1:*") for spec in ("0-3", "4-7", "4-7"))
    server = ServerProcess(["--shards", tiny_split, "--dtype", "float32", "--wait-s", "20",
                            "--agent", f"0-3={a.endpoint}", "--agent", f"4-7={b.endpoint}",
                            "--agent", f"4-7={c.endpoint}", "--max-queue", "0"])
    try:
        server.wait_ready()
        tokens = 12
        alone = [stream_completion(server, p, tokens) for p in CONCURRENT_PROMPTS]
        results = concurrent_completions(server, CONCURRENT_PROMPTS, tokens)
        _, state = http(server.url + "/v1/wdmoe/state")
        _, metrics = http(server.url + "/metrics")
    finally:
        server.stop()
    assert results == alone
    replica_tokens = {x["agent"]: sum((x["replica_calls"] or {}).values())
                      for x in state["agents"]}
    assert replica_tokens[b.endpoint] > 0 and replica_tokens[c.endpoint] > 0, replica_tokens
    assert replica_tokens[a.endpoint] == 0
    assert state["replica_retries"] == 0
    counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("wdmoe_replica_calls_total{"))
    assert counted == replica_tokens[b.endpoint] + replica_tokens[c.endpoint]
    dropped = [line for line in metrics.splitlines()
               if line.startswith("wdmoe_experts_dropped_total")]
    assert all(float(line.split()[-1]) == 0 for line in dropped), dropped

"""Slow is not dead: a live agent that misses its estimate's deadline is waited for, so θ = 0
stays the exact model; only an agent whose connection is gone (or a request over its size's
cap) costs a fault drop.

Regression: a request not answered within its estimate's slack (floor 0.25 s) was taken for the
agent failing. On a loaded machine, serve at θ = 0 dropped thousands of expert slots with every
agent alive, and results changed from run to run."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from agent_fixtures import start_agent  # noqa: F401

from basestation.dispatch import give_up_reason

PROMPT = "Return the list of items in the queue."
STOP_S = 3.0  # the figure: a box stalled for seconds (a GC pause, a throttled GPU)


def test_give_up_reason_waits_for_a_live_agent_until_the_cap():
    asked = []

    def connected(answer):
        return lambda: asked.append(answer) or answer

    assert give_up_reason(1.0, 6.0, connected(True)) is None  # late, alive: wait
    assert "connection is gone" in give_up_reason(1.0, 6.0, connected(False))
    assert "cap" in give_up_reason(6.0, 6.0, connected(True))
    assert asked == [True, False]  # past the cap the connection is not even asked


def _session(tiny_split, agents):
    from basestation.session import build_roster, open_session

    roster = build_roster([f"0-3={agents[0].endpoint}", f"4-7={agents[1].endpoint}"],
                          None, None)
    return open_session(tiny_split, roster, theta=0.0, wait_s=30, dtype="float32",
                        progress=False)


def _two_agents(start_agent, tiny_split):
    return [start_agent("--expert", experts, "--shards", tiny_split,
                        "--bind", "tcp://127.0.0.1:*") for experts in ("0-3", "4-7")]


@pytest.mark.integration
def test_an_agent_stopped_for_seconds_is_waited_for_and_theta_0_stays_exact(start_agent,
                                                                            tiny_split):
    from basestation.generate import generate

    agents = _two_agents(start_agent, tiny_split)
    victim = agents[1].proc.pid
    session = _session(tiny_split, agents)
    resume = None
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        reference = generate(session, ids, max_new_tokens=16, ignore_eos=True)
        pieces = []

        def stop_after_a_few(piece):
            nonlocal resume
            pieces.append(piece)
            if len(pieces) == 3:
                os.kill(victim, signal.SIGSTOP)
                resume = threading.Timer(STOP_S, os.kill, (victim, signal.SIGCONT))
                resume.start()

        waited_before = session.runtime.stats.late_replies_waited
        stalled = generate(session, ids, max_new_tokens=16, ignore_eos=True,
                           on_text=stop_after_a_few)
        waited = session.runtime.stats.late_replies_waited - waited_before
    finally:
        if resume is not None:
            resume.join()
        os.kill(victim, signal.SIGCONT)
        session.close()
    assert resume is not None, "the generation never reached its third token"
    assert stalled.token_ids == reference.token_ids
    assert stalled.experts_dropped == 0 and stalled.fault_drops == 0
    assert waited >= 1  # the stop did land on a request, which was waited for
    assert all(a["failures"] == 0 and a["alive"] for a in stalled.agents), stalled.agents


@pytest.mark.integration
def test_a_late_agent_whose_connection_goes_is_given_up_then_not_at_the_cap(start_agent,
                                                                          tiny_split, caplog):
    """Regression: once a request was late, the gather never looked at its connection again, so
    an agent killed while late was given up only at the cap of its request (>= 6 s)."""
    from waiting import wait_until

    from basestation.generate import generate

    agents = _two_agents(start_agent, tiny_split)
    victim = agents[1].proc.pid
    session = _session(tiny_split, agents)
    stats = session.runtime.stats
    killer = None
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        pieces = []
        waited_before = stats.late_replies_waited

        def kill_once_late():
            wait_until(lambda: stats.late_replies_waited > waited_before, 30,
                       what="the stopped agent's request to be late")
            os.kill(victim, signal.SIGKILL)

        def stop_after_a_few(piece):
            nonlocal killer
            pieces.append(piece)
            if len(pieces) == 3:
                os.kill(victim, signal.SIGSTOP)
                killer = threading.Thread(target=kill_once_late)
                killer.start()

        with caplog.at_level("WARNING", logger="basestation"):
            result = generate(session, ids, max_new_tokens=8, ignore_eos=True,
                              on_text=stop_after_a_few)
    finally:
        if killer is not None:
            killer.join()
        session.close()
    assert killer is not None, "the generation never reached its third token"
    assert result.fault_drops > 0
    reasons = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
    assert reasons and all("its connection is gone" in r for r in reasons), reasons

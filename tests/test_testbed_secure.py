"""`testbed up --secure`: CurveZMQ keys for the base station and every agent, agents that answer
the base station's key only, and a roster that carries everything `basestation` needs. Loopback
runs without privileges (as tests/test_links.py's loopback test); the namespaced modes run where
root or user namespaces are available.
"""

from __future__ import annotations

import json
import os

import pytest
from test_basestation import reference_tokens
from test_links import SHAPED_MODES, run_links_cli, shaped_test

from basestation.roster import read_roster_agents, read_roster_keys
from testbed.links import control as links
from testbed.links import userns
from testbed.links.procs import alive
from wire.client import AgentClient, PeerUnreachable
from wire.keys import load_keypair

PROMPT = "Return the list of items in the queue."
TOKENS = 8
SILENCE_S = 1.5  # how long an unkeyed client waits before calling it "no answer"
AGENT_ARGS = "--agent-arg=--no-self-benchmark"


def generate(run_cli, tiny_split: str, roster: str) -> list[int]:
    """`basestation generate --agents ROSTER` and nothing else about keys: greedy, θ = 0."""
    done = run_cli("basestation", "generate", "--shards", tiny_split, "--agents", roster,
                   "--prompt", PROMPT, "--max-new-tokens", str(TOKENS), "--ignore-eos",
                   "--json", "--dtype", "float32", "--wait-s", "30")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["experts_dropped"] == 0 and all(a["failures"] == 0 for a in out["agents"]), out
    return out["token_ids"]


def assert_unkeyed_gets_no_answer(endpoints: list[str]) -> None:
    with AgentClient() as unkeyed:
        for endpoint in endpoints:
            with pytest.raises((TimeoutError, PeerUnreachable)):
                unkeyed.info(unkeyed.connect(endpoint), timeout_s=SILENCE_S)


def assert_secure_roster(state_dir: str, roster: str, num_agents: int) -> list[str]:
    """The roster names the base station's keys and each agent's public key; returns the
    agents' endpoints."""
    state = links.load_state(state_dir)
    keys_dir = read_roster_keys(roster)
    assert keys_dir == state["keys"]["basestation"] and os.path.isdir(keys_dir)
    agents = read_roster_agents(roster)
    assert len(agents) == num_agents
    for agent, folder in zip(agents, state["keys"]["agents"]):
        assert agent.public_key == load_keypair(folder).public
        assert agent.endpoint.startswith("tcp://127.0.0.1:")
    return [agent.endpoint for agent in agents]


@pytest.mark.integration
def test_up_secure_generates_as_plain_up_and_answers_its_keys_only(
        tiny_split, tiny_checkpoint, tmp_path, monkeypatch, run_cli):
    """Loopback (neither root nor user namespaces): `testbed up` and `testbed up --secure`
    give the same greedy tokens through their rosters, transformers' own at θ = 0; the keyed
    agents give an unkeyed client no answer; `down` removes the keys."""
    monkeypatch.setattr(links, "is_root", lambda: False)
    monkeypatch.setattr(userns, "unavailable_reason", lambda: "user.max_user_namespaces = 0")
    plain_dir, secure_dir = str(tmp_path / "plain"), str(tmp_path / "secure")
    pids = []
    try:
        assert run_links_cli("up", "--shards", tiny_split, "--agents", "1", AGENT_ARGS,
                             "--state-dir", plain_dir) == 0
        pids += [p for a in links.load_state(plain_dir)["agents"] for p in a["pids"]]
        with open(os.path.join(plain_dir, "roster.toml")) as f:
            assert "public_key" not in f.read()  # plain up writes the roster it always did
        plain_tokens = generate(run_cli, tiny_split, os.path.join(plain_dir, "roster.toml"))
        assert run_links_cli("down", "--state-dir", plain_dir) == 0

        assert run_links_cli("up", "--secure", "--shards", tiny_split, "--agents", "2",
                             AGENT_ARGS, "--state-dir", secure_dir) == 0
        pids += [p for a in links.load_state(secure_dir)["agents"] for p in a["pids"]]
        roster = os.path.join(secure_dir, "roster.toml")
        endpoints = assert_secure_roster(secure_dir, roster, 2)
        assert generate(run_cli, tiny_split, roster) == plain_tokens
        assert plain_tokens == reference_tokens(tiny_checkpoint, PROMPT, TOKENS)
        assert [r.answers for r in links.status(secure_dir)] == [True, True]  # keyed status
        assert_unkeyed_gets_no_answer(endpoints)
    finally:
        for state_dir in (plain_dir, secure_dir):
            run_links_cli("down", "--state-dir", state_dir)
    assert not os.path.exists(os.path.join(secure_dir, "keys"))
    assert not any(alive(p) for p in pids)


@shaped_test
@pytest.mark.parametrize("mode", SHAPED_MODES or ["none"])
def test_up_secure_behind_namespaced_links(tiny_split, tiny_checkpoint, tmp_path, run_cli,
                                           mode):
    """In a network namespace (root) or a user namespace: the agents bind beyond loopback
    with their keys (no --insecure), and the roster alone reaches them through their links."""
    state_dir = str(tmp_path / "state")
    tb = links.up(tiny_split, 2, state_dir=state_dir, agent_args=[AGENT_ARGS.split("=")[1]],
                  mode=mode, secure=True)
    try:
        state = links.load_state(state_dir)
        for agent in state["agents"]:
            assert "--insecure" not in agent["agent_command"]
            assert "--keys" in agent["agent_command"]
        assert tb.basestation_keys == state["keys"]["basestation"]
        assert generate(run_cli, tiny_split, tb.roster_path) == \
            reference_tokens(tiny_checkpoint, PROMPT, TOKENS)
        assert_unkeyed_gets_no_answer([a["endpoint"] for a in state["agents"]])
        new_pid = tb.restart(0)  # waits for a keyed answer from the restarted agent
        assert alive(new_pid)
    finally:
        tb.down()

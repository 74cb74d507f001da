"""The live base station over real agent processes on loopback."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from agent_fixtures import free_port, start_agent, start_module_agent, two_agents  # noqa: F401
from waiting import wait_until

from basestation.generate import generate
from basestation.session import RosterError, build_roster, open_session
from testbed.models.make_model import ModelSpec

pytestmark = pytest.mark.integration
PROMPT = "Return the list of items in the queue."


def reference_tokens(checkpoint: str, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own generate with its eager experts (the per-expert loop the library
    defines; its default grouped_mm kernel rounds differently, and this random model's logits
    are close enough to ties that greedy decoding notices)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    config = model.generation_config
    config.eos_token_id = []  # as --ignore-eos (None would be filled back in)
    with torch.inference_mode():
        out = model.generate(ids, generation_config=config, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.eos_token_id,
                             attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def test_theta_zero_matches_transformers(two_agents, tiny_checkpoint, tiny_split, run_cli):
    result = run_cli("basestation", "generate", "--shards", tiny_split,
                     *[a for flag in two_agents for a in ("--agent", flag)],
                     "--prompt", PROMPT, "--max-new-tokens", "24", "--ignore-eos", "--json",
                     "--dtype", "float32", "--wait-s", "20")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["token_ids"] == reference_tokens(tiny_checkpoint, PROMPT, 24)
    assert len(out["token_latency_ms"]) == 24
    assert out["experts_dropped"] == 0
    # every token of every layer reaches top-2 experts: prompt + 23 decode steps, 2 layers
    from transformers import AutoTokenizer

    prompt_tokens = len(AutoTokenizer.from_pretrained(tiny_checkpoint)(PROMPT).input_ids)
    assert out["expert_calls"] == 2 * 2 * (prompt_tokens + 23)
    assert sum(a["calls"] for a in out["agents"]) == out["expert_calls"]
    assert all(a["failures"] == 0 and a["rtt_ms"] > 0 for a in out["agents"])


def test_theta_drops_the_slow_agent_first(start_agent, tiny_split):
    fast = start_agent("--expert", "0-3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*")
    slow = start_agent("--expert", "4-7", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                       "--fault", "delay=0.02")
    roster = build_roster([f"0-3={fast.endpoint}", f"4-7={slow.endpoint}"], None, None)
    session = open_session(tiny_split, roster, theta=0.0, wait_s=20, progress=False)
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        generate(session, ids, max_new_tokens=4, ignore_eos=True)  # learn the links
        result = generate(session, ids, max_new_tokens=12, ignore_eos=True, theta=0.3)
    finally:
        session.close()
    by_name = {a["agent"]: a for a in result.agents}
    slow_drops = by_name[slow.endpoint]["drops"]
    fast_drops = by_name[fast.endpoint]["drops"]
    assert result.experts_dropped > 0
    assert slow_drops > 3 * max(1, fast_drops), (slow_drops, fast_drops)


def test_killed_agent_generation_completes_and_rejoins(start_agent, tiny_split, caplog):
    """A killed agent is gone, not slow: its connection closes and the layer in flight drops
    its slots at once (noticed by the connection, not a timeout); it rejoins when restarted."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    keep = start_agent("--expert", "0-3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*")
    victim = start_agent("--expert", "4-7", "--shards", tiny_split, "--bind", endpoint)
    roster = build_roster([f"0-3={keep.endpoint}", f"4-7={endpoint}"], None, None)
    session = open_session(tiny_split, roster, wait_s=20, progress=False)
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        pieces = []

        def kill_after_a_few(piece):
            pieces.append(piece)
            if len(pieces) == 3:
                victim.kill()

        with caplog.at_level(logging.WARNING, logger="basestation"):
            result = generate(session, ids, max_new_tokens=16, ignore_eos=True,
                              on_text=kill_after_a_few)
        assert len(result.token_ids) == 16 and not result.interrupted
        failures = [r.getMessage() for r in caplog.records if "failed (" in r.getMessage()]
        assert failures and all("connection is gone" in m or "unreachable" in m
                                for m in failures), failures
        figures = {a["agent"]: a for a in result.agents}
        assert figures[endpoint]["failures"] >= 1
        # the pairs in flight when it died were dropped; later tokens route around it
        assert result.fault_drops >= 1
        assert figures[keep.endpoint]["calls"] > 0

        start_agent("--expert", "4-7", "--shards", tiny_split, "--bind", endpoint)
        calls_before = figures[endpoint]["calls"]
        # the dispatcher re-probes the dead agent with capped backoff (2 s) and takes it back
        victim_link = next(a for a in session.agents if a.name == endpoint)

        def taken_back() -> bool:
            session.poll_probes(0.1)
            return victim_link.alive

        wait_until(taken_back, 60, interval_s=0, what="the restarted agent to be taken back")
        result = generate(session, ids, max_new_tokens=24, ignore_eos=True)
        after = {a["agent"]: a for a in result.agents}[endpoint]
        assert after["alive"] and after["calls"] > calls_before
    finally:
        session.close()


def test_roster_errors(tmp_path, tiny_split, two_agents, checkpoint_factory, start_agent,
                       run_cli):
    bad = tmp_path / "roster.toml"
    bad.write_text("agents = [")
    result = run_cli("basestation", "generate", "--shards", tiny_split, "--agents", str(bad),
                     "--prompt", "x")
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_cli("basestation", "generate", "--shards", tiny_split, "--agent",
                     two_agents[0], "--prompt", "x", "--wait-s", "1")
    assert result.returncode == 2
    assert "no agent for experts 4,5,6,7" in result.stderr and "Traceback" not in result.stderr

    with pytest.raises(RosterError, match="expected EXPERTS=tcp"):
        build_roster(["3"], None, None)

    from shard_tool.split import split

    other = str(tmp_path / "other")
    split(checkpoint_factory(ModelSpec(seed=1)), other)
    stranger = start_agent("--expert", "4-7", "--shards", other, "--bind", "tcp://127.0.0.1:*")
    result = run_cli("basestation", "generate", "--shards", tiny_split, "--agent",
                     two_agents[0], "--agent", f"4-7={stranger.endpoint}", "--prompt", "x",
                     "--wait-s", "10")
    assert result.returncode == 2 and "serves a different model" in result.stderr


def test_allow_missing_runs_without_those_experts(two_agents, tiny_split):
    roster = build_roster([two_agents[0]], None, None)
    session = open_session(tiny_split, roster, wait_s=1, allow_missing=True, progress=False)
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        result = generate(session, ids, max_new_tokens=4, ignore_eos=True)
    finally:
        session.close()
    assert len(result.token_ids) == 4
    assert result.agents[0]["experts"] == [0, 1, 2, 3] and result.agents[0]["calls"] > 0


def test_dial_in_agents(start_agent, tiny_split, tiny_checkpoint):
    port = free_port()
    for spec in ("0-3", "4-7"):
        start_agent("--expert", spec, "--shards", tiny_split, "--basestation",
                    f"tcp://127.0.0.1:{port}", ready=None)
    roster = build_roster([], None, f"tcp://127.0.0.1:{port}")
    session = open_session(tiny_split, roster, wait_s=30, dtype="float32", progress=False)
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        result = generate(session, ids, max_new_tokens=8, ignore_eos=True)
    finally:
        session.close()
    assert result.token_ids == reference_tokens(tiny_checkpoint, PROMPT, 8)
    assert sorted(e for a in result.agents for e in a["experts"]) == list(range(8))


def test_status_table(two_agents, run_cli):
    result = run_cli("basestation", "status", *[a for f in two_agents for a in ("--agent", f)])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(" yes " in line for line in lines[1:])  # header + 2 agents


def test_modeled_latency_drops_the_far_devices(two_agents, tiny_split):
    """--latency model: the paper's channel instead of measurements. Experts 4-7 at 20 km get
    ~30x the latency of 0-3 at 50 m, so WLR drops them first."""
    from basestation.channel_model import ChannelScenario

    channel = ChannelScenario(distances_m=(50.0,) * 4 + (20000.0,) * 4)
    roster = build_roster(two_agents, None, None)
    session = open_session(tiny_split, roster, theta=0.3, latency="model", wait_s=20,
                           channel=channel, progress=False)
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        result = generate(session, ids, max_new_tokens=16, ignore_eos=True)
    finally:
        session.close()
    drops = {tuple(a["experts"]): a["drops"] for a in result.agents}
    assert result.experts_dropped > 0
    assert drops[(4, 5, 6, 7)] > 3 * max(1, drops[(0, 1, 2, 3)])

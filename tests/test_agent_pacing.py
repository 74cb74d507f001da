"""Compute pacing (`edge_agent --pace-compute-us-per-token`): an agent emulating a bigger model
on a slower device takes at least tokens x pace per request, reports that as its compute time,
and still returns the real expert's output."""

from __future__ import annotations

import pytest
import torch
from agent_fixtures import client, start_agent  # noqa: F401

from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts

REPLY_TIMEOUT_S = 10.0


def test_the_pace_is_a_roofline_per_expert():
    """max(per call, tokens x per token) for each expert of a request, summed; 0 when off."""
    from edge_agent.config import EmulationConfig
    from edge_agent.pacing import paced_s

    both = EmulationConfig(pace_s_per_token=0.002, pace_s_per_call=0.030)
    assert paced_s([[3, 1]], both) == pytest.approx(0.030)  # the call, not 30 + 2 ms
    assert paced_s([[3, 40]], both) == pytest.approx(0.080)  # 40 x 2 ms beats the call
    assert paced_s([[3, 1], [5, 40]], both) == pytest.approx(0.110)
    assert paced_s([[3, 40]], EmulationConfig()) == 0.0


# Speeds (how close compute_s comes to the pace on an idle machine): bench/agent_pacing.py.
# Here only what holds under any load: a paced call takes at least its pace.
@pytest.mark.integration
def test_paced_agent_takes_its_emulated_time_and_answers_right(start_agent, tiny_split, client):
    paced = start_agent("--expert", "3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark", "--pace-compute-us-per-token", "20000")
    reference = load_experts(tiny_split, [3], device="cpu")
    x = torch.randn(5, 64)
    out, reply = client.expert(client.connect(paced.endpoint), 0, x, [(3, 5)],
                               timeout_s=REPLY_TIMEOUT_S)
    assert reply.header["compute_s"] >= 5 * 0.020  # five tokens at 20 ms each
    torch.testing.assert_close(out, expert_forward(x, reference.weights[3][0]))


@pytest.mark.integration
def test_roofline_pace_per_call_and_per_token(start_agent, tiny_split, client):
    """max(per call, tokens x per token): one token costs the call, many their tokens."""
    agent = start_agent("--expert", "3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark", "--pace-compute-us-per-call", "30000",
                        "--pace-compute-us-per-token", "2000")
    peer = client.connect(agent.endpoint)
    _, one = client.expert(peer, 0, torch.randn(1, 64), [(3, 1)], timeout_s=REPLY_TIMEOUT_S)
    _, many = client.expert(peer, 0, torch.randn(40, 64), [(3, 40)], timeout_s=REPLY_TIMEOUT_S)
    assert one.header["compute_s"] >= 0.030
    assert many.header["compute_s"] >= 0.080  # 40 x 2 ms beats the 30 ms call


@pytest.mark.integration
def test_bad_pace_is_a_one_line_error(start_agent, tiny_split):
    import subprocess
    import sys

    from agent_fixtures import REPO_ROOT

    for bad in ("-1", "nan", "1e9"):
        out = subprocess.run([sys.executable, "-m", "edge_agent", "--expert", "3", "--shards",
                              tiny_split, "--pace-compute-us-per-token", bad],
                             capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr

"""Compute pacing (`edge_agent --pace-compute-us-per-token`): an agent emulating a bigger model
on a slower device takes at least tokens x pace per request, reports that as its compute time,
and still returns the real expert's output."""

from __future__ import annotations

import pytest
import torch

from agent_fixtures import client, start_agent  # noqa: F401
from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts

pytestmark = pytest.mark.integration
REPLY_TIMEOUT_S = 10.0


def test_paced_agent_takes_its_emulated_time_and_answers_right(start_agent, tiny_split, client):
    paced = start_agent("--expert", "3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark", "--pace-compute-us-per-token", "20000")
    plain = start_agent("--expert", "3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark")
    reference = load_experts(tiny_split, [3], device="cpu")
    x = torch.randn(5, 64)
    out, reply = client.expert(client.connect(paced.endpoint), 0, x, [(3, 5)],
                               timeout_s=REPLY_TIMEOUT_S)
    paced_s = reply.header["compute_s"]
    _, reply = client.expert(client.connect(plain.endpoint), 0, x, [(3, 5)],
                             timeout_s=REPLY_TIMEOUT_S)
    plain_s = reply.header["compute_s"]
    assert paced_s >= 5 * 0.020  # five tokens at 20 ms each
    assert plain_s < 5 * 0.020
    torch.testing.assert_close(out, expert_forward(x, reference.weights[3][0]))


def test_roofline_pace_per_call_and_per_token(start_agent, tiny_split, client):
    """max(per call, tokens x per token): one token costs the call, many their tokens."""
    agent = start_agent("--expert", "3", "--shards", tiny_split, "--bind", "tcp://127.0.0.1:*",
                        "--no-self-benchmark", "--pace-compute-us-per-call", "30000",
                        "--pace-compute-us-per-token", "2000")
    peer = client.connect(agent.endpoint)
    _, one = client.expert(peer, 0, torch.randn(1, 64), [(3, 1)], timeout_s=REPLY_TIMEOUT_S)
    _, many = client.expert(peer, 0, torch.randn(40, 64), [(3, 40)], timeout_s=REPLY_TIMEOUT_S)
    assert 0.030 <= one.header["compute_s"] < 0.060
    assert 0.080 <= many.header["compute_s"] < 0.150  # 40 x 2 ms beats the 30 ms call


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

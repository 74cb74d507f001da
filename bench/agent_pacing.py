"""How close a paced agent's reported compute time comes to its pace (the speed half of
tests/test_agent_pacing.py, which asserts only the lower bound that holds under any load).

    .venv/bin/python bench/agent_pacing.py [--rounds 20]

Starts a real `edge_agent` on the tiny model with --pace-compute-us-per-call 30000 and
--pace-compute-us-per-token 2000, and one without pacing, and prints for 1, 5 and 40 tokens the
median compute_s each reports, the pace (edge_agent.pacing.paced_s) and paced / pace.
On an idle machine the ratio is a little over 1 (the sleep's overshoot); under load it grows.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PACE_US_PER_CALL, PACE_US_PER_TOKEN = 30000, 2000
TOKENS = (1, 5, 40)
START_TIMEOUT_S = 120.0


def start_agent(shards: str, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "--expert", "3", "--shards",
                             shards, "--bind", "tcp://127.0.0.1:*", "--no-self-benchmark",
                             *extra], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(r"serving (tcp://\S+)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise SystemExit("bench: the agent did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    import torch

    from edge_agent.config import EmulationConfig
    from edge_agent.pacing import paced_s
    from shard_tool.split import split
    from testbed.models.make_model import ModelSpec, make_model
    from wire.client import AgentClient

    emulation = EmulationConfig(pace_s_per_call=PACE_US_PER_CALL / 1e6,
                                pace_s_per_token=PACE_US_PER_TOKEN / 1e6)
    with tempfile.TemporaryDirectory() as tmp:
        make_model(os.path.join(tmp, "model"), ModelSpec())
        split(os.path.join(tmp, "model"), os.path.join(tmp, "shards"))
        shards = os.path.join(tmp, "shards")
        paced, paced_endpoint = start_agent(
            shards, "--pace-compute-us-per-call", str(PACE_US_PER_CALL),
            "--pace-compute-us-per-token", str(PACE_US_PER_TOKEN))
        plain, plain_endpoint = start_agent(shards)
        try:
            with AgentClient() as client:
                peers = {"paced": client.connect(paced_endpoint),
                         "plain": client.connect(plain_endpoint)}
                print(f"{'tokens':>6} {'pace ms':>8} {'paced ms':>9} {'plain ms':>9} "
                      f"{'paced/pace':>10}")
                for tokens in TOKENS:
                    x = torch.randn(tokens, 64)
                    median_s = {}
                    for name, peer in peers.items():
                        samples = [client.expert(peer, 0, x, [(3, tokens)], timeout_s=30)[1]
                                   .header["compute_s"] for _ in range(args.rounds)]
                        median_s[name] = statistics.median(samples)
                    pace = paced_s([[3, tokens]], emulation)
                    print(f"{tokens:>6} {pace * 1e3:>8.1f} {median_s['paced'] * 1e3:>9.1f} "
                          f"{median_s['plain'] * 1e3:>9.2f} {median_s['paced'] / pace:>10.2f}")
        finally:
            for proc in (paced, plain):
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()

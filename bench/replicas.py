"""Replicas against drops and waits: decode behind one slow box, in the same run.

Three loopback agents: A holds experts 0-3, B holds 4-7, S holds 4-7 too and sleeps `--delay-ms`
before every expert reply (edge_agent's fault injection: a slow link or slow compute). Rosters,
run interleaved round by round on the same agents:

    no slow agent    A + B                the baseline
    replicas         A + B + S            4-7 on B and S: the route picks the faster
    replica removed  A + S                θ = 0 waits for S (as before replicas)
    removed, θ=0.5   A + S at θ = 0.5     WLR drops S's experts instead

and prints each one's median decode token latency (the first token, the prefill, left out),
its drops, and its ratio to the baseline.

    .venv/bin/python bench/replicas.py [--model DIR] [--tokens 32] [--rounds 4] [--delay-ms 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch
from decode import PROMPT, REPO_ROOT, stop  # bench/, beside this script


def split_model(model: str | None, scratch: str) -> str:
    """The split of `model` (default: the tiny test model, made here) in scratch/shards."""
    from shard_tool.split import split

    checkpoint = model
    if checkpoint is None:
        from testbed.models.make_model import ModelSpec, make_model

        checkpoint = os.path.join(scratch, "model")
        make_model(checkpoint, ModelSpec())
    shards = os.path.join(scratch, "shards")
    split(checkpoint, shards)
    return shards


def start_agent(shards: str, experts: str, delay_s: float = 0.0) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    fault = ["--fault", f"delay={delay_s}"] if delay_s else []
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "--expert", experts,
                             "--shards", shards, "--bind", "tcp://127.0.0.1:*", *fault],
                            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
    line = proc.stdout.readline()  # "edge_agent ready: serving tcp://… …"
    if "serving" not in line:
        raise SystemExit(f"agent {experts} did not start: {line!r}")
    return proc, line.split("serving ")[1].split()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: make the tiny one)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=40.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scratch = tempfile.mkdtemp(prefix="bench-replicas-")
    procs: list[subprocess.Popen] = []
    sessions = {}
    try:
        shards = split_model(args.model, scratch)
        from basestation.generate import generate
        from basestation.session import build_roster, open_session

        (a, a_at), (b, b_at), (s, s_at) = (start_agent(shards, "0-3"),
                                           start_agent(shards, "4-7"),
                                           start_agent(shards, "4-7", args.delay_ms / 1e3))
        procs = [a, b, s]
        runs = {"no slow agent": ([f"0-3={a_at}", f"4-7={b_at}"], 0.0),
                "replicas": ([f"0-3={a_at}", f"4-7={b_at}", f"4-7={s_at}"], 0.0),
                "replica removed": ([f"0-3={a_at}", f"4-7={s_at}"], 0.0),
                "removed, θ=0.5": ([f"0-3={a_at}", f"4-7={s_at}"], 0.5)}
        for name, (flags, _) in runs.items():
            sessions[name] = open_session(shards, build_roster(flags, None, None),
                                          dtype="float32", wait_s=20, progress=False)
        ids = sessions["replicas"].base.tokenizer(PROMPT, return_tensors="pt").input_ids
        latencies = {name: [] for name in runs}
        drops = dict.fromkeys(runs, 0)
        slots = dict.fromkeys(runs, 0)
        for _ in range(args.rounds):
            for name, (_, theta) in runs.items():
                result = generate(sessions[name], ids, max_new_tokens=args.tokens,
                                  ignore_eos=True, theta=theta)
                latencies[name] += result.token_latency_ms[1:]
                drops[name] += result.experts_dropped
                slots[name] += result.expert_calls + result.experts_dropped
        base_ms = statistics.median(latencies["no slow agent"])
        print(f"{args.tokens} tokens x {args.rounds} rounds, slow agent {args.delay_ms:g} ms "
              "a call, median decode token:")
        print(f"{'roster':<18}{'median ms':>10}{'ratio':>8}{'drops':>9}")
        for name in runs:
            median_ms = statistics.median(latencies[name])
            print(f"{name:<18}{median_ms:>10.2f}{median_ms / base_ms:>8.2f}"
                  f"{100 * drops[name] / max(slots[name], 1):>8.1f}%")
    finally:
        for session in sessions.values():
            session.close()
        stop(procs)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

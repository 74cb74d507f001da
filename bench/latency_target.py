"""A latency target against fixed θ at the same mean token latency, behind one slow box.

Two loopback agents: A holds experts 0-3, S holds 4-7 and sleeps `--delay-ms` before every
expert reply. In the same run, interleaved prompt by prompt: decode at fixed θ over a ladder
(0 … 0.5), then with a latency target halfway between the θ = 0 and θ = 0.5 means. Fixed θ's
(mean latency, slots dropped) points are joined by straight lines; the target's drops are
compared with that line at the target's achieved mean: the fixed θ that would give the same
mean. Printed: each θ's mean and drops, the target's achieved mean (and its error against the
target), its drops, the fixed-θ drops at that mean, and their ratio.

    .venv/bin/python bench/latency_target.py [--model DIR] [--tokens 48] [--prompts 4]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile

import torch
from decode import stop  # bench/, beside this script
from replicas import split_model, start_agent

THETAS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
PROMPTS = ("Return the list of items in the queue.", "The queue module implements queues.",
           "Every network wait has a deadline.", "A slow box is waited for, a dead one is not.")


def interpolate(points: list[tuple[float, float]], x: float) -> float:
    """y at x on the broken line through points (sorted by x; ends held flat)."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return points[-1][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: make the tiny one)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=40.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scratch = tempfile.mkdtemp(prefix="bench-target-")
    procs: list[subprocess.Popen] = []
    session = None
    try:
        shards = split_model(args.model, scratch)
        from basestation.generate import generate
        from basestation.session import build_roster, open_session

        (a, a_at), (s, s_at) = start_agent(shards, "0-3"), \
            start_agent(shards, "4-7", args.delay_ms / 1e3)
        procs = [a, s]
        session = open_session(shards, build_roster([f"0-3={a_at}", f"4-7={s_at}"], None, None),
                               dtype="float32", wait_s=20, progress=False)
        prompts = [session.base.tokenizer(p, return_tensors="pt").input_ids
                   for p in (PROMPTS * args.prompts)[:args.prompts]]
        generate(session, prompts[0], max_new_tokens=8, ignore_eos=True)  # learn the links

        def run(ids, **how):
            result = generate(session, ids, max_new_tokens=args.tokens, ignore_eos=True, **how)
            return result.token_latency_ms[1:], result.experts_dropped

        fixed = {t: ([], 0) for t in THETAS}
        for ids in prompts:
            for theta in THETAS:
                ms, dropped = run(ids, theta=theta)
                fixed[theta] = (fixed[theta][0] + ms, fixed[theta][1] + dropped)
        mean = {t: statistics.fmean(ms) for t, (ms, _) in fixed.items()}
        target_ms = (mean[0.0] + mean[0.5]) / 2
        target_latencies, target_drops = [], 0
        for ids in prompts:
            ms, dropped = run(ids, latency_target_ms=target_ms)
            target_latencies += ms
            target_drops += dropped
        achieved_ms = statistics.fmean(target_latencies)
        same_mean_drops = interpolate([(mean[t], fixed[t][1]) for t in THETAS], achieved_ms)
        print(f"{args.prompts} prompts x {args.tokens} tokens, slow agent {args.delay_ms:g} ms "
              "a call; mean decode token and slots dropped:")
        for theta in THETAS:
            print(f"  θ = {theta:<5g} {mean[theta]:8.2f} ms  {fixed[theta][1]:6d} dropped")
        print(f"target {target_ms:.2f} ms: achieved {achieved_ms:.2f} ms "
              f"({100 * (achieved_ms / target_ms - 1):+.1f} %), {target_drops} dropped; fixed θ "
              f"at that mean: {same_mean_drops:.0f} dropped; ratio "
              f"{target_drops / max(same_mean_drops, 1):.2f}")
    finally:
        if session is not None:
            session.close()
        stop(procs)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The joint bandwidth allocator's cost per call (issue 23), against baselines in the same run.

For 2, 4, 8 and 64 boxes of a random cell (compute 0-6 ms, 8-80 KiB each way; linear rates
0.3-10 bit/s/Hz, Shannon a = P g^2 / N0 for SNRs of about 0-50 dB in 20 MHz): `allocate`
(the min-max shares) against `shared_times` (the even split of the same boxes, the same time
model, no solving). Then one decode layer (one token, top-2 of 8 boxes, theta 0.2):
`select_and_allocate` (WLR and allocation alternated) against `selector.select` alone, the
selector's own cost for one token. Each figure is the best of `--repeats` medians of
`--calls` calls, in us of this thread's CPU time (`--wall` for wall time).

    .venv/bin/python bench/bandwidth.py [--calls 2000] [--repeats 5] [--boxes 2,4,8,64] [--wall]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from functools import partial

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from basestation.bandwidth import (  # noqa: E402
    BoxDemand,
    BoxLink,
    LinearRate,
    ShannonRate,
    allocate,
    select_and_allocate,
    shared_times,
)
from basestation.selector import select  # noqa: E402

BANDWIDTH_HZ = 20e6
SEED = 0


def random_cell(rng: random.Random, boxes: int, shannon: bool) -> dict[int, BoxDemand]:
    def rate():
        return ShannonRate(10 ** rng.uniform(7.3, 12.3)) if shannon \
            else LinearRate(rng.uniform(0.3, 10.0))
    return {q: BoxDemand(rng.uniform(0.0, 6e-3), rng.choice([65536.0, 655360.0]),
                         rng.choice([65536.0, 655360.0]), rate(), rate())
            for q in range(boxes)}


def per_call_us(fn, calls: int, repeats: int, clock) -> float:
    """The best of `repeats` medians of `calls` single calls, in microseconds."""
    best = float("inf")
    for _ in range(repeats):
        samples = []
        for _ in range(calls):
            start = clock()
            fn()
            samples.append(clock() - start)
        best = min(best, statistics.median(samples))
    return best / 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--boxes", default="2,4,8,64")
    parser.add_argument("--wall", action="store_true", help="wall time instead of CPU time")
    args = parser.parse_args(argv)
    try:
        box_counts = [int(n) for n in args.boxes.split(",")]
    except ValueError:
        print(f"bandwidth bench: --boxes {args.boxes!r} is not a comma-separated list of counts",
              file=sys.stderr)
        return 2
    if args.calls < 1 or args.repeats < 1 or any(n < 1 for n in box_counts):
        print("bandwidth bench: --calls, --repeats and every box count must be >= 1",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    clock = time.perf_counter_ns if args.wall else time.thread_time_ns
    rng = random.Random(SEED)
    print(f"{'boxes':>5} {'rates':>8} {'allocate us':>12} {'shared us':>10} {'ratio':>6}")
    for boxes in box_counts:
        for shannon in (False, True):
            cell = random_cell(rng, boxes, shannon)
            calls = max(1, args.calls * 8 // max(boxes, 8))
            joint_us = per_call_us(partial(allocate, cell, None, BANDWIDTH_HZ), calls,
                                   args.repeats, clock)
            shared_us = per_call_us(partial(shared_times, cell, None, BANDWIDTH_HZ), calls,
                                    args.repeats, clock)
            print(f"{boxes:>5} {'Shannon' if shannon else 'linear':>8} {joint_us:>12.1f} "
                  f"{shared_us:>10.1f} {joint_us / shared_us:>6.2f}")

    links = {q: BoxLink(rng.uniform(0, 3e-3), rng.uniform(1.7e-3, 5.2e-3), 65536, 65536,
                        LinearRate(rng.uniform(0.5, 10)), LinearRate(rng.uniform(0.5, 10)))
             for q in range(8)}
    experts, weights = torch.tensor([[5, 2]]), torch.tensor([[0.6, 0.4]])
    box_of_expert, latency = torch.arange(8), [3e-3] * 8 + [1e-3]
    rounds = select_and_allocate(experts, weights, box_of_expert, latency, 0.2, links,
                                 BANDWIDTH_HZ).rounds
    joint_us = per_call_us(lambda: select_and_allocate(
        experts, weights, box_of_expert, latency, 0.2, links, BANDWIDTH_HZ),
        args.calls, args.repeats, clock)
    select_us = per_call_us(lambda: select(experts, weights, box_of_expert, latency, 0.2),
                            args.calls, args.repeats, clock)
    print(f"decode layer, top-2 of 8, theta 0.2: select_and_allocate {joint_us:.1f} us "
          f"({rounds} rounds), select alone {select_us:.1f} us, ratio {joint_us / select_us:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

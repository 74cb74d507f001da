"""The joint bandwidth allocator's cost per call (issue 23), against baselines in the same run.

For 2, 4, 8 and 64 boxes of a random cell (compute 0-6 ms, 8-80 KiB each way; linear rates
0.3-10 bit/s/Hz, Shannon a = P g^2 / N0 for SNRs of about 0-50 dB in 20 MHz): `allocate`
(the min-max shares) against `shared_times` (the even split of the same boxes, the same time
model, no solving). Then one decode layer (one token, top-2 of 8 boxes, theta 0.2):
`select_and_allocate` (WLR and allocation alternated) against `selector.select` alone, the
selector's own cost for one token. Then the testbed's `JointAllocator` per decode layer
(testbed/experiments/joint_alloc.py, 8 boxes on a 20 MHz cell at the `paper` scenario's
first epoch, top-2 picked at random each layer, or the same pair every layer): at θ = 0 its
before_dispatch (memoised shares, the datagram), sending every layer against only on change;
at θ = 0.2 box_latencies (select_and_allocate) and before_dispatch together. Each figure is
the best of `--repeats` medians of `--calls` calls, in us of this thread's CPU time (`--wall`
for wall time; the datagram's cost is mostly the kernel's, so also look at --wall).

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
    for line in joint_allocator_lines(args.calls, args.repeats, clock):
        print(line)
    return 0


class _Bed:
    """What JointAllocator reads of a cell_bed.CellBed: the settings and the control address."""

    def __init__(self, current: dict, control: str):
        self.current, self.control = current, control


class _Boxes:
    def __init__(self, boxes: int):
        self.box_of_expert = torch.arange(boxes)
        self.available = None


def joint_allocator_lines(calls: int, repeats: int, clock) -> list[str]:
    """JointAllocator's per-layer cost, us (a UDP socket of ours stands for the cell)."""
    import itertools
    import socket

    from basestation.channel_model import wire_slowdown
    from testbed import scenarios
    from testbed.experiments.cell_bed import cell_settings
    from testbed.experiments.joint_alloc import JointAllocator

    boxes, bytes_per_token = 8, 2048
    paper = scenarios.with_total_bandwidth(scenarios.load("paper"), BANDWIDTH_HZ).paper
    settings = cell_settings(paper, 0, ["127.0.0.1:1"] * boxes, ["127.0.0.1:1"] * boxes,
                             wire_slowdown(paper.emulate, bytes_per_token), "joint")
    pacing = scenarios.agent_pacing_us(scenarios.load("paper"), boxes)
    rng = random.Random(SEED)
    pairs = [rng.sample(range(boxes), 2) for _ in range(256)]
    layers = {"random pairs": [torch.tensor([p]) for p in pairs],
              "one pair": [torch.tensor([pairs[0]])] * 256}
    keep = torch.ones(1, 2, dtype=torch.bool)
    box_of_expert = torch.arange(boxes)
    weights = torch.tensor([[0.6, 0.4]])
    lines = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cell:
        cell.bind(("127.0.0.1", 0))
        bed = _Bed(settings, "127.0.0.1:%d" % cell.getsockname()[1])
        later = itertools.count(step=1.0)  # a clock past the TTL every call: always send
        for name, stream in layers.items():
            for mode, clock_of in (("every layer", lambda: float(next(later))),
                                   ("on change", time.monotonic)):
                allocator = JointAllocator(bed, list(range(boxes)) + [None],
                                           lambda n: n * bytes_per_token, pacing,
                                           clock=clock_of)
                allocator.active = True
                layer = itertools.cycle(stream)

                def one(allocator=allocator, layer=layer, box_of_expert=box_of_expert):
                    allocator(0, box_of_expert, next(layer), keep)

                us = per_call_us(one, calls, repeats, clock)
                sent = allocator.sent / max(1, allocator.layers)
                allocator.close()
                lines.append(f"JointAllocator theta 0, {name}, send {mode}: {us:.1f} us/layer "
                             f"({100 * sent:.0f} % of layers sent)")
        allocator = JointAllocator(bed, list(range(boxes)) + [None],
                                   lambda n: n * bytes_per_token, pacing,
                                   base_latency_s=lambda b, e: [3e-3] * boxes + [1e-3])
        allocator.active = True
        layer, the_boxes = itertools.cycle(layers["random pairs"]), _Boxes(boxes)

        def one_joint():
            experts = next(layer)
            t = allocator.box_latencies(0, the_boxes, experts, weights, 0.2)
            selection = select(experts, weights, the_boxes.box_of_expert, t, 0.2)
            allocator(0, the_boxes.box_of_expert, experts, selection.keep)

        us = per_call_us(one_joint, calls, repeats, clock)
        allocator.close()
        lines.append(f"JointAllocator theta 0.2 (select_and_allocate, select, send): "
                     f"{us:.1f} us/layer")
    return lines


if __name__ == "__main__":
    sys.exit(main())

"""The base station's own cost per MoE layer call: everything but the wire.

One process: the real runtime (selector, routing, dispatcher, prober, combine) against a fake
agent socket that answers every request at once from memory with a precomputed reply of the
right shape. The fake's own cost (its send_expert/send/recv for the same calls) is timed on its
own and subtracted; both are printed. 8 agents, one expert each, top-2, the tiny Mixtral's
hidden size (testbed/data/tiny-mixtral/config.json), float32, one torch thread.

    .venv/bin/python bench/layer.py [--calls 3000] [--repeats 5] [--tokens 1,16,128]
        [--thetas 0,0.3] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import time

import torch

from basestation.agents import AgentTable
from basestation.dispatch import Dispatcher
from basestation.liveness import AgentLink, Prober
from basestation.moe_layer import MoeRuntime
from wire import protocol as P
from wire.client import Reply

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO_ROOT, "testbed", "data", "tiny-mixtral", "config.json")
AGENTS = 8
TARGET_DECODE_US = 80.0
# CPU time of this thread: on a shared machine, wall time also counts the waits for a core
# (--wall measures wall time instead)
CLOCK_NS = time.thread_time_ns  # per layer call at one token (issue 21)


class FakeClient:
    """The client's interface (send_expert, send, recv, connected, count_late), answering every
    EXPERT request at once with a precomputed [n, H] reply; it counts its calls."""

    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        self.replies: dict[int, tuple[list, dict]] = {}  # rows -> (frames, tensor fields)
        self.queue: list[Reply] = []
        self.next_id = 0
        self.calls = {"send_expert": 0, "send": 0, "recv": 0}
        self.late_replies = 0

    def _payload(self, rows: int) -> tuple[list, dict]:
        payload = self.replies.get(rows)
        if payload is None:
            y = torch.full((rows, self.hidden_size), 0.01)
            payload = self.replies[rows] = P.encode_tensor(y, "float32")
        return payload

    def send_expert(self, peer, layer, x, counts, wire_dtype=None, **fields) -> int:
        self.calls["send_expert"] += 1
        self.next_id += 1
        frames, tensor_fields = self._payload(x.shape[0])
        self.queue.append(Reply(peer, {"kind": P.EXPERT_REPLY, "id": self.next_id,
                                       "compute_s": 0.0, **tensor_fields}, frames))
        return self.next_id

    def send(self, peer, kind, frames=(), **fields) -> int:
        self.calls["send"] += 1
        self.next_id += 1
        if kind == P.PING:
            self.queue.append(Reply(peer, {"kind": P.PONG, "id": self.next_id}, []))
        return self.next_id

    def recv(self, timeout_s: float):
        self.calls["recv"] += 1
        return self.queue.pop(0) if self.queue else None

    def connected(self, peer) -> bool:
        return True

    def count_late(self) -> None:
        self.late_replies += 1


def build(hidden_size: int, ffn_size: int, num_experts: int, fake: FakeClient) -> MoeRuntime:
    agents = [AgentLink(name=f"agent{i}", peer=b"agent%d" % i, experts=(i,), cold_replies=0)
              for i in range(AGENTS)]
    table = AgentTable(agents, num_experts, hidden_size, element_bytes=4)
    prober = Prober(fake, table, probe_layer=0, wire_dtype=None)
    dispatcher = Dispatcher(fake, table, prober)
    return MoeRuntime(table, dispatcher, prober, ffn_size=ffn_size)


def inputs(tokens: int, hidden_size: int, num_experts: int, top_k: int, calls: int, seed: int):
    """`calls` layer inputs: x [T, H], the router's experts [T, K] and softmaxed weights [T, K]."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(min(calls, 64)):  # a cycle of 64 distinct routings
        logits = torch.randn(tokens, num_experts, generator=generator)
        weights, experts = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
        out.append((torch.randn(tokens, hidden_size, generator=generator), experts,
                    weights / weights.sum(dim=-1, keepdim=True)))
    return out


def time_layer(runtime: MoeRuntime, cases, calls: int, theta: float) -> float:
    """Seconds per layer call (the whole call, the fake's cost included)."""
    with runtime.batch(theta=theta):
        for i in range(min(calls, 200)):  # warm: caches, plans, first replies
            x, experts, weights = cases[i % len(cases)]
            runtime.forward(i % 4, x, experts, weights)
        start = CLOCK_NS()
        for i in range(calls):
            x, experts, weights = cases[i % len(cases)]
            runtime.forward(i % 4, x, experts, weights)
        return (CLOCK_NS() - start) / 1e9 / calls


def time_fake(fake: FakeClient, tokens: int, hidden_size: int, counts: dict, calls: int
              ) -> float:
    """Seconds per layer call that the fake's own methods took, for the calls the layer made."""
    per_call = {k: v / calls for k, v in counts.items()}
    x = torch.zeros(tokens, hidden_size)
    n = max(1, round(per_call["send_expert"] * calls))
    start = CLOCK_NS()
    for _ in range(n):
        fake.send_expert(b"agent0", 0, x, [(0, tokens)])
        fake.recv(0.0)
    expert_s = (CLOCK_NS() - start) / 1e9 / n
    extra_recv = max(0.0, per_call["recv"] - per_call["send_expert"])
    start = CLOCK_NS()
    for _ in range(1000):
        fake.recv(0.0)
    recv_s = (CLOCK_NS() - start) / 1e9 / 1000
    return per_call["send_expert"] * expert_s + extra_recv * recv_s


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="layer calls per measurement "
                        "at one token (fewer at more tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", default="1,16,128")
    parser.add_argument("--thetas", default="0,0.3")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the one-token θ = 0 case (the 25 costliest functions)")
    parser.add_argument("--wall", action="store_true", help="wall time, not this thread's "
                        "CPU time")
    args = parser.parse_args(argv)
    global CLOCK_NS
    if args.wall:
        CLOCK_NS = time.perf_counter_ns
    torch.set_num_threads(1)
    with open(CONFIG) as f:
        config = json.load(f)
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    num_experts, top_k = config["num_local_experts"], config["num_experts_per_tok"]
    print(f"MoE layer call at the base station: {AGENTS} agents, E={num_experts}, K={top_k}, "
          f"H={hidden}, float32, fake agent socket; "
          f"{'wall' if args.wall else 'CPU'} time, best of {args.repeats}")
    print(f"{'tokens':>6} {'theta':>5} {'layer us':>9} {'fake us':>8} {'base us':>8} "
          f"{'vs 80 us':>8}")
    with torch.inference_mode():
        for tokens in [int(t) for t in args.tokens.split(",")]:
            calls = max(200, args.calls // max(1, tokens // 4))
            for theta in [float(t) for t in args.thetas.split(",")]:
                cases = inputs(tokens, hidden, num_experts, top_k, calls, seed=tokens)
                totals, fakes = [], []
                for _ in range(args.repeats):
                    fake = FakeClient(hidden)
                    runtime = build(hidden, ffn, num_experts, fake)
                    time_layer(runtime, cases, 1, theta)
                    before = dict(fake.calls)
                    totals.append(time_layer(runtime, cases, calls, theta))
                    counts = {k: fake.calls[k] - before[k] for k in before}
                    fakes.append(time_fake(FakeClient(hidden), tokens, hidden, counts, calls))
                total_us = min(totals) * 1e6
                fake_us = min(fakes) * 1e6
                base_us = total_us - fake_us
                ratio = f"{base_us / TARGET_DECODE_US:.2f}x" if tokens == 1 else ""
                print(f"{tokens:>6} {theta:>5g} {total_us:>9.1f} {fake_us:>8.1f} "
                      f"{base_us:>8.1f} {ratio:>8}", flush=True)
        if args.profile:
            fake = FakeClient(hidden)
            runtime = build(hidden, ffn, num_experts, fake)
            cases = inputs(1, hidden, num_experts, top_k, args.calls, seed=1)
            profiler = cProfile.Profile()
            profiler.enable()
            time_layer(runtime, cases, args.calls, 0.0)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

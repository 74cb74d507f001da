"""Per-token decode time: 8 loopback agents against transformers running the model locally.

Same checkpoint, same prompt, greedy, same number of new tokens, in the same run. The
distributed time is split into base-station compute (everything but waiting for agents),
the gather wait (network + agent compute), and the agents' own reported compute. Also in the
same run, the transport floor: bare pyzmq echo processes (bench/echo_fanout.py), one per agent,
sent the same bytes in the same pattern (per token, one round per MoE layer to top_k of them);
(distributed - local) / floor says how many floors the distribution costs.

    .venv/bin/python bench/decode.py [--model DIR] [--tokens 64] [--pin] [--layers 4 --hidden 256 ...]
    .venv/bin/python bench/decode.py --floor-only   # local and floor only: no base station
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

# bench/, beside this script
from echo_fanout import HEADER_BYTES, agent_socket_options, floor_step_ms, start_echoes, stop_echoes
from pinning import split_cpus

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The queue module implements multi-producer, multi-consumer queues."


DEVICE = {"device": "cpu", "dtype": "float32"}  # set from --device/--dtype in main()


def start_agents(shards: str, groups: list[str], cpus: set[int] | None = None
                 ) -> tuple[list[subprocess.Popen], list[str]]:
    """One agent process per group of expert ids ("3" or "0-7"); returns the roster flags."""
    procs, flags = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for group in groups:
        proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "--expert", group,
                                 "--shards", shards, "--bind", "tcp://127.0.0.1:*",
                                 "--device", DEVICE["device"], "--dtype", DEVICE["dtype"]],
                                stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus
                                else None)
        procs.append(proc)
    for group, proc in zip(groups, procs):
        line = proc.stdout.readline()  # "edge_agent ready: serving tcp://… …"
        if "serving" not in line:
            raise SystemExit(f"agent {group} did not start: {line!r}")
        address = line.split("serving ")[1].split()[0]
        first, _, last = group.partition("-")
        flags += [f"{expert}={address}" for expert in range(int(first), int(last or first) + 1)]
    return procs, flags


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=20)


def local_per_token_ms(checkpoint: str, tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, DEVICE["dtype"])).to(DEVICE["device"]).eval()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(DEVICE["device"])
    config = model.generation_config
    config.eos_token_id = []  # never stop early (None would be filled back in)
    config.max_new_tokens, config.do_sample = tokens, False
    config.pad_token_id = tokenizer.eos_token_id
    times = []
    for _ in range(repeats):
        stamps = []

        class Stamp:
            def put(self, value, stamps=stamps):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        with torch.inference_mode():
            model.generate(ids, generation_config=config, streamer=Stamp(),
                           attention_mask=torch.ones_like(ids))
        decode = [b - a for a, b in zip(stamps[2:], stamps[3:])]  # after prefill
        times.append(statistics.median(decode) * 1e3)
    return min(times)


@dataclass(frozen=True)
class DecodeTraffic:
    """What one decode step sends: per MoE layer, one after the other, one token's activations
    to each of `fanout` agents, and as many bytes back."""

    rounds: int  # MoE layers
    fanout: int  # agents per layer: top_k, one expert per agent
    payload_bytes: int  # hidden_size x wire dtype bytes
    dtype: str  # wire dtype

    @classmethod
    def from_model(cls, model: dict, agents: int, wire_dtype: str = "float32"
                   ) -> "DecodeTraffic":
        """From a manifest's `model` (shard_tool/manifest.py), in the wire dtype the distributed
        run uses (float32: it computes in float32 on a CPU, whatever the checkpoint's dtype)."""
        from basestation.channel_model import comm_bytes
        from wire import protocol as P

        dtype = P.wire_dtype_name(wire_dtype)
        return cls(rounds=len(model["moe_layers"]) if "moe_layers" in model
                   else int(model["num_layers"]),
                   fanout=min(int(model["top_k"]), agents),
                   payload_bytes=int(comm_bytes(int(model["hidden_size"]), 1,
                                                P.WIRE_DTYPES[dtype].itemsize)),
                   dtype=dtype)


def floor_per_token_ms(traffic: DecodeTraffic, agents: int, cpus: set[int] | None,
                       tokens: int, repeats: int) -> float:
    """The same traffic, bare: `agents` echo processes with the agent's socket options."""
    procs, endpoints = start_echoes(agents, cpus, agent_socket_options())
    try:
        return floor_step_ms(endpoints, rounds=traffic.rounds, fanout=traffic.fanout,
                             payload_bytes=traffic.payload_bytes, steps=tokens,
                             repeats=repeats, flags=agent_socket_options(immediate=False))
    finally:
        stop_echoes(procs)


def distributed(shards: str, flags: list[str], tokens: int, repeats: int) -> dict:
    from basestation.generate import generate
    from basestation.session import build_roster, open_session

    session = open_session(shards, build_roster(flags, None, None), dtype=DEVICE["dtype"],
                           device=DEVICE["device"],
                           wait_s=60, progress=False)
    try:
        ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
        generate(session, ids, max_new_tokens=8, ignore_eos=True)  # warm up links
        best = None
        for _ in range(repeats):
            stats = session.runtime.stats
            wait0 = stats.network_s
            compute0 = sum(a.compute_s_total for a in session.agents)
            result = generate(session, ids, max_new_tokens=tokens, ignore_eos=True)
            decode_ms = statistics.median(result.token_latency_ms[1:])
            total_s = sum(result.token_latency_ms) / 1e3
            wait_s = stats.network_s - wait0
            agent_s = sum(a.compute_s_total for a in session.agents) - compute0
            row = {"decode_ms": decode_ms,
                   "base_ms": (total_s - wait_s) / tokens * 1e3,
                   "gather_ms": wait_s / tokens * 1e3,
                   "agent_compute_ms": agent_s / tokens * 1e3}
            if best is None or row["decode_ms"] < best["decode_ms"]:
                best = row
        return best
    finally:
        session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint folder (default: make one)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--pin", action="store_true",
                        help="agents on the last CPU, the base station on the others")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the agents, the base "
                        "station and the local run all use it (the CUDA paths on a GPU box)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="compute and wire dtype (bfloat16 on a GPU)")
    parser.add_argument("--floor-only", action="store_true",
                        help="time only local transformers and the bare pyzmq floor")
    args = parser.parse_args()
    DEVICE.update(device=args.device, dtype=args.dtype)
    cpus = split_cpus(args.pin)
    torch.set_num_threads(1)  # the agents get the other core's share
    scratch = tempfile.mkdtemp(prefix="bench-decode-")
    procs: list[subprocess.Popen] = []
    try:
        checkpoint = args.model
        if checkpoint is None:
            from testbed.models.make_model import ModelSpec, make_model

            checkpoint = os.path.join(scratch, "model")
            make_model(checkpoint, ModelSpec(layers=args.layers, hidden=args.hidden,
                                             intermediate=args.intermediate, heads=8,
                                             kv_heads=2, vocab=2048))
        from shard_tool.split import split

        shards = os.path.join(scratch, "shards")
        manifest = split(checkpoint, shards)
        experts = manifest.num_experts
        local_ms = local_per_token_ms(checkpoint, args.tokens, args.repeats)
        traffic = DecodeTraffic.from_model(manifest.model, experts, args.dtype)
        floor_ms = floor_per_token_ms(traffic, experts, cpus, args.tokens, args.repeats)
        dist = single = None
        if not args.floor_only:
            procs, flags = start_agents(shards, [str(e) for e in range(experts)], cpus)
            dist = distributed(shards, flags, args.tokens, args.repeats)
            stop(procs)
            # The same run with one agent process hosting every expert: what the protocol
            # costs when the machine is not also juggling one process per expert.
            procs, flags = start_agents(shards, [f"0-{experts - 1}"], cpus)
            single = distributed(shards, flags, args.tokens, args.repeats)
    finally:
        stop(procs)
        shutil.rmtree(scratch, ignore_errors=True)
    report(manifest.model, args, cpus, local_ms, floor_ms, traffic, dist, single)


def report(model: dict, args: argparse.Namespace, cpus: set[int] | None, local_ms: float,
           floor_ms: float, traffic: DecodeTraffic, dist: dict | None, single: dict | None
           ) -> None:
    print(f"model: {model['num_layers']} layers, hidden {model['hidden_size']}, ffn "
          f"{model['ffn_size']}, {model['num_experts']} experts top-{model['top_k']}, "
          f"{model['dtype']}; {args.tokens} new tokens, median decode step, best of "
          f"{args.repeats}; {'agents pinned to CPU ' + str(min(cpus)) if cpus else 'not pinned'}")
    print(f"local transformers      {local_ms:8.2f} ms/token")
    print(f"bare pyzmq floor        {floor_ms:8.2f} ms/token   ({model['num_experts']} echo "
          f"processes; {traffic.rounds} rounds x {traffic.fanout} of them, {HEADER_BYTES} + "
          f"{traffic.payload_bytes} B each way, {traffic.dtype})")
    if dist is None:
        return
    print(f"distributed (8 agents)  {dist['decode_ms']:8.2f} ms/token   "
          f"{dist['decode_ms'] / local_ms:.2f}x local")
    print(f"  base-station compute  {dist['base_ms']:8.2f} ms/token (mean)")
    print(f"  gather wait           {dist['gather_ms']:8.2f} ms/token "
          f"(network + agents; agents report {dist['agent_compute_ms']:.2f} ms of compute, "
          f"summed over agents)")
    print(f"  (distributed - local) / floor  {(dist['decode_ms'] - local_ms) / floor_ms:.2f}")
    print(f"distributed (1 agent)   {single['decode_ms']:8.2f} ms/token   "
          f"{single['decode_ms'] / local_ms:.2f}x local   (all experts in one agent process; "
          f"base station {single['base_ms']:.2f}, gather {single['gather_ms']:.2f} ms/token)")


if __name__ == "__main__":
    main()

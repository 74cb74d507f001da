"""Expert-wise bitwidths: per-call expert time and memory at 16/8/4 bits, ratios against 16 bits
in the same run; with --quality, held-out perplexity through real agents at 16/8/4/auto.

Per call = what an agent does for one request: one expert's FFN at one layer on T tokens
(edge_agent.expert_math.expert_forward on the weights edge_agent.shards.load_experts holds).
Calls cycle over every expert and layer (so weights are as cold as an agent's are between its
turns) and alternate between the widths call by call, so all see the same machine state. Memory:
bytes the loaded weights hold (the dequantising scratch included) and the resident-set growth
of a fresh process that loads every expert.

    .venv/bin/python bench/quant.py [--model testbed/data/tiny-mixtral] [--tokens 1,16,256]
        [--kernels auto|on|off] [--device cpu|cuda --dtype float32|bfloat16]
    .venv/bin/python bench/quant.py --quality [--tolerance 0.05] [--eval-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
DEFAULT_MODEL = os.path.join(REPO_ROOT, "testbed", "data", "tiny-mixtral")
HELDOUT = os.path.join(REPO_ROOT, "testbed", "data", "heldout-sample.txt")
WIDTHS = (16, 8, 4)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child_memory(shards: str, device: str, dtype: str, kernels: str) -> None:
    """--child: load every expert in this fresh process, print JSON of what it costs."""
    from edge_agent.shards import load_experts
    from shard_tool.manifest import load_manifest

    experts = list(range(load_manifest(shards).num_experts))
    before = rss_bytes()
    loaded = load_experts(shards, experts, device=device, dtype=dtype, quant_kernels=kernels)
    print(json.dumps({"rss_growth": rss_bytes() - before, "held": loaded.weight_bytes,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def memory(shards: str, args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", shards, "--device", args.device,
                          "--dtype", args.dtype, "--kernels", args.kernels],
                         capture_output=True, text=True, check=True, cwd=REPO_ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_calls(loaded: dict, tokens: int, calls: int, device: torch.device) -> dict[int, float]:
    """Median µs per expert call at each width, calls interleaved across widths."""
    from edge_agent.expert_math import expert_forward

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pairs = {b: [(q, layer) for q in L.experts for layer in L.moe_layers]
             for b, L in loaded.items()}
    any_loaded = next(iter(loaded.values()))
    x = torch.randn(tokens, any_loaded.hidden_size, device=device, dtype=any_loaded.dtype)
    samples: dict[int, list[float]] = {b: [] for b in loaded}
    with torch.inference_mode():
        for b, experts in loaded.items():  # warm-up: one pass over every expert and layer
            for q, layer in pairs[b]:
                expert_forward(x, experts.weights[q][layer])
        sync()
        for i in range(calls):
            for b, experts in loaded.items():
                q, layer = pairs[b][i % len(pairs[b])]
                start = time.perf_counter()
                expert_forward(x, experts.weights[q][layer])
                sync()
                samples[b].append(time.perf_counter() - start)
    return {b: statistics.median(s) * 1e6 for b, s in samples.items()}


def speed(args) -> None:
    from edge_agent.shards import load_experts
    from shard_tool.split import split

    torch.set_num_threads(args.threads)
    scratch = tempfile.mkdtemp(prefix="bench-quant-")
    try:
        splits, sizes = {}, {}
        for bits in WIDTHS:
            splits[bits] = os.path.join(scratch, f"s{bits}")
            manifest = split(args.model, splits[bits], bits=bits)
            sizes[bits] = sum(e.bytes for e in manifest.files if e.role == "expert")
        mem = {bits: memory(splits[bits], args) for bits in WIDTHS}
        loaded = {bits: load_experts(splits[bits], list(range(manifest.num_experts)),
                                     device=args.device, dtype=args.dtype,
                                     quant_kernels=args.kernels) for bits in WIDTHS}
        device = loaded[16].device
        print(f"model {args.model}: {len(manifest.moe_layers)} MoE layers x "
              f"{manifest.num_experts} experts, hidden {manifest.model['hidden_size']}, ffn "
              f"{manifest.model['ffn_size']}, checkpoint {manifest.model['dtype']}; compute "
              f"{loaded[16].dtype} on {device}, {args.threads} thread(s), kernels {args.kernels}")
        for bits in (8, 4):
            for choice in loaded[bits].kernels.values():
                print(f"  {bits} bits: {choice.note}")
        print(f"\n{'':24}" + "".join(f"{str(b) + ' bits':>14}" for b in WIDTHS))
        print(f"{'expert shards, bytes':24}" + "".join(f"{sizes[b]:>14,}" for b in WIDTHS))
        print(f"{'  vs 16 bits':24}" + "".join(f"{sizes[b] / sizes[16]:>13.3f}x" for b in WIDTHS))
        print(f"{'held in memory, bytes':24}" + "".join(f"{mem[b]['held']:>14,}" for b in WIDTHS))
        print(f"{'  vs 16 bits':24}" + "".join(f"{mem[b]['held'] / mem[16]['held']:>13.3f}x"
                                                for b in WIDTHS))
        print(f"{'RSS growth at load':24}" + "".join(f"{mem[b]['rss_growth']:>14,}"
                                                     for b in WIDTHS))
        print(f"{'  vs 16 bits':24}" + "".join(
            f"{mem[b]['rss_growth'] / mem[16]['rss_growth']:>13.3f}x" for b in WIDTHS))
        for tokens in args.tokens:
            times = time_calls(loaded, tokens, args.calls, device)
            print(f"{'us per call, ' + str(tokens) + ' tok':24}" +
                  "".join(f"{times[b]:>14.1f}" for b in WIDTHS))
            print(f"{'  vs 16 bits':24}" + "".join(f"{times[b] / times[16]:>13.3f}x"
                                                    for b in WIDTHS))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def start_agents(shards: str, groups: list[str], args) -> tuple[list, list[str]]:
    """One agent process per group of expert ids; returns them and the roster flags."""
    procs, flags = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for group in groups:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "--expert", group, "--shards", shards,
             "--bind", "tcp://127.0.0.1:*", "--device", args.device, "--dtype", args.dtype],
            stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env))
    for group, proc in zip(groups, procs):
        line = proc.stdout.readline()  # "edge_agent ready: serving tcp://… …"
        if "serving" not in line:
            raise SystemExit(f"agent {group} did not start: {line!r}")
        flags.append(f"{group}={line.split('serving ')[1].split()[0]}")
    return procs, flags


def stop(procs: list) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=20)


def quality(args) -> None:
    """Held-out perplexity through the distributed path (two real agents) at each width."""
    from basestation.session import build_roster, open_session
    from shard_tool.search import describe
    from shard_tool.split import bits_request, split
    from shard_tool.verify import bits_table
    from testbed.experiments.pass_counts import counted
    from testbed.models.quality import score_tokens

    with open(HELDOUT) as f:
        text = f.read()
    scratch = tempfile.mkdtemp(prefix="bench-quant-q-")
    rows = []
    try:
        for label in ("16", "8", "4", "auto"):
            shards = os.path.join(scratch, label)
            request = bits_request(label, args.tolerance if label == "auto" else None,
                                   args.calibration if label == "auto" else None)
            started = time.perf_counter()

            def show(result):
                print(bits_table(result.widths))
                print(describe(result), flush=True)

            manifest = split(args.model, shards, bits=request, on_search=show)
            split_s = time.perf_counter() - started
            experts = manifest.num_experts
            procs, flags = start_agents(shards, [f"0-{experts // 2 - 1}",
                                                 f"{experts // 2}-{experts - 1}"], args)
            try:
                session = open_session(shards, build_roster(flags, None, None),
                                       dtype=args.dtype, device=args.device, wait_s=60,
                                       progress=False)
                try:  # what the scoring lost (an altered perplexity says so)
                    with counted(session.runtime.stats) as counts:
                        score = score_tokens(session.base.model, session.base.tokenizer, text,
                                             max_tokens=args.eval_tokens)
                finally:
                    session.close()
            finally:
                stop(procs)
            expert_bytes = sum(e.bytes for e in manifest.files if e.role == "expert")
            rows.append((label, expert_bytes, score, counts))
            print(f"{label:>5} bits: experts {expert_bytes:,} bytes, perplexity "
                  f"{score.perplexity:.3f}, top-1 {score.accuracy:.4f} ({score.tokens} tokens), "
                  f"experts dropped {counts['experts_dropped']} (fault drops "
                  f"{counts['fault_drops']}), split {split_s:.1f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base_bytes, base = rows[0][1], rows[0][2]
    print(f"\n{'bits':>5} {'expert shards':>14} {'vs 16':>7} {'perplexity':>11} {'vs 16':>8} "
          f"{'top-1':>7} {'fault drops':>12}")
    for label, expert_bytes, score, counts in rows:
        print(f"{label:>5} {expert_bytes:>14,} {expert_bytes / base_bytes:>6.3f}x "
              f"{score.perplexity:>11.3f} {100 * (score.perplexity / base.perplexity - 1):>+7.2f}% "
              f"{score.accuracy:>7.4f} {counts['fault_drops']:>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", default="1,16,256",
                        type=lambda s: [int(t) for t in s.split(",")])
    parser.add_argument("--calls", type=int, default=600, help="timed calls per width and size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (agents: 1)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--tolerance", default="0.05", help="--quality: auto's tolerance, %%")
    parser.add_argument("--calibration", default=None, help="--quality: auto's calibration text")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_memory(args.child, args.device, args.dtype, args.kernels)
    elif args.quality:
        quality(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()

"""Memory-budgeted agents: hit rate, misses, stall per token and decode speed with a budget of
half the layer-experts, with and without prefetch hints, against unbudgeted agents in the same
run (issue 14, "Memory budget and preloading").

Two agents per setting (experts 0-3 and 4-7 of the trained tiny model, float32 on the CPU, one
thread each): unbudgeted; with `--memory-budget` = FRACTION of the bytes their layer-experts
take in memory, loading from the page cache as it is; and the same on emulated slow storage
(`--pace-load-mb-per-s`, an SD card or eMMC of a small box), each budgeted pair without and
with hints. A calibration generation first teaches the base station's predictor (and warms
every agent); then each round decodes TOKENS greedy tokens in each setting, the settings taking
turns, so all see the same machine. Hit rate, misses and stall come from the agents' own counters
(`info` memory_budget, before and after each run); stall per token sums both agents' stalls;
tokens/s counts decode steps only (the first token, with the prefill, is left out). "+ hints"
is the default: an agent whose loads cost no waiting on storage declines hints (info
memory_budget prefetch false, edge_agent/residency.py HINT_LOAD_RATIO) and gets none.

    .venv/bin/python bench/expert_cache.py [--model testbed/data/tiny-mixtral] [--tokens 64]
        [--rounds 3] [--fraction 0.5] [--storage-mb-per-s 400]
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

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
DEFAULT_MODEL = os.path.join(REPO_ROOT, "testbed", "data", "tiny-mixtral")
CALIBRATION = ("The queue module implements multi-producer, multi-consumer queues. It is "
               "especially useful in threaded programming when information must be exchanged "
               "safely between multiple threads.")
PROMPT = "Return the list of items in the queue."
GROUPS = ("0-3", "4-7")
COUNTERS = ("hits", "misses", "stall_s", "loads", "evictions", "hinted_hits", "hinted_loads")


def start_agents(shards: str, budget_bytes: int | None, storage_mb_per_s: float = 0.0
                 ) -> list[subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    extra = ["--memory-budget", str(budget_bytes)] if budget_bytes else []
    if storage_mb_per_s:
        extra += ["--pace-load-mb-per-s", str(storage_mb_per_s)]
    return [subprocess.Popen([sys.executable, "-m", "edge_agent", "--expert", group, "--shards",
                              shards, "--bind", "tcp://127.0.0.1:*", "--device", "cpu",
                              "--dtype", "float32", "--no-self-benchmark", *extra],
                             stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env)
            for group in GROUPS]


def roster_flags(procs: list[subprocess.Popen]) -> list[str]:
    flags = []
    for group, proc in zip(GROUPS, procs):
        line = proc.stdout.readline()  # "edge_agent ready: serving tcp://… …"
        if "serving" not in line:
            raise SystemExit(f"agent {group} did not start: {line!r}")
        flags.append(f"{group}={line.split('serving ')[1].split()[0]}")
    return flags


def counters(session) -> dict:
    """The budgeted agents' counters, summed (zeros for unbudgeted ones)."""
    total = dict.fromkeys(COUNTERS, 0.0)
    for agent in session.agents:
        for attempt in range(3):  # a reply lost on a busy box: ask again
            try:
                budget = session.client.info(agent.peer).get("memory_budget") or {}
                break
            except TimeoutError:
                if attempt == 2:
                    raise
        for key in COUNTERS:
            total[key] += budget.get(key, 0)
    return total


def decode(session, ids, tokens: int) -> dict:
    from basestation.generate import generate

    before = counters(session)
    result = generate(session, ids, max_new_tokens=tokens, ignore_eos=True, theta=0.0)
    after = counters(session)
    figures = {key: after[key] - before[key] for key in COUNTERS}
    figures["decode_s"] = sum(result.token_latency_ms[1:]) / 1e3
    figures["steps"] = len(result.token_ids) - 1
    figures["token_ids"] = result.token_ids
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.5,
                        help="budget as a share of the agent's layer-experts' bytes")
    parser.add_argument("--storage-mb-per-s", type=float, default=400.0,
                        help="the emulated storage's read speed (MB/s)")
    parser.add_argument("--min-probability", type=float, default=None,
                        help="hint experts at least this likely (default: PrefetchConfig's)")
    args = parser.parse_args()

    import torch

    from basestation.session import build_roster, open_session
    from shard_tool.split import split

    torch.set_num_threads(1)
    scratch = tempfile.mkdtemp(prefix="bench-expert-cache-")
    procs: list[subprocess.Popen] = []
    sessions = {}
    try:
        started_s = time.perf_counter()
        shards = os.path.join(scratch, "shards")
        manifest = split(args.model, shards)
        hidden, ffn = int(manifest.model["hidden_size"]), int(manifest.model["ffn_size"])
        layers = len(manifest.moe_layers)
        unit_bytes = 3 * hidden * ffn * 4  # one expert at one layer, float32 in memory
        units = layers * manifest.num_experts // len(GROUPS)
        budget = int(args.fraction * units * unit_bytes)
        started = {"full": start_agents(shards, None), "budget": start_agents(shards, budget),
                   "slow": start_agents(shards, budget, args.storage_mb_per_s)}
        procs = [proc for pair in started.values() for proc in pair]
        flags = {name: roster_flags(pair) for name, pair in started.items()}
        # one session open at a time, each setting's route table living on across its sessions
        # (several at once lost replies to a race in the client guard's counters, since fixed:
        # peer_limits' buffers are per thread)
        from basestation.prefetch import PrefetchConfig, RoutePredictor

        predictors = {name: RoutePredictor(manifest.num_experts) for name in flags}
        config = PrefetchConfig(args.min_probability) if args.min_probability is not None \
            else PrefetchConfig()

        def run(name: str, hints: bool | None, prompt) -> dict:
            session = open_session(shards, build_roster(flags[name], None, None),
                                   dtype="float32", device="cpu", wait_s=60, progress=False)
            sessions[name] = session
            try:
                session.runtime.set_prefetch(bool(hints), predictor=predictors[name],
                                             config=config)
                return decode(session, prompt, args.tokens)
            finally:
                session.close()
                del sessions[name]

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        calibration = tokenizer(CALIBRATION, return_tensors="pt").input_ids
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        print(f"model {args.model}: {layers} MoE layers x {manifest.num_experts} experts, "
              f"hidden {hidden}, ffn {ffn}; 2 agents x {units} layer-experts of "
              f"{unit_bytes:,} bytes (float32, CPU, 1 thread)")
        print(f"budget {budget:,} bytes per agent = {budget // unit_bytes} of {units} "
              f"layer-experts ({args.fraction:g} of {units * unit_bytes:,}); "
              f"emulated storage {args.storage_mb_per_s:g} MB/s ("
              f"{unit_bytes / 2 / args.storage_mb_per_s / 1e3:.2f} ms a load); "
              f"{args.tokens} tokens x {args.rounds} rounds; setup "
              f"{time.perf_counter() - started_s:.1f} s", flush=True)
        for name in ("budget", "slow"):  # each agent's own call (info memory_budget)
            session = open_session(shards, build_roster(flags[name], None, None),
                                   dtype="float32", device="cpu", wait_s=60, progress=False)
            budgets = [agent.info["memory_budget"] for agent in session.agents]
            print(f"{name}: agents take hints {[b.get('prefetch') for b in budgets]} (a load "
                  f"{[b.get('load_ms') for b in budgets]} ms, of it CPU "
                  f"{[b.get('load_cpu_ms') for b in budgets]} ms); the base station hints "
                  f"{len(session.runtime.budgeted_agents())} of them")
            session.close()
        for name in flags:  # calibration: the predictor learns, caches warm
            run(name, True, calibration)
        settings = {"unbudgeted": ("full", None), "budget, no hints": ("budget", False),
                    "budget + hints": ("budget", True), "slow, no hints": ("slow", False),
                    "slow + hints": ("slow", True)}
        runs: dict[str, list[dict]] = {name: [] for name in settings}
        for _ in range(args.rounds):
            for name, (session_name, hints) in settings.items():
                runs[name].append(run(session_name, hints, ids))
        full_rate = sum(r["steps"] for r in runs["unbudgeted"]) / \
            sum(r["decode_s"] for r in runs["unbudgeted"])
        same = all(r["token_ids"] == runs["unbudgeted"][0]["token_ids"]
                   for rs in runs.values() for r in rs)
        print(f"\n{'setting':<18} {'hit rate':>9} {'misses/tok':>11} {'loads/tok':>10} "
              f"{'stall ms/tok':>13} {'tokens/s':>9} {'median':>8} {'vs unbudgeted':>14}")
        for name, rs in runs.items():
            hits, misses = sum(r["hits"] for r in rs), sum(r["misses"] for r in rs)
            steps = sum(r["steps"] for r in rs)
            rate = steps / sum(r["decode_s"] for r in rs)
            median = statistics.median(r["steps"] / r["decode_s"] for r in rs)
            hit_rate = f"{hits / (hits + misses):.3f}" if hits + misses else "-"
            print(f"{name:<18} {hit_rate:>9} {misses / steps:>11.2f} "
                  f"{sum(r['loads'] for r in rs) / steps:>10.2f} "
                  f"{sum(r['stall_s'] for r in rs) * 1e3 / steps:>13.3f} {rate:>9.1f} "
                  f"{median:>8.1f} {rate / full_rate:>13.3f}x")
        for name in ("budget + hints", "slow + hints"):
            hinted = runs[name]
            print(f"{name}: {sum(r['hinted_loads'] for r in hinted):.0f} layer-experts loaded "
                  f"on hints, {sum(r['hinted_hits'] for r in hinted):.0f} of them used")
        print(f"greedy tokens "
              f"equal in every setting: {'yes' if same else 'NO'}; total "
              f"{time.perf_counter() - started_s:.1f} s")
    finally:
        for session in list(sessions.values()):
            session.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

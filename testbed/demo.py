"""`testbed demo` (`make demo`): the whole path on loopback, in about a minute.

Makes (or reuses) a small Mixtral, splits it, starts one agent process per expert (the busiest
expert's behind a 20 ms delay, a slow box), and generates the same prompt at several θ, printing what the
base station measured. Shaped links in namespaces and θ sweeps with quality figures come with the
testbed's link issue; this is the part that exists.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time

from basestation.generate import generate
from basestation.session import build_roster, open_session
from shard_tool.split import split
from testbed.make_model import ModelSpec, make_model

PROMPT = "Return a list of the items in the queue."
SLOW_DELAY_S = 0.02
AGENT_START_TIMEOUT_S = 120


def busiest_expert(model_dir: str, prompt: str) -> int:
    """The expert the router picks most for this prompt (counted with transformers locally):
    the one to put behind the slow link, so the link matters."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model(ids, output_router_logits=True)
    top_k = model.config.num_experts_per_tok
    picks = torch.cat([logits.topk(top_k, dim=-1).indices.reshape(-1)
                       for logits in out.router_logits])
    return int(torch.bincount(picks, minlength=model.config.num_local_experts).argmax())


def start_agents(shards: str, experts: int, slow_expert: int
                 ) -> tuple[list[subprocess.Popen], list[str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for expert in range(experts):
        fault = ["--fault", f"delay={SLOW_DELAY_S}"] if expert == slow_expert else []
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "--expert", str(expert), "--shards", shards,
             "--bind", "tcp://127.0.0.1:*", *fault],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env))
    flags = []
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    for expert, proc in enumerate(procs):
        line = proc.stdout.readline() if time.monotonic() < deadline else ""
        if "serving " not in line:
            raise RuntimeError(f"agent for expert {expert} did not start")
        flags.append(f"{expert}={line.split('serving ')[1].split()[0]}")
    return procs, flags


def run_demo(out: str, thetas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3),
             max_new_tokens: int = 24) -> int:
    model_dir, shards = os.path.join(out, "model"), os.path.join(out, "shards")
    if not os.path.exists(model_dir):
        print(f"making a small random Mixtral in {model_dir}")
        make_model(model_dir, ModelSpec(layers=4, hidden=128, intermediate=256, vocab=1024))
    print(f"splitting into {shards}")
    manifest = split(model_dir, shards, force=True)
    slow_expert = busiest_expert(model_dir, PROMPT)
    print(f"starting {manifest.num_experts} agents on loopback (expert {slow_expert}, the "
          f"router's favourite for this prompt, behind a {SLOW_DELAY_S * 1e3:.0f} ms delay)")
    procs, flags = start_agents(shards, manifest.num_experts, slow_expert)
    try:
        session = open_session(shards, build_roster(flags, None, None), wait_s=60,
                               progress=False)
        try:
            ids = session.base.tokenizer(PROMPT, return_tensors="pt").input_ids
            generate(session, ids, max_new_tokens=8, ignore_eos=True)  # learn the links
            print(f"\nprompt: {PROMPT!r}, {max_new_tokens} new tokens, greedy\n")
            print(f"{'theta':>5} {'median ms':>9} {'p95 ms':>7} {'dropped':>8} "
                  f"{'slow-box drops':>14}  agreement with theta=0")
            reference = None
            for theta in thetas:
                session.dispatcher.theta = theta
                slow = session.dispatcher.owner[slow_expert]
                slow_before = slow.drops
                result = generate(session, ids, max_new_tokens=max_new_tokens, ignore_eos=True)
                decode = sorted(result.token_latency_ms[1:])
                p95 = decode[int(0.95 * (len(decode) - 1))]
                reference = reference or result.token_ids
                agree = sum(a == b for a, b in zip(result.token_ids, reference)) / len(reference)
                considered = result.expert_calls + result.experts_dropped
                print(f"{theta:>5.2f} {statistics.median(decode):>9.2f} {p95:>7.2f} "
                      f"{100 * result.experts_dropped / considered:>7.1f}% "
                      f"{slow.drops - slow_before:>14}  {100 * agree:.0f} %")
        finally:
            session.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print("\nagents stopped. Random weights: agreement shows what dropping changes, not quality.")
    return 0

"""`testbed demo` (`make demo`): the project's main job, on one machine, in about three minutes.

The trained tiny model (or a small random one when it is missing), split; 8 agents, one per
expert, each in its own network namespace behind the `paper` scenario's links, emulating
Mixtral-8x7B on Jetson-class boxes (root, or an unprivileged user namespace; loopback agents
without shaping only where neither works); `testbed eval` at θ = 0, 0.1, 0.2, 0.3: token latency
measured and modeled, with intervals, a multiple-choice task scored by lm-eval through the
distributed model, and KL(θ=0 || θ) and top-1 agreement with θ = 0 over held-out text, with
intervals (16 items cannot rank θs; 1,008 next-token distributions can); the table, the
figure, and everything torn down. Then the shared cell (issue 23): the same 8 agents' links
through one 20 MHz cell, `static`, `shared` and `joint` interleaved at θ = 0 over fewer
prompts and tokens (latency only), and their table.
"""

from __future__ import annotations

import os

from shard_tool.split import split
from testbed.experiments.cpu_share import base_station_threads
from testbed.experiments.eval_report import draw, markdown, policy_table, write_tables
from testbed.experiments.evaluate import LATENCY_PROMPTS, EvalConfig, run_eval
from testbed.experiments.report import read_results
from testbed.experiments.report_page import write_report_html
from testbed.models.make_model import ModelSpec, make_model

TESTBED_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # testbed/

DATA_DIR = os.path.join(TESTBED_DIR, "data")
TRAINED_MODEL = os.path.join(DATA_DIR, "tiny-mixtral")
DEMO_THETAS = (0.0, 0.1, 0.2, 0.3)
DEMO_MC_ITEMS = 16  # lm-eval items per θ: enough to show the path, not to rank θs (see README)
DEMO_TOKENS = 24
CELL_POLICIES = ("static", "shared", "joint")
CELL_BANDWIDTH_HZ = 20e6  # the 20 MHz: where the policies differ most
CELL_PROMPTS = 4  # x CELL_TOKENS per policy: the cell's table in well under a minute
CELL_TOKENS = 10


def run_demo(out: str, scenario: str = "paper") -> int:
    # our tasks read testbed/data: nothing to download, and nothing may be
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(TRAINED_MODEL, "config.json")):
        model_dir = TRAINED_MODEL
        print(f"model: the trained tiny Mixtral ({model_dir})")
    else:
        model_dir = os.path.join(out, "model")
        if not os.path.exists(model_dir):
            make_model(model_dir, ModelSpec(layers=4, hidden=128, intermediate=256, vocab=1024))
        print(f"model: a small random Mixtral ({model_dir}); quality figures mean nothing")
    shards = os.path.join(out, "shards")
    manifest = split(model_dir, shards, force=True)
    print(f"split into {shards} (fingerprint {manifest.fingerprint[:16]})")
    results_dir = os.path.join(out, "eval")
    if os.path.exists(os.path.join(results_dir, "results.jsonl")):
        os.remove(os.path.join(results_dir, "results.jsonl"))
    print(f"eval: scenario {scenario}, θ = {', '.join(map(str, DEMO_THETAS))}, "
          f"{manifest.num_experts} agents")
    run_eval(EvalConfig(shards=shards, out=results_dir, scenario=scenario, thetas=DEMO_THETAS,
                        tasks=("wdmoe_mc_heldout",), limit=DEMO_MC_ITEMS,
                        max_new_tokens=DEMO_TOKENS))
    rows = sorted(read_results(results_dir), key=lambda r: r["theta"])
    print()
    print(markdown(rows))
    for path in write_tables(results_dir) + draw(results_dir) + [write_report_html(results_dir)]:
        print(f"wrote {path}")
    print(f"records: {os.path.join(results_dir, 'results.jsonl')}")
    print()
    print(cell_table(shards, os.path.join(out, "cell"), scenario, manifest.num_experts))
    print(serve_hint(shards, manifest.num_experts))
    return 0


def cell_table(shards: str, results_dir: str, scenario: str, num_agents: int) -> str:
    """The shared cell's three policies at θ = 0 (latency only), as a markdown table."""
    if os.path.exists(os.path.join(results_dir, "results.jsonl")):
        os.remove(os.path.join(results_dir, "results.jsonl"))
    print(f"shared cell: {CELL_BANDWIDTH_HZ / 1e6:g} MHz, {', '.join(CELL_POLICIES)} "
          f"interleaved, {CELL_PROMPTS} prompts x {CELL_TOKENS} tokens each, θ = 0")
    run_eval(EvalConfig(shards=shards, out=results_dir, scenario=scenario, thetas=(0.0,),
                        tasks=(), prompts=LATENCY_PROMPTS[:CELL_PROMPTS],
                        max_new_tokens=CELL_TOKENS, num_agents=num_agents,
                        divergence_text=None, bandwidth=CELL_POLICIES,
                        total_bandwidth_hz=CELL_BANDWIDTH_HZ))
    rows = read_results(results_dir)
    return "\n".join([f"### shared cell, {CELL_BANDWIDTH_HZ / 1e6:g} MHz ({scenario})", "",
                      policy_table(rows), "", f"records: {results_dir}/results.jsonl"])


def serve_hint(shards: str, num_agents: int) -> str:
    """How to serve the demo's model to OpenAI clients behind the same links, and one request."""
    roster = os.path.join(os.path.dirname(os.path.abspath(shards)), "roster.toml")
    return (
        "\nserve it to OpenAI clients behind the paper's links (Ctrl-C stops serve; "
        "`testbed down` removes the links):\n"
        f"  .venv/bin/testbed up --shards {shards} --agents {num_agents} --scenario paper "
        f"--roster {roster}\n"
        f"  .venv/bin/basestation serve --shards {shards} --agents {roster} --port 8000 "
        f"--threads {base_station_threads(num_agents)}\n"
        "  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' "
        "-d '{\"model\": \"shards\", \"messages\": [{\"role\": \"user\", \"content\": "
        "\"What does the queue module do?\"}], \"max_tokens\": 32, \"theta\": 0.2}'")

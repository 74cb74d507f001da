"""`testbed demo` (`make demo`): the project's main job, on one machine, in a few minutes.

The trained tiny model (or a small random one when it is missing), split; 8 agents, one per
expert, each in its own network namespace behind the `paper` scenario's links (loopback agents
without shaping when not root); a short θ sweep with quality scored through the distributed
model; a table, the figures, and everything torn down.
"""

from __future__ import annotations

import os

from shard_tool.split import split
from testbed.make_model import ModelSpec, make_model
from testbed.report import draw, read_results, table
from testbed.sweep import SweepConfig, run_sweep

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
TRAINED_MODEL = os.path.join(DATA_DIR, "tiny-mixtral")
HELDOUT_TEXT = os.path.join(DATA_DIR, "heldout-sample.txt")
MC_FILE = os.path.join(DATA_DIR, "mc-heldout.jsonl")
DEMO_THETAS = (0.0, 0.1, 0.2, 0.3)


def run_demo(out: str, scenarios: tuple[str, ...] = ("paper", "one-bad-link")) -> int:
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
    results_dir = os.path.join(out, "sweep")
    if os.path.exists(os.path.join(results_dir, "results.jsonl")):
        os.remove(os.path.join(results_dir, "results.jsonl"))
    trained = model_dir == TRAINED_MODEL
    for scenario in scenarios:
        print(f"sweep: scenario {scenario}, θ = {', '.join(map(str, DEMO_THETAS))}, "
              f"{manifest.num_experts} agents")
        run_sweep(SweepConfig(
            shards=shards, out=results_dir, scenario=scenario, thetas=DEMO_THETAS,
            max_new_tokens=16, eval_text=HELDOUT_TEXT if trained else None, eval_tokens=192,
            mc_file=MC_FILE if trained and os.path.exists(MC_FILE) else None, mc_items=30))
    print()
    print(table(read_results(results_dir)))
    for path in draw(results_dir):
        print(f"figure: {path}")
    print(f"records: {os.path.join(results_dir, 'results.jsonl')} (and results.csv)")
    print(serve_hint(shards, manifest.num_experts))
    return 0


def serve_hint(shards: str, num_agents: int) -> str:
    """How to serve the demo's model to OpenAI clients behind the same links, and one request."""
    roster = os.path.join(os.path.dirname(os.path.abspath(shards)), "roster.toml")
    return (
        "\nserve it to OpenAI clients behind the paper's links (Ctrl-C stops serve; "
        "`testbed down` removes the links):\n"
        f"  .venv/bin/testbed up --shards {shards} --agents {num_agents} --scenario paper "
        f"--roster {roster}\n"
        f"  .venv/bin/basestation serve --shards {shards} --agents {roster} --port 8000\n"
        "  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' "
        "-d '{\"model\": \"shards\", \"messages\": [{\"role\": \"user\", \"content\": "
        "\"What does the queue module do?\"}], \"max_tokens\": 32, \"theta\": 0.2}'")

"""`testbed sweep`: θ sweeps through real agents behind shaped links; one record per θ.

For each θ: the prompts are generated through the base station (per-token latency, tokens/s,
experts called and dropped per agent), then quality is scored through the same distributed
model (held-out perplexity, top-1 next-token accuracy, multiple-choice accuracy, KL(θ=0 || θ)
and top-1 agreement with θ = 0 over held-out text by `divergence`, the harness `eval` uses,
and agreement of the generated tokens with θ = 0). Each record keeps what both passes cost in
experts (`passes`: generation as "latency", and "quality"). Records are appended to
results.jsonl as they are made, so Ctrl-C keeps what is done; a CSV is written at the end.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from basestation.generate import generate
from basestation.session import build_roster, open_session
from testbed import scenarios
from testbed.experiments import divergence
from testbed.experiments import pass_counts
from testbed.models import quality
from testbed.experiments.cpu_share import share_with_agents
from testbed.links.control import TestbedError

TESTBED_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # testbed/

DEFAULT_PROMPTS = (
    "The queue module implements",
    "To open a file for reading, use",
    "A dictionary maps keys to",
    "The following example shows how to",
)
HELDOUT_TEXT = os.path.join(TESTBED_DIR, "data",
                            "heldout-sample.txt")
CSV_FIELDS = ("scenario", "backend", "theta", "latency", "tokens", "median_token_ms",
              "p95_token_ms", "mean_token_ms", "tokens_per_s", "expert_calls",
              "experts_dropped", "drop_rate", "fault_drops", "failed_requests",
              "quality_fault_drops", "quality_failed_requests", "perplexity", "top1_accuracy",
              "mc_accuracy", "kl_nats", "agreement", "generated_agreement")


@dataclass(frozen=True)
class SweepConfig:
    shards: str
    out: str
    scenario: str = "uniform"
    thetas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    num_agents: int | None = None  # default: one per expert
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 24
    eval_text: str | None = None  # held-out text to score (perplexity, top-1)
    eval_tokens: int = 256
    mc_file: str | None = None  # JSONL {question, choices, answer}
    mc_items: int = 40
    latency: str = "measured"
    progress: bool = True
    # KL / top-1 agreement with θ = 0 over held-out text (eval_text, else the bundled
    # sample); 0: off
    divergence_tokens: int = divergence.MAX_TOKENS


def code_version() -> str:
    from shard_tool import __version__

    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5, cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{__version__}+{rev}" if rev else __version__


class ScheduleRunner(threading.Thread):
    """Re-applies the scenario's shapes while the sweep runs (flaky links, fading epochs)."""

    def __init__(self, testbed, scenario, num_agents: int,
                 wire_bytes_per_token: float | None = None, start_s: float | None = None):
        super().__init__(daemon=True, name="link-schedule")
        self.testbed, self.scenario, self.num_agents = testbed, scenario, num_agents
        self.wire_bytes_per_token = wire_bytes_per_token  # emulation: see scenarios.shapes_at
        self.start_s = start_s  # the clock the fading epochs count from (default: run())
        self.stop_event = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        start = time.monotonic() if self.start_s is None else self.start_s
        applied = scenarios.shapes_at(self.scenario, self.num_agents, 0.0,
                                      self.wire_bytes_per_token)
        while not self.stop_event.wait(self.scenario.step_s / 2):
            shapes = scenarios.shapes_at(self.scenario, self.num_agents,
                                         time.monotonic() - start, self.wire_bytes_per_token)
            for agent, shape in shapes.items():
                if shape != applied.get(agent):
                    try:
                        self.testbed.degrade(agent, shape)
                    except Exception as e:  # keep the sweep going; the record notes it
                        self.errors.append(f"agent {agent}: {e}")
                    applied[agent] = shape

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=10)


def _quality(model, tokenizer, config: SweepConfig) -> dict:
    out = {}
    if config.eval_text:
        with open(config.eval_text) as f:
            scores = quality.score_tokens(model, tokenizer, f.read(),
                                          max_tokens=config.eval_tokens)
        out.update(perplexity=scores.perplexity, top1_accuracy=scores.accuracy)
    if config.mc_file:
        mc = quality.multiple_choice(model, tokenizer, config.mc_file,
                                     max_items=config.mc_items)
        out.update(mc_accuracy=mc["acc"], mc_accuracy_norm=mc["acc_norm"], mc_items=mc["items"])
    return out


def run_sweep(config: SweepConfig) -> str:
    """Runs the sweep; returns the results.jsonl path. Raises TestbedError, RosterError."""
    from shard_tool.manifest import load_manifest
    from testbed.links import control as links

    manifest = load_manifest(config.shards)
    num_agents = config.num_agents or manifest.num_experts
    scenario = scenarios.load(config.scenario)
    os.makedirs(config.out, exist_ok=True)
    results_path = os.path.join(config.out, "results.jsonl")
    state_dir = os.path.join(config.out, "testbed-state")
    bed = links.up(config.shards, num_agents,
                   scenarios.shapes_at(scenario, num_agents, 0.0), state_dir=state_dir)
    schedule = None
    session = None
    try:
        threads = share_with_agents(num_agents)  # they run on this host
        session = open_session(config.shards, build_roster([], bed.roster_path, None),
                               latency=config.latency, wait_s=60, progress=False)
        if scenario.changes_over_time:
            schedule = ScheduleRunner(bed, scenario, num_agents)
            schedule.start()
        tokenizer = session.base.tokenizer
        prompt_ids = [tokenizer(p, return_tensors="pt").input_ids for p in config.prompts]
        generate(session, prompt_ids[0], max_new_tokens=4, ignore_eos=True)  # learn the links
        reference: list[list[int]] | None = None
        kl_reference = kl_reference_counts = None
        if config.divergence_tokens:
            kl_reference, kl_reference_counts = _divergence_reference(session, config)
        base_record = {"kind": "sweep", "scenario": scenario.name, "backend": bed.backend,
                       "base_station_threads": threads,
                       "fingerprint": manifest.fingerprint, "code_version": code_version(),
                       "latency": config.latency, "agents": num_agents}
        bar = _bar(len(config.thetas), config.progress)
        with open(results_path, "a") as results:
            for theta in config.thetas:
                record = dict(base_record, theta=theta,
                              **_generation_figures(session, prompt_ids, config, bed, theta))
                token_ids = record.pop("_token_ids")
                reference = reference or token_ids
                record["generated_agreement"] = statistics.fmean(
                    quality.sequence_agreement(ref, ids)["position"]
                    for ref, ids in zip(reference, token_ids))
                with pass_counts.quality_pass(session, theta) as counts:
                    record.update(_quality(session.base.model, tokenizer, config))
                    if kl_reference is not None:
                        record["divergence"] = dict(kl_reference.against(session.base.model),
                                                    reference_pass=kl_reference_counts)
                record["passes"]["quality"] = counts
                record["quality_fault_drops"] = counts["fault_drops"]
                record["quality_failed_requests"] = counts["failed_requests"]
                if "divergence" in record:  # flat, for the CSV and the figure
                    record["kl_nats"] = record["divergence"]["kl_nats"]["value"]
                    record["agreement"] = record["divergence"]["top1_agreement"]["value"]
                record["schedule_errors"] = list(schedule.errors) if schedule else []
                record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                results.write(json.dumps(record) + "\n")
                results.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(theta=theta, ms=round(record["median_token_ms"], 2))
        if bar is not None:
            bar.close()
    finally:
        if schedule is not None:
            schedule.stop()
        if session is not None:
            session.close()
        bed.down()
    write_csv(results_path)
    return results_path


def _divergence_reference(session, config: SweepConfig):
    """The θ = 0 next-token distributions over held-out blocks, and what the pass cost."""
    with open(config.eval_text or HELDOUT_TEXT) as f:
        blocks = divergence.heldout_blocks(session.base.tokenizer, f.read(),
                                           max_tokens=config.divergence_tokens)
    with pass_counts.quality_pass(session, 0.0) as counts:
        reference = divergence.Divergence.measure_reference(session.base.model, blocks)
    return reference, counts


def _bar(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sweep", unit="θ", file=sys.stderr)


def _generation_figures(session, prompt_ids, config: SweepConfig, bed, theta: float) -> dict:
    before = {a.name: (a.calls, a.drops, a.failures) for a in session.agents}
    latencies, token_ids = [], []
    with pass_counts.counted(session.runtime.stats) as counts:
        for ids in prompt_ids:
            result = generate(session, ids, max_new_tokens=config.max_new_tokens,
                              ignore_eos=True, theta=theta)
            latencies += result.token_latency_ms[1:]  # decode steps; the first: prefill
            token_ids.append(result.token_ids)
    latencies.sort()
    agents = {}
    for agent in session.agents:
        c0, d0, f0 = before[agent.name]
        agents[agent.name] = {"experts": list(agent.experts), "calls": agent.calls - c0,
                              "drops": agent.drops - d0, "failures": agent.failures - f0,
                              "rtt_ms": round(agent.state.srtt_s * 1e3, 3)}
    total_s = sum(latencies) / 1e3
    return {
        "tokens": len(latencies),
        "median_token_ms": statistics.median(latencies),
        "p95_token_ms": latencies[int(0.95 * (len(latencies) - 1))],
        "mean_token_ms": statistics.fmean(latencies),
        "tokens_per_s": len(latencies) / total_s if total_s else 0.0,
        # the generation pass's ("latency"); the quality pass's are in passes["quality"]
        "expert_calls": counts["expert_calls"], "experts_dropped": counts["experts_dropped"],
        "fault_drops": counts["fault_drops"], "failed_requests": counts["failed_requests"],
        "drop_rate": pass_counts.drop_rate(counts), "passes": {"latency": counts},
        "per_agent": agents, "_token_ids": token_ids,
    }


def write_csv(results_path: str) -> str:
    rows = [json.loads(line) for line in open(results_path) if line.strip()]
    csv_path = os.path.splitext(results_path)[0] + ".csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return csv_path


__all__ = ["SweepConfig", "run_sweep", "write_csv", "TestbedError"]

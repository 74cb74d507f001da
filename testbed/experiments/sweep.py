"""`testbed sweep`: θ sweeps through real agents behind shaped links; one record per θ.

For each θ: the prompts are generated through the base station (per-token latency, tokens/s,
experts called and dropped per agent), then quality is scored through the same distributed
model (held-out perplexity, top-1 next-token accuracy, multiple-choice accuracy, KL(θ=0 || θ)
and top-1 agreement with θ = 0 over held-out text, and agreement of the generated tokens with
θ = 0). Each record keeps what both passes cost in experts (`passes`: generation as "latency",
and "quality"). Agents, links, the θ = 0 reference and results.jsonl are `harness`'s, shared
with `eval`; a CSV is written at the end.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
from dataclasses import dataclass

from basestation.generate import generate
from testbed.experiments import divergence, harness, pass_counts
from testbed.experiments.beds import Placement
from testbed.experiments.harness import DEFAULT_PROMPTS, HELDOUT_TEXT
from testbed.links.control import TestbedError
from testbed.models import quality

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
    placement: Placement | None = None  # the user's agents (--roster, --shape-dev); None: ours


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
    with harness.running(config.shards, config.out, config.scenario, config.num_agents,
                         placement=config.placement, latency=config.latency) as run:
        session = run.session
        prompt_ids = run.tokenize(config.prompts)
        run.warm_up(prompt_ids[0])
        reference: list[list[int]] | None = None
        kl_reference = kl_reference_counts = None
        if config.divergence_tokens:
            kl_reference, kl_reference_counts = harness.reference_pass(
                session, config.eval_text or HELDOUT_TEXT, config.divergence_tokens)
        base_record = dict(run.record("sweep"), latency=config.latency)
        bar = _bar(len(config.thetas), config.progress)
        with run.results() as append:
            for theta in config.thetas:
                record = dict(base_record, theta=theta,
                              **_generation_figures(session, prompt_ids, config, theta))
                token_ids = record.pop("_token_ids")
                reference = reference or token_ids
                record["generated_agreement"] = statistics.fmean(
                    quality.sequence_agreement(ref, ids)["position"]
                    for ref, ids in zip(reference, token_ids))
                with pass_counts.quality_pass(session, theta) as counts:
                    record.update(_quality(session.base.model, session.base.tokenizer, config))
                    if kl_reference is not None:
                        record["divergence"] = harness.divergence_against(
                            session, kl_reference, kl_reference_counts)
                record["passes"]["quality"] = counts
                record["quality_fault_drops"] = counts["fault_drops"]
                record["quality_failed_requests"] = counts["failed_requests"]
                if "divergence" in record:  # flat, for the CSV and the figure
                    record["kl_nats"] = record["divergence"]["kl_nats"]["value"]
                    record["agreement"] = record["divergence"]["top1_agreement"]["value"]
                append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(theta=theta, ms=round(record["median_token_ms"], 2))
        if bar is not None:
            bar.close()
    write_csv(run.results_path)
    return run.results_path


def _bar(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sweep", unit="θ", file=sys.stderr)


def _generation_figures(session, prompt_ids, config: SweepConfig, theta: float) -> dict:
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

"""`testbed sweep`: θ sweeps through real agents behind shaped links; one record per θ.

For each θ: the prompts are generated through the base station (per-token latency, tokens/s,
experts called and dropped per agent), then quality is scored through the same distributed
model (held-out perplexity, top-1 next-token accuracy, multiple-choice accuracy, KL(θ=0 || θ)
and top-1 agreement with θ = 0 over held-out text, and agreement of the generated tokens with
θ = 0). Each record keeps what both passes cost in experts (`passes`: generation as "latency",
and "quality"). Agents, links, the θ = 0 reference and results.jsonl are `harness`'s, shared
with `eval`; a CSV is written at the end.

With `bandwidth` (issue 23: static, shared, joint), our agents run behind one shared cell
(`cell_bed`), at the `[paper]` scenario's emulated wire time and compute; per θ every prompt is
decoded under each policy in turn (the order rotating per prompt), and each (policy, θ) gets a
record carrying `bandwidth`, the cell's shares and the modeled latency of the same steps under
that policy (Eqs. 6-8 at its shares of B). The quality pass runs once per θ, under the first
policy (`quality_bandwidth`): at θ = 0 bandwidth never changes the answer.
"""

from __future__ import annotations

import csv
import hashlib
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

CSV_FIELDS = ("scenario", "backend", "bandwidth", "theta", "latency", "tokens",
              "median_token_ms", "modeled_median_token_ms",
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
    # a shared cell's policies, compared in one interleaved run (() = no cell); a `[paper]`
    # scenario that emulates a model, our own agents
    bandwidth: tuple[str, ...] = ()
    total_bandwidth_hz: float | None = None  # the cell's B (default: the scenario's)


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
    cell_on = bool(config.bandwidth)
    with harness.running(config.shards, config.out, config.scenario, config.num_agents,
                         placement=config.placement, latency=config.latency, emulate=cell_on,
                         cell=cell_on, total_bandwidth_hz=config.total_bandwidth_hz) as run:
        session = run.session
        cell = _open_cell(run) if cell_on else None
        policies = config.bandwidth or (None,)
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
                figures = _generation_figures(session, prompt_ids, config, theta, policies,
                                              cell)
                if cell is not None:  # the quality pass's, charged apart from its record
                    cell.set_policy(policies[0], counted=False)
                with pass_counts.quality_pass(session, theta) as counts:
                    scores = _quality(session.base.model, session.base.tokenizer, config)
                    if kl_reference is not None:
                        scores["divergence"] = harness.divergence_against(
                            session, kl_reference, kl_reference_counts)
                for policy in policies:
                    record = dict(base_record, theta=theta, **figures[policy])
                    token_ids = record.pop("_token_ids")
                    reference = reference or token_ids
                    record["generated_agreement"] = statistics.fmean(
                        quality.sequence_agreement(ref, ids)["position"]
                        for ref, ids in zip(reference, token_ids))
                    if cell is not None:
                        record.update(cell.fields(policy, since_last=True),
                                      quality_bandwidth=policies[0])
                        record["tokens_sha256"] = hashlib.sha256(
                            json.dumps(token_ids).encode()).hexdigest()
                    record.update(scores)
                    record["passes"]["quality"] = counts
                    record["quality_fault_drops"] = counts["fault_drops"]
                    record["quality_failed_requests"] = counts["failed_requests"]
                    if "divergence" in record:  # flat, for the CSV and the figure
                        record["kl_nats"] = record["divergence"]["kl_nats"]["value"]
                        record["agreement"] = record["divergence"]["top1_agreement"]["value"]
                    append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(theta=theta, ms=round(figures[policies[0]]["median_token_ms"],
                                                          2))
        if bar is not None:
            bar.close()
        if cell is not None:
            cell.close()
    write_csv(run.results_path)
    return run.results_path


def _open_cell(run):
    """The cell's policy switch, and the paper's model of each step beside the measured one
    (under the policy in force)."""
    from testbed import scenarios
    from testbed.experiments.cell_bed import CellPolicies
    from testbed.experiments.modeled_latency import ModeledLatency

    paper = run.scenario.paper
    modeled = ModeledLatency(paper, paper.emulate, run.num_agents,
                             len(run.manifest.model.get("moe_layers") or [0]),
                             start_s=run.start_s)
    run.session.runtime.on_selection = modeled
    return CellPolicies(run, scenarios.agent_pacing_us(run.scenario, run.num_agents), modeled)


def _bar(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="sweep", unit="θ", file=sys.stderr)


def _generation_figures(session, prompt_ids, config: SweepConfig, theta: float,
                        policies: tuple = (None,), cell=None) -> dict:
    """Per policy (None: no cell), the generation pass's figures at THETA: every prompt
    decoded under each policy in turn, the order rotating per prompt."""
    before = {p: {a.name: (a.calls, a.drops, a.failures) for a in session.agents}
              for p in policies}
    agents_now = {p: dict.fromkeys(before[p], (0, 0, 0)) for p in policies}
    latencies = {p: [] for p in policies}
    modeled_ms = {p: [] for p in policies}
    token_ids = {p: [] for p in policies}
    counts = {p: pass_counts.zero() for p in policies}
    modeled = session.runtime.on_selection if cell is not None else None
    for i, ids in enumerate(prompt_ids):
        for policy in policies[i % len(policies):] + policies[:i % len(policies)]:
            if cell is not None:
                cell.set_policy(policy)
                modeled.reset()
            start = {a.name: (a.calls, a.drops, a.failures) for a in session.agents}
            with pass_counts.counted(session.runtime.stats) as step_counts:
                result = generate(session, ids, max_new_tokens=config.max_new_tokens,
                                  ignore_eos=True, theta=theta)
            for a in session.agents:  # this policy's share of each agent's counters
                c0, d0, f0 = start[a.name]
                c, d, f = agents_now[policy][a.name]
                agents_now[policy][a.name] = (c + a.calls - c0, d + a.drops - d0,
                                              f + a.failures - f0)
            counts[policy] = pass_counts.add(counts[policy], step_counts)
            latencies[policy] += result.token_latency_ms[1:]  # decode steps; 1st: prefill
            token_ids[policy].append(list(result.token_ids))
            if modeled is not None:
                steps = modeled.step_totals_s()
                modeled_ms[policy] += [1e3 * s for s in steps[1:len(result.token_latency_ms)]]
    return {p: _figures(session, latencies[p], modeled_ms[p], counts[p], agents_now[p],
                        token_ids[p]) for p in policies}


def _figures(session, latencies: list[float], modeled_ms: list[float], counts: dict,
             per_agent: dict, token_ids: list) -> dict:
    latencies = sorted(latencies)
    agents = {a.name: {"experts": list(a.experts), "calls": per_agent[a.name][0],
                       "drops": per_agent[a.name][1], "failures": per_agent[a.name][2],
                       "rtt_ms": round(a.state.srtt_s * 1e3, 3)} for a in session.agents}
    total_s = sum(latencies) / 1e3
    figures = {
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
    if modeled_ms:
        figures["modeled_median_token_ms"] = statistics.median(modeled_ms)
    return figures


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

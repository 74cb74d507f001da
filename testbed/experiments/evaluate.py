"""`testbed eval`: the paper's Table I and Fig. 3 from measurements, per scenario.

Agents come up behind the scenario's shaped links (`harness`, shared with `sweep`; with a
`[paper]` channel that emulates a model: links at that model's wire time, agents paced to its
compute time). For each θ:
- latency: the prompts are decoded through the base station; every decode step's measured
  latency is kept, beside the paper's modeled latency (Eqs. 6-8) of the same step, computed
  from what each token kept on this epoch's channel draw;
- accuracy: lm-eval tasks run through the same distributed model (`lm_eval_model`), with
  lm-eval's standard errors;
- divergence: KL(θ=0 || θ) of the next-token distribution and top-1 agreement with θ = 0 over
  held-out text, with bootstrap intervals (`divergence`): what a few items of accuracy hide.
Each record keeps what every pass cost in experts (`passes`: calls, drops, fault drops,
failed requests, retries; `pass_counts`). With `exact`, a row whose passes lost an expert to a
fault is marked failed (`failed`) instead of passing altered numbers off as fine.
One JSON record per θ goes to results.jsonl as it is made (Ctrl-C keeps what is done); the
table and the figure come from `eval_report`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from basestation.generate import generate
from testbed import scenarios
from testbed.experiments import divergence, harness, pass_counts
from testbed.experiments.beds import Placement
from testbed.experiments.cell_bed import CellPolicies
from testbed.experiments.harness import DEFAULT_PROMPTS, HELDOUT_TEXT, TESTBED_DIR
from testbed.experiments.stats import bootstrap, relative_change
from testbed.experiments.step_waits import StepWaits, observers
from testbed.links.control import TestbedError

TASKS_DIR = os.path.join(TESTBED_DIR, "tasks")
LATENCY_PROMPTS = DEFAULT_PROMPTS + (
    "An exception is raised when",
    "The socket module provides",
    "To install a package, run",
    "A generator function returns",
)


@dataclass(frozen=True)
class EvalConfig:
    shards: str
    out: str
    scenario: str = "paper"
    thetas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)
    tasks: tuple[str, ...] = ("wdmoe_mc_heldout",)
    limit: int | None = None  # items per task (None: all)
    batch_size: int = 8
    prompts: tuple[str, ...] = LATENCY_PROMPTS
    max_new_tokens: int = 24
    num_agents: int | None = None  # default: one per expert
    include_path: str | None = None  # more task YAMLs (ours are always included)
    dtype: str = "auto"
    progress: bool = True
    exact: bool = False  # a row whose passes lost an expert to a fault is marked failed
    divergence_text: str | None = HELDOUT_TEXT  # held-out text for KL / agreement (None: off)
    divergence_tokens: int = divergence.MAX_TOKENS
    placement: Placement | None = None  # the user's agents (--roster, --shape-dev); None: ours
    # a `[paper]` scenario's emulated model: None = on our own agents (wire time and compute);
    # on real boxes only when asked (wire time only: the boxes compute at their own speed)
    emulate: bool | None = None
    # a shared cell's policies, compared in one interleaved run (issue 23; () = no cell):
    # our agents on loopback behind one cell process (cell_bed), a `[paper]` scenario only
    bandwidth: tuple[str, ...] = ()
    total_bandwidth_hz: float | None = None  # the cell's B (default: the scenario's)
    # the `testbed eval` options as parsed, kept in every record (report.html's command line)
    options: tuple[tuple[str, object], ...] = ()

    @property
    def emulating(self) -> bool:
        if self.emulate is not None:
            return self.emulate
        return self.placement is None or self.placement.roster is None


def run_eval(config: EvalConfig) -> str:
    """Runs the evaluation; returns the results.jsonl path. Raises TestbedError, RosterError."""
    if config.bandwidth and config.placement is not None and config.placement.roster:
        raise TestbedError("--bandwidth: not yet on real boxes")
    with harness.running(config.shards, config.out, config.scenario, config.num_agents,
                         emulate=config.emulating, dtype=config.dtype,
                         placement=config.placement, cell=bool(config.bandwidth),
                         total_bandwidth_hz=config.total_bandwidth_hz) as run:
        session, scenario = run.session, run.scenario
        modeled = _modeled(scenario, run.num_agents, run.manifest, run.start_s) \
            if config.emulating else None
        waits = StepWaits(session.runtime.stats, _moe_layers(run.manifest))
        session.runtime.on_selection = observers(modeled, waits)
        prompt_ids = run.tokenize(config.prompts)
        run.warm_up(prompt_ids[0])
        # real boxes compute at their own speed: nothing paces them
        pacing = {} if run.real_boxes or not config.emulating else \
            scenarios.agent_pacing_us(scenario, run.num_agents)
        cell = CellPolicies(run, pacing, modeled) if config.bandwidth else None
        base = dict(run.record("eval"), description=scenario.description,
                    eval_options=dict(config.options) or None,
                    emulated=scenario.paper.emulate.name
                    if config.emulating and scenario.paper and scenario.paper.emulate else None,
                    pace_us={str(a): {"per_call": round(call, 1), "per_token": round(token, 1)}
                             for a, (call, token) in pacing.items()})
        # Latency first, every θ in turn per prompt: a busy machine or a fading epoch then
        # weighs on every θ alike, instead of on whichever θ ran at the time.
        _say(config, f"latency: {len(prompt_ids)} prompts x {config.max_new_tokens} tokens "
                     f"at θ = {', '.join(f'{t:g}' for t in config.thetas)}, interleaved")
        policies = config.bandwidth or (None,)
        samples = _latency_interleaved(session, prompt_ids, config, modeled, waits,
                                       policies, cell.set_policy if cell else None)
        if cell is not None:  # the quality passes run under the first policy (θ > 0: joint
            cell.set_policy(policies[0])  # selects otherwise), as the records say
        reference = reference_counts = None
        if config.divergence_text:
            _say(config, f"divergence: θ = 0 reference over {config.divergence_tokens} "
                         "held-out tokens")
            reference, reference_counts = reference_pass(session, config)
        with run.results() as append:
            for theta in config.thetas:
                quality, quality_counts = quality_pass(session, config, theta, reference,
                                                       reference_counts)
                for policy in policies:
                    row = dict(base, theta=theta, exact=config.exact)
                    if cell is not None:
                        row.update(cell.fields(policy), quality_bandwidth=policies[0])
                        # the tokens of every prompt, as a digest: at θ = 0 every policy's
                        # must be the same (bandwidth changes time, never the answer)
                        row["tokens_sha256"] = hashlib.sha256(json.dumps(
                            samples[(policy, theta)]["token_ids"]).encode()).hexdigest()
                    # with a cell: against the first policy at this θ; else the first θ
                    first = samples[(policies[0], theta)] if cell is not None else \
                        samples[(None, config.thetas[0])]
                    append(make_record(row, samples[(policy, theta)], first, quality,
                                       quality_counts))
        if cell is not None:
            cell.close()
    return run.results_path


def make_record(base: dict, sample: dict, first: dict, quality: dict,
                quality_counts: dict) -> dict:
    """One θ's record: BASE, the latency figures of SAMPLE and their change against FIRST
    (the first θ's sample), the quality fields, both passes' expert counts, and the --exact
    verdict. Pure."""
    record = dict(base, **_figures(sample))
    record["change_vs_first_pct"] = {
        "measured": relative_change(first["measured"], sample["measured"]).as_dict(),
        "modeled": relative_change(first["modeled"], sample["modeled"]).as_dict()
        if sample["modeled"] else None}
    record.update(quality)
    record["passes"] = {"latency": sample["counts"], "quality": quality_counts}
    record["failed"] = pass_counts.exact_failure(record)
    return record


def quality_pass(session, config: EvalConfig, theta: float, reference=None,
                 reference_counts: dict | None = None) -> tuple[dict, dict]:
    """lm-eval's tasks and the divergence against REFERENCE (θ = 0) at THETA: the record's
    quality fields ("tasks", "divergence") and what the pass cost in experts. Raises
    TestbedError for an unknown task or a bad task file."""
    fields: dict = {}
    with pass_counts.quality_pass(session, theta) as counts:
        if config.tasks:
            _say(config, f"θ = {theta:g}: lm-eval {', '.join(config.tasks)}")
            fields["tasks"] = _accuracy(session, config, theta)
        if reference is not None:
            fields["divergence"] = harness.divergence_against(session, reference,
                                                              reference_counts)
    return fields, counts


def reference_pass(session, config: EvalConfig):
    """The θ = 0 next-token distributions over the held-out blocks, and what the pass cost."""
    return harness.reference_pass(session, config.divergence_text, config.divergence_tokens)


def _say(config: EvalConfig, line: str) -> None:
    if config.progress:
        print(f"eval: {line}", file=sys.stderr, flush=True)


def _modeled(scenario, num_agents: int, manifest, start_s: float):
    from testbed.experiments.modeled_latency import ModeledLatency

    paper = scenario.paper
    if paper is None or paper.emulate is None:
        return None
    return ModeledLatency(paper, paper.emulate, num_agents, _moe_layers(manifest),
                          start_s=start_s)


def _moe_layers(manifest) -> int:
    return len(manifest.model.get("moe_layers") or [0])


def _rotated(items: tuple, i: int) -> tuple:
    return items[i % len(items):] + items[:i % len(items)]


def _latency_interleaved(session, prompt_ids, config: EvalConfig, modeled,
                         waits: StepWaits, policies: tuple = (None,), set_policy=None) -> dict:
    """Decode every prompt at every θ (θ order rotating per prompt; with a cell, every
    policy in turn, its order rotating too, each at every θ): per (policy, θ), the measured
    and modeled latency of each decode step (the first step, the prefill, is left out of
    both), the part of each measured step spent waiting for agents, the experts called and
    dropped, and the tokens decoded."""
    thetas = config.thetas
    out = {(p, t): {"measured": [], "modeled": [], "wait": [], "counts": pass_counts.zero(),
                    "token_ids": []}
           for p in policies for t in thetas}
    for i, ids in enumerate(prompt_ids):
        for policy, theta in [(p, t) for p in _rotated(policies, i) for t in _rotated(thetas, i)]:
            if set_policy is not None and policy is not None:
                set_policy(policy)
            if modeled is not None:
                modeled.reset()
            waits.reset()
            with pass_counts.counted(session.runtime.stats) as counts:
                result = generate(session, ids, max_new_tokens=config.max_new_tokens,
                                  ignore_eos=True, theta=theta)
            waits.close()
            mine = out[(policy, theta)]
            mine["token_ids"].append(list(result.token_ids))
            steps = len(result.token_latency_ms)
            mine["measured"] += result.token_latency_ms[1:]
            mine["wait"] += [1e3 * s for s in waits.step_waits_s()[1:steps]]
            if modeled is not None:
                steps = modeled.step_totals_s()
                mine["modeled"] += [1e3 * s for s in steps[1:len(result.token_latency_ms)]]
            mine["counts"] = pass_counts.add(mine["counts"], counts)
    return out


def _figures(sample: dict) -> dict:
    """Medians and means with their bootstrap intervals, the latency pass's drops, measured
    against modeled."""
    measured, modeled, counts = sample["measured"], sample["modeled"], sample["counts"]
    figures = {
        "tokens": len(measured),
        "median_token_ms": bootstrap(measured, np.median).as_dict(),
        "mean_token_ms": bootstrap(measured, np.mean).as_dict(),
        "p95_token_ms": float(np.percentile(measured, 95)),
        # the latency pass's; every pass's counts are in the record's "passes"
        "expert_calls": counts["expert_calls"], "experts_dropped": counts["experts_dropped"],
        "drop_rate": pass_counts.drop_rate(counts),
    }

    wait = sample.get("wait") or []
    if len(wait) == len(measured) and wait:
        # the same steps: a step's base-station share is its measured time minus its wait
        figures["wait_median_token_ms"] = bootstrap(wait, np.median).as_dict()
        figures["base_median_token_ms"] = bootstrap(
            [m - w for m, w in zip(measured, wait)], np.median).as_dict()
    if modeled:
        figures["modeled_median_token_ms"] = bootstrap(modeled, np.median).as_dict()
        figures["modeled_mean_token_ms"] = bootstrap(modeled, np.mean).as_dict()
        figures["measured_over_modeled"] = float(np.median(measured) / np.median(modeled))
        if "wait_median_token_ms" in figures:
            figures["wait_over_modeled"] = float(np.median(wait) / np.median(modeled))
    return figures


def _accuracy(session, config: EvalConfig, theta: float) -> dict:
    """lm-eval's figures per task: {task: {metric: {"value", "stderr"}}}. Run inside a
    pass_counts.quality_pass (θ set, the latency observer off)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from testbed.experiments.lm_eval_model import DistributedLM

    started_s = time.monotonic()
    try:
        paths = [TASKS_DIR] + ([config.include_path] if config.include_path else [])
        result = lm_eval.simple_evaluate(
            model=DistributedLM(session, theta=theta, batch_size=config.batch_size),
            tasks=list(config.tasks), limit=config.limit, log_samples=False,
            task_manager=TaskManager(include_path=paths), random_seed=0,
            numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    except (KeyError, ValueError) as e:  # an unknown task name, a bad task file
        raise TestbedError(f"lm-eval: {e}") from None
    # the pass's expert counts are the record's passes["quality"] (the caller's quality_pass)
    out = {"_run": {"seconds": round(time.monotonic() - started_s, 1)}}
    for task, figures in result["results"].items():
        metrics = {}
        for key, value in figures.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            name, filt = key.split(",", 1)
            stderr = figures.get(f"{name}_stderr,{filt}")
            metrics[key] = {"value": float(value),
                            "stderr": float(stderr) if isinstance(stderr, (int, float))
                            else None}
        out[task] = {"items": result.get("n-samples", {}).get(task, {}).get("effective"),
                     "metrics": metrics}
    return out

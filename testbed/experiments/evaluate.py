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

With latency targets instead of θs (issue 24: accuracy at a given latency, the way users ask),
each prompt is decoded with the target's controller (`generate(latency_target_ms=)`), which
picks θ per token; the record keeps the target, the achieved latency, the θ of every measured
token, their mean (the record's `theta`) and whether the target was met. lm-eval's scoring
passes are prefills, not decode tokens, so no controller can pace them on their own latency:
the quality pass instead replays the latency pass's θs, one per token in order, cycling
(`ThetaReplay`, `replayed`), so accuracy and divergence are measured under the mix of θ the
target produced. Per token, not per forward pass: a decoded token ran at its own θ over a KV
cache of tokens at theirs, which is what a prefill with a θ per token computes; and a pass of
one forward (the divergence's blocks) or a few (lm-eval's batches) still gets the whole mix
instead of the first few θs of the sequence (the controller's learning tokens, at θ = 0).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from basestation.generate import generate, per_pass_theta
from basestation.popularity import Popularity
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
    # the axis instead of thetas (issue 24): one row per latency target, in ms (() = θs)
    latency_targets_ms: tuple[float, ...] = ()
    # the routers' slots per (layer, expert) over every pass, written here (JSON, for
    # `basestation plan --popularity`; basestation/popularity.py); None: not counted
    popularity_out: str | None = None

    @property
    def axis(self) -> tuple[float, ...]:
        """What the rows are run at: the latency targets (ms) when given, else the θs."""
        return self.latency_targets_ms or self.thetas

    @property
    def emulating(self) -> bool:
        if self.emulate is not None:
            return self.emulate
        return self.placement is None or self.placement.roster is None


def run_eval(config: EvalConfig) -> str:
    """Runs the evaluation; returns the results.jsonl path. Raises TestbedError, RosterError."""
    with harness.running(config.shards, config.out, config.scenario, config.num_agents,
                         emulate=config.emulating, dtype=config.dtype,
                         placement=config.placement, cell=bool(config.bandwidth),
                         total_bandwidth_hz=config.total_bandwidth_hz) as run:
        session, scenario = run.session, run.scenario
        if config.popularity_out:
            session.runtime.popularity = Popularity(session.runtime.table.num_experts)
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
        axis = f"latency targets {', '.join(f'{t:g}' for t in config.latency_targets_ms)} ms" \
            if config.latency_targets_ms else f"θ = {', '.join(f'{t:g}' for t in config.thetas)}"
        _say(config, f"latency: {len(prompt_ids)} prompts x {config.max_new_tokens} tokens "
                     f"at {axis}, interleaved")
        policies = config.bandwidth or (None,)
        samples = _latency_interleaved(session, prompt_ids, config, modeled, waits,
                                       policies, cell.set_policy if cell else None)
        # each policy's cell figures are of its latency passes alone: the quality passes
        # below run under a policy too, their bytes and allocations charged apart
        reference = reference_counts = None
        if config.divergence_text:
            if cell is not None:
                cell.set_policy(policies[0], counted=False)
            _say(config, f"divergence: θ = 0 reference over {config.divergence_tokens} "
                         "held-out tokens")
            reference, reference_counts = reference_pass(session, config)
        with run.results() as append:
            for point in config.axis:
                # one quality pass per θ, under the first policy (θ > 0: joint selects
                # otherwise), as the records say; a target's row replays the θs its own
                # latency pass used (their mean is the row's θ), under that pass's policy
                quality_at: dict = {}
                for policy in policies:
                    sample = samples[(policy, point)]
                    replay = sample["thetas"] if config.latency_targets_ms else None
                    theta = mean_theta(replay) if replay is not None else point
                    key = (policy, tuple(replay)) if replay is not None else theta
                    if key not in quality_at:
                        ran_under = policy if replay is not None else policies[0]
                        if cell is not None:
                            cell.set_policy(ran_under, counted=False)
                        quality_at[key] = (*quality_pass(session, config, theta, reference,
                                                         reference_counts, replay=replay),
                                           ran_under)
                    quality, quality_counts, ran_under = quality_at[key]
                    row = dict(base, theta=theta, exact=config.exact)
                    if replay is not None:
                        row.update(target_fields(point, sample))
                    if cell is not None:
                        row.update(cell.fields(policy), quality_bandwidth=ran_under)
                        # the tokens of every prompt, as a digest: at θ = 0 every policy's
                        # must be the same (bandwidth changes time, never the answer)
                        row["tokens_sha256"] = hashlib.sha256(json.dumps(
                            sample["token_ids"]).encode()).hexdigest()
                    # with a cell: against the first policy at this point; else the first row
                    first = samples[(policies[0], point)] if cell is not None else \
                        samples[(None, config.axis[0])]
                    append(make_record(row, sample, first, quality, quality_counts))
        if cell is not None:
            cell.close()
        if config.popularity_out:
            session.runtime.popularity.save(config.popularity_out)
            _say(config, f"popularity: {session.runtime.popularity.slots} slots counted, "
                         f"written to {config.popularity_out}")
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


def target_fields(target_ms: float, sample: dict) -> dict:
    """A latency target's own fields of its record, from its latency pass's SAMPLE: the
    target, the achieved mean of the measured tokens (the same tokens as mean_token_ms), the
    θ each of them was decoded at and their mean, and whether every prompt met the target as
    far as its controller knew (latency_target.steady_feasible). Pure."""
    measured, thetas, verdicts = sample["measured"], sample["thetas"], sample["feasible"]
    return {"latency_target_ms": target_ms, "latency_target": {
        "target_ms": target_ms,
        "achieved_mean_ms": round(float(np.mean(measured)), 3) if measured else None,
        "mean_theta": mean_theta(thetas), "thetas": list(thetas),
        "feasible": all(verdicts), "prompts_feasible": sum(verdicts), "prompts": len(verdicts),
        # what the quality fields were measured at (lm-eval cannot pace prefills on latency)
        "quality_thetas": "replayed: the θs above, one per token, in order, cycling"}}


def mean_theta(thetas: list[float]) -> float:
    """The mean of a target's per-token θs, rounded as latency_target.mean_theta rounds
    (0 without tokens)."""
    return round(sum(thetas) / len(thetas), 4) if thetas else 0.0


class ThetaReplay:
    """θ per token from a recorded sequence, in order, from its start again when it runs out:
    how a latency target's quality pass reproduces the mix of θ its latency pass used. Pure
    (holds no clock); `replayed` hands its θs to the model's forward passes."""

    def __init__(self, thetas: list[float]):
        if not thetas:
            raise ValueError("ThetaReplay needs at least one θ")
        self.thetas = tuple(thetas)
        self.given = 0  # θs handed out so far

    def take(self, count: int) -> list[float]:
        """The next COUNT θs of the sequence."""
        size = len(self.thetas)
        out = [self.thetas[(self.given + i) % size] for i in range(count)]
        self.given += count
        return out


def _tokens_in(args: tuple, kwargs: dict) -> int:
    """How many tokens a causal LM's forward call carries ([B, L] flattened, as its MoE
    layers see them)."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        return kwargs["inputs_embeds"].shape[:-1].numel()
    return ids.numel()


def replayed(model, runtime, replay: ThetaReplay):
    """Inside, each forward pass of MODEL runs with REPLAY's next θs, one per token (a [T] θ,
    as serve's engine gives a batch of requests; generate.per_pass_theta)."""
    def theta_for(args, kwargs):
        thetas = replay.take(_tokens_in(args, kwargs))
        return thetas[0] if len(set(thetas)) == 1 else torch.tensor(thetas, dtype=torch.float64)

    return per_pass_theta(model, runtime, theta_for)


def quality_pass(session, config: EvalConfig, theta: float, reference=None,
                 reference_counts: dict | None = None,
                 replay: list[float] | None = None) -> tuple[dict, dict]:
    """lm-eval's tasks and the divergence against REFERENCE (θ = 0) at THETA, or with REPLAY
    (a latency target's per-token θs) at those θs, one per token (`replayed`; from the
    sequence's start for each of the two): the record's quality fields ("tasks",
    "divergence") and what the pass cost in experts. Raises TestbedError for an unknown task
    or a bad task file."""
    fields: dict = {}

    def at_replay():
        return replayed(session.base.model, session.runtime, ThetaReplay(replay)) if replay \
            else contextlib.nullcontext()

    with pass_counts.quality_pass(session, theta) as counts:
        if config.tasks:
            at = f"the latency pass's θs (mean {theta:g})" if replay else f"θ = {theta:g}"
            _say(config, f"{at}: lm-eval {', '.join(config.tasks)}")
            with at_replay():
                fields["tasks"] = _accuracy(session, config, theta)
        if reference is not None:
            with at_replay():
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
    """Decode every prompt at every θ, or with every latency target's controller (the
    order rotating per prompt; with a cell, every policy in turn, its order rotating too,
    each at every θ): per (policy, θ or target), the measured and modeled latency of each
    decode step (the first step, the prefill, is left out of both), the part of each
    measured step spent waiting for agents, the experts called and dropped, and the tokens
    decoded; with a target also the θ of each measured step and each prompt's verdict
    (latency_target.steady_feasible)."""
    points, targets = config.axis, bool(config.latency_targets_ms)
    out = {(p, t): {"measured": [], "modeled": [], "wait": [], "counts": pass_counts.zero(),
                    "token_ids": [], "thetas": [], "feasible": []}
           for p in policies for t in points}
    for i, ids in enumerate(prompt_ids):
        for policy, point in [(p, t) for p in _rotated(policies, i) for t in _rotated(points, i)]:
            if set_policy is not None and policy is not None:
                set_policy(policy)
            if modeled is not None:
                modeled.reset()
            waits.reset()
            axis = {"latency_target_ms": point} if targets else {"theta": point}
            with pass_counts.counted(session.runtime.stats) as counts:
                result = generate(session, ids, max_new_tokens=config.max_new_tokens,
                                  ignore_eos=True, **axis)
            waits.close()
            mine = out[(policy, point)]
            mine["token_ids"].append(list(result.token_ids))
            steps = len(result.token_latency_ms)
            mine["measured"] += result.token_latency_ms[1:]
            if result.latency_target is not None:  # the measured steps' θs, as measured
                mine["thetas"] += result.latency_target["thetas"][1:steps]
                mine["feasible"].append(result.latency_target["feasible"])
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


@functools.lru_cache(maxsize=4)
def _task_manager(paths: tuple[str, ...], tasks: tuple[str, ...]):
    """lm-eval's index of task files, made once per run, and of PATHS alone when they hold
    every task asked for: indexing lm-eval's own thousands of YAMLs takes 5-15 s, which every
    row paid again. Each evaluation still loads its tasks afresh."""
    from lm_eval.tasks import TaskManager

    ours = TaskManager(include_path=list(paths), include_defaults=False)
    if all(task in ours.all_tasks for task in tasks):
        return ours
    return TaskManager(include_path=list(paths))


def _accuracy(session, config: EvalConfig, theta: float) -> dict:
    """lm-eval's figures per task: {task: {metric: {"value", "stderr"}}}. Run inside a
    pass_counts.quality_pass (θ set, the latency observer off)."""
    import lm_eval

    from testbed.experiments.lm_eval_model import DistributedLM

    started_s = time.monotonic()
    try:
        paths = (TASKS_DIR,) + ((config.include_path,) if config.include_path else ())
        result = lm_eval.simple_evaluate(
            model=DistributedLM(session, theta=theta, batch_size=config.batch_size),
            tasks=list(config.tasks), limit=config.limit, log_samples=False,
            task_manager=_task_manager(paths, tuple(config.tasks)), random_seed=0,
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

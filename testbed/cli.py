"""`testbed`: test models, shaped links, θ sweeps and their figures, the demo."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from testbed.models.make_model import DTYPES, MAX_PARAMETERS, ModelSpec, make_model, parameter_count


def cmd_make_model(args) -> int:
    if os.path.exists(args.out):
        raise SystemExit(f"testbed: error: {args.out} already exists")
    if args.family != "mixtral":  # the small per-family configs of testbed/models/family_models.py
        from testbed.models.corpus import stdlib_docstrings
        from testbed.models.family_models import write_family_checkpoint
        from testbed.models.make_model import train_tokenizer

        write_family_checkpoint(args.family, args.out,
                                train_tokenizer(args.vocab, stdlib_docstrings()),
                                seed=args.seed, max_shard_size=args.max_shard_size)
        print(f"wrote {args.out}: a small random {args.family} (testbed/models/family_models.py)")
        return 0
    spec = ModelSpec(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                     experts=args.experts, top_k=args.top_k, vocab=args.vocab, heads=args.heads,
                     kv_heads=args.kv_heads, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, seed=args.seed)
    sizes = (spec.layers, spec.hidden, spec.intermediate, spec.experts, spec.top_k, spec.vocab,
             spec.heads, spec.kv_heads)
    if min(sizes) < 1 or spec.top_k > spec.experts or spec.hidden % spec.heads \
            or spec.heads % spec.kv_heads:
        raise SystemExit("testbed: error: sizes must be >= 1, with top-k <= experts, "
                         "heads | hidden, kv-heads | heads")
    if parameter_count(spec) > MAX_PARAMETERS:  # refused before torch builds any of it
        print(f"testbed: error: {parameter_count(spec):,} parameters; make-model writes test "
              f"models of at most {MAX_PARAMETERS:,}", file=sys.stderr)
        return 2
    try:
        make_model(args.out, spec)
    except ValueError as e:
        raise SystemExit(f"testbed: error: {e}") from None
    except OSError as e:
        raise SystemExit(f"testbed: error: {args.out}: {e.strerror or e}") from None
    print(f"wrote {args.out}: {spec.layers} layers, {spec.experts} experts (top-{spec.top_k}), "
          f"hidden {spec.hidden}, ffn {spec.intermediate}, vocab {spec.vocab}, {spec.dtype}")
    return 0


def cmd_sweep(args) -> int:
    from testbed.experiments.report import table
    from testbed.experiments.sweep import SweepConfig, run_sweep

    thetas = _numbers("--thetas", args.thetas)
    if any(not 0.0 <= t <= 1.0 for t in thetas):  # NaN fails this too
        raise SystemExit(f"testbed: error: --thetas {args.thetas!r}: each within 0-1")
    if args.kl_tokens < 0:
        raise SystemExit("testbed: error: --kl-tokens must be >= 0 (0: no KL / agreement)")
    bandwidth, total_bandwidth_hz = _bandwidth_args(args)
    prompts = None
    if args.prompts:
        with open(args.prompts) as f:
            prompts = tuple(line.strip() for line in f if line.strip())
    config = SweepConfig(shards=args.shards, out=args.out, scenario=args.scenario, thetas=thetas,
                         num_agents=args.agents, max_new_tokens=args.max_new_tokens,
                         eval_text=args.eval_text, eval_tokens=args.eval_tokens,
                         mc_file=args.mc, mc_items=args.mc_items, latency=args.latency,
                         divergence_tokens=args.kl_tokens, placement=_placement(args),
                         bandwidth=bandwidth, total_bandwidth_hz=total_bandwidth_hz,
                         **({"prompts": prompts} if prompts else {}))
    results = run_sweep(config)
    from testbed.experiments.report import read_results

    print(table(read_results(args.out)))
    print(f"records: {results} (and .csv); figures: testbed report {args.out}")
    return 0


def _placement(args):
    """--roster, --shape-dev, --shape-backend, --force, --agents-on-host as a Placement (None:
    our own agents)."""
    from testbed.experiments.beds import Placement

    if not args.roster:
        for flag, value in (("--shape-dev", args.shape_dev),
                            ("--agents-on-host", args.agents_on_host)):
            if value is not None:
                raise SystemExit(f"testbed: error: {flag} needs --roster (the user's agents)")
        return None
    if args.agents_on_host is not None and args.agents_on_host < 0:
        raise SystemExit("testbed: error: --agents-on-host must be >= 0")
    return Placement(roster=args.roster, shape_dev=args.shape_dev,
                     shape_backend=args.shape_backend, force=args.force,
                     agents_on_host=args.agents_on_host)


def add_placement_args(p) -> None:
    """Where the agents are: ours (default) or the user's, named by a roster."""
    from testbed.boxes.cli import BACKEND_HELP, FORCE_HELP
    from testbed.boxes.shaper import SHAPE_BACKENDS

    g = p.add_argument_group("real boxes (agents you started)")
    g.add_argument("--roster", metavar="FILE",
                   help="run on the agents this roster names (as `basestation --agents` reads "
                   "it, keys included) instead of starting our own; links numbered in its order")
    g.add_argument("--shape-dev", metavar="DEV",
                   help="with --roster: shape each box's link (both ways, by its address) on "
                   "this interface of the base station towards the boxes; without it nothing "
                   "is shaped and the experiment runs on the links as they are")
    g.add_argument("--shape-backend", choices=SHAPE_BACKENDS, default="auto",
                   help=BACKEND_HELP)
    g.add_argument("--force", action="store_true", help=FORCE_HELP)
    g.add_argument("--agents-on-host", type=int, default=None, metavar="N",
                   help="roster agents running on this machine, sharing its cores (default: "
                   "those on a loopback address)")


def add_bandwidth_args(p) -> None:
    """--bandwidth and --cell-mhz (eval, sweep): a shared cell's policies (issue 23)."""
    p.add_argument("--bandwidth", metavar="POLICIES",
                   help="compare a shared cell's policies in one interleaved run, comma-"
                   "separated: static,shared,joint (our agents on loopback behind one cell "
                   "process; a [paper] scenario)")
    p.add_argument("--cell-mhz", type=float, metavar="MHZ",
                   help="with --bandwidth: the cell's total bandwidth (default: the scenario's)")


def _numbers(flag: str, value: str, example: str = "0,0.1,0.2") -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in value.split(","))
    except ValueError:
        raise SystemExit(f"testbed: error: {flag} {value!r}: numbers like {example}") from None


EVAL_THETAS = "0,0.1,0.2,0.3"  # `testbed eval`'s axis when neither --thetas nor targets


def eval_axis(thetas: str | None, latency_targets: str | None) -> tuple[tuple[float, ...],
                                                                         tuple[float, ...]]:
    """`testbed eval`'s rows: (θs, latency targets in ms), one of them empty; SystemExit with
    one line when both are given or a number is bad."""
    from basestation.latency_target import MAX_TARGET_MS

    if latency_targets is None:
        found = _numbers("--thetas", thetas or EVAL_THETAS)
        if any(not 0.0 <= t <= 1.0 for t in found):  # NaN fails this too
            raise SystemExit(f"testbed: error: --thetas {thetas!r}: each within 0-1")
        return found, ()
    if thetas is not None:
        raise SystemExit("testbed: error: --thetas and --latency-targets: give one axis, "
                         "not both")
    targets = _numbers("--latency-targets", latency_targets, "20,40,80")
    if any(not 0.0 < t <= MAX_TARGET_MS for t in targets) or len(set(targets)) < len(targets):
        raise SystemExit(f"testbed: error: --latency-targets {latency_targets!r}: distinct "
                         f"milliseconds a token, each > 0 and at most {MAX_TARGET_MS:g}")
    return (), targets


def _bandwidth_args(args) -> tuple[tuple[str, ...], float | None]:
    """--bandwidth's policies and --cell-mhz in Hz; SystemExit with one line when bad."""
    from testbed.links.cell_policy import POLICIES

    policies = tuple(p for p in (args.bandwidth or "").split(",") if p)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or len(set(policies)) != len(policies):
        raise SystemExit(f"testbed: error: --bandwidth {args.bandwidth!r}: distinct names of "
                         f"{', '.join(POLICIES)}")
    if args.cell_mhz is not None and (not policies or not args.cell_mhz > 0):
        raise SystemExit("testbed: error: --cell-mhz: a bandwidth > 0, with --bandwidth")
    return policies, args.cell_mhz * 1e6 if args.cell_mhz is not None else None


def cmd_eval(args) -> int:
    from testbed.experiments.eval_report import row_label
    from testbed.experiments.evaluate import EvalConfig, run_eval
    from testbed.experiments.harness import HELDOUT_TEXT
    from testbed.experiments.pass_counts import exact_failure
    from testbed.experiments.report import read_results
    from testbed.links.control import TestbedError

    thetas, latency_targets_ms = eval_axis(args.thetas, args.latency_targets)
    if not latency_targets_ms and args.thetas is None:  # the default, kept in eval_options
        args.thetas = EVAL_THETAS
    if args.limit is not None and args.limit < 1 or args.batch_size < 1 \
            or args.max_new_tokens < 2:
        raise SystemExit("testbed: error: --limit and --batch-size must be >= 1, "
                         "--max-new-tokens >= 2")
    if args.kl_tokens < 0:
        raise SystemExit("testbed: error: --kl-tokens must be >= 0 (0: no KL / agreement)")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    placement = _placement(args)
    bandwidth, total_bandwidth_hz = _bandwidth_args(args)
    if args.popularity_out:
        from basestation.popularity import out_path_error

        problem = out_path_error(args.popularity_out)
        if problem:
            raise SystemExit(f"testbed: error: {problem}")
    done_before = _rows_in(args.out)
    results = None
    for scenario in [s for s in args.scenario.split(",") if s]:
        results = run_eval(EvalConfig(
            shards=args.shards, out=args.out, scenario=scenario, thetas=thetas, tasks=tasks,
            limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            num_agents=args.agents, include_path=args.include_path, dtype=args.dtype,
            exact=args.exact, divergence_text=(args.kl_text or HELDOUT_TEXT)
            if args.kl_tokens else None, divergence_tokens=args.kl_tokens,
            placement=placement, emulate=True if args.emulate else None,
            bandwidth=bandwidth, total_bandwidth_hz=total_bandwidth_hz,
            latency_targets_ms=latency_targets_ms, popularity_out=args.popularity_out,
            options=tuple((k, v) for k, v in vars(args).items() if k not in ("func", "command"))))
    print_eval(args.out)
    print(f"records: {results}")
    failed = [f"{r['scenario']} {row_label(r)}" for r in read_results(args.out)[done_before:]
              if exact_failure(r)]
    if failed:
        raise TestbedError(f"--exact: {len(failed)} row(s) lost experts to faults, their "
                           f"numbers are altered: {', '.join(failed)}")
    return 0


def _rows_in(folder: str) -> int:
    """Records already in FOLDER/results.jsonl (eval appends), 0 when there is none."""
    try:
        with open(os.path.join(folder, "results.jsonl")) as f:
            return sum(1 for line in f if line.strip())
    except FileNotFoundError:
        return 0


def print_eval(folder: str) -> None:
    """`testbed eval`'s tables (printed, and as files) and figures of FOLDER's records."""
    from testbed.experiments.eval_report import axis_key, draw, markdown, write_tables
    from testbed.experiments.report import read_results

    by_scenario: dict[str, list[dict]] = {}
    for row in read_results(folder):
        by_scenario.setdefault(row["scenario"], []).append(row)
    for rows in by_scenario.values():
        print(markdown(sorted(rows, key=axis_key)) + "\n")
    from testbed.experiments.report_page import write_report_html

    for path in write_tables(folder) + draw(folder) + [write_report_html(folder)]:
        print(f"wrote {path}")


def cmd_report(args) -> int:
    from testbed.experiments.report import draw, is_eval, read_results, table

    rows = read_results(args.out)
    if rows and all(is_eval(r) for r in rows):  # `testbed eval`'s records
        print_eval(args.out)
        return 0
    if any(is_eval(r) for r in rows):
        raise SystemExit(f"testbed: error: {args.out}/results.jsonl mixes `testbed eval` and "
                         "`testbed sweep` records: give each its own --out")
    print(table(rows))
    for path in draw(args.out):
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from testbed.experiments.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    from testbed.boxes import cli as boxes_cli
    from testbed.links import cli as links_cli
    from testbed.models import tiny_cli

    parser = argparse.ArgumentParser(prog="testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-model", help="write a small random MoE checkpoint + tokenizer")
    p.add_argument("out")
    from testbed.models.family_models import FAMILY_CONFIGS

    p.add_argument("--family", choices=sorted(FAMILY_CONFIGS), default="mixtral",
                   help="model_type; other than mixtral, the size options below are ignored "
                   "but --vocab, --seed and --max-shard-size")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--max-shard-size", default=None,
                   help="e.g. 200KB or 1GB: write sharded files with an index")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_model)

    tiny_cli.add_parser(sub)
    links_cli.add_parsers(sub)
    boxes_cli.add_parsers(sub)
    from testbed.boxes import linkcheck

    linkcheck.add_parser(sub)

    p = sub.add_parser("sweep", help="θ sweep through agents behind shaped links")
    p.add_argument("--shards", required=True, metavar="DIR")
    p.add_argument("--scenario", default="uniform", help="uniform | one-bad-link | flaky | "
                   "paper | FILE.toml")
    p.add_argument("--thetas", default="0,0.1,0.2,0.3")
    p.add_argument("--agents", type=int, default=None, help="default: one per expert")
    p.add_argument("--prompts", metavar="FILE", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--eval-text", metavar="FILE", help="held-out text: perplexity, top-1")
    p.add_argument("--eval-tokens", type=int, default=256)
    p.add_argument("--mc", metavar="FILE.jsonl", help="multiple-choice set")
    p.add_argument("--mc-items", type=int, default=40)
    p.add_argument("--latency", choices=("measured", "model"), default="measured")
    p.add_argument("--kl-tokens", type=int, default=1024, metavar="N",
                   help="held-out tokens (--eval-text, else testbed/data/heldout-sample.txt) "
                   "for KL(θ=0 || θ) and top-1 agreement with θ = 0 (default 1024; 0: off)")
    p.add_argument("--out", required=True, metavar="DIR")
    add_placement_args(p)
    add_bandwidth_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="lm-eval tasks and token latency per θ x scenario "
                       "through agents behind shaped links: Table I and Fig. 3")
    p.add_argument("--shards", required=True, metavar="DIR")
    p.add_argument("--scenario", default="paper", help="one or more, comma-separated: "
                   "paper | uniform | one-bad-link | flaky | FILE.toml (default paper)")
    p.add_argument("--thetas", default=None, help=f"default {EVAL_THETAS}")
    p.add_argument("--latency-targets", metavar="MS,MS,...",
                   help="the rows' axis instead of --thetas: mean token latency targets in ms; "
                   "each prompt is decoded with the target's controller (θ per token), and "
                   "the quality pass replays the θs it used")
    p.add_argument("--popularity-out", metavar="FILE", help="count the routers' slots per "
                   "(layer, expert) over every pass and write them here (JSON, for "
                   "`basestation plan --popularity`)")
    p.add_argument("--tasks", default="wdmoe_mc_heldout",
                   help="lm-eval task names, comma-separated: ours (wdmoe_mc_heldout, "
                   "wdmoe_heldout_ppl, wdmoe_heldout_next_word, offline) or any lm-eval task "
                   "(piqa, arc_easy, … need the network once); empty: latency only")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval items per forward pass")
    p.add_argument("--include-path", metavar="DIR", help="more lm-eval task YAMLs")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="tokens per latency prompt (default 24)")
    p.add_argument("--agents", type=int, default=None, help="default: one per expert")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--exact", action="store_true",
                   help="mark a row (θ x scenario) failed when any of its passes lost an "
                   "expert to a fault, and exit non-zero naming those rows")
    p.add_argument("--kl-tokens", type=int, default=1024, metavar="N",
                   help="held-out tokens for KL(θ=0 || θ) and top-1 agreement with θ = 0 "
                   "(blocks of 64; default 1024; 0: off)")
    p.add_argument("--kl-text", metavar="FILE",
                   help="held-out text for KL / agreement (default: testbed/data/"
                   "heldout-sample.txt)")
    p.add_argument("--out", required=True, metavar="DIR")
    add_placement_args(p)
    p.add_argument("--emulate", action="store_true",
                   help="with --roster: a `paper` scenario's emulated model sets the links' "
                   "wire time (the boxes still compute at their own speed); on our own agents "
                   "it always does, and paces their compute too")
    add_bandwidth_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="table and figures (PNG) of a sweep's or an eval's "
                       "records")
    p.add_argument("out", metavar="DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole path: model, split, shaped links, θ sweep, plot")
    p.add_argument("--out", default="demo-out")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from basestation.roster import RosterError
    from common.errors import ShardError
    from testbed.links.control import TestbedError

    args = build_parser().parse_args(argv)
    # SIGTERM cleans up like Ctrl-C (namespaces, agents)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.func(args)
    except (TestbedError, RosterError, ShardError) as e:
        print(f"testbed: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130

"""`testbed`: test models, shaped links, θ sweeps and their figures, the demo."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from testbed.make_model import DTYPES, ModelSpec, make_model


def cmd_make_model(args) -> int:
    if os.path.exists(args.out):
        raise SystemExit(f"testbed: error: {args.out} already exists")
    if args.family != "mixtral":  # the small per-family configs of testbed/family_models.py
        from testbed.corpus import stdlib_docstrings
        from testbed.family_models import write_family_checkpoint
        from testbed.make_model import train_tokenizer

        write_family_checkpoint(args.family, args.out,
                                train_tokenizer(args.vocab, stdlib_docstrings()),
                                seed=args.seed, max_shard_size=args.max_shard_size)
        print(f"wrote {args.out}: a small random {args.family} (testbed/family_models.py)")
        return 0
    spec = ModelSpec(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                     experts=args.experts, top_k=args.top_k, vocab=args.vocab, heads=args.heads,
                     kv_heads=args.kv_heads, dtype=args.dtype,
                     max_shard_size=args.max_shard_size, seed=args.seed)
    if spec.top_k > spec.experts or spec.hidden % spec.heads or spec.heads % spec.kv_heads:
        raise SystemExit("testbed: error: need top-k <= experts, heads | hidden, kv-heads | heads")
    try:
        make_model(args.out, spec)
    except ValueError as e:
        raise SystemExit(f"testbed: error: {e}") from None
    print(f"wrote {args.out}: {spec.layers} layers, {spec.experts} experts (top-{spec.top_k}), "
          f"hidden {spec.hidden}, ffn {spec.intermediate}, vocab {spec.vocab}, {spec.dtype}")
    return 0


def cmd_sweep(args) -> int:
    from testbed.report import table
    from testbed.sweep import SweepConfig, run_sweep

    try:
        thetas = tuple(float(t) for t in args.thetas.split(","))
    except ValueError:
        raise SystemExit(f"testbed: error: --thetas {args.thetas!r}: numbers like 0,0.1,0.2")
    prompts = None
    if args.prompts:
        with open(args.prompts) as f:
            prompts = tuple(line.strip() for line in f if line.strip())
    config = SweepConfig(shards=args.shards, out=args.out, scenario=args.scenario, thetas=thetas,
                         num_agents=args.agents, max_new_tokens=args.max_new_tokens,
                         eval_text=args.eval_text, eval_tokens=args.eval_tokens,
                         mc_file=args.mc, mc_items=args.mc_items, latency=args.latency,
                         **({"prompts": prompts} if prompts else {}))
    results = run_sweep(config)
    from testbed.report import read_results

    print(table(read_results(args.out)))
    print(f"records: {results} (and .csv); figures: testbed report {args.out}")
    return 0


def cmd_report(args) -> int:
    from testbed.report import draw, read_results, table

    print(table(read_results(args.out)))
    for path in draw(args.out):
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from testbed.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    from testbed import links_cli, train_tiny

    parser = argparse.ArgumentParser(prog="testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-model", help="write a small random MoE checkpoint + tokenizer")
    p.add_argument("out")
    from testbed.family_models import FAMILY_CONFIGS

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

    train_tiny.add_parser(sub)
    links_cli.add_parsers(sub)

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
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="table and figures (PNG) of a sweep")
    p.add_argument("out", metavar="DIR")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole path: model, split, shaped links, θ sweep, plot")
    p.add_argument("--out", default="demo-out")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from basestation.session import RosterError
    from shard_tool.errors import ShardError
    from testbed.links import TestbedError

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

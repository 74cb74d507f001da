"""`testbed`: test models now; links, scenarios and experiments as they land."""

from __future__ import annotations

import argparse
import os
import sys

from testbed.make_model import DTYPES, ModelSpec, make_model


def cmd_make_model(args) -> int:
    if os.path.exists(args.out):
        raise SystemExit(f"testbed: error: {args.out} already exists")
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


def cmd_demo(args) -> int:
    from testbed.demo import run_demo

    return run_demo(args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-model", help="write a small random Mixtral checkpoint + tokenizer")
    p.add_argument("out")
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
    p = sub.add_parser("demo", help="make, split, serve on loopback and generate at several θ")
    p.add_argument("--out", default="demo-out")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return 130

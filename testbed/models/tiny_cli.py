"""`testbed train-tiny`: train the tiny Mixtral, then evaluate it and write its card."""

from __future__ import annotations

import os

from testbed.models.tiny_card import write_card
from testbed.models.train_tiny import TrainSpec, train


def cmd_train_tiny(args) -> int:
    from testbed.models.corpus_docs import CorpusError

    if os.path.exists(args.out):
        raise SystemExit(f"testbed: error: {args.out} already exists")
    spec = TrainSpec(steps=args.steps, seed=args.seed, seq_len=args.seq_len, batch=args.batch,
                     lr=args.lr, threads=args.threads, corpus_cache=args.corpus_cache,
                     deb=args.deb)
    try:
        record = train(args.out, spec)
    except CorpusError as e:
        raise SystemExit(f"testbed: error: {e}") from None
    print(f"trained {args.out}: {record['parameters']} parameters, {spec.steps} steps in "
          f"{record['train_seconds']:.0f} s")
    if not args.no_card:
        write_card(args.out, corpus_cache=spec.corpus_cache)
        print(f"wrote {os.path.join(args.out, 'README.md')}")
    return 0


def add_parser(subparsers) -> None:
    """Add the `train-tiny` subcommand to testbed's CLI."""
    defaults = TrainSpec()
    p = subparsers.add_parser(
        "train-tiny", help="train a small Mixtral on the Python docs (python3.11-doc)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--threads", type=int, default=defaults.threads)
    p.add_argument("--corpus-cache", default=None, help="where the cleaned corpus is cached")
    p.add_argument("--deb", default=None, help="a python3.11-doc .deb already downloaded")
    p.add_argument("--no-card", action="store_true", help="skip the evaluation and model card")
    p.set_defaults(func=cmd_train_tiny)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="train_tiny")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train-tiny", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

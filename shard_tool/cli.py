"""`shard_tool`: split a checkpoint, verify and inspect the result, push shards to agents."""

from __future__ import annotations

import argparse
import signal
import sys

from shard_tool import push
from shard_tool.errors import ShardError
from shard_tool.split import DTYPE_CHOICES


def cmd_split(args) -> int:
    from shard_tool.split import split

    manifest = split(args.src, args.out, dtype=args.dtype, force=args.force,
                     progress=sys.stderr.isatty())
    experts = sum(1 for e in manifest.files if e.role == "expert")
    print(f"wrote {args.out}: base-station shard + {experts} expert shards, "
          f"{manifest.model['dtype']}, fingerprint {manifest.fingerprint[:16]}")
    return 0


def cmd_verify(args) -> int:
    from shard_tool.verify import verify

    manifest = verify(args.out, progress=sys.stderr.isatty())
    print(f"ok: {len(manifest.files)} files match the manifest "
          f"(fingerprint {manifest.fingerprint[:16]})")
    return 0


def cmd_inspect(args) -> int:
    from shard_tool.manifest import load_manifest
    from shard_tool.verify import inspect_table

    print(inspect_table(load_manifest(args.out)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shard_tool", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="split a HuggingFace MoE checkpoint into shards")
    p.add_argument("src", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("out", help="output folder (created whole, or not at all)")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep")
    p.add_argument("--force", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_split)
    p = sub.add_parser("verify", help="re-hash every shard against the manifest")
    p.add_argument("out")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("inspect", help="table of shards, tensors, bytes and device memory")
    p.add_argument("out")
    p.set_defaults(func=cmd_inspect)
    push.add_parser(sub)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM cleans up like Ctrl-C: no half-written output left behind
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.func(args)
    except ShardError as e:
        print(f"shard_tool: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shard_tool: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1

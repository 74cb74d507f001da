"""`shard_tool`: split a checkpoint, verify and inspect the result, push shards to agents."""

from __future__ import annotations

import argparse
import signal
import sys

from common.cli_args import ArgumentParser, check_endpoint, user_error
from common.errors import ShardError
from shard_tool import push
from shard_tool.split import DTYPE_CHOICES


def cmd_split(args) -> int:
    from shard_tool.split import bits_request, split
    from shard_tool.verify import bits_summary

    request = bits_request(args.bits, args.tolerance, args.calibration, args.calibration_tokens)
    manifest = split(args.src, args.out, dtype=args.dtype, force=args.force,
                     progress=sys.stderr.isatty(), bits=request, on_search=_print_search)
    experts = [e for e in manifest.files if e.role == "expert"]
    widths = sorted({bits_summary(manifest, e) for e in experts})
    print(f"wrote {args.out}: base-station shard + {len(experts)} expert shards "
          f"({sum(e.bytes for e in experts)} bytes, experts at {' / '.join(widths)} bits), "
          f"{manifest.model['dtype']}, fingerprint {manifest.fingerprint[:16]}")
    return 0


def _print_search(result) -> None:
    from shard_tool.search import describe
    from shard_tool.verify import bits_table

    print("bits per expert and MoE layer (chosen by --bits auto):")
    print(bits_table(result.widths))
    print(describe(result), flush=True)


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
    parser = ArgumentParser(prog="shard_tool", description=__doc__)  # one-line errors
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("split", help="split a HuggingFace MoE checkpoint into shards")
    p.add_argument("src", help="checkpoint folder (config.json + safetensors)")
    p.add_argument("out", help="output folder (created whole, or not at all)")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep")
    p.add_argument("--bits", default="16", metavar="16|8|4|auto",
                   help="routed experts' weight matrices: 16 keeps the checkpoint's floats; 8 or "
                        "4 quantises them per output channel; auto picks 8 or 4 per expert and "
                        "layer by measured sensitivity (needs --tolerance)")
    p.add_argument("--tolerance", default=None, metavar="PCT",
                   help="auto: calibration loss increase allowed over 16 bits, in percent")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="auto: calibration text (default: Python's standard-library docstrings)")
    p.add_argument("--calibration-tokens", default="2048", metavar="N",
                   help="auto: tokens of calibration text scored per measurement (2048)")
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


MAX_CHUNK_MB = 1024.0  # one chunk is one message held in memory at both ends
# A wait per step; libzmq takes milliseconds as a C int, so 1e17 s would overflow (a traceback)
MAX_TIMEOUT_S = 86400.0


def check_push_args(args) -> None:
    """push's numbers and --to, before any file or socket is touched (`--chunk-mb 0` would
    loop forever, sending empty chunks). Raises ShardError."""
    try:
        check_endpoint(args.to)
    except ValueError as e:
        raise ShardError(f"--to {e}") from None
    if not 0.001 <= args.chunk_mb <= MAX_CHUNK_MB:  # also refuses NaN
        raise ShardError(f"--chunk-mb {args.chunk_mb:g}: must be within 0.001-{MAX_CHUNK_MB:g} "
                         "(MiB per chunk)")
    if not 0 < args.timeout_s <= MAX_TIMEOUT_S:  # also refuses NaN
        raise ShardError(f"--timeout-s {args.timeout_s:g}: must be a number of seconds > 0 "
                         f"and <= {MAX_TIMEOUT_S:g}")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM cleans up like Ctrl-C: no half-written output left behind
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.command == "push":
            check_push_args(args)
        return args.func(args)
    except ShardError as e:
        print(f"shard_tool: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shard_tool: interrupted; nothing was left behind", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as e:  # a file, a folder or a socket the user named: one line, not a trace
        line = user_error(e)
        if line is None:
            raise
        print(f"shard_tool: error: {line}", file=sys.stderr)
        return 2

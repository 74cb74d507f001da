"""`basestation`: generate, chat, serve and status against live edge agents."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from basestation.session import RosterError, build_roster
from shard_tool.errors import ShardError


def add_roster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", action="append", default=[], metavar="EXPERTS=tcp://HOST:PORT",
                   help="a listening agent, e.g. 3=tcp://10.0.0.3:5600 (repeatable)")
    p.add_argument("--agents", metavar="FILE", help="TOML roster: [agents] \"3\" = \"tcp://…\"")
    p.add_argument("--listen", metavar="tcp://0.0.0.0:PORT", help="accept dial-in agents here")
    p.add_argument("--wait-s", type=float, default=30.0,
                   help="how long to wait for every expert's agent (default 30)")


def add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="DIR", help="split folder (shard_tool)")
    add_roster_args(p)
    p.add_argument("--theta", type=float, default=0.0, help="WLR drop threshold (0: never drop)")
    p.add_argument("--latency", choices=("measured", "model"), default="measured",
                   help="measured links (default) or the paper's modeled channel")
    p.add_argument("--channel", metavar="FILE", help="for --latency model: a scenario TOML "
                   "with a [paper] table (distances, powers, bandwidth); default: the paper's "
                   "8 devices at 50-400 m")
    p.add_argument("--dtype", default="auto", help="auto (the model's on a GPU, float32 on a "
                   "CPU) | bfloat16 | float16 | float32")
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees it) | cpu | cuda")
    p.add_argument("--wire-dtype", default=None, help="activations on the wire: "
                   "float32|bfloat16|float16|int8 (default: the compute dtype)")
    p.add_argument("--allow-missing", action="store_true",
                   help="run with the experts that have no agent dropped")
    p.add_argument("--local-fallback", metavar="EXPERTS|all",
                   help="load these experts here too, used when their agent is down")


def add_model_args(p: argparse.ArgumentParser, sample_by_default: bool = False) -> None:
    add_session_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    if sample_by_default:
        p.add_argument("--temperature", type=float, default=None,
                       help="0: greedy (default: the model's generation_config, or 0.7 with "
                       "top-p 0.9 where it does not sample)")
    else:
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--ignore-eos", action="store_true")


def _open(args):
    from basestation.session import open_session, read_channel_file

    if not 0.0 <= args.theta <= 1.0:
        raise RosterError(f"--theta {args.theta}: must be in [0, 1]")
    roster = build_roster(args.agent, args.agents, args.listen)
    return open_session(args.shards, roster, theta=args.theta, latency=args.latency,
                        dtype=args.dtype, wire_dtype=args.wire_dtype, wait_s=args.wait_s,
                        allow_missing=args.allow_missing, local_fallback=args.local_fallback,
                        channel=read_channel_file(args.channel) if args.channel else None,
                        device=args.device,
                        progress=sys.stderr.isatty())


def cmd_generate(args) -> int:
    from basestation.generate import generate

    session = _open(args)
    try:
        tokenizer = session.base.tokenizer
        input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
        result = generate(session, input_ids, args.max_new_tokens, args.temperature,
                          args.ignore_eos, on_text=stream)
        if args.json:
            print(json.dumps(result.to_json()))
        else:
            print()
            print(result.summary(), file=sys.stderr)
    finally:
        session.close()
    return 130 if result.interrupted else 0


def cmd_chat(args) -> int:
    from basestation.chat import run_chat

    session = _open(args)
    try:
        return run_chat(session, args)
    finally:
        session.close()


def cmd_serve(args) -> int:
    from basestation.engine import Engine
    from basestation.openai_api import Defaults
    from basestation.serve import is_loopback, run_server

    if args.max_queue < 0 or args.max_tokens < 1 or not 0 <= args.port <= 65535 \
            or args.max_batch < 1 or args.prefill_chunk_tokens < 1:
        raise RosterError("--max-queue must be >= 0, --max-tokens, --max-batch and "
                          "--prefill-chunk-tokens >= 1, --port in 0-65535")
    if not is_loopback(args.host) and not args.api_key and not args.insecure:
        raise RosterError(f"--host {args.host} is reachable beyond this machine: give "
                          "--api-key KEY (clients send Authorization: Bearer KEY) or --insecure")
    session = _open(args)
    try:
        model_id = args.model_name or os.path.basename(os.path.abspath(args.shards))
        engine = Engine(session, Defaults(model_id=model_id, theta=args.theta,
                                          max_tokens=args.max_tokens), max_queue=args.max_queue,
                        max_batch=args.max_batch, prefill_chunk_tokens=args.prefill_chunk_tokens)
        try:
            run_server(engine, model_id, args.host, args.port, args.api_key)
        except KeyboardInterrupt:  # uvicorn re-raises SIGINT/SIGTERM after its clean shutdown
            print("basestation serve: stopped", file=sys.stderr)
        except OSError as e:
            raise RosterError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") \
                from None
    finally:
        session.close()
    return 0


def cmd_status(args) -> int:
    from basestation.status import run_status

    roster = build_roster(args.agent, args.agents, args.listen)
    return run_status(roster, args.wait_s)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="basestation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="generate a completion through the agents")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="one JSON object with every figure")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat (tokens stream as they come)")
    add_model_args(p, sample_by_default=True)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="the OpenAI API over HTTP (one request decoded at a time)")
    add_session_args(p)
    p.add_argument("--host", default="127.0.0.1", help="beyond loopback needs --api-key or "
                   "--insecure (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("BASESTATION_API_KEY"),
                   help="clients must send Authorization: Bearer KEY (default: "
                   "$BASESTATION_API_KEY)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without --api-key")
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a place in the batch; more get 503 "
                   "(default 16)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences decoded together, one forward pass per step (default 16)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=256,
                   help="tokens per step at most: longer prompts are prefilled in chunks "
                   "while running answers keep flowing (default 256)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="max_tokens of a request that gives none (cut to the context)")
    p.add_argument("--model-name", help="the model id clients name (default: the shards "
                   "folder's name)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("status", help="table of every agent: reachable, experts, RTT, …")
    add_roster_args(p)
    p.set_defaults(func=cmd_status, wait_s=3.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.func(args)
    except (RosterError, ShardError) as e:
        print(f"basestation: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbasestation: interrupted", file=sys.stderr)
        return 130

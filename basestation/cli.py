"""`basestation`: generate, chat, serve and status against live edge agents; keygen."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys

from basestation import plan_cli
from basestation.latency_target import MAX_TARGET_MS
from basestation.roster import RosterError, build_roster
from common.cli_args import (
    ArgumentParser,
    check_endpoint,
    device,
    endpoint,
    number,
    user_error,
)
from common.errors import ShardError

THETA_DEFAULT = 0.0  # never drop


class ExpertsLost(Exception):
    """An exact run lost an expert to a fault: its answer is not the model's."""


def add_roster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", action="append", default=[],
                   metavar="EXPERTS=tcp://HOST:PORT[@KEY]",
                   help="a listening agent, e.g. 3=tcp://10.0.0.3:5600 (repeatable); with "
                   "--keys, @KEY names its public key: its certificate file "
                   "(0-3=tcp://10.0.0.3:5600@keys/edge-3.key, the NAME.key `edge_agent keygen` "
                   "wrote) or the key itself (40 Z85 characters)")
    p.add_argument("--agents", metavar="FILE", help="TOML roster: [agents] \"3\" = \"tcp://…\"")
    p.add_argument("--listen", metavar="tcp://0.0.0.0:PORT", type=endpoint(bind=True),
                   help="accept dial-in agents here")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ: this base station's keypair (from "
                   "`basestation keygen DIR`) and DIR/trusted/*.key, the agents that may dial "
                   "in; roster entries carry each listening agent's public key")
    p.add_argument("--insecure", action="store_true",
                   help="allow what is otherwise refused: --listen beyond loopback without "
                   "--keys, keyless roster agents beyond loopback with --keys, and for serve "
                   "a --host beyond loopback without --api-key")
    p.add_argument("--wait-s", type=number(0), default=30.0,
                   help="how long to wait for every expert's agent (default 30)")


def add_session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", required=True, metavar="DIR", help="split folder (shard_tool)")
    add_roster_args(p)
    p.add_argument("--theta", type=number(0, 1), default=THETA_DEFAULT,
                   help="WLR drop threshold (0: never drop)")
    p.add_argument("--latency", choices=("measured", "model"), default="measured",
                   help="measured links (default) or the paper's modeled channel")
    p.add_argument("--channel", metavar="FILE", help="for --latency model: a scenario TOML "
                   "with a [paper] table (distances, powers, bandwidth); default: the paper's "
                   "8 devices at 50-400 m")
    p.add_argument("--dtype", default="auto", help="auto (the model's on a GPU, float32 on a "
                   "CPU) | bfloat16 | float16 | float32")
    p.add_argument("--device", default="auto", type=device,
                   help="auto (CUDA when torch sees it) | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=number(1, integer=True), default=None,
                   help="torch CPU threads (default: one per core); agents on this same host "
                   "need cores too: give the base station the cores they leave, at least 1")
    p.add_argument("--wire-dtype", default=None, help="activations on the wire: "
                   "float32|bfloat16|float16|int8 (default: the compute dtype)")
    p.add_argument("--no-prefetch-hints", action="store_true",
                   help="send memory-budgeted agents no prefetch hints (on by default when an "
                   "agent reports --memory-budget)")
    p.add_argument("--allow-missing", action="store_true",
                   help="run with the experts that have no agent dropped")
    p.add_argument("--local-fallback", metavar="EXPERTS|all",
                   help="load these experts here too, used when their agent is down")
    p.add_argument("--popularity-out", metavar="FILE", help="count the router's slots per "
                   "(layer, expert) and write them here (JSON, for `basestation plan "
                   "--popularity`): at the end; serve also every 60 s")


MAX_TEMPERATURE = 10.0  # as chat's /temperature
# Below this, logits / temperature overflow to inf and sampling gives NaN (1e-300 would
# be a traceback); 0 stays greedy.
MIN_TEMPERATURE = 1e-5


def temperature(text: str) -> float:
    """An argparse `type`: 0 (greedy) or a number within MIN_TEMPERATURE-MAX_TEMPERATURE."""
    value = number(0, MAX_TEMPERATURE)(text)
    if 0 < value < MIN_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 (greedy) or at least "
                                         f"{MIN_TEMPERATURE:g}")
    return value


def add_model_args(p: argparse.ArgumentParser, sample_by_default: bool = False) -> None:
    add_session_args(p)
    p.add_argument("--max-new-tokens", type=number(1, integer=True), default=64,
                   help="at most this many tokens (prompt + these within the context)")
    if sample_by_default:
        p.add_argument("--temperature", type=temperature, default=None,
                       help="0: greedy (default: the model's generation_config, or 0.7 with "
                       "top-p 0.9 where it does not sample)")
    else:
        p.add_argument("--temperature", type=temperature, default=0.0,
                       help="0: greedy")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--latency-target-ms", type=number(0, MAX_TARGET_MS, above=True),
                   metavar="MS", help="pick θ per token to hold the mean token latency on MS "
                   "(in place of --theta; a target below what θ = 0.5 gives is met as well "
                   "as it can be)")


def _check_target(args) -> None:
    """--latency-target-ms replaces --theta: both given is refused (RosterError)."""
    if args.latency_target_ms is not None and args.theta != THETA_DEFAULT:
        raise RosterError(f"--theta {args.theta:g} and --latency-target-ms "
                          f"{args.latency_target_ms:g}: give one (the target picks θ per token)")


def _open(args, roster=None):
    from basestation.channel_file import read_channel_file
    from basestation.session import open_session

    if not 0.0 <= args.theta <= 1.0:
        raise RosterError(f"--theta {args.theta}: must be in [0, 1]")
    roster = _roster(args) if roster is None else roster
    if args.popularity_out:
        from basestation.popularity import out_path_error

        problem = out_path_error(args.popularity_out)
        if problem:
            raise RosterError(problem)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    session = open_session(args.shards, roster, theta=args.theta, latency=args.latency,
                           dtype=args.dtype, wire_dtype=args.wire_dtype, wait_s=args.wait_s,
                           allow_missing=args.allow_missing, local_fallback=args.local_fallback,
                           channel=read_channel_file(args.channel) if args.channel else None,
                           device=args.device,
                           progress=sys.stderr.isatty())
    if args.no_prefetch_hints:
        session.runtime.set_prefetch(False)
    if args.popularity_out:
        from basestation.popularity import Popularity

        session.runtime.popularity = Popularity(session.runtime.table.num_experts)
    return session


def _save_popularity(args, session) -> None:
    """--popularity-out: the counts so far into the file (generate's and chat's end)."""
    if args.popularity_out and session.runtime.popularity is not None:
        session.runtime.popularity.save(args.popularity_out)


def _roster(args):
    """build_roster, then every endpoint it names checked: flags and roster files alike (a port
    past 65535 would be dialled as another port). Raises RosterError."""
    roster = build_roster(args.agent, args.agents, args.listen, args.keys, args.insecure)
    for name in roster.endpoints:
        try:
            check_endpoint(name)
        except ValueError as e:
            raise RosterError(f"agent {e}") from None
    return roster


def _model_limits(shards: str):
    """(tokenizer, context length) of a split, read before any agent is waited for, so that a
    prompt or --max-new-tokens past the context is refused at once. Raises ShardError."""
    from transformers import AutoConfig, AutoTokenizer

    from basestation.generate import context_length
    from shard_tool.manifest import BASESTATION_DIR, load_manifest

    load_manifest(shards)  # one line when SHARDS is not a split
    base_dir = os.path.join(shards, BASESTATION_DIR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        return tokenizer, context_length(AutoConfig.from_pretrained(base_dir), tokenizer)
    except (OSError, ValueError) as e:
        raise ShardError(f"{base_dir}: no usable tokenizer or config.json "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def cmd_generate(args) -> int:
    from basestation.generate import budget_error, generate

    if not args.prompt:
        raise RosterError("--prompt is empty: give the text to continue")
    _check_target(args)
    roster = _roster(args)  # the quick checks first
    tokenizer, context = _model_limits(args.shards)
    # verbose=False: a prompt past the tokenizer's max length is refused below in one line
    input_ids = tokenizer(args.prompt, return_tensors="pt", verbose=False).input_ids
    problem = budget_error(input_ids.shape[1], args.max_new_tokens, context)
    if problem:
        raise RosterError(problem)
    session = _open(args, roster)
    try:
        stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
        result = generate(session, input_ids, args.max_new_tokens, args.temperature,
                          args.ignore_eos, on_text=stream, exact=args.exact,
                          latency_target_ms=args.latency_target_ms)
        if args.exact and result.fault_drops:
            if stream is not None:
                print()
            raise ExpertsLost("--exact: " + _lost(result))
        if args.json:
            print(json.dumps(result.to_json()))
        else:
            print()
            print(result.summary(), file=sys.stderr)
    finally:
        try:
            _save_popularity(args, session)
        finally:
            session.close()
    return 130 if result.interrupted else 0


def _lost(result) -> str:
    from basestation.ledger import lost_message

    failed = {a["agent"]: a["failures"] for a in result.agents if a["failures"]}
    return lost_message(result.fault_drops, failed,
                        [a["agent"] for a in result.agents if not a["alive"]])


def cmd_chat(args) -> int:
    from basestation.chat import run_chat

    _check_target(args)
    roster = _roster(args)  # the quick checks first
    _, context = _model_limits(args.shards)
    if args.max_new_tokens >= context:  # every answer needs at least one prompt token
        raise RosterError(f"--max-new-tokens {args.max_new_tokens}: must be below the model's "
                          f"context of {context} tokens")
    session = _open(args, roster)
    try:
        return run_chat(session, args)
    finally:
        try:
            _save_popularity(args, session)
        finally:
            session.close()


def cmd_serve(args) -> int:
    from basestation.engine import Engine
    from basestation.http_limits import HttpLimits
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
    writer = None
    if args.popularity_out:
        from basestation.popularity import PopularityWriter

        writer = PopularityWriter(session.runtime.popularity, args.popularity_out).start()
    try:
        model_id = args.model_name or os.path.basename(os.path.abspath(args.shards))
        engine = Engine(session, Defaults(model_id=model_id, theta=args.theta,
                                          max_tokens=args.max_tokens), max_queue=args.max_queue,
                        max_batch=args.max_batch, prefill_chunk_tokens=args.prefill_chunk_tokens)
        try:
            run_server(engine, model_id, args.host, args.port, args.api_key,
                       HttpLimits(max_body_bytes=int(args.max_body_mb * 2**20),
                                  header_timeout_s=args.header_timeout_s,
                                  max_connections=args.max_connections))
        except KeyboardInterrupt:  # uvicorn re-raises SIGINT/SIGTERM after its clean shutdown
            print("basestation serve: stopped", file=sys.stderr)
        except OSError as e:
            raise RosterError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") \
                from None
    finally:
        try:
            if writer is not None:
                writer.close()  # the final counts
        finally:
            session.close()
    return 0


def cmd_status(args) -> int:
    from basestation.status import run_status

    return run_status(_roster(args), args.wait_s)


def cmd_keygen(args) -> int:
    from wire.keys import TRUSTED_DIR, KeysError, keygen

    try:
        public, secret = keygen(args.dir, args.name, (TRUSTED_DIR,))
    except KeysError as e:
        raise RosterError(str(e)) from None
    print(f"wrote {secret} (stays here) and {public} (copy it into each agent's --keys "
          f"DIR/trusted/, and pushers/ to push with it); put dial-in agents' .key files in "
          f"{args.dir}/{TRUSTED_DIR}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="basestation", description=__doc__)  # one-line errors
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="generate a completion through the agents")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="one JSON object with every figure")
    p.add_argument("--exact", action="store_true", help="fail (exit 3, no answer) when an "
                   "expert is lost to a fault rather than print an answer computed without it "
                   "(θ's drops are not faults)")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat (tokens stream as they come)")
    add_model_args(p, sample_by_default=True)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("serve", help="the OpenAI API over HTTP (one request decoded at a time)")
    add_session_args(p)
    p.add_argument("--host", default="127.0.0.1", help="beyond loopback needs --api-key or "
                   "--insecure (default 127.0.0.1)")
    p.add_argument("--port", type=number(0, 65535, integer=True), default=8000)
    p.add_argument("--api-key", default=os.environ.get("BASESTATION_API_KEY"),
                   help="clients must send Authorization: Bearer KEY (default: "
                   "$BASESTATION_API_KEY)")
    p.add_argument("--max-queue", type=number(0, integer=True), default=16,
                   help="requests that may wait for a place in the batch; more get 503 "
                   "(default 16)")
    p.add_argument("--max-batch", type=number(1, integer=True), default=16,
                   help="sequences decoded together, one forward pass per step (default 16)")
    p.add_argument("--prefill-chunk-tokens", type=number(1, integer=True), default=256,
                   help="tokens per step at most: longer prompts are prefilled in chunks "
                   "while running answers keep flowing (default 256)")
    p.add_argument("--max-tokens", type=number(1, integer=True), default=256,
                   help="max_tokens of a request that gives none (cut to the context)")
    p.add_argument("--model-name", help="the model id clients name (default: the shards "
                   "folder's name)")
    p.add_argument("--max-body-mb", type=number(0.001, 1024), default=4.0,
                   help="larger request bodies get 413 (MiB, default 4: 16 prompts of 32k ids)")
    p.add_argument("--header-timeout-s", type=number(0.1, 3600), default=10.0,
                   help="a connection must send its request line and headers this soon after "
                   "it opens or its last response ends (default 10)")
    p.add_argument("--max-connections", type=number(1, 1_000_000, integer=True), default=1000,
                   help="HTTP connections held at once, further ones closed (default 1000, cut "
                   "to leave descriptors for the agents)")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("status", help="table of every agent: reachable, experts, RTT, …")
    add_roster_args(p)
    p.set_defaults(func=cmd_status, wait_s=3.0)
    p = sub.add_parser("keygen", help="write this base station's CurveZMQ keypair into DIR")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--name", default=f"basestation-{socket.gethostname()}",
                   help="file name of the keypair (default: basestation-HOSTNAME)")
    p.set_defaults(func=cmd_keygen)
    plan_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return args.func(args)
    except (RosterError, ShardError) as e:
        print(f"basestation: error: {e}", file=sys.stderr)
        return 2
    except ExpertsLost as e:
        print(f"basestation: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\nbasestation: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a file, a port or a socket the user named: one line, not a trace
        line = user_error(e)
        if line is None:
            raise
        print(f"basestation: error: {line}", file=sys.stderr)
        return 2

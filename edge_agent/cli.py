"""`edge_agent --expert 3 --shards DIR`: serve expert FFN calls (see protocol.py for the wire).
`edge_agent keygen DIR`: make this box's CurveZMQ keys (see keys.py for the folder layout)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import socket
import sys

from common.cli_args import ArgumentParser, device, endpoint, number, user_error
from common.expert_ids import format_expert_ids, parse_expert_ids
from edge_agent.faults import parse_faults
from wire.keys import (
    PUSHERS_DIR,
    TRUSTED_DIR,
    KeysError,
    keygen,
    load_key_folder,
    public_key_arg,
    refuse_unprotected_bind,
)
from wire.peer_limits import MAX_PEERS, PeerLimits
from wire.protocol import SocketConfig

DEFAULT_BIND = "tcp://0.0.0.0:5600"
EXIT_USAGE = 2
# --memory-budget units: decimal (MB = 10^6 bytes) and binary (MiB = 2^20 bytes), as disks and
# `free -h` count them; no unit: bytes
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", re.ASCII)
MAX_MEMORY_BYTES = 2**50


class UsageError(Exception):
    pass


def parse_experts(spec: str) -> tuple[int, ...]:
    """--expert value -> sorted unique ids (syntax owned by common.expert_ids). Raises
    UsageError."""
    try:
        return parse_expert_ids(spec)
    except ValueError as e:
        raise UsageError(f"--expert {e}") from None


def check_keys(args, bind: str | None):
    """--keys, --basestation-key and --insecure against the sockets this agent will open
    (protected by default: a bind beyond loopback needs keys). Returns (KeyFolder | None,
    base station key | None). Raises KeysError."""
    keys = load_key_folder(args.keys, "edge_agent") if args.keys else None
    if bind:
        refuse_unprotected_bind(bind, keys, args.insecure, "edge_agent", "--bind")
    if keys is None:
        if args.basestation_key:
            raise KeysError("--basestation-key needs --keys DIR (this agent's own keypair)")
        return None, None
    if bind and not keys.admitted:
        raise KeysError(f"--keys {args.keys}: {TRUSTED_DIR}/ and {PUSHERS_DIR}/ hold no "
                        "certificate, so nobody could talk to this agent; copy the base "
                        f"station's .key into {args.keys}/{TRUSTED_DIR}/")
    if args.basestation and not args.basestation_key:
        raise KeysError("--keys with --basestation needs --basestation-key (the base "
                        "station's public key or its .key file)")
    return keys, public_key_arg(args.basestation_key) if args.basestation_key else None


def fingerprint(text: str) -> str:
    """An argparse `type` for --accept-fingerprint: a model's fingerprint or its first 16+ hex
    characters (`shard_tool split` prints 16)."""
    if not (16 <= len(text) <= 64 and all(c in "0123456789abcdefABCDEF" for c in text)):
        raise argparse.ArgumentTypeError(f"{text!r}: 16 to 64 hex characters (the fingerprint "
                                         "`shard_tool split` printed)")
    return text.lower()


def memory_size(text: str) -> int:
    """An argparse `type` for --memory-budget: `64MB`, `1.5GiB`, `300000000` -> bytes."""
    match = SIZE_RE.fullmatch(text)
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a size (e.g. 64MB, 1.5GiB, or a "
                                         "number of bytes)")
    value = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if not (math.isfinite(value) and 1 <= value <= MAX_MEMORY_BYTES):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: must be at least 1 byte and at most "
                                         "1 PiB")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="edge_agent", description=__doc__)  # one-line errors
    p.add_argument("--expert", required=True, help="expert ids to host: 3, 0,3 or 0-3")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", metavar="DIR", help="split folder holding manifest.json and "
                     "this box's expert shard(s)")
    src.add_argument("--store", metavar="DIR", help="receive shards by `shard_tool push` into "
                     "DIR (waits when they are not there yet); restarted on the same DIR, it "
                     "serves the shards stored there without a new push, and an interrupted "
                     "push resumes where it stopped")
    p.add_argument("--bind", type=endpoint(bind=True),
                   help=f"listen for the base station (default {DEFAULT_BIND} "
                   "unless --basestation is given)")
    p.add_argument("--basestation", metavar="tcp://HOST:PORT", type=endpoint(),
                   help="dial in to the base station (for boxes it cannot reach)")
    p.add_argument("--advertise", metavar="tcp://HOST:PORT", type=endpoint(),
                   help="address reported in info (default: from the network interfaces)")
    p.add_argument("--keys", metavar="DIR", help="CurveZMQ: this box's keypair (from "
                   "`edge_agent keygen DIR`), DIR/trusted/*.key the base stations it serves, "
                   "DIR/pushers/*.key the keys that may push shards; anyone else gets no answer")
    p.add_argument("--basestation-key", metavar="KEY|FILE",
                   help="with --keys and --basestation: the base station's public key (Z85) or "
                   "its .key certificate")
    p.add_argument("--insecure", action="store_true",
                   help="allow a --bind beyond loopback without --keys (unencrypted, open to "
                   "anyone who can reach it)")
    p.add_argument("--id", dest="agent_id", help="routing id when dialling in "
                   "(default: edge-HOSTNAME-eEXPERTS)")
    p.add_argument("--device", default="auto", type=device,
                   help="auto (CUDA when present) | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="auto (the model's on CUDA, float32 on a CPU) | bfloat16 | float16 | "
                   "float32 (or bf16/fp16/fp32)")
    # libzmq keeps the TTL in deciseconds, 16 bits: 0.1 s to 6553 s
    p.add_argument("--heartbeat-timeout-s", type=number(0.1, 6553),
                   default=SocketConfig.heartbeat_timeout_s,
                   help="a peer silent this long is gone (what tells a dead peer from a slow "
                   "one: keep it above the longest stall a live box has)")
    p.add_argument("--max-message-mb", type=number(0.001, 2.0**20),  # -1 was "no cap"
                   default=SocketConfig.max_message_bytes / 2**20,
                   help="largest message a peer may send (MiB)")
    p.add_argument("--max-peers", type=number(1, 65536, integer=True), default=MAX_PEERS,
                   help="connections the --bind socket keeps; past it the one idle longest is "
                   f"cut (default {MAX_PEERS})")
    p.add_argument("--accept-fingerprint", metavar="FP", type=fingerprint,
                   help="with --store: the only model that may be pushed (its fingerprint, "
                   "as `shard_tool split` prints it); needed on an empty store whose --bind "
                   "reaches beyond loopback")
    p.add_argument("--memory-budget", type=memory_size, metavar="SIZE",
                   help="keep at most SIZE of expert weights in memory (64MB, 1.5GiB): the "
                   "layer-experts beyond it stay in the shard and load when a request needs "
                   "them or the base station hints they will (default: all of them, at start)")
    p.add_argument("--pace-load-mb-per-s", type=number(0, 1e6), default=0.0, metavar="MB",
                   help="emulation, with --memory-budget: reading a layer-expert from the shard "
                   "takes at least its size / MB (10^6 bytes) per second, as from an SD card "
                   "or eMMC; 0: off (default)")
    p.add_argument("--fault", action="append", default=[], metavar="delay=S|drop=N|crash=N",
                   help="fault injection for tests")
    p.add_argument("--no-self-benchmark", action="store_true", help="skip the start-up benchmark")
    p.add_argument("--pace-compute-us-per-token", type=float, default=0.0, metavar="US",
                   help="emulation: every (token, expert) takes at least US microseconds, as "
                   "an emulated model's expert on an emulated device would (FLOPs / peak "
                   "FLOP/s; `testbed up --scenario paper` sets it); 0: off (default)")
    p.add_argument("--pace-compute-us-per-call", type=float, default=0.0, metavar="US",
                   help="emulation: every expert call takes at least US microseconds whatever "
                   "its tokens (weight bytes / memory bandwidth): with the per-token pace, a "
                   "roofline max(per call, tokens x per token); 0: off (default)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--print-unit", action="store_true",
                   help="print a systemd unit that runs this same command line (without "
                   "--print-unit) on boot and after a crash, then exit without serving")
    return p


def print_unit(args, argv: list[str]) -> int:
    """--print-unit: the unit file for this command line, on stdout."""
    from edge_agent.unit_file import unit_text

    source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    working_dir = os.getcwd()
    try:
        parse_faults(args.fault)
        text = unit_text(
            python=os.path.abspath(sys.executable),
            # argparse takes abbreviations: a "--print-u" left in would make the unit print
            agent_args=[a for a in argv if not _abbreviates_print_unit(a)],
            working_dir=working_dir,
            experts=format_expert_ids(parse_experts(args.expert)),
            # `-m edge_agent` must import from here when the package is not installed
            source_root=None if source_root == working_dir else source_root,
            user=None if os.geteuid() == 0 else _user_name())
    except (UsageError, ValueError) as e:  # UnitError is a ValueError
        print(f"edge_agent: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(text)
    return 0


def _abbreviates_print_unit(arg: str) -> bool:
    """--print-unit or a prefix argparse takes for it ("--pr…": --pace-* start "--pa")."""
    return len(arg) >= len("--pr") and "--print-unit".startswith(arg)


def _user_name() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no name (a container): systemd takes the number too
        return str(os.geteuid())


def keygen_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="edge_agent keygen",
                                description="Write this agent's CurveZMQ keypair into DIR.")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--name", default=f"edge-{socket.gethostname()}",
                   help="file name of the keypair (default: edge-HOSTNAME)")
    args = p.parse_args(argv)
    try:
        public, secret = keygen(args.dir, args.name, (TRUSTED_DIR, PUSHERS_DIR))
    except KeysError as e:
        print(f"edge_agent keygen: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {secret} (stays here) and {public} (give it to the base station: its "
          f"--keys DIR/trusted/ or the roster's certificate); put the base station's .key in "
          f"{args.dir}/{TRUSTED_DIR}/ and pushers' in {args.dir}/{PUSHERS_DIR}/")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["keygen"]:
        return keygen_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="edge_agent: %(message)s", stream=sys.stderr)
    bind = args.bind or (None if args.basestation else DEFAULT_BIND)
    try:  # before the slow imports: a refusal comes at once
        keys, basestation_key = check_keys(args, bind)
    except KeysError as e:
        print(f"edge_agent: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.print_unit:  # checked like a real start, so the unit does not fail on boot
        return print_unit(args, argv)
    # Imported after parsing so `--help` is instant (torch takes seconds to import).
    import zmq

    from common.errors import ShardError
    from edge_agent.config import AgentConfig, EmulationConfig, NetworkConfig
    from edge_agent.server import Agent
    from edge_agent.shard_reader import missing_experts

    try:
        experts = parse_experts(args.expert)
        faults = parse_faults(args.fault)
    except (UsageError, ValueError) as e:
        print(f"edge_agent: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not (0.0 <= args.pace_compute_us_per_token < 1e7
            and 0.0 <= args.pace_compute_us_per_call < 1e7):
        print("edge_agent: error: --pace-compute-us-per-token/-per-call must be in [0, 1e7)",
              file=sys.stderr)
        return EXIT_USAGE
    if args.pace_load_mb_per_s and not args.memory_budget:
        print("edge_agent: error: --pace-load-mb-per-s paces the loads of --memory-budget: give "
              "both", file=sys.stderr)
        return EXIT_USAGE
    if args.store and os.path.exists(args.store) and not os.path.isdir(args.store):
        print(f"edge_agent: error: --store {args.store}: not a folder", file=sys.stderr)
        return EXIT_USAGE
    sockets = SocketConfig(heartbeat_timeout_s=args.heartbeat_timeout_s,
                           max_message_bytes=int(args.max_message_mb * 2**20))
    network = NetworkConfig(
        bind=bind, basestation=args.basestation, advertise=args.advertise,
        agent_id=args.agent_id, sockets=sockets, keys=keys, basestation_key=basestation_key,
        limits=PeerLimits.for_message_cap(sockets.max_message_bytes, args.max_peers))
    emulation = EmulationConfig(
        pace_s_per_token=args.pace_compute_us_per_token / 1e6,
        pace_s_per_call=args.pace_compute_us_per_call / 1e6,
        pace_load_bytes_per_s=args.pace_load_mb_per_s * 1e6, faults=faults)
    config = AgentConfig(
        experts=experts, shards_dir=args.shards, store_dir=args.store,
        accept_fingerprint=args.accept_fingerprint, device=args.device, dtype=args.dtype,
        self_benchmark=not args.no_self_benchmark, memory_budget_bytes=args.memory_budget,
        network=network, emulation=emulation)
    try:  # with --store, makes the store's folders
        agent = Agent(config, ready=lambda line: print(line, flush=True))
    except OSError as e:
        print(f"edge_agent: error: {user_error(e)}", file=sys.stderr)
        return EXIT_USAGE

    def request_stop(signum, frame):
        agent.stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        agent.check_store()  # the model a --store takes pushes of, before anything is loaded
        if args.shards:
            agent.load(args.shards)
        elif not missing_experts(args.store, list(experts)):
            try:
                agent.load(args.store)
            except ShardError as e:  # a corrupt shard in the store: wait for a new push
                logging.getLogger("edge_agent").warning("store: %s; waiting for a push", e)
        agent.open_sockets()
    except ShardError as e:
        print(f"edge_agent: error: {e}", file=sys.stderr)
        agent.close()
        return EXIT_USAGE
    except zmq.ZMQError as e:
        print(f"edge_agent: error: cannot use {bind or args.basestation}: {e.strerror}",
              file=sys.stderr)
        agent.close()
        return EXIT_USAGE
    except OSError as e:  # a shard or store file the user pointed at
        print(f"edge_agent: error: {user_error(e)}", file=sys.stderr)
        agent.close()
        return EXIT_USAGE
    if agent.loaded is not None:
        agent.announce_ready()
    else:
        print(f"edge_agent waiting: {agent.where()} store {args.store} needs experts "
              f"{','.join(map(str, missing_experts(args.store, list(experts))))}", flush=True)
    try:
        agent.run()
    finally:
        agent.close()
    print("edge_agent: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`edge_agent --expert 3 --shards DIR`: serve expert FFN calls (see protocol.py for the wire)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from edge_agent.faults import parse_faults
from edge_agent.protocol import SocketConfig
from shard_tool.expert_ids import parse_expert_ids

DEFAULT_BIND = "tcp://0.0.0.0:5600"
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def parse_experts(spec: str) -> tuple[int, ...]:
    """--expert value -> sorted unique ids (syntax owned by shard_tool.expert_ids). Raises
    UsageError."""
    try:
        return parse_expert_ids(spec)
    except ValueError as e:
        raise UsageError(f"--expert {e}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge_agent", description=__doc__)
    p.add_argument("--expert", required=True, help="expert ids to host: 3, 0,3 or 0-3")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", metavar="DIR", help="split folder holding manifest.json and "
                     "this box's expert shard(s)")
    src.add_argument("--store", metavar="DIR", help="receive shards by `shard_tool push` into "
                     "DIR (waits when they are not there yet)")
    p.add_argument("--bind", help=f"listen for the base station (default {DEFAULT_BIND} "
                   "unless --basestation is given)")
    p.add_argument("--basestation", metavar="tcp://HOST:PORT",
                   help="dial in to the base station (for boxes it cannot reach)")
    p.add_argument("--advertise", metavar="tcp://HOST:PORT",
                   help="address reported in info (default: from the network interfaces)")
    p.add_argument("--id", dest="agent_id", help="routing id when dialling in "
                   "(default: edge-HOSTNAME-eEXPERTS)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    p.add_argument("--dtype", default="auto",
                   help="auto (the model's on CUDA, float32 on a CPU) | bfloat16 | float16 | "
                   "float32 (or bf16/fp16/fp32)")
    p.add_argument("--heartbeat-timeout-s", type=float, default=SocketConfig.heartbeat_timeout_s,
                   help="drop a silent peer after this long (keep it above the longest "
                   "transfer on the slowest link)")
    p.add_argument("--max-message-mb", type=float,
                   default=SocketConfig.max_message_bytes / 2**20,
                   help="largest message a peer may send (MiB)")
    p.add_argument("--fault", action="append", default=[], metavar="delay=S|drop=N|crash=N",
                   help="fault injection for tests")
    p.add_argument("--no-self-benchmark", action="store_true", help="skip the start-up benchmark")
    p.add_argument("--pace-compute-us-per-token", type=float, default=0.0, metavar="US",
                   help="emulation: every (token, expert) takes at least US microseconds, as "
                   "an emulated model's expert on an emulated device would (the paper's Eq. 4 "
                   "/ C_q; `testbed up --scenario paper` sets it); 0: off (default)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="edge_agent: %(message)s", stream=sys.stderr)
    # Imported after parsing so `--help` is instant (torch takes seconds to import).
    from shard_tool.errors import ShardError
    import zmq

    from edge_agent.server import Agent, AgentConfig
    from edge_agent.shards import missing_experts

    try:
        experts = parse_experts(args.expert)
        faults = parse_faults(args.fault)
    except (UsageError, ValueError) as e:
        print(f"edge_agent: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not 0.0 <= args.pace_compute_us_per_token < 1e7:
        print("edge_agent: error: --pace-compute-us-per-token must be in [0, 1e7)",
              file=sys.stderr)
        return EXIT_USAGE
    bind = args.bind or (None if args.basestation else DEFAULT_BIND)
    sockets = SocketConfig(heartbeat_timeout_s=args.heartbeat_timeout_s,
                           max_message_bytes=int(args.max_message_mb * 2**20))
    config = AgentConfig(
        experts=experts, shards_dir=args.shards, store_dir=args.store, bind=bind,
        basestation=args.basestation, advertise=args.advertise, agent_id=args.agent_id,
        device=args.device, dtype=args.dtype, self_benchmark=not args.no_self_benchmark,
        sockets=sockets, faults=faults,
        pace_s_per_token=args.pace_compute_us_per_token / 1e6)
    agent = Agent(config, ready=lambda line: print(line, flush=True))

    def request_stop(signum, frame):
        agent.stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
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

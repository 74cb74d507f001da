"""`testbed up | degrade | status | down`: the link subcommands (wired in by testbed/cli.py)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from testbed.links import control as links
from testbed.links.control import LinkShape, TestbedError

_NUMBER = r"([0-9]*\.?[0-9]+)"
_TIME_UNITS_MS = {"": 1.0, "ms": 1.0, "s": 1000.0, "us": 0.001}
_RATE_UNITS_MBIT = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}


def parse_ms(value: str) -> float:
    """'40ms', '0.04s', '40' (ms) -> 40.0. Raises TestbedError."""
    match = re.fullmatch(_NUMBER + r"\s*(ms|s|us|)", value.strip().lower())
    if not match:
        raise TestbedError(f"{value!r}: expected a time like 40ms or 0.04s")
    return float(match.group(1)) * _TIME_UNITS_MS[match.group(2)]


def parse_pct(value: str) -> float:
    """'2%' or '2' -> 2.0. Raises TestbedError."""
    match = re.fullmatch(_NUMBER + r"\s*%?", value.strip())
    if not match or float(match.group(1)) > 100:
        raise TestbedError(f"{value!r}: expected a percentage like 2%")
    return float(match.group(1))


def parse_rate_mbit(value: str) -> float | None:
    """'20mbit' -> 20.0, '500kbit' -> 0.5, '1gbit' -> 1000.0, 'none' -> None (unlimited).
    Raises TestbedError."""
    text = value.strip().lower()
    if text in ("none", "unlimited", "off"):
        return None
    match = re.fullmatch(_NUMBER + r"\s*(bit|kbit|mbit|gbit)", text)
    if not match or float(match.group(1)) <= 0:
        raise TestbedError(f"{value!r}: expected a rate like 500kbit, 20mbit or 1gbit "
                           "(bits per second), or none")
    return float(match.group(1)) * _RATE_UNITS_MBIT[match.group(2)]


def _fail(e: Exception) -> int:
    print(f"testbed: error: {e}", file=sys.stderr)
    return 2


def _load_scenario(name: str | None, shards: str, num_agents: int
                   ) -> tuple[dict[int, LinkShape], dict[int, list[str]]]:
    """The scenario's shapes at time 0 and, when it emulates a model (`paper`), the agents'
    compute pacing."""
    if not name:
        return {}, {}
    from testbed import scenarios

    shapes, agent_args, _ = scenarios.bring_up(scenarios.load(name), shards, num_agents)
    return shapes, agent_args


def cmd_up(args) -> int:
    try:
        shapes, paced = _load_scenario(args.scenario, args.shards, args.agents)
        common = args.agent_arg or []
        agent_args = {i: common + paced.get(i, []) for i in range(args.agents)} if paced \
            else common
        mode, unshaped_why = links.link_mode()
        if mode == links.LOOPBACK:
            print(f"testbed: {unshaped_why}: agents run on loopback without shaping",
                  file=sys.stderr)
        print(f"testbed: starting {args.agents} agents (logs in {args.state_dir})",
              file=sys.stderr)
        tb = links.up(args.shards, args.agents, shapes, state_dir=args.state_dir,
                      roster_path=args.roster, agent_args=agent_args,
                      timeout_s=args.timeout_s, secure=args.secure)
    except (TestbedError, ValueError) as e:
        return _fail(e)
    _print_status(links.status(tb.state_dir))
    if tb.basestation_keys:
        print(f"keys: {os.path.dirname(tb.basestation_keys)}  (CurveZMQ: the roster names the "
              "base station's keys and each agent's public key; `testbed down` removes them)")
    print(f"roster: {tb.roster_path}  (basestation chat --shards {args.shards} --agents "
          f"{tb.roster_path})")
    return 0


def _shape_changes(args) -> dict:
    """The LinkShape fields degrade's flags set. Raises TestbedError."""
    changes = {}
    if args.delay is not None:
        changes["delay_ms"] = parse_ms(args.delay)
    if args.jitter is not None:
        changes["jitter_ms"] = parse_ms(args.jitter)
    if args.loss is not None:
        changes["loss_pct"] = parse_pct(args.loss)
    if args.rate is not None:
        changes["rate_mbit"] = parse_rate_mbit(args.rate)
    if args.down or args.up:
        changes["down"] = bool(args.down)
    return changes


def cmd_degrade(args) -> int:
    try:
        if args.roster:  # real boxes, shaped by `testbed shape` (testbed/boxes)
            from testbed.boxes import cli as boxes_cli

            if args.state_dir == links.DEFAULT_STATE_DIR:
                args.state_dir = None  # `testbed shape`'s own default
            return boxes_cli.degrade_roster(args, _shape_changes(args))
        if args.dev:
            raise TestbedError("--dev goes with --roster (boxes shaped by `testbed shape`)")
        state = links.load_state(args.state_dir)
        if state is None:
            raise TestbedError(f"no testbed is up in {args.state_dir} (run `testbed up` first)")
        if args.agent is not None and not args.agent.isdigit():
            raise TestbedError(f"--agent {args.agent!r}: an agent index (an endpoint needs "
                               "--roster)")
        index = int(args.agent) if args.agent is not None else \
            links.agent_for_expert(args.state_dir, args.expert)
        current = next((links.shape_of(a) for a in state["agents"] if a["index"] == index),
                       LinkShape())
        if args.clear:
            current = LinkShape()
        shape = LinkShape(**{**current.__dict__, **_shape_changes(args)})
        links.degrade(args.state_dir, index, shape)
    except TestbedError as e:
        return _fail(e)
    print(f"agent {index}: {shape.describe()}")
    return 0


def _print_status(rows: list[links.LinkStatus]) -> None:
    if rows:
        print(f"backend: {rows[0].backend}")
    for r in rows:
        state = ("alive" if r.alive else "DEAD") + (", answers" if r.answers else
                                                    ", no answer")
        extra = f"  args: {' '.join(r.agent_args)}" if r.agent_args else ""
        print(f"agent {r.index} experts {links.experts_spec(r.experts)}  "
              f"{r.namespace or 'loopback'}  {r.endpoint}  [{r.shape.describe()}]  {state}"
              f"{extra}")


def cmd_status(args) -> int:
    try:
        _print_status(links.status(args.state_dir))
    except TestbedError as e:
        return _fail(e)
    return 0


def cmd_down(args) -> int:
    try:
        removed = links.down(args.state_dir, everything=args.all)
    except TestbedError as e:
        return _fail(e)
    if removed:
        print(f"removed {len(removed)}: " + ", ".join(removed))
    else:
        print(f"nothing to remove in {args.state_dir}"
              + ("" if args.all else " (`testbed down --all` removes every wdm-* leftover)"))
    return 0


def add_parsers(subparsers) -> None:
    """Add up, degrade, status, down to an argparse subparsers object."""
    def state_dir(p: argparse.ArgumentParser) -> None:
        # %(default)s: the folder of the user running it (per uid unless root, or
        # WDMOE_TESTBED_STATE), and a % in that variable cannot break --help
        p.add_argument("--state-dir", default=links.DEFAULT_STATE_DIR,
                       help="where state, logs and the roster go (default %(default)s: "
                            "/tmp/wdmoe-testbed as root, /tmp/wdmoe-testbed-UID otherwise; "
                            "the environment variable WDMOE_TESTBED_STATE sets another)")

    p = subparsers.add_parser("up", help="start agents behind shaped links in network namespaces "
                              "(without root: inside a user namespace)")
    p.add_argument("--shards", required=True, help="split folder (shard_tool split)")
    p.add_argument("--agents", type=int, required=True, help="number of agents")
    p.add_argument("--scenario", help="link scenario: a name or a file")
    p.add_argument("--roster", help="roster file to write (default STATE_DIR/roster.toml)")
    p.add_argument("--timeout-s", type=float, default=links.UP_TIMEOUT_S,
                   help="give up when agents have not answered by then")
    p.add_argument("--agent-arg", action="append", metavar="ARG",
                   help="extra edge_agent argument (repeatable), e.g. "
                        "--agent-arg=--no-self-benchmark")
    p.add_argument("--secure", action="store_true",
                   help="CurveZMQ: keys for the base station and every agent (in "
                        "STATE_DIR/keys), agents that answer the base station's key only, and "
                        "a roster that carries the keys (basestation --agents ROSTER alone)")
    state_dir(p)
    p.set_defaults(func=cmd_up)

    p = subparsers.add_parser("degrade", help="change one link while everything runs")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--expert", type=int, help="the link of the agent hosting this expert")
    who.add_argument("--agent", help="the link of this agent index (with --roster also an "
                     "ENDPOINT)")
    p.add_argument("--delay", help="one-way delay, e.g. 40ms")
    p.add_argument("--jitter", help="± jitter around the delay, e.g. 5ms")
    p.add_argument("--loss", help="packet loss each way, e.g. 2%%")
    p.add_argument("--rate", help="rate each way, e.g. 20mbit, 500kbit, none")
    updown = p.add_mutually_exclusive_group()
    updown.add_argument("--down", action="store_true", help="no packet passes")
    updown.add_argument("--up", action="store_true", help="packets pass again")
    p.add_argument("--clear", action="store_true", help="start from an unshaped link")
    p.add_argument("--roster", metavar="FILE", help="real boxes shaped by `testbed shape "
                   "--roster FILE --dev DEV`: change one of their links (needs --dev)")
    p.add_argument("--dev", help="with --roster: the interface `testbed shape` shaped")
    state_dir(p)
    p.set_defaults(func=cmd_degrade)

    p = subparsers.add_parser("status", help="each link's shaping and its agent's state")
    state_dir(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("down", help="remove every namespace, link, rule and process")
    p.add_argument("--all", action="store_true",
                   help="also remove leftovers of any testbed (root: every wdm-* namespace; "
                   "any user: every user namespace of ours)")
    state_dir(p)
    p.set_defaults(func=cmd_down)

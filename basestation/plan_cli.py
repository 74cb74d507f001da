"""`basestation plan`: where each expert should live, from measured boxes and expert popularity.

Steps: check the inputs (roster, split, popularity file, room per box) -> open a short session
on the roster's agents (connect, calibrate, then PROBE_CALLS one-token calls to each so the link
estimate holds its real time per call) -> the load per expert (a popularity file, a text run
through the model at θ = 0, or uniform) -> `placement.plan_placement` -> print the measured
table, the plan, the new roster and the commands (plan_steps.py), and write the roster to
--out (and what --text measured to --popularity-out). Every user error is one line before
anything is written.
"""

from __future__ import annotations

import os
import sys
import time

from basestation.plan_steps import (
    MeasuredBox,
    box_commands,
    commands_text,
    measured_table,
    merge_boxes,
    plan_table,
    planned_roster,
)
from basestation.roster import (
    RosterError,
    build_roster,
    format_roster,
    read_roster_agents,
    read_roster_keys,
)
from common.cli_args import device, number
from common.errors import ShardError

PROBE_CALLS = 24  # one-token calls per agent: enough for a 40 ms box's estimate to settle
PROBE_DEADLINE_S = 30.0  # the whole probe, after the agents answered INFO
TEXT_CHUNK_TOKENS = 256  # a --text is run in independent chunks of this many tokens at most
GIB = 2**30


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="plan replicas and placement from measured boxes and "
                       "expert popularity; print the new roster and the commands")
    p.add_argument("--roster", required=True, metavar="FILE",
                   help="the roster TOML of the agents to measure and plan for")
    p.add_argument("--shards", required=True, metavar="DIR",
                   help="the split (shard_tool): the model, one expert's shard size for "
                   "--memory, and what the printed `shard_tool push` lines send")
    room = p.add_mutually_exclusive_group(required=True)
    room.add_argument("--experts-per-box", type=number(1, integer=True), metavar="N",
                      help="every box holds N experts")
    room.add_argument("--memory", action="append", metavar="GB|ENDPOINT=GB",
                      help="memory for experts, GiB: one figure for every box, or per box "
                      "(repeat); a box's room is whole expert shards in it")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--popularity", metavar="FILE", help="expert popularity from "
                        "`--popularity-out` (serve, generate, chat) or testbed eval")
    source.add_argument("--text", metavar="FILE", help="measure popularity on this text "
                        "(run through the model on the roster's agents at θ = 0)")
    p.add_argument("--out", metavar="ROSTER", help="write the new roster here (atomically)")
    p.add_argument("--popularity-out", metavar="FILE", help="with --text: write the popularity "
                   "measured on it here (JSON, for a later plan --popularity without running "
                   "the text again)")
    p.add_argument("--max-copies", type=number(1, integer=True), metavar="N",
                   help="copies of one expert at most (default: one per box)")
    p.add_argument("--agent-shards", metavar="DIR", help="the split's folder on the boxes: "
                   "the edge_agent lines read it with --shards and no push is needed")
    p.add_argument("--agent-store", default="wdmoe-store", metavar="DIR",
                   help="the edge_agent lines' --store folder, filled by the push lines "
                   "(default wdmoe-store)")
    p.add_argument("--agent-keys", default="keys", metavar="DIR",
                   help="keyed boxes' key folder in their edge_agent lines (default keys)")
    p.add_argument("--keys", metavar="DIR", help="the base station's key folder (default: "
                   "the roster's [basestation] keys)")
    p.add_argument("--insecure", action="store_true",
                   help="reach keyless agents beyond loopback unencrypted (as generate)")
    p.add_argument("--wait-s", type=number(0), default=30.0,
                   help="how long to wait for every agent to answer (default 30)")
    p.add_argument("--probe-calls", type=number(1, 1000, integer=True), default=PROBE_CALLS,
                   help=f"one-token calls per agent to measure it (default {PROBE_CALLS})")
    p.add_argument("--dtype", default="auto", help="as generate's (--text runs the model)")
    p.add_argument("--device", default="auto", type=device, help="as generate's")
    p.set_defaults(func=cmd_plan)


def memory_bytes(values: list[str], endpoints: list[str]) -> dict[str, float]:
    """--memory values -> bytes per endpoint: a plain figure is every box's not named on its
    own; ENDPOINT=GB names one. Raises RosterError (pure)."""
    default, named = None, {}
    for value in values:
        where, sep, figure = value.rpartition("=")
        try:
            gib = float(figure)
            if not 0 < gib < float("inf"):
                raise ValueError
        except ValueError:
            raise RosterError(f"--memory {value[:80]!r}: expected GB or ENDPOINT=GB (GiB, a "
                              "number > 0)") from None
        if not sep:
            default = gib
        elif where not in endpoints:
            raise RosterError(f"--memory {value[:80]!r}: {where[:80]} is not an agent of the "
                              f"roster ({', '.join(endpoints)})")
        else:
            named[where] = gib
    missing = [e for e in endpoints if e not in named and default is None]
    if missing:
        raise RosterError(f"--memory: no figure for {', '.join(missing)} (give GB for every "
                          "box, or ENDPOINT=GB for each)")
    return {e: named.get(e, default) * GIB for e in endpoints}


def expert_shard_bytes(manifest) -> int:
    """The largest expert shard of the split (quantised splits differ per expert)."""
    sizes = [f.bytes for f in manifest.files if f.role == "expert"]
    if not sizes:
        raise ShardError("the split has no expert shards")
    return max(sizes)


def capacities(args, endpoints: list[str], manifest) -> list[int]:
    """Experts each box can hold. Raises RosterError."""
    from basestation.placement import capacity_from_memory

    if args.experts_per_box is not None:
        room = [args.experts_per_box] * len(endpoints)
    else:
        shard = expert_shard_bytes(manifest)
        memory = memory_bytes(args.memory, endpoints)
        room = [capacity_from_memory(memory[e], shard) for e in endpoints]
    if sum(room) < manifest.num_experts:
        raise RosterError(f"the boxes hold {sum(room)} experts in all ({', '.join(map(str, room))}"
                          f" per box), fewer than the model's {manifest.num_experts}: give more "
                          "--memory or --experts-per-box")
    return room


def cmd_plan(args) -> int:
    from basestation.placement import BoxProfile, PlacementError, plan_placement
    from basestation.popularity import PopularityError, load_popularity
    from shard_tool.manifest import load_manifest

    # the quick checks first: nothing is probed or written for a bad input
    manifest = load_manifest(args.shards)
    agents = merge_boxes(read_roster_agents(args.roster))
    roster = build_roster([], args.roster, None, args.keys, args.insecure)
    endpoints = [a.endpoint for a in agents]
    room = capacities(args, endpoints, manifest)
    popularity, source = None, "no --popularity or --text: uniform load (every expert alike)"
    if args.popularity:
        try:
            popularity = load_popularity(args.popularity)
        except PopularityError as e:
            raise RosterError(str(e)) from None
        if popularity.num_experts != manifest.num_experts:
            raise RosterError(f"{args.popularity}: counts {popularity.num_experts} experts, the "
                              f"split has {manifest.num_experts}")
        source = (f"popularity from {args.popularity}: {popularity.slots} slots, "
                  f"{len(popularity.snapshot())} layers, {popularity.tokens} tokens")
    text = _read_text(args.text) if args.text else None
    if args.popularity_out:
        from basestation.popularity import out_path_error

        problem = out_path_error(args.popularity_out) if text is not None else (
            f"--popularity-out {args.popularity_out}: needs --text (it writes what the text "
            "measured)")
        if problem:
            raise RosterError(problem)
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise RosterError(f"--out {args.out}: no such folder")

    boxes, measured = _measure(args, roster, agents, room, text)
    if measured is not None:
        popularity, source = measured
    load = [float(n) for n in popularity.totals()] if popularity is not None else None
    if load is not None and not any(load):
        load, source = None, source + "; no slots counted: uniform load"
    load = load or [1.0] * manifest.num_experts
    try:
        placement = plan_placement(load, [BoxProfile(b.endpoint, b.time_s_per_load, b.capacity)
                                          for b in boxes], args.max_copies)
    except PlacementError as e:
        raise RosterError(f"cannot plan: {e}") from None

    keys_dir = args.keys or read_roster_keys(args.roster)
    roster_text = format_roster(planned_roster(boxes, placement),
                                comment=f"planned by basestation plan from {args.roster}",
                                keys=_keys_for(keys_dir, args.out))
    commands = box_commands(boxes, placement, args.shards, args.agent_shards,
                            args.agent_store, keys_dir, args.agent_keys)
    print("measured:")
    print(measured_table(boxes))
    print(source)
    print("\nplan:")
    print(plan_table(boxes, placement, load))
    print("\nroster" + (f" (written to {args.out})" if args.out else "") + ":")
    print(roster_text, end="")
    print("\ncommands (start each box, then push its shards):" if not args.agent_shards
          else "\ncommands (start each box):")
    print(commands_text(commands))
    if args.out:
        from common.staging import write_file_atomic

        write_file_atomic(args.out, roster_text.encode())
    if args.popularity_out:  # with the roster: after a plan, as nothing is written before one
        popularity.save(args.popularity_out)
    return 0


def _keys_for(keys_dir: str | None, out: str | None) -> str | None:
    """The key folder as the written roster should name it: relative to its own folder."""
    if keys_dir is None or out is None:
        return keys_dir
    return os.path.relpath(os.path.abspath(keys_dir), os.path.dirname(os.path.abspath(out)))


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RosterError(f"--text {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise RosterError(f"--text {path}: not UTF-8 text") from None
    if not text.strip():
        raise RosterError(f"--text {path}: empty")
    return text


def _measure(args, roster, agents, room, text):
    """Open a session, probe every agent, measure popularity on `text` when given: the boxes
    (in roster order) and (Popularity, source line) or None. Raises RosterError, ShardError."""
    from basestation import link_estimator as links
    from basestation.session import open_session

    session = open_session(args.shards, roster, dtype=args.dtype, wait_s=args.wait_s,
                           device=args.device, progress=sys.stderr.isatty())
    try:
        probe(session, args.probe_calls, PROBE_DEADLINE_S)
        by_name = {a.name: a for a in session.agents}
        one_bytes = session.runtime.table.request_bytes(1)
        boxes = []
        for agent_entry, capacity in zip(agents, room):
            link = by_name[agent_entry.endpoint]
            figures = link.figures()
            boxes.append(MeasuredBox(
                agent_entry.endpoint, link.experts, agent_entry.public_key,
                figures["rtt_ms"], figures["throughput_mbit_s"],
                figures["compute_us_per_token"],
                links.expected_time_s(link.state, one_bytes, one_bytes, 1, 1), capacity))
        measured = measure_text(session, text, progress=sys.stderr.isatty()) \
            if text is not None else None
    finally:
        session.close()
    return boxes, measured


def probe(session, calls: int, deadline_s: float) -> None:
    """`calls` work probes (one token through one of its experts) answered by every agent, so
    its link estimate holds its time per call; the Prober sends them (at most one in flight per
    agent) and takes the replies. Raises RosterError when an agent falls short by the
    deadline."""
    from basestation.liveness import TICK_S

    prober, client = session.runtime.prober, session.client
    start = {id(a): a.state.samples for a in session.agents}
    end_s = time.monotonic() + deadline_s

    def short() -> list:
        return [a for a in session.agents if a.state.samples - start[id(a)] < calls]

    while short():
        if time.monotonic() > end_s:
            names = ", ".join(f"{a.name} ({a.state.samples - start[id(a)]})" for a in short())
            raise RosterError(f"probe: agents answered fewer than {calls} calls within "
                              f"{deadline_s:g} s: {names}")
        prober.tick(time.perf_counter(), refresh_after_s=0.0)  # a probe to each idle agent
        reply = client.recv(TICK_S)
        if reply is not None and not prober.take(reply, time.perf_counter()):
            client.count_late()


def measure_text(session, text: str, progress: bool = False):
    """Popularity of `text` run through the model at θ = 0, in independent chunks of at most
    TEXT_CHUNK_TOKENS (one prefill pass each), with a bar on a terminal: (Popularity, source
    line)."""
    from basestation.generate import context_length, prompt_logits
    from basestation.popularity import Popularity

    base, runtime = session.base, session.runtime
    ids = base.tokenizer(text, return_tensors="pt", verbose=False).input_ids  # [1, T]
    chunk = max(1, min(TEXT_CHUNK_TOKENS, context_length(base.config, base.tokenizer)))
    popularity = Popularity(runtime.table.num_experts)
    previous = getattr(runtime, "popularity", None)
    runtime.popularity = popularity
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=ids.shape[1], desc="plan --text", unit="token", file=sys.stderr)
    try:
        for first in range(0, ids.shape[1], chunk):
            prompt_logits(session, ids[:, first:first + chunk], theta=0.0)
            if bar is not None:
                bar.update(min(chunk, ids.shape[1] - first))
    finally:
        runtime.popularity = previous
        if bar is not None:
            bar.close()
    return popularity, (f"popularity measured on the text: {ids.shape[1]} tokens in "
                        f"{-(-ids.shape[1] // chunk)} chunks, {popularity.slots} slots counted")


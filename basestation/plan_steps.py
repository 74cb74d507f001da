"""What `basestation plan` prints and writes, as data: pure functions of the measured boxes and
the placement (basestation/placement.py), no sockets, no files.

A box is one listening agent of the input roster (its endpoint and public key stay); the plan
gives it a new expert set. The commands that make the plan real are argv lists, printed by the
CLI with shlex.join: on each box `edge_agent --expert IDS --bind ENDPOINT` reading its shards
from `--store DIR` (filled by the `shard_tool push` line run where the split is) or, with the
split already on the box, from `--shards DIR`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from basestation.placement import Placement
from basestation.roster import RosterAgent
from common.expert_ids import format_expert_ids as _ids
from wire.keys import is_loopback_endpoint


@dataclass(frozen=True)
class MeasuredBox:
    """One box as the probe saw it (figures from AgentLink.figures and the link estimate)."""

    endpoint: str
    experts: tuple[int, ...]  # what it holds now
    public_key: bytes | None
    rtt_ms: float
    throughput_mbit_s: float
    compute_us_per_token: float
    time_s_per_load: float  # expected time of a one-token, one-expert call
    capacity: int


@dataclass(frozen=True)
class BoxCommands:
    endpoint: str
    experts: tuple[int, ...]
    start: tuple[str, ...]  # edge_agent argv, run on the box
    push: tuple[str, ...] | None  # shard_tool push argv, run where the split is; None: --shards


def merge_boxes(agents: list[RosterAgent]) -> list[RosterAgent]:
    """Roster entries by endpoint (a roster may name one agent in several entries), in the
    order they first appear, each with the union of its experts."""
    merged: dict[str, RosterAgent] = {}
    for agent in agents:
        seen = merged.get(agent.endpoint)
        experts = tuple(sorted(set(agent.experts) | set(seen.experts if seen else ())))
        key = seen.public_key if seen and seen.public_key else agent.public_key
        merged[agent.endpoint] = RosterAgent(experts, agent.endpoint, key)
    return list(merged.values())


def planned_roster(boxes: list[MeasuredBox], placement: Placement) -> list[RosterAgent]:
    """The new roster's agents: each box with its planned experts (a box given none is left
    out), endpoint and public key as before."""
    return [RosterAgent(experts, box.endpoint, box.public_key)
            for box, experts in zip(boxes, placement.experts_of) if experts]


def box_commands(boxes: list[MeasuredBox], placement: Placement, split: str,
                 agent_shards: str | None = None, agent_store: str = "wdmoe-store",
                 basestation_keys: str | None = None, agent_keys: str = "keys"
                 ) -> list[BoxCommands]:
    """Per box that holds experts in the plan: the edge_agent line that starts it and the
    shard_tool push line that sends it its shards (none with `agent_shards`: the split is on
    the box). Keyed boxes start with --keys `agent_keys` and are pushed to over CurveZMQ with
    the base station's keys; a plain box beyond loopback needs --insecure, as it runs today."""
    out = []
    for box, experts in zip(boxes, placement.experts_of):
        if not experts:
            continue
        ids = _ids(experts)
        start = ["edge_agent", "--expert", ids, "--bind", box.endpoint]
        start += ["--shards", agent_shards] if agent_shards else ["--store", agent_store]
        if box.public_key is not None:
            start += ["--keys", agent_keys]
        elif not is_loopback_endpoint(box.endpoint):
            start.append("--insecure")
        push = None
        if not agent_shards:
            push = ["shard_tool", "push", split, "--expert", ids, "--to", box.endpoint]
            if box.public_key is not None:
                push += ["--keys", basestation_keys or "KEYS", "--agent-key",
                         box.public_key.decode()]
        out.append(BoxCommands(box.endpoint, experts, tuple(start),
                               tuple(push) if push else None))
    return out


def measured_table(boxes: list[MeasuredBox]) -> str:
    """What the probe measured, one row per box."""
    rows = [("agent", "experts", "rtt ms", "Mbit/s", "compute us/token", "ms per call",
             "room")]
    rows += [(box.endpoint, _ids(box.experts), f"{box.rtt_ms:.3f}",
              f"{box.throughput_mbit_s:.1f}", f"{box.compute_us_per_token:.1f}",
              f"{box.time_s_per_load * 1e3:.3f}", str(box.capacity)) for box in boxes]
    return _table(rows)


def plan_table(boxes: list[MeasuredBox], placement: Placement, load: list[float]) -> str:
    """Per box its planned experts, their load and its planned time (load x its time per
    call, a replicated expert's load split by speed); then each replicated expert's holders."""
    rows = [("agent", "experts", "planned s", "share of slowest")]
    slowest = placement.time_s or 1.0
    for box, experts, time_s in zip(boxes, placement.experts_of, placement.box_time_s):
        rows.append((box.endpoint, _ids(experts) if experts else "(none: not needed)",
                     f"{time_s:.4g}", f"{time_s / slowest:.2f}"))
    lines = [_table(rows)]
    replicated = [(e, holders) for e, holders in enumerate(placement.holders) if len(holders) > 1]
    if replicated:
        lines.append("replicated experts (load, holders):")
        lines += [f"  expert {e} ({load[e]:g}): " + ", ".join(boxes[b].endpoint for b in holders)
                  for e, holders in replicated]
    else:
        lines.append("no expert replicated (no room beyond one copy each, or no copy would "
                     "shorten the plan)")
    return "\n".join(lines)


def commands_text(commands: list[BoxCommands]) -> str:
    lines = []
    for c in commands:
        lines.append(f"# {c.endpoint}: experts {_ids(c.experts)}")
        lines.append(f"on the box:  {shlex.join(c.start)}")
        if c.push is not None:
            lines.append(f"from here:   {shlex.join(c.push)}")
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)

"""`testbed linkcheck --roster FILE`: what each agent's link really gives, measured from here.

Per roster agent, in roster order: INFO within a deadline; the wall time of N one-token EXPERT
calls (p50, p95: the round trip a decode step pays, compute included); the compute time the
agent reports for one token and, per token, for MANY_TOKENS; and throughput each way with one
large message, the round trip of an empty PING subtracted:
    down  PING carrying the payload, reply_bytes=0  -> an empty PONG
    up    PING with reply_bytes=N, no payload       -> a PONG of N zero bytes
(wire/protocol.py PING; an agent that echoes instead, one from before reply_bytes, gets None
and a note). An agent that does not answer is a row that says why; the others are measured.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from basestation.roster import RosterError, build_roster
from common.expert_ids import format_expert_ids

# torch, the wire and edge_agent.cli (all import torch) are imported where they are used:
# every `testbed` command builds this parser, and `testbed --help` must not wait 2 s for torch
if TYPE_CHECKING:
    from testbed.links.spec import LinkShape
    from wire.client import AgentClient

DEFAULT_CALLS = 20
DEFAULT_TRANSFER_BYTES = 4 << 20
DEFAULT_TIMEOUT_S = 10.0
MAX_CALLS = 10_000
MAX_TIMEOUT_S = 3600.0
# A large PING's payload or reply; the agent refuses a reply_bytes past this (protocol.py)
MAX_TRANSFER_BYTES = 64 << 20
HEADER_ROOM_BYTES = 4096  # a payload's header shares the agent's message cap
MANY_TOKENS = 64  # per-token compute: one call's fixed cost is spread over these
MANY_TOKEN_CALLS = 3  # median of these
WARM_UP_CALLS = 1  # not timed: a first call pays one-off costs (allocations, caches)
BASE_PINGS = 5  # empty PINGs, median: the round trip a transfer's time is measured beyond
TRANSFER_REPEATS = 3  # each way, median time: one retransmit or stall does not set the figure
EXIT_ALL_ANSWERED, EXIT_SOME_SILENT, EXIT_USAGE = 0, 1, 2


@dataclass(frozen=True)
class LinkMeasure:
    index: int  # roster order
    endpoint: str
    experts: tuple[int, ...]
    answered: bool  # INFO answered and the expert calls measured; else `error` says why
    error: str | None = None
    rtt_p50_ms: float | None = None
    rtt_p95_ms: float | None = None
    compute_us_per_call: float | None = None  # agent-reported, 1 token
    compute_us_per_token: float | None = None  # agent-reported, MANY_TOKENS / MANY_TOKENS
    down_mbit: float | None = None
    up_mbit: float | None = None
    note: str | None = None  # why a figure is None while the agent answered

    def as_record(self) -> dict:
        """JSON-ready: lists for tuples, ms to the µs, µs to 0.1, mbit to 0.01."""
        record = dataclasses.asdict(self)
        record["experts"] = list(self.experts)
        for name, digits in (("rtt_p50_ms", 3), ("rtt_p95_ms", 3), ("compute_us_per_call", 1),
                             ("compute_us_per_token", 3), ("down_mbit", 2), ("up_mbit", 2)):
            if record[name] is not None:
                record[name] = round(record[name], digits)
        return record


# -- pure ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """The pct-th percentile (0-100), linear between the closest ranks (numpy's default).
    Raises ValueError on no values."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * min(100.0, max(0.0, pct)) / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def throughput_mbit(nbytes: int, seconds: float, base_rtt_s: float) -> float | None:
    """Megabits per second of `nbytes` that took `seconds` from send to reply, of which
    `base_rtt_s` is what an empty message takes; None when nothing is left beyond it (too few
    bytes to see the link's rate)."""
    transfer_s = seconds - base_rtt_s
    if nbytes <= 0 or not transfer_s > 0:
        return None
    return nbytes * 8 / transfer_s / 1e6


@dataclass(frozen=True)
class ProbeTarget:
    """What an agent's EXPERT requests look like, read from its INFO."""

    layer: int
    expert: int
    hidden: int
    dtype: str  # wire dtype name
    max_message_bytes: int


def probe_target(info: dict, experts: Sequence[int]) -> ProbeTarget:
    """The first MoE layer, the first expert both the roster and the agent name, the agent's
    hidden size and dtype. Raises ValueError with a one-line reason."""
    from wire import protocol as P

    if info.get("serving") is not True:
        missing = info.get("missing")
        raise ValueError("answers, but serves nothing yet" +
                         (f" (missing experts {missing})" if missing else ""))
    hosted = [e for e in experts if e in (info.get("experts") or [])]
    if not hosted:
        raise ValueError(f"hosts experts {info.get('experts')}, none of the roster's "
                         f"{format_expert_ids(experts)}")
    hidden, model = info.get("hidden"), info.get("model")
    layers = (model.get("moe_layers") if isinstance(model, dict) else None) or [0]
    if type(hidden) is not int or hidden < 1 or type(layers[0]) is not int:
        raise ValueError(f"its info has no usable hidden size ({P.shown(hidden)}) or layers")
    try:
        dtype = P.wire_dtype_name(info.get("dtype"))
    except P.ProtocolError:
        dtype = "float32"  # a dtype the wire lacks: the agent converts what it gets
    caps = info.get("capabilities")
    cap = caps.get("max_message_bytes") if isinstance(caps, dict) else None
    return ProbeTarget(layers[0], hosted[0], hidden, dtype,
                       cap if type(cap) is int and cap > 0 else P.MAX_MESSAGE_BYTES)


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(measures: list[LinkMeasure], asked: dict[int, LinkShape] | None = None) -> str:
    """One row per agent (measured figures; with `asked`, the shaping's RTT, 2 x delay_ms, and
    rates beside them), then one line per note. A silent agent's row says why."""
    header = ["#", "endpoint", "experts", "rtt p50 ms", "rtt p95 ms"]
    header += ["asked rtt ms"] if asked is not None else []
    header += ["down mbit", "up mbit"]
    header += ["asked down/up mbit"] if asked is not None else []
    header += ["compute µs/call", "µs/token"]
    rows, notes = [], []
    for m in measures:
        row = [str(m.index), m.endpoint, format_expert_ids(m.experts)]
        shape = (asked or {}).get(m.index)
        if not m.answered:
            rows.append(row + [f"NO ANSWER: {m.error}"])
            continue
        row += [_num(m.rtt_p50_ms, ".2f"), _num(m.rtt_p95_ms, ".2f")]
        if asked is not None:
            row.append(_num(2 * shape.delay_ms, "g") if shape else "-")
        row += [_num(m.down_mbit, ".1f"), _num(m.up_mbit, ".1f")]
        if asked is not None:
            row.append("/".join(_num(r, "g") if r else "unlimited" for r in
                                (shape.down_rate_mbit, shape.up_rate_mbit)) if shape else "-")
        row += [_num(m.compute_us_per_call, ".0f"), _num(m.compute_us_per_token, ".2f")]
        rows.append(row)
        if m.note:
            notes.append(f"#{m.index}: {m.note}")
    widths = [max([len(header[i])] + [len(r[i]) for r in rows if len(r) > i and
                                      (len(r) == len(header) or i < 3)])
              for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
             for row in [header] + rows]
    return "\n".join(lines + [f"note {n}" for n in notes])


def parse_transfer_bytes(text: str) -> int:
    """--bytes: '4MiB', '500kB', '1048576' -> bytes, at most MAX_TRANSFER_BYTES. Raises
    ValueError with a one-line message."""
    from edge_agent.cli import memory_size  # the agent's --memory-budget units

    try:
        value = memory_size(text)
    except Exception as e:  # argparse.ArgumentTypeError: its message is the one line
        raise ValueError(f"--bytes {e}") from None
    if value > MAX_TRANSFER_BYTES:
        raise ValueError(f"--bytes {text[:40]!r}: at most {MAX_TRANSFER_BYTES >> 20}MiB")
    return value


# -- measuring ------------------------------------------------------------------------------


def _timed_s(call: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def _compute_s(reply) -> float:
    return float(reply.message.compute_s)


def _expert_figures(client: AgentClient, peer: bytes, target: ProbeTarget, calls: int,
                    timeout_s: float) -> dict:
    """RTT percentiles and reported compute. Raises TimeoutError, PeerUnreachable, AgentError,
    ProtocolError."""
    import torch

    from wire import protocol as P

    dtype = P.WIRE_DTYPES[target.dtype]
    one = torch.zeros(1, target.hidden, dtype=dtype)  # [1, H]: zeros are a valid activation
    many = torch.zeros(MANY_TOKENS, target.hidden, dtype=dtype)  # [T, H]

    def call(x: torch.Tensor):
        return client.expert(peer, target.layer, x, [(target.expert, x.shape[0])],
                             timeout_s=timeout_s, wire_dtype=target.dtype)[1]

    for _ in range(WARM_UP_CALLS):
        call(one)
    timed = [_timed_s(lambda: call(one)) for _ in range(calls)]
    rtts_ms = [seconds * 1e3 for seconds, _ in timed]
    many_s = statistics.median(_compute_s(call(many)) for _ in range(MANY_TOKEN_CALLS))
    return {"rtt_p50_ms": percentile(rtts_ms, 50), "rtt_p95_ms": percentile(rtts_ms, 95),
            "compute_us_per_call": statistics.median(_compute_s(r) for _, r in timed) * 1e6,
            "compute_us_per_token": many_s / MANY_TOKENS * 1e6}


def _ping_s(client: AgentClient, peer: bytes, timeout_s: float, frames: Sequence,
            reply_bytes: int) -> float | None:
    """Seconds of one PING, or None when the PONG is not the one-way answer asked for (an
    agent from before reply_bytes echoes the payload instead). Raises TimeoutError,
    PeerUnreachable, AgentError, ProtocolError."""
    from wire import protocol as P

    seconds, reply = _timed_s(lambda: client.call(peer, P.PING, frames, timeout_s=timeout_s,
                                                  reply_bytes=reply_bytes))
    if reply.kind != P.PONG:
        return None
    pong = reply.message
    answered_bytes = sum(len(f) for f in pong.payload)
    return seconds if pong.bytes == reply_bytes == answered_bytes else None


def _transfer_figures(client: AgentClient, peer: bytes, nbytes: int, timeout_s: float
                      ) -> tuple[dict, str | None]:
    """({down_mbit, up_mbit}, a note when one is None). Never raises on the agent's account."""
    base = [_ping_s(client, peer, timeout_s, (), 0) for _ in range(BASE_PINGS)]
    if None in base:
        return {}, "no PING round trip to measure from"
    base_s = statistics.median(base)
    payload = bytes(nbytes)
    ways = {"down_mbit": ([payload], 0), "up_mbit": ((), nbytes)}
    figures: dict = {}
    for name, (frames, reply_bytes) in ways.items():
        times = [_ping_s(client, peer, timeout_s, frames, reply_bytes)
                 for _ in range(TRANSFER_REPEATS)]
        if None in times:
            return figures, "the agent echoes PING payloads (no reply_bytes: an older agent); " \
                            "no one-way throughput"
        figures[name] = throughput_mbit(nbytes, statistics.median(times), base_s)
    if None in figures.values():
        return figures, f"{nbytes} bytes took no longer than an empty PING: try a larger --bytes"
    return figures, None


def _measure_agent(client: AgentClient, peer: bytes, row: LinkMeasure, info: dict, calls: int,
                   transfer_bytes: int, timeout_s: float) -> LinkMeasure:
    from wire.client import AgentError, PeerUnreachable
    from wire.protocol import ProtocolError

    try:
        target = probe_target(info, row.experts)
    except ValueError as e:
        return dataclasses.replace(row, error=str(e))
    try:
        figures = _expert_figures(client, peer, target, calls, timeout_s)
    except (TimeoutError, PeerUnreachable, AgentError, ProtocolError) as e:
        return dataclasses.replace(row, error=f"expert {target.expert} at layer "
                                              f"{target.layer}: {e}")
    nbytes = min(transfer_bytes, target.max_message_bytes - HEADER_ROOM_BYTES)
    notes = [] if nbytes == transfer_bytes else [f"transfers cut to {nbytes} bytes (the "
                                                 "agent's message cap)"]
    try:
        rates, note = _transfer_figures(client, peer, nbytes, timeout_s)
    except TimeoutError as e:
        rates, note = {}, f"throughput not measured: {e} (a slow link: a smaller --bytes or a " \
                          "longer --timeout-s)"
    except (PeerUnreachable, AgentError, ProtocolError) as e:
        rates, note = {}, f"throughput not measured: {e}"
    notes += [note] if note else []
    return dataclasses.replace(row, answered=True, note="; ".join(notes) or None,
                               **figures, **rates)


def _silent_error(client: AgentClient, peer: bytes, error: str | None, timeout_s: float) -> str:
    if error:
        return f"answered INFO with an error: {error}"
    if not client.connected(peer):
        return f"no connection within {timeout_s:g} s (nothing listening, a wrong key, or " \
               "the link is down)"
    return f"connected, but no INFO reply within {timeout_s:g} s"


def measure_links(roster_path: str, *, calls: int = DEFAULT_CALLS,
                  transfer_bytes: int = DEFAULT_TRANSFER_BYTES,
                  timeout_s: float = DEFAULT_TIMEOUT_S, progress: bool = False
                  ) -> list[LinkMeasure]:
    """Every roster agent's link, in roster order (see the module docstring). `timeout_s`
    bounds each wait: INFO from all agents at once, each call, each transfer. `progress`: a
    bar on stderr when it is a terminal. Raises RosterError (the roster), ValueError (calls or
    transfer_bytes out of range)."""
    if not 1 <= calls <= MAX_CALLS or not 1 <= transfer_bytes <= MAX_TRANSFER_BYTES:
        raise ValueError(f"calls 1-{MAX_CALLS} and transfer_bytes 1-{MAX_TRANSFER_BYTES}")
    roster = build_roster([], roster_path, None)
    if not roster.endpoints:
        raise RosterError(f"{roster_path}: no listening agents to measure")
    from wire.client import AgentClient
    from wire.info import ask_info

    bar = None
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(roster.endpoints), desc="linkcheck", unit="agent", file=sys.stderr)
    try:
        with AgentClient(keypair=roster.keys.keypair if roster.keys else None) as client:
            peers = {endpoint: client.connect(endpoint, server_key=roster.public_keys.get(endpoint))
                     for endpoint in roster.endpoints}
            answers = ask_info(client, peers.values(), timeout_s)
            measures = []
            for index, (endpoint, experts) in enumerate(roster.endpoints.items()):
                peer = peers[endpoint]
                row = LinkMeasure(index, endpoint, experts, answered=False)
                if peer in answers.infos:
                    row = _measure_agent(client, peer, row, answers.infos[peer], calls,
                                         transfer_bytes, timeout_s)
                else:
                    row = dataclasses.replace(row, error=_silent_error(
                        client, peer, answers.errors.get(peer), timeout_s))
                measures.append(row)
                if bar is not None:
                    bar.update(1)
            return measures
    finally:
        if bar is not None:
            bar.close()


# -- command line ---------------------------------------------------------------------------


def _checked_args(args) -> tuple[int, int, float]:
    """(calls, bytes, timeout_s) from the strings given. Raises ValueError (one line)."""
    try:
        calls = int(args.calls)
    except ValueError:
        calls = 0
    if not 1 <= calls <= MAX_CALLS:
        raise ValueError(f"--calls {args.calls[:40]!r}: a whole number 1-{MAX_CALLS}")
    try:
        timeout_s = float(args.timeout_s)
    except ValueError:
        timeout_s = math.nan
    if not 0 < timeout_s <= MAX_TIMEOUT_S:  # NaN fails this too
        raise ValueError(f"--timeout-s {args.timeout_s[:40]!r}: seconds > 0 and <= "
                         f"{MAX_TIMEOUT_S:g}")
    return calls, parse_transfer_bytes(args.bytes), timeout_s


def cmd_linkcheck(args) -> int:
    try:
        calls, nbytes, timeout_s = _checked_args(args)
        measures = measure_links(args.roster, calls=calls, transfer_bytes=nbytes,
                                 timeout_s=timeout_s, progress=True)
    except (ValueError, RosterError) as e:
        print(f"testbed: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps([m.as_record() for m in measures], indent=2))
    else:
        print(format_table(measures))
    return EXIT_ALL_ANSWERED if all(m.answered for m in measures) else EXIT_SOME_SILENT


def add_parser(subparsers) -> None:
    """Add `linkcheck` to an argparse subparsers object (testbed/cli.py)."""
    p = subparsers.add_parser("linkcheck", help="measure every roster agent's link: RTT of a "
                              "one-token call, throughput each way, reported compute")
    p.add_argument("--roster", required=True, metavar="FILE",
                   help="the base station's --agents TOML (keys included)")
    # strings, checked by cmd_linkcheck: a bad value is one line, not argparse's usage block
    p.add_argument("--calls", default=str(DEFAULT_CALLS),
                   help=f"one-token expert calls per agent (default {DEFAULT_CALLS})")
    p.add_argument("--bytes", default="4MiB",
                   help="the large message each way, e.g. 4MiB or 500kB (default 4MiB, at "
                   f"most {MAX_TRANSFER_BYTES >> 20}MiB)")
    p.add_argument("--timeout-s", default=f"{DEFAULT_TIMEOUT_S:g}",
                   help="deadline of each wait: INFO, each call, each transfer (default "
                   f"{DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--json", action="store_true", help="print JSON records, not the table")
    p.set_defaults(func=cmd_linkcheck)

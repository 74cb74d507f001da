"""`basestation status`: one table of every agent, from INFO and a few timed pings."""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from basestation.discovery import open_links
from basestation.roster import Roster
from wire import protocol as P
from wire.client import AgentClient, AgentError, PeerUnreachable
from wire.handshake_check import diagnose
from wire.info import ask_info

PINGS = 5
PROBE_BYTES = 64 * 1024  # one throughput probe per agent
DIAGNOSE_THREADS = 16  # silent agents looked at at once (each opens its own connection)


def run_status(roster: Roster, wait_s: float) -> int:
    """Prints the table; exit 0 when every agent answered, 1 otherwise."""
    rows = []
    with open_links(roster) as client:
        peers = {endpoint: endpoint.encode() for endpoint in roster.endpoints}  # the aliases
        if roster.listen:
            client.wait_hello(wait_s)
        targets = list(peers.items()) + [(p.decode(errors="replace"), p) for p in client.hellos]
        for name, peer in targets:
            rows.append(_probe(client, name, peer, wait_s))
    _add_hints(rows, roster)
    print(f"{'agent':<28} {'up':<3} {'experts':<9} {'device':<22} {'rtt ms':>8} "
          f"{'MB/s':>8} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['agent'][:28]:<28} {'yes' if r['up'] else 'NO':<3} {r['experts']:<9} "
              f"{r['device'][:22]:<22} {r['rtt_ms']:>8} {r['mb_s']:>8} {r['tokens_s']:>10}"
              f"{'  ' + r['hint'] if r.get('hint') else ''}")
    down = sum(not r["up"] for r in rows)
    if down or not rows:
        print(f"basestation status: {down} of {len(rows)} agents did not answer within "
              f"{wait_s:g} s" if rows else f"basestation status: no dial-in agent within "
              f"{wait_s:g} s", file=sys.stderr)
        return 1
    return 0


def _add_hints(rows: list[dict], roster: Roster) -> None:
    """Each silent listening agent's row gets a hint on why (a key missing or wrong), from one
    handshake of its own; all at once, so dead hosts cost one deadline, not one each."""
    silent = [r for r in rows if not r["up"] and r["agent"] in roster.endpoints]
    keypair = roster.keys.keypair if roster.keys else None
    if not silent:
        return
    with ThreadPoolExecutor(max_workers=min(DIAGNOSE_THREADS, len(silent))) as pool:
        hints = pool.map(lambda r: diagnose(r["agent"], keypair,
                                            roster.public_keys.get(r["agent"])), silent)
        for row, hint in zip(silent, hints):
            row["hint"] = hint


def _probe(client: AgentClient, name: str, peer: bytes, wait_s: float) -> dict:
    row = {"agent": name, "up": False, "experts": "-", "device": "-", "rtt_ms": "-",
           "mb_s": "-", "tokens_s": "-"}
    info = ask_info(client, [peer], wait_s).infos.get(peer)
    if info is None:
        return row
    experts = info.get("experts")  # as an agent reports it: checked, never trusted
    row.update(experts=",".join(map(str, experts)) if isinstance(experts, list) else "?",
               device=str(info.get("device_name") or info.get("device", "?")))
    rtts = []
    try:  # an agent that answers INFO but not PING is not up (it used to be a traceback)
        for _ in range(PINGS):
            start = time.perf_counter()
            client.call(peer, P.PING, timeout_s=1.0)
            rtts.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.call(peer, P.PING, [bytes(PROBE_BYTES)], timeout_s=2.0, reply_bytes=PROBE_BYTES)
    except (TimeoutError, PeerUnreachable, AgentError):
        return row
    row["up"] = True
    transfer_s = max(1e-6, time.perf_counter() - start - statistics.median(rtts))
    row["rtt_ms"] = f"{statistics.median(rtts) * 1e3:.3f}"
    row["mb_s"] = f"{2 * PROBE_BYTES / transfer_s / 1e6:.1f}"
    throughput = info.get("throughput")
    tokens_per_s = throughput.get("tokens_per_s") if isinstance(throughput, dict) else None
    if isinstance(tokens_per_s, (int, float)):
        row["tokens_s"] = f"{tokens_per_s:.0f}"
    return row

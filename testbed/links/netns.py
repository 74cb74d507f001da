"""Network namespaces and veth pairs for the agents' links, made with `ip`.

Every function takes `enter`: the command prefix that runs `ip` where the host ends of the
veths are (() as root on this machine; `nsenter` into the user namespace otherwise). Only
loopback and addresses inside our namespaces are ever contacted; an `unreachable` route for the
slot's /24 keeps traffic for a vanished veth from following the default route out.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from testbed.links import shaping
from testbed.links.plan import LINK_PREFIX, NS_PREFIX, SUBNET
from testbed.links.spec import TestbedError


def ip(enter: Sequence[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Raises TestbedError when `check` and ip fails."""
    try:
        return shaping.run(["ip", *args], check=check, enter=enter)
    except shaping.ShapingError as e:
        raise TestbedError(str(e)) from None


def list_netns(enter: Sequence[str]) -> list[str]:
    out = ip(enter, "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def list_links(enter: Sequence[str]) -> list[str]:
    out = ip(enter, "-o", "link", "show", check=False).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def our_routes(enter: Sequence[str]) -> list[str]:
    out = ip(enter, "route", "show", "type", "unreachable", check=False).stdout
    return [line.split()[1] for line in out.splitlines() if f" {SUBNET}." in f" {line}"]


def free_slot(enter: Sequence[str]) -> int:
    """A /24 of SUBNET that no address or route uses yet. Raises TestbedError."""
    used = ip(enter, "-o", "addr", check=False).stdout + \
        ip(enter, "route", "show", "table", "all", check=False).stdout
    for slot in range(256):
        if f"{SUBNET}.{slot}." not in used:
            return slot
    raise TestbedError(f"no free /24 left in {SUBNET}.0.0/16 (run `testbed down --all`)")


def fence_slot(enter: Sequence[str], slot: int) -> bool:
    """Traffic for a vanished veth must not follow the default route out of this machine.
    The route is also the slot's claim: False when another testbed, started at the same time,
    fenced it first. Raises TestbedError when ip fails otherwise."""
    added = ip(enter, "route", "add", "unreachable", f"{SUBNET}.{slot}.0/24", check=False)
    if added.returncode and "File exists" in added.stderr:
        return False
    if added.returncode:
        detail = added.stderr.strip().splitlines() or [f"exit {added.returncode}"]
        raise TestbedError(f"ip route add unreachable {SUBNET}.{slot}.0/24: {detail[0]}")
    return True


def make_link(enter: Sequence[str], agent: dict) -> None:
    """The agent's namespace and its veth pair, addressed and up. Raises TestbedError."""
    ns, host_dev, ns_dev = agent["ns"], agent["host_dev"], agent["ns_dev"]
    ip(enter, "netns", "add", ns)
    ip(enter, "link", "add", host_dev, "type", "veth", "peer", "name", ns_dev, "netns", ns)
    ip(enter, "addr", "add", f"{agent['host_addr']}/30", "dev", host_dev)
    ip(enter, "link", "set", host_dev, "up")
    ip(enter, "-n", ns, "addr", "add", f"{agent['ns_addr']}/30", "dev", ns_dev)
    ip(enter, "-n", ns, "link", "set", ns_dev, "up")
    ip(enter, "-n", ns, "link", "set", "lo", "up")  # the relay reaches the agent on loopback


def our_namespaces(enter: Sequence[str], recorded: set[str], tag: str | None,
                   everything: bool) -> set[str]:
    """The namespaces that exist of those recorded, of this tag, or (everything) any of ours."""
    prefix = NS_PREFIX if everything else f"{NS_PREFIX}{tag}-"
    return {ns for ns in list_netns(enter)
            if ns in recorded or (tag or everything) and ns.startswith(prefix)}


def pids_in(enter: Sequence[str], namespaces: set[str]) -> list[int]:
    """Every process inside these namespaces (all of them ones we started)."""
    return [int(p) for ns in sorted(namespaces)
            for p in ip(enter, "netns", "pids", ns, check=False).stdout.split()]


def remove(enter: Sequence[str], namespaces: set[str], tag: str | None, slot: int | None,
           everything: bool) -> list[str]:
    """Delete the namespaces (and so their veths and nft tables), any half-made veth of TAG and
    the slot's route; with `everything`, every wdm* veth and 10.213 route. Returns what it
    removed. Stop the processes inside first."""
    removed = []
    for ns in sorted(namespaces):
        ip(enter, "netns", "del", ns, check=False)
        removed.append(f"namespace {ns}")
    # Deleting a namespace deletes its veth end and so the pair; catch any half-made one.
    link_prefix = LINK_PREFIX if everything else f"{LINK_PREFIX}{tag}"
    if tag or everything:
        for link in list_links(enter):
            ours = link.startswith(link_prefix) and (everything or len(link) > len(link_prefix))
            if ours and ip(enter, "link", "del", link, check=False).returncode == 0:
                removed.append(f"link {link}")
    for route in our_routes(enter):
        if everything or (slot is not None and route == f"{SUBNET}.{slot}.0/24"):
            ip(enter, "route", "del", "unreachable", route, check=False)
            removed.append(f"route unreachable {route}")
    return removed

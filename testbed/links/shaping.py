"""Link shaping on one veth pair: tc/netem where the kernel has it, else tbf + nftables + relay.

Every quantity applies in each direction (like netem on both ends of the pair): `delay_ms` is
one-way, so a request/reply sees 2 × delay; `loss_pct` drops that share of packets each way.

Fallback (kernels without sch_netem, like this project's CI machine):
- rate: a tbf qdisc on both veth ends (each direction's own rate where it has one); a
  direction's own wire rate (the paper emulation's Shannon rates) also makes the relay
  serialise each message at it;
- loss and down: an nftables table inside the agent's namespace (`numgen random` drops on the
  veth's ingress and egress; down drops everything), so the host's ruleset is never touched;
- delay, jitter and wire rates: the delaying relay (testbed/links/relay.py), told via its file.

`enter` (every function taking it): the command prefix that runs a command where the host ends
of the veths are: () on this machine as root; `nsenter` into the user namespace otherwise
(testbed/links/userns.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

NETEM = "netem"
FALLBACK = "tbf+nft+relay"
LOOPBACK = "loopback (no shaping)"

NFT_TABLE = "wdm"  # one table per namespace; deleting the namespace deletes it too
NFT_PACKAGE = "nftables"  # Debian package holding the `nft` command (the kernel part is built in)
TC_TIMEOUT_S = 10.0
APT_TIMEOUT_S = 300.0
TBF_MIN_BURST_BYTES = 32 * 1024  # veth hands tbf GSO packets up to 64 KiB; too small a burst
TBF_BURST_S = 0.004  # ... or 4 ms of the rate (one jiffy at HZ=250), whichever is larger
TBF_QUEUE_S = 0.05  # queue up to 50 ms of the rate before tail-dropping
# ip, tc and nft live in sbin, which a normal user's PATH often lacks (they work unprivileged
# inside a user namespace all the same).
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class ShapingError(Exception):
    """A tc/nft command failed; the message is one line."""


def tool(name: str) -> str:
    """The absolute path of command NAME, looked up in PATH and then the sbin folders; NAME
    itself when it is nowhere (running it then says "command not found")."""
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN_DIRS])
    return shutil.which(name, path=path) or name


def run(cmd: list[str], check: bool = True, input_text: str | None = None,
        enter: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run a network command (cmd[0] looked up by `tool`) with a deadline, through the ENTER
    prefix. Raises ShapingError when it fails and `check`."""
    shown = " ".join(cmd)  # without the prefix: the command is what the user can act on
    full = [*enter, tool(cmd[0]), *cmd[1:]]
    try:
        proc = subprocess.run(full, check=False, capture_output=True, text=True, input=input_text,
                              timeout=TC_TIMEOUT_S)
    except FileNotFoundError as e:
        raise ShapingError(f"{e.filename or full[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise ShapingError(f"{shown}: no answer within {TC_TIMEOUT_S} s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ShapingError(f"{shown}: {detail[0] if detail else f'exit {proc.returncode}'}")
    return proc


def tc(ns: str | None, *args: str, check: bool = True,
       enter: Sequence[str] = ()) -> subprocess.CompletedProcess:
    return run(["tc", *(["-n", ns] if ns else []), *args], check=check, enter=enter)


def has_netem(dev: str, enter: Sequence[str] = ()) -> bool:
    """Whether the kernel takes a netem qdisc (tried on a device of ours, then removed)."""
    probe = tc(None, "qdisc", "add", "dev", dev, "root", "netem", "delay", "0ms", check=False,
               enter=enter)
    if probe.returncode:
        return False
    tc(None, "qdisc", "del", "dev", dev, "root", check=False, enter=enter)
    return True


def ensure_nft() -> None:
    """Make sure `nft` exists (as root, installing the Debian package if not). Raises
    ShapingError."""
    if tool("nft") != "nft":
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ShapingError(f"loss and down need the `nft` command: install {NFT_PACKAGE} "
                           f"(as root: apt-get install {NFT_PACKAGE})")
    print(f"testbed: this kernel has no netem; installing {NFT_PACKAGE} for loss and down "
          f"(apt-get install -y {NFT_PACKAGE})", file=sys.stderr)
    for cmd in (["apt-get", "install", "-y", "-q", NFT_PACKAGE],
                ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", NFT_PACKAGE]):
        try:
            subprocess.run(cmd, check=False, capture_output=True, timeout=APT_TIMEOUT_S,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        except subprocess.TimeoutExpired:
            break
        if tool("nft") != "nft":
            return
    raise ShapingError(f"could not install {NFT_PACKAGE}; loss and down need the `nft` command")


def _rate_kbit(rate_mbit: float) -> str:
    return f"{max(1, round(rate_mbit * 1000))}kbit"


def _tbf_args(rate_mbit: float) -> list[str]:
    rate_bytes_per_s = rate_mbit * 1e6 / 8
    burst_bytes = max(TBF_MIN_BURST_BYTES, int(rate_bytes_per_s * TBF_BURST_S))
    limit_bytes = burst_bytes + int(rate_bytes_per_s * TBF_QUEUE_S)
    return ["tbf", "rate", _rate_kbit(rate_mbit), "burst", str(burst_bytes),
            "limit", str(limit_bytes)]


def _set_root(ns: str | None, dev: str, qdisc_args: list[str] | None,
              enter: Sequence[str]) -> None:
    if qdisc_args is None:
        # No root qdisc left means the veth default (noqueue); "no qdisc" is not an error here.
        tc(ns, "qdisc", "del", "dev", dev, "root", check=False, enter=enter)
    else:
        tc(ns, "qdisc", "replace", "dev", dev, "root", *qdisc_args, enter=enter)


def netem_args(shape, rate_mbit: float | None) -> list[str] | None:
    """netem's arguments for a LinkShape in the direction whose rate is RATE_MBIT (None:
    unshaped). Down is 100 % loss."""
    args = ["netem"]
    if shape.delay_ms or shape.jitter_ms:
        args += ["delay", f"{shape.delay_ms:g}ms"]
        if shape.jitter_ms:
            args += [f"{shape.jitter_ms:g}ms"]
    loss_pct = 100.0 if shape.down else shape.loss_pct
    if loss_pct:
        args += ["loss", f"{loss_pct:g}%"]
    if rate_mbit:
        args += ["rate", _rate_kbit(rate_mbit)]
    if len(args) == 1:
        return None
    if shape.delay_ms or shape.jitter_ms:
        # netem's default queue (1000 packets) tail-drops at high rate × delay products.
        args += ["limit", "100000"]
    return args


def nft_script(ns_dev: str, shape, family: str = "netdev") -> str:
    """An atomic nft transaction replacing the namespace's table for this shape.

    family "netdev" drops at the device on its ingress and egress hooks (kernel >= 5.16),
    silently, like netem; "inet" (input/output hooks) is for older kernels, where a dropped
    local send returns EPERM to the sender instead of vanishing."""
    if shape.down:
        match = ""
    elif shape.loss_pct:
        # Per ten thousand, so loss is exact to 0.01 %.
        match = f"numgen random mod 10000 < {max(0, min(10000, round(shape.loss_pct * 100)))} "
    else:
        match = None
    if family == "netdev":
        hooks = [("ingress", f'ingress device "{ns_dev}"', ""),
                 ("egress", f'egress device "{ns_dev}"', "")]
    else:
        hooks = [("input", "input", f'iifname "{ns_dev}" '),
                 ("output", "output", f'oifname "{ns_dev}" ')]
    chains = ""
    for name, hook, iface in hooks:
        rule = f"    {iface}{match}drop\n" if match is not None else ""
        chains += (f"  chain {name} {{\n    type filter hook {hook} priority 0; policy accept;\n"
                   f"{rule}  }}\n")
    # "add table" then "delete table" makes the delete safe when the table does not exist yet.
    return (f"add table {family} {NFT_TABLE}\ndelete table {family} {NFT_TABLE}\n"
            f"table {family} {NFT_TABLE} {{\n{chains}}}\n")


def _nft(ns: str, ns_dev: str, shape, enter: Sequence[str]) -> None:
    cmd = ["ip", "netns", "exec", ns, tool("nft"), "-f", "-"]
    try:
        run(cmd, input_text=nft_script(ns_dev, shape, "netdev"), enter=enter)
    except ShapingError:  # no egress hook: older kernel
        run(cmd, input_text=nft_script(ns_dev, shape, "inet"), enter=enter)


def apply(backend: str, ns: str, host_dev: str, ns_dev: str, shape, old=None,
          enter: Sequence[str] = ()) -> None:
    """Shape the veth pair (host_dev on the host side, ns_dev inside ns) in both directions;
    with OLD, the shape the link has now, only what differs is changed. Delay and jitter of
    the fallback are the relay's job (see relay.write_settings). Raises ShapingError."""
    # Each end shapes what it sends: the host end base station -> agent (down), the
    # namespace end agent -> base station (up).
    ends = ((None, host_dev, "down_rate_mbit"), (ns, ns_dev, "up_rate_mbit"))
    if backend == NETEM:
        for where, dev, rate in ends:
            args = netem_args(shape, getattr(shape, rate))
            if old is None or netem_args(old, getattr(old, rate)) != args:
                _set_root(where, dev, args, enter)
    elif backend == FALLBACK:
        # Each end's tbf takes that direction's rate. tbf lets anything under its burst (32 KiB
        # here) through at once, so it cannot give a 1 KiB message its wire time: the relay
        # also serialises every message at a direction's own wire rate (wire_*_mbit).
        for where, dev, rate in ends:
            rate_mbit = getattr(shape, rate)
            if old is None or getattr(old, rate) != rate_mbit:
                _set_root(where, dev, _tbf_args(rate_mbit) if rate_mbit else None, enter)
        if old is None or (old.loss_pct, old.down) != (shape.loss_pct, shape.down):
            _nft(ns, ns_dev, shape, enter)
    else:
        raise ShapingError(f"backend {backend!r} cannot shape links")

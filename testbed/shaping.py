"""Link shaping on one veth pair: tc/netem where the kernel has it, else tbf + nftables + relay.

Every quantity applies in each direction (like netem on both ends of the pair): `delay_ms` is
one-way, so a request/reply sees 2 × delay; `loss_pct` drops that share of packets each way.

Fallback (kernels without sch_netem, like this project's CI machine):
- rate: a tbf qdisc on both veth ends;
- loss and down: an nftables table inside the agent's namespace (`numgen random` drops on the
  veth's ingress and egress; down drops everything), so the host's ruleset is never touched;
- delay and jitter: the delaying relay in the namespace (testbed/relay.py), told via its file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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


class ShapingError(Exception):
    """A tc/nft command failed; the message is one line."""


def run(cmd: list[str], check: bool = True,
        input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run a network command with a deadline. Raises ShapingError when it fails and `check`."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, input=input_text,
                              timeout=TC_TIMEOUT_S)
    except FileNotFoundError:
        raise ShapingError(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise ShapingError(f"{' '.join(cmd)}: no answer within {TC_TIMEOUT_S} s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise ShapingError(f"{' '.join(cmd)}: {detail[0] if detail else f'exit {proc.returncode}'}")
    return proc


def tc(ns: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["tc", *(["-n", ns] if ns else []), *args], check=check)


def has_netem(dev: str) -> bool:
    """Whether the kernel takes a netem qdisc (tried on a device of ours, then removed)."""
    probe = tc(None, "qdisc", "add", "dev", dev, "root", "netem", "delay", "0ms", check=False)
    if probe.returncode:
        return False
    tc(None, "qdisc", "del", "dev", dev, "root", check=False)
    return True


def ensure_nft() -> None:
    """Make sure `nft` exists (installing the Debian package if not). Raises ShapingError."""
    if shutil.which("nft"):
        return
    if not shutil.which("apt-get"):
        raise ShapingError(f"loss and down need the `nft` command: install {NFT_PACKAGE}")
    print(f"testbed: this kernel has no netem; installing {NFT_PACKAGE} for loss and down "
          f"(apt-get install -y {NFT_PACKAGE})", file=sys.stderr)
    for cmd in (["apt-get", "install", "-y", "-q", NFT_PACKAGE],
                ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", NFT_PACKAGE]):
        try:
            subprocess.run(cmd, capture_output=True, timeout=APT_TIMEOUT_S,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        except subprocess.TimeoutExpired:
            break
        if shutil.which("nft"):
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


def _set_root(ns: str | None, dev: str, qdisc_args: list[str] | None) -> None:
    if qdisc_args is None:
        # No root qdisc left means the veth default (noqueue); "no qdisc" is not an error here.
        tc(ns, "qdisc", "del", "dev", dev, "root", check=False)
    else:
        tc(ns, "qdisc", "replace", "dev", dev, "root", *qdisc_args)


def netem_args(shape) -> list[str] | None:
    """netem's arguments for a LinkShape (None: unshaped). Down is 100 % loss."""
    args = ["netem"]
    if shape.delay_ms or shape.jitter_ms:
        args += ["delay", f"{shape.delay_ms:g}ms"]
        if shape.jitter_ms:
            args += [f"{shape.jitter_ms:g}ms"]
    loss_pct = 100.0 if shape.down else shape.loss_pct
    if loss_pct:
        args += ["loss", f"{loss_pct:g}%"]
    if shape.rate_mbit:
        args += ["rate", _rate_kbit(shape.rate_mbit)]
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


def _nft(ns: str, ns_dev: str, shape) -> None:
    cmd = ["ip", "netns", "exec", ns, "nft", "-f", "-"]
    try:
        run(cmd, input_text=nft_script(ns_dev, shape, "netdev"))
    except ShapingError:
        run(cmd, input_text=nft_script(ns_dev, shape, "inet"))  # no egress hook: older kernel


def apply(backend: str, ns: str, host_dev: str, ns_dev: str, shape, old=None) -> None:
    """Shape the veth pair (host_dev on the host, ns_dev inside ns) in both directions;
    with OLD, the shape the link has now, only what differs is changed. Delay and jitter of
    the fallback are the relay's job (see relay.write_settings). Raises ShapingError."""
    if backend == NETEM:
        if old is None or netem_args(old) != netem_args(shape):
            args = netem_args(shape)
            _set_root(None, host_dev, args)
            _set_root(ns, ns_dev, args)
    elif backend == FALLBACK:
        if old is None or old.rate_mbit != shape.rate_mbit:
            tbf = _tbf_args(shape.rate_mbit) if shape.rate_mbit else None
            _set_root(None, host_dev, tbf)
            _set_root(ns, ns_dev, tbf)
        if old is None or (old.loss_pct, old.down) != (shape.loss_pct, shape.down):
            _nft(ns, ns_dev, shape)
    else:
        raise ShapingError(f"backend {backend!r} cannot shape links")

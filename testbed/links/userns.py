"""Links without root: an unprivileged user + network + mount namespace to hold them.

`unshare --user --map-root-user --net --mount` gives a namespace in which we are root, so the
same per-agent namespaces, veths, tbf qdiscs and nftables rules as on a root host can be made
there; `ip netns` needs /run/netns, so the holder puts a tmpfs there (its mount namespace only).
The holder process (`python -m testbed.links.userns`, started by `start_holder`) keeps the
namespaces alive; `enter(pid)` is the prefix that runs a command inside them (`nsenter`). The
namespaces vanish with the last process inside: `down` stops them all.

Nothing on this machine changes: the only trace outside is an empty folder in /tmp when
/run/netns does not exist here (see `prepare_run_netns`), removed by `down`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from testbed.links.procs import PACKAGE_ROOT, cmdline, log_tail
from testbed.links.shaping import tool

HOLDER_MODULE = "testbed.links.userns"
PROBE_TIMEOUT_S = 10.0  # the availability probe (one unshare + ip link add)
READY_TIMEOUT_S = 20.0  # the holder mounting its /run/netns
RUN_DIR = "/run"
NETNS_DIR = "/run/netns"  # where `ip netns` keeps its names (compiled into iproute2)
SYSCTLS = ("/proc/sys/kernel/unprivileged_userns_clone", "/proc/sys/user/max_user_namespaces")
APPARMOR_SYSCTL = "/proc/sys/kernel/apparmor_restrict_unprivileged_userns"


class UsernsError(Exception):
    """The user namespace could not be made or used; the message is one line."""


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when this user can make a user namespace with a veth in it, else why not (one
    line). Checked once per process: the sysctls, the commands, then a real try."""
    for path in SYSCTLS:
        if _read(path) == "0":
            name = path.removeprefix("/proc/sys/").replace("/", ".")
            return f"{name} = 0"
    for name in ("unshare", "nsenter", "ip", "tc", "mount"):
        if tool(name) == name:
            return f"`{name}` not found"
    try:
        probe = subprocess.run(
            [tool("unshare"), "--user", "--map-root-user", "--net", "--mount", tool("ip"),
             "link", "add", "wdmprobe0", "type", "veth", "peer", "name", "wdmprobe1"],
            check=False, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"unshare --user --net: no answer within {PROBE_TIMEOUT_S:g} s"
    if probe.returncode:
        detail = (probe.stderr.strip().splitlines() or [f"exit {probe.returncode}"])[0]
        if _read(APPARMOR_SYSCTL) == "1":
            detail += " (kernel.apparmor_restrict_unprivileged_userns = 1)"
        return f"unshare --user --net: {detail}"
    return None


def enter(holder_pid: int) -> tuple[str, ...]:
    """The prefix that runs a command as root inside the holder's user, network and mount
    namespaces. `--preserve-credentials`: setgroups is denied in a map-root-user namespace."""
    return (tool("nsenter"), f"--target={holder_pid}", "--user", "--net", "--mount",
            "--preserve-credentials", "--")


def namespace_id(pid: int) -> str | None:
    """'user:[4026532…]' of a process of ours, None when it is gone."""
    try:
        return os.readlink(f"/proc/{pid}/ns/user")
    except OSError:
        return None


def pids_in_namespace(userns_id: str) -> list[int]:
    """Every process (of ours: others' /proc/PID/ns are not readable) in that user namespace."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and namespace_id(int(entry)) == userns_id:
            out.append(int(entry))
    return out


def processes_of_user() -> list[int]:
    """Every process of this user (by its /proc entry's owner)."""
    out = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat(f"/proc/{entry}").st_uid == os.getuid():
                out.append(int(entry))
        except OSError:  # exited meanwhile
            continue
    return out


def holder_args(tag: str, state_dir: str) -> list[bytes]:
    return [b"--tag", tag.encode(), b"--state-dir", state_dir.encode()]


def is_holder(pid: int, tag: str | None = None, state_dir: str | None = None) -> bool:
    """Whether PID is a holder of ours (of TAG / STATE_DIR when given), by its command line."""
    args = cmdline(pid).split(b"\0")
    if HOLDER_MODULE.encode() not in args:
        return False

    def value(flag: bytes) -> bytes | None:
        return args[args.index(flag) + 1] if flag in args[:-1] else None

    return (tag is None or value(b"--tag") == tag.encode()) and \
        (state_dir is None or value(b"--state-dir") == state_dir.encode())


def find_holders(state_dir: str | None = None) -> list[int]:
    """Our holders (for STATE_DIR, or all), found by command line: a `kill -9` of `up` right
    after starting one leaves it unrecorded."""
    return [pid for pid in processes_of_user() if is_holder(pid, state_dir=state_dir)]


def spawn_holder(tag: str, state_dir: str, log_path: str) -> subprocess.Popen:
    """Start the holder (its pid is the namespaces' first process); `wait_ready` next.
    Raises UsernsError when unshare cannot run."""
    cmd = [tool("unshare"), "--user", "--map-root-user", "--net", "--mount",
           "--propagation", "private", "--", sys.executable, "-m", HOLDER_MODULE,
           *(a.decode() for a in holder_args(tag, state_dir))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p))
    try:
        with open(log_path, "ab") as log:
            # A new session: the holder outlives `testbed up` and a Ctrl-C in its terminal.
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        raise UsernsError(f"cannot start unshare: {e}") from None


def wait_ready(proc: subprocess.Popen, log_path: str,
               timeout_s: float = READY_TIMEOUT_S) -> dict:
    """The holder's ready record ({"stash": folder or None}) once its /run/netns is mounted.
    Raises UsernsError when it exits or says nothing within timeout_s."""
    deadline = time.monotonic() + timeout_s
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise UsernsError(f"the user namespace holder did not start within {timeout_s:g} s "
                              f"({log_tail(log_path)})")
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.2))
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                proc.wait(timeout=5)
                raise UsernsError(f"the user namespace holder exited: {log_tail(log_path)}")
            line += chunk
    proc.stdout.close()  # it writes nothing more
    try:
        return json.loads(line)
    except ValueError:
        raise UsernsError(f"the user namespace holder said {line!r}") from None


# -- the holder process (runs inside the new namespaces, as their root) ------------------------

def _mount(*args: str) -> None:
    proc = subprocess.run([tool("mount"), *args], check=False, capture_output=True, text=True,
                          timeout=PROBE_TIMEOUT_S)
    if proc.returncode:
        detail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[0]
        raise UsernsError(f"mount {' '.join(args)}: {detail}")


def prepare_run_netns(overlay_run: bool = False) -> str | None:
    """Give `ip netns` an empty, writable /run/netns in this mount namespace. Where /run/netns
    exists a tmpfs goes on it; where it does not (we cannot create it in root's /run), a tmpfs
    goes on /run itself and /run's entries are bound back from a stash folder in /tmp, which is
    returned (empty outside this namespace; `down` removes it). Raises UsernsError."""
    if os.path.isdir(NETNS_DIR) and not overlay_run:
        _mount("-t", "tmpfs", "-o", "mode=755", "wdm-netns", NETNS_DIR)
        return None
    stash = tempfile.mkdtemp(prefix="wdmoe-run-", dir="/tmp")
    _mount("--rbind", RUN_DIR, stash)
    _mount("-t", "tmpfs", "-o", "mode=755", "wdm-run", RUN_DIR)
    for name in sorted(os.listdir(stash)):
        src, dst = os.path.join(stash, name), os.path.join(RUN_DIR, name)
        if name == "netns":
            continue
        try:
            if os.path.islink(src):
                os.symlink(os.readlink(src), dst)
                continue
            if os.path.lexists(dst):
                pass  # made meanwhile (mount itself keeps /run/mount/utab)
            elif os.path.isdir(src):
                os.mkdir(dst)
            else:
                open(dst, "w").close()  # a file mount point for a file or socket
            _mount("--rbind", src, dst)
        except (OSError, UsernsError) as e:
            # The agents need none of it; say what is missing and go on.
            print(f"userns: {dst} not bound back: {e}", file=sys.stderr, flush=True)
    os.mkdir(NETNS_DIR)
    return stash


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=HOLDER_MODULE, description="holds the testbed's user, "
                                "network and mount namespaces until SIGTERM")
    p.add_argument("--tag", required=True, help="the testbed's tag (to find it again)")
    p.add_argument("--state-dir", required=True, help="the testbed's state folder (likewise)")
    p.add_argument("--overlay-run", action="store_true",
                   help="put the tmpfs on /run even where /run/netns exists (for tests)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        stash = prepare_run_netns(args.overlay_run)
    except (OSError, UsernsError) as e:
        print(f"userns: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"stash": stash}), flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())

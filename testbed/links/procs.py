"""The testbed's processes: start them detached with a log, recognise them, stop them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import testbed

STOP_GRACE_S = 3.0  # SIGTERM, then SIGKILL after this long
LOG_TAIL_LINES = 5
# what we ever start
OUR_MODULES = (b"edge_agent", b"testbed.links.relay", b"testbed.links.cell",
               b"testbed.links.userns")
# The folder holding our packages: processes started inside a mount namespace (nsenter) begin
# in its root folder, so `python -m edge_agent` must not depend on the caller's folder.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(testbed.__file__)))


def cmdline(pid: int) -> bytes:
    """The NUL-separated command line, b'' when the process is gone or not ours to read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def pid_is_ours(pid: int) -> bool:
    """Alive and running one of our modules (guards against a recycled pid)."""
    line = cmdline(pid)
    return any(m in line for m in OUR_MODULES)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pids(pids: list[int]) -> None:
    """SIGTERM, then SIGKILL whatever is left after STOP_GRACE_S; reaps our own children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in pids if os.path.exists(f"/proc/{p}")]
        for pid in live:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while live and time.monotonic() < deadline:
            for pid in live:
                try:  # reap our own children so they do not linger as zombies
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
            live = [p for p in live if alive(p)]
            time.sleep(0.05)
        if not live:
            return


def spawn(cmd: list[str], log_path: str, pass_fds: tuple[int, ...] = ()) -> int:
    """Start CMD detached, output appended to LOG_PATH; returns its pid (the pid stays the
    process's own through `nsenter` and `ip netns exec`, which exec without forking)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")  # many agents share few cores
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        # A new session: the agents outlive `testbed up` and a Ctrl-C in its terminal.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                pass_fds=pass_fds)
    return proc.pid


def log_tail(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read().splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-LOG_TAIL_LINES:]) or "(empty log)"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port of 127.0.0.1 free now and not handed out before by this process: the kernel may
    give the same ephemeral port to two binds in a row once the first socket is closed, and a
    caller picking several (a cell's links, a bed's agents) needs them distinct."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port

"""Helpers for the edge-agent tests: real agent processes with deadlines, always killed."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from testbed.links.procs import free_port  # noqa: F401  (the tests import it from here)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 60.0  # torch import + load on a busy 2-core machine
READY_RE = re.compile(r"serving (tcp://\S+)")


def _die_with_parent() -> None:
    """Linux: the agent gets SIGKILL if the test process dies before its finalizers run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class AgentProcess:
    """`python -m edge_agent ...` with stdout lines read by a thread (so waits have deadlines)."""

    def __init__(self, args: list[str]):
        self.args = args
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", *args], cwd=REPO_ROOT,
                                     stdout=subprocess.PIPE, stderr=self.stderr_file, text=True,
                                     env=env, preexec_fn=_die_with_parent)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.endpoint: str | None = None
        self.last_line = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, prefix: str, timeout_s: float = START_TIMEOUT_S) -> str:
        """The next stdout line starting with `prefix`; fails the test at the deadline."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"agent printed no {prefix!r} line within {timeout_s} s; "
                            f"stderr:\n{self.stderr()}")
            if line is None:
                pytest.fail(f"agent exited ({self.proc.wait()}) before {prefix!r}; "
                            f"stderr:\n{self.stderr()}")
            if line.startswith(prefix):
                match = READY_RE.search(line)
                if match:
                    self.endpoint = match.group(1)
                self.last_line = line
                return line

    def stderr(self) -> str:
        self.stderr_file.flush()
        self.stderr_file.seek(0)
        return self.stderr_file.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        if self.alive():
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"agent did not exit within {timeout_s} s of signal {sig}")

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=20)


def _agents():
    started: list[AgentProcess] = []

    def start(*args: str, ready: str | None = "edge_agent ready") -> AgentProcess:
        agent = AgentProcess(list(args))
        started.append(agent)
        if ready:
            agent.wait_line(ready)
        return agent

    yield start
    for agent in started:
        agent.kill()
        agent.stderr_file.close()


@pytest.fixture
def start_agent():
    """start_agent(*args, ready="edge_agent ready") -> AgentProcess; all killed at teardown."""
    yield from _agents()


@pytest.fixture(scope="module")
def start_module_agent():
    """As start_agent, for agents shared by the tests of one module."""
    yield from _agents()


@pytest.fixture(scope="module")
def two_agents(start_module_agent, tiny_split):
    """Experts 0-3 on one agent, 4-7 on another: the roster flags for them."""
    low = start_module_agent("--expert", "0-3", "--shards", tiny_split,
                             "--bind", "tcp://127.0.0.1:*")
    high = start_module_agent("--expert", "4-7", "--shards", tiny_split,
                              "--bind", "tcp://127.0.0.1:*")
    return [f"0-3={low.endpoint}", f"4-7={high.endpoint}"]


@pytest.fixture
def client():
    from wire.client import AgentClient

    with AgentClient() as c:
        yield c


class ScriptedDialIn:
    """A scripted dial-in agent in a thread, for attacks on the base station's dial-in port: a
    DEALER under `routing_id` that announces itself with `info` (HELLO every hello_every_s,
    as real agents do on connect) and answers each message with `answer(header, frames)`, a
    list of multipart replies. `curve`: (its keypair, the base station's public key)."""

    hello_every_s = 0.5

    def __init__(self, endpoint: str, routing_id: bytes, info: dict, curve=None):
        self.endpoint, self.routing_id, self.info, self.curve = endpoint, routing_id, info, curve
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def answer(self, header: dict, frames: list[bytes]) -> list[list[bytes]]:
        raise NotImplementedError

    def _serve(self) -> None:
        import zmq

        from wire import protocol as P

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, self.routing_id)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        if self.curve is not None:
            keypair, server_key = self.curve
            sock.setsockopt(zmq.CURVE_PUBLICKEY, keypair.public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, keypair.secret)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)
        sock.connect(self.endpoint)
        next_hello_s = 0.0
        try:
            while not self._stop.is_set():
                if time.monotonic() >= next_hello_s:
                    sock.send(P.pack(P.HELLO, 0, info=self.info), flags=zmq.NOBLOCK)
                    next_hello_s = time.monotonic() + self.hello_every_s
                    self.connected.set()
                if not sock.poll(20):
                    continue
                frames = sock.recv_multipart()
                try:
                    header = P.unpack(frames[0])
                except P.ProtocolError:
                    continue
                for reply in self.answer(header, frames):
                    sock.send_multipart(reply, flags=zmq.NOBLOCK)
        except zmq.Again:  # the base station stopped reading: it is being closed
            pass
        finally:
            sock.close(linger=0)
            ctx.term()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

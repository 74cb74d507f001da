"""testbed.links.relay on loopback: forwarding from an inherited listening socket (how the user
namespace's relays are reached), delay taken from the settings file, one-line errors."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from testbed.links.relay import write_settings

pytestmark = pytest.mark.integration
DEADLINE_S = 10.0
DELAY_MS = 20.0
# Load only adds to a round trip: the relay's holding is a floor every round trip clears, and
# the fastest of several is the relay's own time; LOAD_MARGIN_MS is what load may add to it.
LOAD_MARGIN_MS = 15.0


class EchoServer:
    """Echoes every byte back, on 127.0.0.1; stopped by closing its socket."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def start_relay(args: list[str], pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """The relay as a real process; returns once it says it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "testbed.links.relay", *args], pass_fds=pass_fds,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(DEADLINE_S)
    if not line or not line[0].startswith("relay ready"):
        proc.kill()
        proc.wait(timeout=DEADLINE_S)
        pytest.fail(f"relay did not start: {line} {proc.stderr.read()}")
    return proc


def round_trips_ms(port: int, rounds: int = 10) -> list[float]:
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            start = time.perf_counter()
            s.sendall(b"ping")
            got = b""
            while len(got) < 4:
                chunk = s.recv(4 - len(got))
                assert chunk, "relay closed the connection"
                got += chunk
            out.append((time.perf_counter() - start) * 1000)
    return out


def test_relay_forwards_from_an_inherited_socket_with_the_delay_asked(tmp_path):
    echo = EchoServer()
    settings = str(tmp_path / "relay.json")
    write_settings(settings, 0, 0)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    relay = start_relay(["--listen-fd", str(listener.fileno()), "--target",
                         f"127.0.0.1:{echo.port}", "--settings", settings],
                        pass_fds=(listener.fileno(),))
    listener.close()  # the relay holds its own copy
    try:
        assert write_settings(settings, DELAY_MS, 0, wait=True)
        delayed_ms = round_trips_ms(port)
    finally:
        relay.kill()
        relay.wait(timeout=DEADLINE_S)
        echo.close()
    # held each way (a timer may fire up to a clock tick early: 1 ms)
    assert 2 * DELAY_MS - 1 <= min(delayed_ms) < 2 * DELAY_MS + LOAD_MARGIN_MS, delayed_ms


def test_relay_without_settings_only_forwards():
    echo = EchoServer()
    with socket.socket() as probe:  # a free port for --listen
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = start_relay(["--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{echo.port}"])
    try:
        assert min(round_trips_ms(port)) < DELAY_MS  # holds nothing back: no delay at all
    finally:
        relay.kill()
        relay.wait(timeout=DEADLINE_S)
        echo.close()


@pytest.mark.parametrize("args", [
    ["--listen", "127.0.0.1:0", "--target", "nonsense"],
    ["--listen-fd", "987", "--target", "127.0.0.1:1"],  # no such descriptor
])
def test_relay_bad_arguments_are_one_line(args):
    out = subprocess.run([sys.executable, "-m", "testbed.links.relay", *args], check=False,
                         capture_output=True, text=True, timeout=DEADLINE_S)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def message_round_trips_ms(port: int, size: int, rounds: int = 10) -> list[float]:
    out = []
    payload = b"x" * size
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            start = time.perf_counter()
            s.sendall(payload)
            got = 0
            while got < size:
                chunk = s.recv(size - got)
                assert chunk, "relay closed the connection"
                got += len(chunk)
            out.append((time.perf_counter() - start) * 1000)
            # the measured scenario, not synchronisation: messages spaced like decode steps
            time.sleep(0.02)
    return out


def test_relay_serialises_each_message_at_each_directions_wire_rate(tmp_path):
    """A message far under any tbf burst still takes bytes x 8 / rate on the wire, each way
    at its own rate: the paper emulation's wire time for small messages."""
    echo = EchoServer()
    settings = str(tmp_path / "relay.json")
    write_settings(settings, 0, 0)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    relay = start_relay(["--listen-fd", str(listener.fileno()), "--target",
                         f"127.0.0.1:{echo.port}", "--settings", settings],
                        pass_fds=(listener.fileno(),))
    listener.close()
    try:
        # 8 KiB down at 2 Mbit/s is 32.8 ms, back up at 32 Mbit/s 2.0 ms: far apart, so that
        # one rate for both ways (4.1 or 65.5 ms) misses by more than load adds
        assert write_settings(settings, 0, 0, wait=True, wire_down_mbit=2, wire_up_mbit=32)
        wired_ms = message_round_trips_ms(port, 8192)
    finally:
        relay.kill()
        relay.wait(timeout=DEADLINE_S)
        echo.close()
    expected_ms = 8192 * 8 / 2e6 * 1e3 + 8192 * 8 / 32e6 * 1e3
    assert expected_ms - 1 <= min(wired_ms) < expected_ms + LOAD_MARGIN_MS, wired_ms

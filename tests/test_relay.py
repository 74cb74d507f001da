"""testbed.links.relay on loopback: forwarding from an inherited listening socket (how the user
namespace's relays are reached), delay taken from the settings file, one-line errors."""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time

import pytest

from testbed.links.relay import write_settings

pytestmark = pytest.mark.integration
DEADLINE_S = 10.0
DELAY_MS = 20.0


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
        base_ms = statistics.median(round_trips_ms(port))
        assert write_settings(settings, DELAY_MS, 0, wait=True)
        delayed_ms = statistics.median(round_trips_ms(port))
    finally:
        relay.kill()
        relay.wait(timeout=DEADLINE_S)
        echo.close()
    assert abs(delayed_ms - base_ms - 2 * DELAY_MS) < 5  # held each way


def test_relay_without_settings_only_forwards():
    echo = EchoServer()
    with socket.socket() as probe:  # a free port for --listen
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = start_relay(["--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{echo.port}"])
    try:
        assert statistics.median(round_trips_ms(port)) < 5
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
            time.sleep(0.02)  # an idle wire between messages: no queue carried over
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
        base_ms = statistics.median(message_round_trips_ms(port, 8192))
        # 8 KiB down at 8 Mbit/s is 8.2 ms, back up at 16 Mbit/s 4.1 ms
        assert write_settings(settings, 0, 0, wait=True, wire_down_mbit=8, wire_up_mbit=16)
        wired_ms = statistics.median(message_round_trips_ms(port, 8192))
    finally:
        relay.kill()
        relay.wait(timeout=DEADLINE_S)
        echo.close()
    expected_ms = 8192 * 8 / 8e6 * 1e3 + 8192 * 8 / 16e6 * 1e3
    assert expected_ms - 1 < wired_ms - base_ms < expected_ms + 4, (base_ms, wired_ms)

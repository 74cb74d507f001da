"""The transport floor: bare pyzmq echo processes, and a client that fans bytes out to them.

    .venv/bin/python bench/echo_fanout.py [--sockopt NAME=VALUE ...]

As a process: one ROUTER bound on a random loopback port, announced on stdout as
"echo ready: serving tcp://127.0.0.1:PORT", answering every message with its own frames. No
protocol, no torch: only pyzmq. Its socket options come on the command line;
`agent_socket_options()` records them from wire.protocol.configure_socket in the parent
(recorded, not copied, so the echo follows the agent's options when they change).
As a module: `start_echoes` starts N of them; `floor_step_ms` times steps of sequential rounds,
each round one request to k echoes at once and a wait for all k replies, through one ROUTER
socket as the base station's AgentClient sends one MoE layer.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Sequence

import zmq

HEADER_BYTES = 64  # about an EXPERT header (msgpack, one token): the frame before the tensor
READY = "echo ready: serving "
CONNECT_TIMEOUT_S = 10.0  # until every echo has answered once
REPLY_TIMEOUT_S = 5.0  # a round with a missing reply fails the bench instead of hanging it
WARMUP_STEPS = 20


class _OptionRecorder:
    """Stands in for a ROUTER socket: what configure_socket touches is `type` and setsockopt."""

    type = zmq.ROUTER

    def __init__(self) -> None:
        self.flags: list[str] = []

    def setsockopt(self, option: int, value: int) -> None:
        self.flags.append(f"{zmq.SocketOption(option).name}={int(value)}")


def agent_socket_options(immediate: bool = True) -> list[str]:
    """configure_socket's options for a ROUTER as NAME=VALUE flags (immediate=False: the base
    station's client side). Imports wire.protocol, hence torch: call it in the parent."""
    from wire.protocol import configure_socket

    recorder = _OptionRecorder()
    configure_socket(recorder, immediate=immediate)
    return recorder.flags


def apply_options(sock: zmq.Socket, flags: Sequence[str]) -> None:
    """NAME=VALUE flags (integer options) onto a socket. Raises ValueError on a bad flag."""
    for flag in flags:
        name, _, value = flag.partition("=")
        option = getattr(zmq.SocketOption, name, None)
        if option is None or not value.lstrip("-").isdigit():
            raise ValueError(f"bad socket option {flag!r} (NAME=INTEGER)")
        sock.setsockopt(option, int(value))
    sock.setsockopt(zmq.LINGER, 0)  # whatever the flags say: a bench process exits at once


def serve(flags: Sequence[str]) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    apply_options(sock, flags)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    print(f"{READY}tcp://127.0.0.1:{port}", flush=True)
    while True:
        frames = sock.recv_multipart(copy=False)  # [client id, *frames]
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.ZMQError as e:  # ROUTER_MANDATORY: the client has gone, nothing to answer
            if e.errno != zmq.EHOSTUNREACH:
                raise


def start_echoes(count: int, cpus: set[int] | None = None, flags: Sequence[str] = ()
                 ) -> tuple[list[subprocess.Popen], list[str]]:
    """`count` echo processes (on `cpus` when given); returns them and their endpoints."""
    cmd = [sys.executable, os.path.abspath(__file__), *(f"--sockopt={f}" for f in flags)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                              preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus
                              else None) for _ in range(count)]
    endpoints = []
    for proc in procs:
        line = proc.stdout.readline()
        if not line.startswith(READY):
            stop_echoes(procs)
            raise SystemExit(f"bench: echo process did not start: {line!r}")
        endpoints.append(line[len(READY):].strip())
    return procs, endpoints


def stop_echoes(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=10)


class FanoutClient:
    """One ROUTER socket to every echo, each peer named by its endpoint (CONNECT_ROUTING_ID),
    with the options given: the base station's AgentClient without its protocol."""

    def __init__(self, endpoints: list[str], flags: Sequence[str] = ()):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        apply_options(self.sock, flags)
        self.sock.setsockopt(zmq.RCVTIMEO, int(REPLY_TIMEOUT_S * 1000))
        self.peers = [endpoint.encode() for endpoint in endpoints]
        for endpoint, peer in zip(endpoints, self.peers):
            self.sock.setsockopt(zmq.CONNECT_ROUTING_ID, peer)
            self.sock.connect(endpoint)
        self._wait_connected()

    def _wait_connected(self) -> None:
        """Raises TimeoutError when an echo does not answer by CONNECT_TIMEOUT_S."""
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        for peer in self.peers:
            while True:
                try:  # ROUTER_MANDATORY: EHOSTUNREACH until the handshake is done
                    self.round_trip([peer], [b""])
                    break
                except zmq.ZMQError as e:
                    if e.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline:
                        raise TimeoutError(f"echo {peer.decode()} did not answer") from None
                    time.sleep(0.01)

    def round_trip(self, peers: list[bytes], frames: list) -> None:
        """Send `frames` to each peer, then wait for every reply. Raises zmq.Again (no reply
        by REPLY_TIMEOUT_S) and RuntimeError (a reply from a peer not asked)."""
        for peer in peers:
            self.sock.send_multipart([peer, *frames], copy=False)
        pending = set(peers)
        for _ in peers:
            sender = self.sock.recv_multipart(copy=False)[0].bytes
            if sender not in pending:
                raise RuntimeError(f"unexpected reply from {sender!r}")
            pending.discard(sender)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def floor_step_ms(endpoints: list[str], *, rounds: int, fanout: int, payload_bytes: int,
                  steps: int, repeats: int, flags: Sequence[str] = (), seed: int = 0) -> float:
    """Median time of a step: `rounds` sequential rounds, each one message of HEADER_BYTES +
    payload_bytes to `fanout` echoes drawn at random (as a router picks experts) and a wait
    for their equal-sized replies. Best median of `repeats` runs of `steps` steps."""
    frames = [bytes(HEADER_BYTES), bytes(payload_bytes)]
    client = FanoutClient(endpoints, flags)
    rng = random.Random(seed)
    try:
        medians = []
        for repeat in range(repeats + 1):  # the first run warms up and is not counted
            times_s = []
            for _ in range(WARMUP_STEPS if repeat == 0 else steps):
                picks = [rng.sample(client.peers, fanout) for _ in range(rounds)]
                start_s = time.perf_counter()
                for peers in picks:
                    client.round_trip(peers, frames)
                times_s.append(time.perf_counter() - start_s)
            if repeat:
                medians.append(statistics.median(times_s) * 1e3)
        return min(medians)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sockopt", action="append", default=[], metavar="NAME=VALUE",
                        help="a zmq socket option for the ROUTER (repeatable)")
    args = parser.parse_args(argv)
    try:
        serve(args.sockopt)
    except ValueError as e:
        raise SystemExit(f"echo_fanout: {e}") from None


if __name__ == "__main__":
    main()

"""A base station's dial-in port in a process of its own, for tests that flood it: when it
dies (libzmq aborts the process on some floods), the test sees the exit status, not its own
death. Driven by lines on stdin, answering on stdout:

    python tests/dialin_basestation.py SHARDS --cap-mb 1
    -> "listening tcp://127.0.0.1:PORT"
    -> "agent ROUTING_ID"            (when a dial-in agent announced itself)
    <- "pause"                       stop reading (a base station busy elsewhere)
    <- "check EXPERT[,EXPERT...]"    read everything, then call the agent for each expert and
                                     compare with the shard's own math
    -> "ok CUTS REFUSED"  or  "failed WHY"
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import zmq

from edge_agent.expert_math import expert_forward
from edge_agent.shards import load_experts
from wire import protocol as P
from wire.client import AgentClient

HELLO_TIMEOUT_S = 60.0
CALL_TIMEOUT_S = 10.0


def say(line: str) -> None:
    print(line, flush=True)


def check(client: AgentClient, peer: bytes, shards: str, experts: list[int]) -> str:
    while client.recv(0.2) is not None:  # whatever the floods left: read and dropped
        pass
    reference = load_experts(shards, experts, device="cpu")
    x = torch.randn(4, reference.hidden_size)
    for expert in experts:
        out, _ = client.expert(peer, 1, x, [(expert, 4)], timeout_s=CALL_TIMEOUT_S)
        want = expert_forward(x, reference.weights[expert][1])
        if not torch.allclose(out, want, rtol=1e-4, atol=1e-5):
            return f"failed expert {expert} computed wrong"
    return f"ok {client.guard.cuts} {client.guard.refused}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("shards")
    parser.add_argument("--cap-mb", type=float, default=1.0)
    args = parser.parse_args()
    sockets = P.SocketConfig(max_message_bytes=int(args.cap_mb * 2**20))
    with AgentClient(sockets=sockets) as client:
        say(f"listening {client.bind('tcp://127.0.0.1:*')}")
        peer = client.wait_hello(HELLO_TIMEOUT_S)
        if peer is None:
            say("failed no agent dialled in")
            return 1
        say(f"agent {peer.decode()}")
        reading = True
        poller = zmq.Poller()
        poller.register(sys.stdin.fileno(), zmq.POLLIN)
        while True:
            if reading:
                client.recv(0.0)  # at most one reply: the rest is dropped on the way
            if not poller.poll(50):
                continue
            line = sys.stdin.readline().split()
            if not line:
                return 0
            if line[0] == "pause":
                reading = False
                say("paused")
            elif line[0] == "check":
                try:
                    say(check(client, peer, args.shards, [int(e) for e in line[1].split(",")]))
                except Exception as e:  # noqa: BLE001 (the test reads one line, whatever broke)
                    say(f"failed {type(e).__name__}: {e}")
                reading = True


if __name__ == "__main__":
    sys.exit(main())

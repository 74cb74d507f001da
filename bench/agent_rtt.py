"""Round trip of an expert call vs a bare pyzmq DEALER/ROUTER ping-pong of the same bytes.

    .venv/bin/python bench/agent_rtt.py [--hidden 4096 --ffn 2048 --rounds 400 --pin]

Makes a one-layer Mixtral checkpoint with a realistic hidden size, splits it, starts a real
`edge_agent` process on loopback TCP and times `AgentClient.expert` for 1, 16 and 256 tokens.
In the same run, a bare echo process (bench/echo_fanout.py: ROUTER with the agent's socket
options, no protocol, no torch) answers a DEALER with the same request and reply sizes.
Agent overhead = (rtt - compute_s reported by the agent) vs bare.
Targets (issue 3): overhead adds <= 50 % to the bare round trip at 1 token, <= 20 % at 256.
Then the same protocol work in this process, hot, without sockets: what it costs when no
process has to wake up.

    .venv/bin/python bench/agent_rtt.py --curve [--tokens 1,256 --pin]

What CurveZMQ costs per call: a plain agent and an agent with `--keys` (the same shard, both
on loopback) answer the same requests, calls alternating plain / encrypted / bare echo one by
one; prints each side's median round trip and (rtt - compute), and encrypted / plain.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# bench/, beside this script
from echo_fanout import HEADER_BYTES, agent_socket_options, start_echoes  # noqa: E402
from pinning import split_cpus  # noqa: E402

TOKENS = (1, 16, 256)
TARGET_OVERHEAD = {1: 0.50, 256: 0.20}


def start(cmd: list[str], pattern: str, cpus: set[int] | None = None,
          timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        match = re.search(pattern, line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise SystemExit(f"bench: {cmd[:4]} did not start")


def bare_rtts_s(sock, payload: bytes, rounds: int) -> list[float]:
    out, header = [], bytes(HEADER_BYTES)
    for _ in range(rounds):
        start = time.perf_counter()
        sock.send_multipart([header, payload], copy=False)
        sock.recv_multipart(copy=False)
        out.append(time.perf_counter() - start)
    return out


def in_process(shards: str, hidden: int, rounds: int) -> None:
    """The protocol's own cost, hot, with no sockets and no process wake-ups: the agent's
    handling of a request (header, checks, tensor view, reply header) beside the FFN alone,
    and the client's encode + header and reply header + decode."""
    import torch
    import zmq

    from edge_agent.server import Agent, AgentConfig
    from wire import protocol as P

    agent = Agent(AgentConfig(experts=(0,), shards_dir=shards, self_benchmark=False))
    agent.load(shards)
    print(f"in process, hot (medians of {rounds}): {'tokens':>6} {'ffn_us':>8} "
          f"{'agent_protocol_us':>17} {'client_us':>9}")
    with torch.inference_mode():
        for tokens in TOKENS:
            x = torch.randn(tokens, hidden)
            ffn, handled, client = [], [], []
            for _ in range(rounds):
                start_s = time.perf_counter()
                frames, fields = P.encode_tensor(x, "float32")
                header = P.pack(P.EXPERT, 1, layer=0, experts=[[0, tokens]], **fields)
                encoded_s = time.perf_counter() - start_s
                # as received: zmq owns the bytes (a copy, so no pyzmq gc thread runs meanwhile)
                request = [zmq.Frame(header), zmq.Frame(frames[0], copy=True)]
                start_s = time.perf_counter()
                reply = agent.handle(request)
                handled_s = time.perf_counter() - start_s
                start_s = time.perf_counter()
                reply_header = P.unpack(reply[0])
                P.decode_tensor(reply_header, reply[1:])
                client.append(encoded_s + time.perf_counter() - start_s)
                ffn.append(reply_header["compute_s"])
                handled.append(handled_s - reply_header["compute_s"])
                del request, reply  # freeing the 4 MiB message is not the protocol's work
            print(f"{'':36}{tokens:>6} {statistics.median(ffn) * 1e6:>8.1f} "
                  f"{statistics.median(handled) * 1e6:>17.1f} "
                  f"{statistics.median(client) * 1e6:>9.1f}")


def make_keys(tmp: str):
    """An agent key folder that trusts a client keypair: (agent's --keys DIR, client Keypair,
    agent's public key)."""
    from wire.keys import (
        PUSHERS_DIR,
        TRUSTED_DIR,
        keygen,
        load_keypair,
        read_certificate,
        trust,
    )

    agent_dir, client_dir = os.path.join(tmp, "agent-keys"), os.path.join(tmp, "client-keys")
    agent_public, _ = keygen(agent_dir, "bench-agent", (TRUSTED_DIR, PUSHERS_DIR))
    client_public, _ = keygen(client_dir, "bench-client", (TRUSTED_DIR,))
    trust(agent_dir, client_public, TRUSTED_DIR)
    return agent_dir, load_keypair(client_dir), read_certificate(agent_public)


def curve_main(args, cpus, shards: str, tmp: str) -> None:
    """Plain vs CurveZMQ, the same agent code and shard, calls interleaved one by one."""
    import torch
    import zmq

    from wire.client import AgentClient

    tokens_list = tuple(int(t) for t in args.tokens.split(","))
    agent_dir, keypair, agent_key = make_keys(tmp)
    serve = [sys.executable, "-m", "edge_agent", "--expert", "0", "--shards", shards, "--bind",
             "tcp://127.0.0.1:*", "--no-self-benchmark"]
    plain_agent, plain_endpoint = start(serve, r"serving (tcp://\S+)", cpus)
    curve_agent, curve_endpoint = start(serve + ["--keys", agent_dir], r"serving (tcp://\S+)",
                                        cpus)
    (echo,), (echo_endpoint,) = start_echoes(1, cpus, agent_socket_options())
    client = AgentClient(keypair=keypair)
    ctx = zmq.Context()
    bare = ctx.socket(zmq.DEALER)
    bare.linger = 0
    bare.connect(echo_endpoint)
    try:
        plain = client.connect(plain_endpoint)
        curve = client.connect(curve_endpoint, server_key=agent_key)
        for peer in (plain, curve):
            client.info(peer, timeout_s=60)
        print(f"CurveZMQ vs plain: hidden {args.hidden}, ffn {args.ffn}, wire float32, "
              f"{args.rounds} calls per size and side, interleaved, "
              f"{'servers pinned to CPU ' + str(min(cpus)) if cpus else 'not pinned'}; "
              f"libzmq {zmq.zmq_version()}, curve {bool(zmq.has('curve'))}")
        print(f"{'tokens':>6} {'bytes':>9} {'bare_us':>8} {'plain_us':>9} {'curve_us':>9} "
              f"{'curve-plain_us':>14} {'curve/plain':>11} {'plain-c_us':>10} "
              f"{'curve-c_us':>10} {'net curve/plain':>15}")
        for tokens in tokens_list:
            x = torch.randn(tokens, args.hidden)
            payload = bytes(x.numel() * 4)
            for _ in range(10):  # warm-up
                bare_rtts_s(bare, payload, 1)
                client.expert(plain, 0, x, [(0, tokens)])
                client.expert(curve, 0, x, [(0, tokens)])
            timed = {"plain": ([], []), "curve": ([], [])}
            bares = []
            for _ in range(args.rounds):
                bares += bare_rtts_s(bare, payload, 1)
                for name, peer in (("plain", plain), ("curve", curve)):
                    start_s = time.perf_counter()
                    _, reply = client.expert(peer, 0, x, [(0, tokens)])
                    timed[name][0].append(time.perf_counter() - start_s)
                    timed[name][1].append(reply.header["compute_s"])
            rtt = {n: statistics.median(r) * 1e6 for n, (r, _) in timed.items()}
            net = {n: statistics.median(r - c for r, c in zip(*timed[n])) * 1e6 for n in timed}
            print(f"{tokens:>6} {len(payload):>9} {statistics.median(bares) * 1e6:>8.0f} "
                  f"{rtt['plain']:>9.0f} {rtt['curve']:>9.0f} "
                  f"{rtt['curve'] - rtt['plain']:>+14.0f} {rtt['curve'] / rtt['plain']:>11.2f} "
                  f"{net['plain']:>10.0f} {net['curve']:>10.0f} "
                  f"{net['curve'] / net['plain']:>15.2f}")
    finally:
        client.close()
        bare.close(linger=0)
        ctx.term()
        for proc in (plain_agent, curve_agent, echo):
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=400, help="timed calls per size and side")
    parser.add_argument("--blocks", action="store_true",
                        help="time bare and agent calls in alternating blocks of rounds/5 "
                             "instead of call by call")
    parser.add_argument("--pin", action="store_true",
                        help="servers on the last CPU, this client on the others")
    parser.add_argument("--curve", action="store_true",
                        help="CurveZMQ vs plain: the same agent with and without --keys")
    parser.add_argument("--tokens", default="1,256", help="with --curve: request sizes")
    args = parser.parse_args()
    cpus = split_cpus(args.pin)

    import torch
    import zmq

    from shard_tool.split import split
    from testbed.models.make_model import ModelSpec, make_model
    from wire.client import AgentClient

    tmp = tempfile.mkdtemp(prefix="agent-rtt-")
    spec = ModelSpec(layers=1, hidden=args.hidden, intermediate=args.ffn, experts=2, heads=32,
                     kv_heads=8, vocab=512, dtype="fp32")
    make_model(os.path.join(tmp, "model"), spec)
    split(os.path.join(tmp, "model"), os.path.join(tmp, "out"))
    if args.curve:
        try:
            curve_main(args, cpus, os.path.join(tmp, "out"), tmp)
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        return
    agent, endpoint = start([sys.executable, "-m", "edge_agent", "--expert", "0", "--shards",
                             os.path.join(tmp, "out"), "--bind", "tcp://127.0.0.1:*"],
                            r"serving (tcp://\S+)", cpus)
    (echo,), (echo_endpoint,) = start_echoes(1, cpus, agent_socket_options())
    client = AgentClient()
    ctx = zmq.Context()
    bare = ctx.socket(zmq.DEALER)
    bare.linger = 0
    bare.connect(echo_endpoint)
    try:
        peer = client.connect(endpoint)
        info = client.info(peer, timeout_s=60)
        print(f"agent: {info['device_name']} ({info['device']}, {torch.get_num_threads()} "
              f"threads), hidden {args.hidden}, ffn {args.ffn}, wire float32, "
              f"self-benchmark {info['throughput']['tokens_per_s']:.0f} tokens/s, "
              f"{'servers pinned to CPU ' + str(min(cpus)) if cpus else 'not pinned'}")
        print(f"{'tokens':>6} {'bytes':>9} {'bare_us':>8} {'rtt_us':>8} {'compute_us':>10} "
              f"{'rtt-compute_us':>14} {'rtt/bare':>8} {'overhead':>8} target")
        for tokens in TOKENS:
            x = torch.randn(tokens, args.hidden)
            payload = bytes(x.numel() * 4)
            for _ in range(10):  # warm-up
                bare_rtts_s(bare, payload, 1)
                client.expert(peer, 0, x, [(0, tokens)])
            rtts, computes, bares = [], [], []
            # Call by call, alternating: both sides see the same machine state. (Blocks of bare
            # calls back to back keep the 4 MiB buffers hot in cache, which an expert call
            # never sees: its FFN evicts them; --blocks measures that way too.)
            for _ in range(args.rounds):
                if args.blocks:
                    break
                bares += bare_rtts_s(bare, payload, 1)
                start_s = time.perf_counter()
                _, reply = client.expert(peer, 0, x, [(0, tokens)])
                rtts.append(time.perf_counter() - start_s)
                computes.append(reply.header["compute_s"])
            for _ in range(5 if args.blocks else 0):
                bares += bare_rtts_s(bare, payload, args.rounds // 5)
                for _ in range(args.rounds // 5):
                    start_s = time.perf_counter()
                    _, reply = client.expert(peer, 0, x, [(0, tokens)])
                    rtts.append(time.perf_counter() - start_s)
                    computes.append(reply.header["compute_s"])
            bare_us = statistics.median(bares) * 1e6
            rtt_us = statistics.median(rtts) * 1e6
            compute_us = statistics.median(computes) * 1e6
            net_us = statistics.median(r - c for r, c in zip(rtts, computes)) * 1e6
            overhead = net_us / bare_us - 1
            target = TARGET_OVERHEAD.get(tokens)
            verdict = "" if target is None else (
                f"<= {target:.0%} {'ok' if overhead <= target else 'MISSED'}")
            print(f"{tokens:>6} {len(payload):>9} {bare_us:>8.0f} {rtt_us:>8.0f} "
                  f"{compute_us:>10.0f} {net_us:>14.0f} {rtt_us / bare_us:>8.2f} "
                  f"{overhead:>+8.0%} {verdict}")
        in_process(os.path.join(tmp, "out"), args.hidden, args.rounds)
    finally:
        client.close()
        bare.close(linger=0)
        ctx.term()
        for proc in (agent, echo):
            proc.terminate()
            proc.wait(timeout=30)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

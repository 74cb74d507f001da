"""Concurrency of `basestation serve`: aggregate tokens/s for 1, 2, 4, 8, 16 clients at once,
as ratios to one client alone, behind six agents on shaped links (10 ms each way by default;
loopback without shaping when not root), plus one `basestation generate` alone on the same agents
as the baseline a single request must not fall behind.

    .venv/bin/python bench/serve.py [--model DIR] [--clients 1,2,4,8,16] [--tokens 32]
                                    [--delay-ms 10] [--agents 6] [--page-rounds N]

Each client sends one /v1/completions request (greedy, ignore_eos, `--tokens` new tokens) and the
bench times from the first send to the last answer. The server decodes concurrent requests
together (one forward pass, one request per agent per layer, per step), so the aggregate rate
should grow almost linearly until the base station's own compute per step catches up with the
links' round trips.

`--page-rounds N` adds the dashboard's cost (issue 25): N rounds, each one client's rate with no
page open, then with what an open page keeps running on the server (a reader of
/v1/wdmoe/events at the page's 1 s interval, and one /v1/wdmoe/state), alternating, and the
median ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from testbed.links.procs import free_port

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(REPO_ROOT, "testbed", "data", "tiny-mixtral")
PROMPT = "The queue module implements multi-producer, multi-consumer queues."
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0


def start_server(shards: str, roster: str, port: int, threads: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "basestation", "serve", "--shards", shards,
                             "--agents", roster, "--port", str(port), "--dtype", "float32",
                             "--max-queue", "64", "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=REPO_ROOT)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready" in line:
            return proc
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit("serve did not start")


def one_request(port: int, tokens: int) -> int:
    body = json.dumps({"model": "shards", "prompt": PROMPT, "max_tokens": tokens,
                       "temperature": 0, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
        return int(json.load(reply)["usage"]["completion_tokens"])


def aggregate_tokens_per_s(port: int, clients: int, tokens: int) -> float:
    done: list[int] = []
    errors: list[Exception] = []

    def client() -> None:
        try:
            done.append(one_request(port, tokens))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S)
    elapsed = time.perf_counter() - start
    if errors:
        raise SystemExit(f"{len(errors)} of {clients} requests failed: {errors[0]}")
    return sum(done) / elapsed


class PageReader:
    """What an open dashboard asks of the server: /v1/wdmoe/state once, then the event stream
    read to the end (the server sends a snapshot every interval)."""

    def __init__(self, port: int):
        self.port, self.events, self._response = port, 0, None
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> PageReader:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/wdmoe/state",
                                    timeout=30) as reply:
            json.load(reply)
        self._response = urllib.request.urlopen(
            f"http://127.0.0.1:{self.port}/v1/wdmoe/events?interval_s=1", timeout=30)
        self._thread.start()
        return self

    def _read(self) -> None:
        try:
            for line in self._response:
                if line.startswith(b"event: state"):
                    self.events += 1
        except (OSError, ValueError, AttributeError):
            pass  # closed by __exit__ (http.client drops its file mid-read: AttributeError)

    def __exit__(self, *exc) -> None:
        self._response.close()
        self._thread.join(5)


def page_cost(port: int, tokens: int, rounds: int) -> tuple[list[float], list[float], int]:
    """One client's tokens/s without and with a page open, alternating; the events read."""
    without, with_page, events = [], [], 0
    for _ in range(rounds):
        without.append(aggregate_tokens_per_s(port, 1, tokens))
        with PageReader(port) as page:
            with_page.append(aggregate_tokens_per_s(port, 1, tokens))
        events += page.events
    return without, with_page, events


def generate_alone_tokens_per_s(shards: str, roster: str, tokens: int, threads: int) -> float:
    result = subprocess.run([sys.executable, "-m", "basestation", "generate", "--shards", shards,
                             "--agents", roster, "--prompt", PROMPT, "--max-new-tokens",
                             str(tokens), "--ignore-eos", "--json", "--dtype", "float32",
                             "--threads", str(threads)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)
    if result.returncode:
        raise SystemExit(f"generate failed: {result.stderr.strip()[-300:]}")
    out = json.loads(result.stdout)
    return len(out["token_ids"]) / (sum(out["token_latency_ms"]) / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--clients", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--delay-ms", type=float, default=10.0, help="one way, every link")
    parser.add_argument("--page-rounds", type=int, default=0,
                        help="also measure an open dashboard's cost: N alternating rounds")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]

    from shard_tool.split import split
    from testbed.experiments.cpu_share import base_station_threads
    from testbed.links import control as links

    threads = base_station_threads(args.agents)  # the agents run on this host too

    scratch = tempfile.mkdtemp(prefix="bench-serve-")
    bed = server = None
    try:
        shards = os.path.join(scratch, "shards")
        split(args.model, shards)
        shapes = {i: links.LinkShape(delay_ms=args.delay_ms) for i in range(args.agents)}
        bed = links.up(shards, args.agents, shapes, state_dir=os.path.join(scratch, "bed"))
        alone = generate_alone_tokens_per_s(shards, bed.roster_path, args.tokens, threads)
        port = free_port()
        server = start_server(shards, bed.roster_path, port, threads)
        one_request(port, 4)  # warm up the links
        rates = {n: aggregate_tokens_per_s(port, n, args.tokens) for n in counts}
        page = page_cost(port, args.tokens, args.page_rounds) if args.page_rounds else None
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        if bed is not None:
            bed.down()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"{args.agents} agents, links {bed.backend}: {args.delay_ms:g} ms each way; "
          f"{args.tokens} tokens per request, greedy; base station on {threads} thread(s)")
    print(f"basestation generate alone      {alone:8.1f} tokens/s")
    base = rates[counts[0]]
    for n in counts:
        print(f"{n:3d} concurrent clients          {rates[n]:8.1f} tokens/s aggregate   "
              f"{rates[n] / base:5.2f}x {counts[0]} client(s)")
    print(f"one client vs generate alone: {rates[counts[0]] / alone:.2f}x")
    if page:
        without, with_page, events = page
        ratios = sorted(w / o for w, o in zip(with_page, without))
        print(f"dashboard open ({len(without)} alternating rounds, {events} state events read): "
              f"1 client {statistics.median(without):.1f} tokens/s without, "
              f"{statistics.median(with_page):.1f} with; median ratio "
              f"{statistics.median(ratios):.3f} (rounds {', '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()

"""θ = 0 is the exact model, on a busy box: echo log-probabilities through `basestation serve`
against transformers running the same checkpoint locally, with busy processes beside it.

    .venv/bin/python bench/exact_under_load.py [--model DIR] [--busy 4] [--requests 8]
                                               [--tokens 200] [--concurrent]

Eight agents (one expert id each, real processes on loopback), one `basestation serve`, `--busy`
processes spinning on the same cores, and `--requests` echo requests of `--tokens` held-out
tokens each, one after another, the first on a cold server. Each request's prompt
log-probabilities are compared with transformers' own (float32, this process), and the figures
every response carries (`wdmoe`: experts dropped, fault drops, failed agent requests) are
printed beside them. Exits 1 when any request was not exact (|Δ| > --atol, or any expert slot
dropped): the regression this exists for dropped thousands of slots at θ = 0 with every agent
alive, because a late reply was taken for a dead agent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "bench"))
from serve import TINY_MODEL, free_port  # noqa: E402  (bench/serve.py)

HELDOUT = os.path.join(REPO_ROOT, "testbed", "data", "heldout-sample.txt")
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0
BUSY_LOOP = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"


def wait_for(proc: subprocess.Popen, word: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if word in line:
            return line
        if not line and proc.poll() is not None:
            break
    raise SystemExit(f"{proc.args[2:5]} did not print {word!r}")


def echo(port: int, ids: list[int]) -> dict:
    body = json.dumps({"model": "shards", "prompt": ids, "max_tokens": 0, "echo": True,
                       "logprobs": 1, "temperature": 0, "theta": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
        return json.load(reply)


def reference(model, ids: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=TINY_MODEL)
    parser.add_argument("--busy", type=int, default=4, help="processes spinning beside it")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--atol", type=float, default=2e-3)
    parser.add_argument("--concurrent", action="store_true",
                        help="send the requests all at once (one batch) instead of in turn")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shard_tool.split import split

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text_ids = tokenizer(open(HELDOUT).read()).input_ids
    prompts = [text_ids[i * args.tokens:(i + 1) * args.tokens] for i in range(args.requests)]
    if len(prompts[-1]) < args.tokens:
        raise SystemExit(f"{HELDOUT} has fewer than {args.requests} x {args.tokens} tokens")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    experts = int(model.config.num_local_experts)

    scratch = tempfile.mkdtemp(prefix="bench-exact-")
    procs: list[subprocess.Popen] = []
    rows = []
    try:
        shards = os.path.join(scratch, "shards")
        split(args.model, shards)
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # threads as a user's agents get them
        roster = []
        for q in range(experts):
            agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "--expert", str(q),
                                      "--shards", shards, "--bind", "tcp://127.0.0.1:*",
                                      "--no-self-benchmark"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, cwd=REPO_ROOT, env=env)
            procs.append(agent)
            roster += ["--agent", f"{q}=" + wait_for(agent, "serving").split("serving ")[1]
                       .split()[0]]
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "basestation", "serve", "--shards",
                                   shards, *roster, "--port", str(port), "--dtype", "float32"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                  cwd=REPO_ROOT)
        procs.append(server)
        wait_for(server, "ready")
        busy_s = 30 + 30 * args.requests  # a bound: they stop by themselves too
        procs += [subprocess.Popen([sys.executable, "-c", BUSY_LOOP.format(seconds=busy_s)])
                  for _ in range(args.busy)]
        # the first on a cold server; --concurrent: all at once, decoded in one batch
        answers: dict[int, tuple[dict, float]] = {}

        def ask(i: int) -> None:
            start = time.perf_counter()
            answers[i] = (echo(port, prompts[i]), time.perf_counter() - start)

        if args.concurrent:
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(REQUEST_TIMEOUT_S)
        else:
            for i in range(len(prompts)):
                ask(i)
        for i, ids in enumerate(prompts):
            if i not in answers:
                raise SystemExit(f"request {i} got no answer")
            out, elapsed_s = answers[i]
            got = out["choices"][0]["logprobs"]["token_logprobs"][1:]
            want = reference(model, ids)
            delta = max(abs(a - b) for a, b in zip(got, want))
            rows.append((i, delta, out.get("wdmoe", {}), elapsed_s))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{experts} agents + serve on loopback, {args.busy} busy processes beside them; "
          f"{args.requests} echo requests of {args.tokens} tokens at θ = 0, "
          + ("all at once" if args.concurrent else "one at a time"))
    print(f"{'request':>7} {'max |Δ logprob|':>16} {'dropped':>8} {'fault drops':>12} "
          f"{'failed reqs':>12} {'seconds':>8}")
    exact = True
    for i, delta, wdmoe, elapsed_s in rows:
        dropped = wdmoe.get("experts_dropped", "?")
        faults = wdmoe.get("fault_drops", "?")
        failed = wdmoe.get("failed_requests", "?")
        ok = delta <= args.atol and dropped == 0
        exact &= ok
        print(f"{i:>7} {delta:16.2e} {dropped!s:>8} {faults!s:>12} {failed!s:>12} "
              f"{elapsed_s:8.2f}" + ("" if ok else "   NOT EXACT") + ("   (cold)" if i == 0 else ""))
    print("θ = 0 exact on every request" if exact else "θ = 0 was NOT the model")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())

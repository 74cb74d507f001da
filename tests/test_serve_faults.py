"""Every answer says what it lost: an agent that fails shows in the request's `wdmoe` figures
and in /metrics, and a request that asks for `"exact": true` fails (503 expert_lost) rather
than answer without the lost experts, while the requests beside it are served.

The failing agent replies NaN to every expert request (test_rogue_agent.RogueAgent): each
reply is refused, the agent is marked dead, probed back, and fails again. Deterministic, unlike
a slow agent, which is waited for."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest
from agent_fixtures import start_module_agent  # noqa: F401
from test_rogue_agent import RogueAgent
from test_serve import MODEL, PROMPT, _start, http, metric

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rogue(tiny_split):
    from shard_tool.manifest import load_manifest

    manifest = load_manifest(tiny_split)
    agent = RogueAgent(manifest.fingerprint, int(manifest.model["hidden_size"]), "nan")
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def honest(start_module_agent, tiny_split):
    return start_module_agent("--expert", "0-3", "--shards", tiny_split,
                              "--bind", "tcp://127.0.0.1:*")


@pytest.fixture(scope="module")
def faulty_server(honest, rogue, tiny_split):
    server = _start([f"0-3={honest.endpoint}", f"4-7={rogue.endpoint}"], tiny_split)
    yield server
    server.stop()


def complete(server, **extra) -> tuple[int, dict]:
    return http(server.url + "/v1/completions",
                {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                 "ignore_eos": True, **extra})


def sse_events(url: str, body: dict) -> list:
    """The data of every server-sent event of a streamed response, JSON-decoded but [DONE]."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_a_failing_agent_is_counted_and_fails_exact_requests(faulty_server, rogue):
    server = faulty_server
    lost_before = metric(server, 'wdmoe_requests_total{outcome="expert_lost"}')
    status, body = complete(server)
    assert status == 200, body
    wdmoe = body["wdmoe"]
    assert rogue.expert_requests >= 1
    assert wdmoe["failed_requests"] >= 1 and wdmoe["fault_drops"] >= 1
    # one holder per expert and no --local-fallback: a lost slot has nowhere to go again
    assert wdmoe["experts_dropped"] >= wdmoe["fault_drops"] and wdmoe["retries"] == 0
    by_agent = {a["address"]: a for a in wdmoe["agents"]}
    assert by_agent[rogue.endpoint]["failures"] == wdmoe["failed_requests"]
    assert len(body["choices"][0]["text"]) > 0

    status, body = complete(server, exact=True)
    assert status == 503, body
    error = body["error"]
    assert error["code"] == "expert_lost" and error["type"] == "server_error"
    assert "lost to faults" in error["message"] and rogue.endpoint in error["message"]

    status, body = http(server.url + "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "exact": "yes"})
    assert status == 400 and body["error"]["param"] == "exact"

    # streamed: the stream ends with the error event, not [DONE] as if it were fine
    events = sse_events(server.url + "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
        "ignore_eos": True, "stream": True, "exact": True})
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "expert_lost", events

    assert metric(server, "wdmoe_fault_drops_total") >= 2
    assert metric(server, "wdmoe_failed_agent_requests_total") >= 1
    assert metric(server, "wdmoe_retries_total") == 0
    assert metric(server, 'wdmoe_requests_total{outcome="expert_lost"}') == lost_before + 2


def test_an_exact_request_fails_alone_in_its_batch(faulty_server):
    """An exact request and a plain one decoded together: only the exact one fails."""
    server = faulty_server
    results: dict[str, tuple[int, dict]] = {}
    start = threading.Barrier(2)

    def ask(name: str, **extra) -> None:
        start.wait()
        results[name] = complete(server, max_tokens=24, **extra)

    threads = [threading.Thread(target=ask, args=("exact",), kwargs={"exact": True}),
               threading.Thread(target=ask, args=("plain",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    status, body = results["plain"]
    assert status == 200 and body["usage"]["completion_tokens"] == 24, body
    assert body["wdmoe"]["fault_drops"] >= 1
    status, body = results["exact"]
    assert status == 503 and body["error"]["code"] == "expert_lost", body


def test_generate_json_and_exact(honest, rogue, tiny_split, run_cli):
    roster = ["--agent", f"0-3={honest.endpoint}", "--agent", f"4-7={rogue.endpoint}"]
    args = ("basestation", "generate", "--shards", tiny_split, *roster, "--prompt", PROMPT,
            "--max-new-tokens", "6", "--ignore-eos", "--wait-s", "20")
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["fault_drops"] >= 1 and out["failed_requests"] >= 1 and out["retries"] == 0
    assert len(out["token_ids"]) == 6

    result = run_cli(*args, "--json", "--exact")
    assert result.returncode == 3 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("basestation: error: --exact: ") and "lost to faults" in lines[-1]
    assert rogue.endpoint in lines[-1]

"""Issue 25's server side against a real `basestation serve` over two real agents: the live
state, its event stream read by a real HTTP client, the dashboard's routes and the api-key rule,
the per-token breakdown of `wdmoe` and the new /metrics series."""

from __future__ import annotations

import json
import os
import time
from http.client import HTTPConnection

import pytest
from agent_fixtures import start_module_agent, two_agents  # noqa: F401
from test_serve import MODEL, _start, http
from waiting import wait_until

pytestmark = pytest.mark.integration
KEY = "s3cret-live"
DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "basestation", "dashboard")
STREAM_DEADLINE_S = 60.0  # for two events on a loaded 2-core machine (they come 0.25 s apart)


@pytest.fixture(scope="module")
def server(two_agents, tiny_split):  # noqa: F811
    s = _start(two_agents, tiny_split)
    yield s
    s.stop()


def complete(server, theta: float, tokens: int = 6, headers: dict | None = None) -> dict:
    status, body = http(server.url + "/v1/completions",
                        {"model": MODEL, "prompt": "The live view of", "max_tokens": tokens,
                         "temperature": 0, "ignore_eos": True, "theta": theta},
                        headers=headers)
    assert status == 200, body
    return body


def read_events(port: int, count: int, headers: dict | None = None,
                query: str = "?interval_s=0.25") -> list[dict]:
    """The first `count` state events of /v1/wdmoe/events, read with http.client; every read
    has a deadline and the whole a STREAM_DEADLINE_S one."""
    conn = HTTPConnection("127.0.0.1", port, timeout=STREAM_DEADLINE_S)
    try:
        conn.request("GET", "/v1/wdmoe/events" + query, headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200, response.read()[:300]
        assert response.getheader("content-type").startswith("text/event-stream")
        events, event, deadline = [], None, time.monotonic() + STREAM_DEADLINE_S
        while len(events) < count:
            assert time.monotonic() < deadline, f"{len(events)} events in {STREAM_DEADLINE_S} s"
            line = response.readline().decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event == "state":
                events.append(json.loads(line[len("data: "):]))
                event = None
        return events
    finally:
        conn.close()


def test_state_has_every_agent_with_measured_figures(server):
    body = complete(server, theta=0.0)
    status, state = http(server.url + "/v1/wdmoe/state")
    assert status == 200, state
    assert state["model"] == MODEL and state["uptime_s"] > 0
    agents = state["agents"]
    assert [a["experts"] for a in agents] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for a in agents:
        assert isinstance(a["rtt_p50_ms"], float) and a["rtt_p50_ms"] > 0, a
        assert a["rtt_p95_ms"] >= a["rtt_p50_ms"] and a["calls"] > 0 and a["alive"], a
        assert a["bits"] == 32 and a["shaping"] is None, a
    experts = state["experts"]
    assert experts["tokens"] > 0 and len(experts["routed"]) == experts["layers"]
    # θ = 0: every routed slot computed; top-2 routing: each layer's shares sum to 2
    assert experts["routed"] == experts["computed"]
    used = [row for row in experts["routed"] if any(row)]
    assert used and all(abs(sum(row) - 2) < 1e-2 for row in used)
    steps = state["tokens"]
    assert steps and steps[0]["prefill"] and not steps[-1]["prefill"]
    last = steps[-1]
    assert last["wait_ms"] > 0 and last["total_ms"] >= last["wait_ms"]
    assert last["slowest"] in [a["agent"] for a in agents]
    assert {b["agent"] for b in last["boxes"]} <= {a["agent"] for a in agents}
    assert max(b["critical_ms"] for b in last["boxes"]) > 0
    assert state["series"] and state["series"][-1]["tokens"] > 0
    # the request's own breakdown
    wdmoe = body["wdmoe"]
    assert wdmoe["time_to_first_token_ms"] > 0
    per_token = wdmoe["per_token"]
    assert per_token["total_ms"] == wdmoe["token_latency_ms"]
    for name in ("base_station_ms", "wait_ms", "slowest"):
        assert len(per_token[name]) == len(wdmoe["token_latency_ms"]) == 6, name
    assert all(w > 0 for w in per_token["wait_ms"])
    assert set(per_token["slowest"]) <= {a["agent"] for a in agents}


def test_computed_share_falls_below_routed_at_theta(server):
    complete(server, theta=0.9, tokens=8)
    _, state = http(server.url + "/v1/wdmoe/state")
    routed, computed = state["experts"]["routed"], state["experts"]["computed"]
    assert any(c < r for rr, cr in zip(routed, computed) for r, c in zip(rr, cr)), state
    assert any(s["theta"] == 0.9 for s in state["tokens"])
    assert sum(s["drops"] for s in state["series"]) > 0


def test_events_stream_states(server):
    complete(server, theta=0.0, tokens=2)
    events = read_events(server.port, 2)
    assert all(len(e["agents"]) == 2 for e in events)
    assert events[1]["time_unix_s"] >= events[0]["time_unix_s"]
    status, body = http(server.url + "/v1/wdmoe/events?interval_s=0")
    assert status == 400 and body["error"]["param"] == "interval_s", body


def test_dashboard_files_and_names(server):
    status, _ = http(server.url + "/")
    assert status == 200
    for name in ("..", "...", ".hidden.js", "..%2Fserve.py", "nothing-here.js", "index.py"):
        status, _ = http(server.url + "/dashboard/" + name)
        assert status == 404, name
    status, _ = http(server.url + "/dashboard/../serve.py")
    assert status == 404


def test_metrics_has_the_new_series(server):
    complete(server, theta=0.5, tokens=3)
    _, text = http(server.url + "/metrics")
    for name in ("wdmoe_time_to_first_token_seconds_count ",
                 'wdmoe_token_phase_latency_seconds_count{phase="prefill"} ',
                 'wdmoe_token_phase_latency_seconds_count{phase="decode"} ',
                 'wdmoe_token_phase_latency_seconds_bucket{phase="decode",le="+Inf"} ',
                 "wdmoe_theta_in_use ", "wdmoe_request_theta_count ",
                 "wdmoe_expert_slots_routed_total ", "wdmoe_expert_slots_computed_total ",
                 "wdmoe_experts_dropped_total ", "wdmoe_fault_drops_total "):
        assert name in text, name
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["wdmoe_expert_slots_routed_total"] > values["wdmoe_expert_slots_computed_total"]
    assert values["wdmoe_time_to_first_token_seconds_count"] >= 1


def test_api_key_guards_the_data_not_the_page(two_agents, tiny_split):  # noqa: F811
    """Beyond loopback (--host 0.0.0.0) with --api-key: the data routes need the key, the page
    and its files do not (the page asks for the key and sends it itself). Then a stream open
    at shutdown ends cleanly (the server's own last comment, the final chunk)."""
    secured = _start(two_agents, tiny_split, "--host", "0.0.0.0", "--api-key", KEY)
    conn = None
    try:
        for path in ("/v1/wdmoe/state", "/v1/wdmoe/events"):
            status, body = http(secured.url + path)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, body)
        assert http(secured.url + "/")[0] == 200
        assert http(secured.url + "/dashboard/index.html")[0] == 200
        assert http(secured.url + "/dashboard/..")[0] == 404
        auth = {"Authorization": f"Bearer {KEY}"}
        status, state = http(secured.url + "/v1/wdmoe/state", headers=auth)
        assert status == 200 and len(state["agents"]) == 2
        assert len(read_events(secured.port, 2, headers=auth)) == 2

        conn = HTTPConnection("127.0.0.1", secured.port, timeout=STREAM_DEADLINE_S)
        conn.request("GET", "/v1/wdmoe/events", headers=auth)
        response = conn.getresponse()
        assert response.status == 200
        wait_until(lambda: response.readline().startswith(b"event: state"), STREAM_DEADLINE_S,
                   what="a first state event")
        secured.proc.terminate()
        rest = response.read()  # ends with the stream (the connection's timeout bounds it)
        assert rest.endswith(b": the server is stopping\n\n"), rest[-200:]
        secured.proc.wait(timeout=30)
        assert "Traceback" not in secured.stderr(), secured.stderr()
    finally:
        if conn is not None:
            conn.close()
        secured.stop()

"""`basestation serve` as a real process over real agents, driven by the real `openai` client
and by raw HTTP for the errors."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request

import pytest
import torch
from agent_fixtures import (  # noqa: F401
    REPO_ROOT,
    START_TIMEOUT_S,
    _die_with_parent,
    free_port,
    start_module_agent,
    two_agents,
)
from waiting import wait_until

pytestmark = pytest.mark.integration
MODEL = "tiny"
PROMPT = "Return the list of items in the queue."
CANCELLED = 'wdmoe_requests_total{outcome="cancelled"}'
WAIT_S = 60.0  # for a server-side event on a loaded 2-core machine


class ServerProcess:
    """`python -m basestation serve ...` on a free port; ready when /health answers."""

    def __init__(self, args: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_file = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "basestation", "serve", "--port", str(self.port),
             "--model-name", MODEL, *args], cwd=REPO_ROOT, stdout=subprocess.PIPE,
            stderr=self.stderr_file, text=True, env=env, preexec_fn=_die_with_parent)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited ({self.proc.returncode}); stderr:\n{self.stderr()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(healthy, timeout_s, interval_s=0.1,
                   what=lambda: f"serve to answer /health; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        self.stderr_file.flush()
        self.stderr_file.seek(0)
        return self.stderr_file.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr_file.close()


def _start(two_agents, tiny_split, *extra: str) -> ServerProcess:
    server = ServerProcess(["--shards", tiny_split, "--dtype", "float32", "--wait-s", "20",
                            *[a for flag in two_agents for a in ("--agent", flag)], *extra])
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def server(two_agents, tiny_split):
    """Batched (up to 16 sequences at once), no queue beyond that."""
    s = _start(two_agents, tiny_split, "--max-queue", "0")
    yield s
    s.stop()


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def http(url: str, body=None, method: str | None = None, headers: dict | None = None,
         raw: bytes | None = None) -> tuple[int, dict | str]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def metric(server, name: str, default: float | None = None) -> float:
    _, text = http(server.url + "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if default is not None:
        return default
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def check_wdmoe(wdmoe: dict, theta: float, tokens: int) -> None:
    assert wdmoe["theta"] == theta
    assert len(wdmoe["token_latency_ms"]) == tokens
    assert wdmoe["expert_calls"] > 0
    if theta == 0.0:  # exact: every selected expert ran
        assert wdmoe["experts_dropped"] == 0
    else:  # k = 2 on two boxes: theta >= 0.5 always drops one
        assert theta >= 0.5 and wdmoe["experts_dropped"] > 0
    assert [tuple(a["experts"]) for a in wdmoe["agents"]] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    for a in wdmoe["agents"]:
        assert {"address", "experts", "calls", "drops", "failures", "rtt_ms",
                "throughput_mbit_s", "compute_us_per_token"} <= set(a)
    assert sum(a["calls"] for a in wdmoe["agents"]) == wdmoe["expert_calls"]
    # healthy agents: nothing lost to a fault, nothing retried
    assert (wdmoe["fault_drops"], wdmoe["retries"], wdmoe["failed_requests"]) == (0, 0, 0)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    status, body = http(server.url + "/health")
    assert status == 200 and body["agents_alive"] == 2


def test_chat_plain_and_streamed(client):
    messages = [{"role": "user", "content": "What does the queue module do?"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                           temperature=0, extra_body={"ignore_eos": True})
    text = plain.choices[0].message.content
    assert plain.choices[0].finish_reason == "length" and text
    assert plain.usage.completion_tokens == 10 and plain.usage.prompt_tokens > 5
    check_wdmoe(plain.model_extra["wdmoe"], 0.0, 10)

    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == text  # greedy: the same answer streamed
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and set(finish[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    check_wdmoe(chunks[-1].model_extra["wdmoe"], 0.0, 10)


def test_chat_sampling_seed_and_stop(client):
    messages = [{"role": "user", "content": "Tell me about threads."}]

    def ask(**kw):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                              extra_body={"ignore_eos": True}, **kw)

    first = ask(temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert ask(temperature=1.0, top_p=0.9, seed=7).choices[0].message.content == first
    greedy = ask(temperature=0).choices[0].message.content
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 2]
    cut = ask(temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[: greedy.index(stop)]


def reference_logprobs(checkpoint: str, ids: list[int]) -> torch.Tensor:
    """transformers' own log-probabilities of each prompt token given the ones before it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                 experts_implementation="eager").eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)[torch.arange(len(ids) - 1), ids[1:]]


def test_completions_echo_logprobs_match_transformers(client, tiny_checkpoint):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny_checkpoint)(PROMPT).input_ids
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, echo=True,
                                    logprobs=2, temperature=0)
    choice = out.choices[0]
    assert choice.text == PROMPT and out.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = reference_logprobs(tiny_checkpoint, ids)
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(value)
        assert max(top.values()) >= value

    # the shape lm-eval sends: token ids, several prompts, one generated token each
    out = client.completions.create(model=MODEL, prompt=[ids, ids[:4]], max_tokens=1,
                                    echo=True, logprobs=1, temperature=0)
    assert [len(c.logprobs.tokens) for c in out.choices] == [len(ids) + 1, 5]
    assert torch.allclose(torch.tensor(out.choices[0].logprobs.token_logprobs[1:len(ids)]),
                          expected, atol=1e-4)
    generated = out.choices[1].logprobs
    assert generated.token_logprobs[-1] == max(generated.top_logprobs[-1].values())  # greedy


def test_theta_belongs_to_the_request(client):
    def complete(theta: float):
        return client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8,
                                         temperature=0, extra_body={"theta": theta,
                                                                    "ignore_eos": True})

    dropping = complete(0.5).model_extra["wdmoe"]  # k = 2: theta >= 0.5 always drops
    check_wdmoe(dropping, 0.5, 8)
    assert dropping["experts_dropped"] > 0
    # θ's drops are the request's choice, not faults: an exact request is served
    exact = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0,
                                      extra_body={"theta": 0.5, "ignore_eos": True,
                                                  "exact": True}).model_extra["wdmoe"]
    assert exact["experts_dropped"] > 0 and exact["fault_drops"] == 0
    keeping = complete(0.0).model_extra["wdmoe"]
    assert keeping["experts_dropped"] == 0 and keeping["theta"] == 0.0


def test_errors_in_openai_shape(server):
    chat = server.url + "/v1/chat/completions"
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (http(chat, raw=b"{not json"), 400, "invalid_json"),
        (http(chat, [1, 2]), 400, "invalid_json"),
        (http(chat, {**good, "temperature": "hot"}), 400, "invalid_value"),
        (http(chat, {**good, "messages": []}), 400, "invalid_value"),
        (http(chat, {**good, "max_tokens": 0}), 400, "invalid_value"),
        (http(chat, {**good, "theta": 2}), 400, "invalid_value"),
        (http(chat, {**good, "model": "gpt-4"}), 404, "model_not_found"),
        (http(server.url + "/v1/completions",
              {"model": MODEL, "prompt": [5] * 4097, "max_tokens": 0}), 400,
         "context_length_exceeded"),
        (http(server.url + "/v1/completions",
              {"model": MODEL, "prompt": [5] * 4000, "max_tokens": 100}), 400,
         "context_length_exceeded"),
        (http(server.url + "/v1/completions", {"model": MODEL, "prompt": [99999]}), 400,
         "invalid_value"),
        (http(server.url + "/v1/completions", {"model": MODEL, "prompt": ""}), 400,
         "invalid_value"),
    ]
    for (status, body), want_status, want_code in cases:
        assert status == want_status, body
        assert set(body["error"]) >= {"message", "type", "code"}, body
        assert body["error"]["code"] == want_code, body
    assert "4096" in cases[7][0][1]["error"]["message"]
    status, _ = http(chat, good)
    assert status == 200


@pytest.fixture
def one_at_a_time(two_agents, tiny_split):
    """A batch of one and no queue: a request that comes while one is decoded gets 503."""
    s = _start(two_agents, tiny_split, "--max-queue", "0", "--max-batch", "1")
    yield s
    s.stop()


def test_overload_and_disconnect_cancels(one_at_a_time):
    """Closing the stream cancels the generation, so a request right after it is served (it
    would get 503 otherwise)."""
    import openai

    server = one_at_a_time
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                           timeout=60)
    cancelled_before = metric(server, CANCELLED)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Go on forever."}], max_tokens=3000,
        stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    for _ in range(3):
        next(it)  # decoding has started
    status, body = http(server.url + "/v1/completions",
                        {"model": MODEL, "prompt": "x", "max_tokens": 1})
    assert status == 503 and body["error"]["code"] == "overloaded"
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert e.value.status_code == 503
    stream.close()

    wait_until(lambda: metric(server, CANCELLED) > cancelled_before, WAIT_S,
               interval_s=0.05, what="the disconnected stream to be cancelled")
    # at capacity this was 503 overloaded (above): served, it shows the stream's slot freed
    out = client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=0)
    assert out.choices[0].text is not None
    assert metric(server, "wdmoe_queue_depth") == 0


def test_metrics_page(server):
    status, text = http(server.url + "/metrics")
    assert status == 200
    for name in ("wdmoe_requests_total{outcome=\"completed\"}", "wdmoe_completion_tokens_total",
                 "wdmoe_token_latency_seconds_bucket{le=\"+Inf\"}",
                 "wdmoe_token_latency_seconds_count", "wdmoe_agent_rtt_ms{agent=",
                 "wdmoe_agent_throughput_mbit_s{", "wdmoe_agent_calls_total{",
                 "wdmoe_agent_drops_total{", "wdmoe_agent_failures_total{",
                 "wdmoe_agent_alive{", "wdmoe_fault_drops_total ", "wdmoe_retries_total ",
                 "wdmoe_failed_agent_requests_total ", "wdmoe_experts_dropped_total ",
                 "wdmoe_http_responses_total{path=\"/v1/chat/completions\","
                 "status=\"400\"}"):
        assert name in text, name
    assert metric(server, "wdmoe_completion_tokens_total") > 0


def test_api_key(two_agents, tiny_split):
    secured = _start(two_agents, tiny_split, "--api-key", "s3cret")
    try:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        url = secured.url + "/v1/completions"
        status, err = http(url, body, headers={"Authorization": "Bearer wrong"})
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert http(url, body)[0] == 401
        assert http(url, body, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert http(secured.url + "/health")[0] == 200  # open for load balancers
    finally:
        secured.stop()


def test_beyond_loopback_needs_a_key(run_cli, tiny_split):
    result = run_cli("basestation", "serve", "--shards", tiny_split, "--agent",
                     "0-7=tcp://127.0.0.1:1", "--host", "0.0.0.0")
    assert result.returncode == 2 and "--api-key" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


CONCURRENT_PROMPTS = [
    "The queue module implements", "A thread is", "Sockets are", "The json module",
    "Use a lock when", "An iterator returns", "The event loop runs", "Files are opened with",
]


def stream_completion(server, prompt: str, tokens: int) -> tuple[str, str]:
    """One streamed greedy completion over raw SSE: its text and finish reason."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    req = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    text, finish = [], None
    with urllib.request.urlopen(req, timeout=120) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk["choices"]:
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    return "".join(text), finish


def batch_histogram(server) -> dict[str, float]:
    _, text = http(server.url + "/metrics")
    return {line.split('le="')[1].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith("wdmoe_batch_sequences_bucket")}


def concurrent_completions(server, prompts: list[str], tokens: int) -> list:
    """Each prompt streamed greedily by its own client thread, all started at once: (text,
    finish) per prompt, in order."""
    results: list = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def client(i: int) -> None:
        start.wait()
        results[i] = stream_completion(server, prompts[i], tokens)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def test_eight_concurrent_streams_equal_each_alone(server):
    """Greedy, θ = 0, float32: every answer of 8 requests decoded together is token for token
    the answer it gets alone, and the steps really carried several sequences."""
    tokens = 16
    alone = [stream_completion(server, p, tokens) for p in CONCURRENT_PROMPTS]
    before = batch_histogram(server)
    results = concurrent_completions(server, CONCURRENT_PROMPTS, tokens)
    assert results == alone
    assert all(finish == "length" and text for text, finish in results)
    after = batch_histogram(server)
    # steps with more than 4 sequences: the le="4" bucket grew less than the +Inf one
    wide_steps = (after["+Inf"] - before["+Inf"]) - (after["4"] - before["4"])
    assert wide_steps >= tokens // 2, (before, after)


def test_a_disconnected_stream_stops_and_the_others_finish(server, client):
    cancelled_before = metric(server, CANCELLED)
    done: dict[int, tuple[str, str]] = {}

    def finisher(i: int) -> None:
        done[i] = stream_completion(server, CONCURRENT_PROMPTS[i], 24)

    others = [threading.Thread(target=finisher, args=(i,)) for i in (1, 2)]
    for t in others:
        t.start()
    leaving = client.completions.create(model=MODEL, prompt=CONCURRENT_PROMPTS[0],
                                        max_tokens=3000, stream=True, temperature=0,
                                        extra_body={"ignore_eos": True})
    it = iter(leaving)
    for _ in range(3):
        next(it)  # decoding together with the others
    leaving.close()
    wait_until(lambda: metric(server, CANCELLED) > cancelled_before, WAIT_S,
               interval_s=0.05, what="the disconnected stream to be cancelled")
    for t in others:
        t.join(120)
    assert [done[i][1] for i in (1, 2)] == ["length", "length"]
    assert metric(server, "wdmoe_queue_depth") == 0


MC_TASK = """task: wdmoe_mc_sample
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_local_completions_scores_through_the_server(server, tiny_checkpoint,
                                                            tmp_path):
    """lm-eval's own `local-completions` model scores a local multiple-choice task through
    the server (offline), and its log-likelihoods are the ones the server computes."""
    items = open(os.path.join(REPO_ROOT, "testbed", "data", "mc-heldout.jsonl")).readlines()[:6]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(items))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "wdmoe_mc_sample.yaml").write_text(MC_TASK.format(data=data))
    served = 'wdmoe_http_responses_total{path="/v1/completions",status="200"}'
    completions_before = metric(server, served, default=0.0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets"), TOKENIZERS_PARALLELISM="false")
    model_args = (f"model={MODEL},base_url={server.url}/v1/completions,"
                  f"tokenizer_backend=huggingface,tokenizer={tiny_checkpoint},"
                  "tokenized_requests=True,num_concurrent=1,max_retries=1")
    out = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
         model_args, "--tasks", "wdmoe_mc_sample", "--include_path", str(tasks),
         "--output_path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.load(open(os.path.join(root, f)))
               for root, _, files in os.walk(tmp_path / "results") for f in files
               if f.endswith(".json") and f.startswith("results")]
    assert results, out.stdout[-2000:]
    scores = results[0]["results"]["wdmoe_mc_sample"]
    assert 0.0 <= scores["acc,none"] <= 1.0 and "acc_stderr,none" in scores
    assert results[0]["n-samples"]["wdmoe_mc_sample"]["effective"] == len(items)
    assert metric(server, served) - completions_before >= len(items)  # >= 1 request per item


def test_theta_per_request_inside_one_batch(server):
    """A θ = 0.5 request (k = 2: always drops) decoding together with θ = 0 ones: only it
    drops, and the θ = 0 answers are still exactly their alone answers."""
    def ask(prompt: str, theta: float) -> dict:
        return http(server.url + "/v1/completions",
                    {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                     "ignore_eos": True, "theta": theta})[1]

    alone = [ask(p, 0.0)["choices"][0]["text"] for p in CONCURRENT_PROMPTS[:3]]
    before = batch_histogram(server)
    results: dict[int, dict] = {}
    start = threading.Barrier(4)

    def client(i: int, prompt: str, theta: float) -> None:
        start.wait()
        results[i] = ask(prompt, theta)

    threads = [threading.Thread(target=client, args=(i, p, 0.0))
               for i, p in enumerate(CONCURRENT_PROMPTS[:3])]
    threads.append(threading.Thread(target=client, args=(3, CONCURRENT_PROMPTS[3], 0.5)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = batch_histogram(server)
    assert (after["+Inf"] - before["+Inf"]) - (after["1"] - before["1"]) > 0  # shared steps
    assert [results[i]["choices"][0]["text"] for i in range(3)] == alone
    for i in range(3):
        assert results[i]["wdmoe"]["experts_dropped"] == 0
        check_wdmoe(results[i]["wdmoe"], 0.0, 12)
    assert results[3]["wdmoe"]["experts_dropped"] > 0
    check_wdmoe(results[3]["wdmoe"], 0.5, 12)

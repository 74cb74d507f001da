"""Expert popularity from real runs (issue 24): `basestation plan --text` counts what the
model's own routers choose on the text, `serve --popularity-out` leaves a whole file with every
token it ran when stopped as by Ctrl-C, and PopularityWriter refreshes its file as counts grow.

Both runs go over two real agents on loopback (0-3 and 4-7, shared by the module)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess

import pytest
import torch
from agent_fixtures import start_module_agent, two_agents  # noqa: F401
from test_serve import MODEL, _start
from waiting import wait_until

from basestation.plan_cli import TEXT_CHUNK_TOKENS
from basestation.popularity import Popularity, PopularityWriter, load_popularity

WORDS = ("the quick brown fox jumps over a lazy dog while every queue of items waits for its "
         "turn at the base station which routes each token to two experts").split()
TEXT_WORDS = 150  # 419 tokens with the tiny tokenizer: two chunks, the second a partial one
TOP_K = 2  # the tiny model's (testbed/models/make_model.py ModelSpec)
LAYERS = 2
# Top-k choices closer than this (router probabilities, ~1/8 each on the tiny model) may go
# either way between the base station (experts on agents, summed in its order: float32 rounding,
# ~1e-8 here) and transformers; each such token may move one slot per layer. On this text: none
# in layer 0, one in layer 1 (at 1e-4 there would be 6 and 11: too loose a check).
NEAR_TIE = 1e-5
STOP_TIMEOUT_S = 60.0  # serve's clean shutdown on a loaded 2-core machine


def _roster(path, flags: list[str]) -> str:
    """A roster file for agent flags "EXPERTS=ENDPOINT"."""
    lines = [f'"{flag.split("=", 1)[0]}" = "{flag.split("=", 1)[1]}"\n' for flag in flags]
    path.write_text("[agents]\n" + "".join(lines))
    return str(path)


def _router_counts(checkpoint: str, ids: torch.Tensor, chunk: int):
    """transformers' own Mixtral on `ids` [1, T] in the plan's chunks: per layer the [E] slot
    counts of its routers' top-k, and how many tokens had a near tie at the k-th choice."""
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    num_experts = model.config.num_local_experts
    counts = {i: torch.zeros(num_experts, dtype=torch.long) for i in range(LAYERS)}
    near = dict.fromkeys(range(LAYERS), 0)

    def hook(layer):
        def record(module, args, output):
            logits, _, indices = output  # the router's [T, E] logits and [T, K] choices
            counts[layer] += torch.bincount(indices.reshape(-1), minlength=num_experts)
            probs = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
            near[layer] += int((probs[:, TOP_K - 1] - probs[:, TOP_K] < NEAR_TIE).sum())
        return record

    handles = [layer.mlp.gate.register_forward_hook(hook(i))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.inference_mode():
            for first in range(0, ids.shape[1], chunk):
                part = ids[:, first:first + chunk]
                model(part, attention_mask=torch.ones_like(part), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: c.tolist() for i, c in counts.items()}, near


@pytest.mark.integration
def test_plan_text_counts_what_the_routers_choose(two_agents, tiny_split, tiny_checkpoint,
                                                  run_cli, tmp_path):
    """plan --text --popularity-out: the file holds, per layer, the top-k counts transformers'
    routers give on the same token ids in the same chunks (exact unless a near tie moved a
    slot), and the printed summary names the same tokens, chunks and slots."""
    from transformers import AutoConfig, AutoTokenizer

    from basestation.generate import context_length
    from shard_tool.manifest import BASESTATION_DIR

    rng = random.Random(7)
    text = " ".join(rng.choice(WORDS) for _ in range(TEXT_WORDS))
    (tmp_path / "text.txt").write_text(text)
    base_dir = os.path.join(tiny_split, BASESTATION_DIR)  # the tokenizer plan runs with
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
    chunk = min(TEXT_CHUNK_TOKENS, context_length(AutoConfig.from_pretrained(base_dir),
                                                  tokenizer))
    tokens = ids.shape[1]
    assert tokens > chunk, "the text should need more than one chunk"
    chunks = -(-tokens // chunk)

    measured = str(tmp_path / "measured.json")
    result = run_cli("basestation", "plan", "--roster", _roster(tmp_path / "r.toml", two_agents),
                     "--shards", tiny_split, "--experts-per-box", "5", "--probe-calls", "4",
                     "--dtype", "float32", "--text", str(tmp_path / "text.txt"),
                     "--popularity-out", measured)
    assert result.returncode == 0, result.stderr
    assert (f"popularity measured on the text: {tokens} tokens in {chunks} chunks, "
            f"{tokens * TOP_K * LAYERS} slots counted") in result.stdout, result.stdout

    pop = load_popularity(measured)
    assert pop.tokens == tokens and pop.slots == tokens * TOP_K * LAYERS
    reference, near = _router_counts(tiny_checkpoint, ids, chunk)
    got = pop.snapshot()
    print(f"{tokens} tokens, {chunks} chunks; near ties per layer {near}\nplan: {got}\n"
          f"transformers: {reference}")
    assert sorted(got) == list(range(LAYERS))
    for layer in range(LAYERS):
        assert sum(got[layer]) == sum(reference[layer]) == tokens * TOP_K
        moved = sum(abs(a - b) for a, b in zip(got[layer], reference[layer]))
        assert moved <= 2 * near[layer], (layer, got[layer], reference[layer])
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no staged file left


def test_plan_popularity_out_is_checked_before_any_agent(tiny_split, tmp_path, capsys):
    """Refused in one line before the roster's agent (none listens there) is waited for."""
    from basestation.cli import main

    roster = _roster(tmp_path / "r.toml", ["0-7=tcp://127.0.0.1:9"])
    for argv, says in ((["--popularity-out", str(tmp_path / "pop.json")], "needs --text"),
                       (["--text", __file__, "--popularity-out", str(tmp_path / "no" / "p")],
                        "no such folder")):
        assert main(["plan", "--roster", roster, "--shards", tiny_split, "--experts-per-box",
                     "8", "--wait-s", "1", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == ["r.toml"]


@pytest.mark.integration
def test_serve_writes_every_token_it_ran_when_stopped(two_agents, tiny_split, tmp_path):
    """serve --popularity-out, two requests, then SIGINT (a user's Ctrl-C): the file loads, each
    layer holds tokens x top-k slots, and tokens are what the model ran: each request's prompt
    plus its generated tokens but the last (sampled from the final step, never fed back)."""
    import openai

    folder = tmp_path / "out"
    folder.mkdir()
    path = str(folder / "popularity.json")
    server = _start(two_agents, tiny_split, "--popularity-out", path)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        first = client.completions.create(model=MODEL, prompt="Return the list of items.",
                                          max_tokens=7, temperature=0,
                                          extra_body={"ignore_eos": True})
        second = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
            temperature=0, extra_body={"ignore_eos": True})
        usages = [first.usage, second.usage]
        assert [u.completion_tokens for u in usages] == [7, 5]
        ran = sum(u.prompt_tokens + u.completion_tokens - 1 for u in usages)

        server.proc.send_signal(signal.SIGINT)
        try:
            code = server.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not stop within {STOP_TIMEOUT_S} s of SIGINT; stderr:\n"
                        f"{server.stderr()}")
        assert code == 0, server.stderr()
        assert "basestation serve: stopped" in server.stderr()
    finally:
        server.stop()

    pop = load_popularity(path)
    counts = pop.snapshot()
    assert sorted(counts) == list(range(LAYERS))
    assert [sum(c) for c in counts.values()] == [pop.tokens * TOP_K] * LAYERS
    assert pop.tokens == ran, (pop.tokens, usages)
    assert os.listdir(folder) == ["popularity.json"]  # written atomically: no staged file left


def test_writer_refreshes_the_file_and_close_writes_the_last_counts(tmp_path, capsys):
    """PopularityWriter: the file appears, follows new counts, survives a failed write (one
    line on stderr, tried again), and close() writes the final counts at once."""
    folder = tmp_path / "out"
    folder.mkdir()
    path = str(folder / "pop.json")
    pop = Popularity(4)

    def slots_on_disk() -> int:
        # never a half file: the writer renames a whole one into place
        return load_popularity(path).slots if os.path.exists(path) else -1

    writer = PopularityWriter(pop, path, interval_s=0.02).start()
    try:
        pop.add(0, torch.tensor([[0, 1], [2, 3]]), None)
        wait_until(lambda: slots_on_disk() == 4, timeout_s=30, interval_s=0.01,
                   what="the first periodic write")
        pop.add(1, torch.tensor([[3, 2]]), [[3, 2]])
        wait_until(lambda: slots_on_disk() == 6, timeout_s=30, interval_s=0.01,
                   what="a write with the new counts")

        shutil.rmtree(folder)  # the next writes fail: said on stderr, the thread goes on
        wait_until(lambda: "cannot write" in capsys.readouterr().err, timeout_s=30,
                   interval_s=0.01, what="the failed write's line on stderr")
        folder.mkdir()
        pop.add(1, torch.tensor([[0, 0]]), None)
        wait_until(lambda: slots_on_disk() == 8, timeout_s=30, interval_s=0.01,
                   what="a write after the folder came back")
        pop.add(0, torch.tensor([[1, 1]]), [[1, 1]])
    finally:
        writer.close()
    back = load_popularity(path)  # close() wrote at once, not at the next interval
    assert back.snapshot() == {0: [1, 3, 1, 1], 1: [2, 0, 1, 1]}
    assert back.tokens == 3 and back.slots == 10
    assert os.listdir(folder) == ["pop.json"]

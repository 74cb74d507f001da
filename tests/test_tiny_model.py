"""The committed trained checkpoint (testbed/data/tiny-mixtral) and the code that made it.

Quality checks run on testbed/data/heldout-sample.txt (committed, so no apt download) and
compare with the figures the trainer recorded in the checkpoint's eval.json, with margins.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from testbed.models import quality
from testbed.models.corpus_docs import clean_rst, is_heldout
from testbed.models.eval_sets import make_choice_items
from testbed.models.local_routing import LocalRouting
from testbed.models.train_tiny import TrainSpec, build_model, lr_at

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "testbed", "data")
CKPT = os.path.join(DATA, "tiny-mixtral")
SAMPLE_TOKENS = 4096
SLOW = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0, 4.0])  # experts 6, 7 on slow links


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(CKPT, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(CKPT)


@pytest.fixture(scope="module")
def recorded():
    with open(os.path.join(CKPT, "eval.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sample():
    with open(os.path.join(DATA, "heldout-sample.txt")) as f:
        return f.read()


@pytest.fixture(scope="module")
def scores(tiny, sample):
    """Sample scored under each routing: stock, theta 0 / 0.3 with slow experts, top-1, random."""
    model, tokenizer = tiny
    out = {}
    for name, kw in {"stock": None, "theta0": {"theta": 0.0, "latency_s": SLOW},
                     "theta0.3": {"theta": 0.3, "latency_s": SLOW}, "top1": {"theta": 0.5},
                     "random": {"random_experts": True}}.items():
        if kw is None:
            out[name] = (quality.score_tokens(model, tokenizer, sample, SAMPLE_TOKENS), None)
            continue
        with LocalRouting(model, **kw) as r:
            out[name] = (quality.score_tokens(model, tokenizer, sample, SAMPLE_TOKENS), r)
    return out


def test_loads_with_plain_transformers(tiny):
    model, tokenizer = tiny
    assert type(model).__name__ == "MixtralForCausalLM"
    assert model.config.model_type == "mixtral"
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (8, 2)
    with open(os.path.join(CKPT, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<s>[INST] hi [/INST]"
    text = "Return a new dictionary — with ünïcode."  # byte-level: every input encodes
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids


def test_shard_tool_splits_it(tmp_path):
    from shard_tool.split import split

    split(CKPT, str(tmp_path / "shards"))
    assert len(list((tmp_path / "shards").rglob("*.safetensors"))) == 9  # base station + 8


@pytest.mark.integration
def test_heldout_perplexity_as_recorded_and_far_below_unigram(scores, recorded):
    score = scores["stock"][0]
    assert score.tokens == recorded["heldout_sample"]["tokens"]
    assert score.perplexity < recorded["heldout_sample"]["perplexity"] * 1.05
    assert score.perplexity < recorded["heldout_sample_unigram_perplexity"] / 4
    assert score.accuracy > 0.3


def test_theta_zero_is_the_stock_model(tiny):
    model, tokenizer = tiny
    ids = torch.tensor([tokenizer("The os module provides", add_special_tokens=False)
                        ["input_ids"]])
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        with LocalRouting(model, theta=0.0, latency_s=SLOW):
            wlr = model(input_ids=ids).logits
    assert torch.equal(stock, wlr)


@pytest.mark.integration
def test_quality_falls_gracefully_as_experts_are_dropped(scores):
    ppl = {name: s.perplexity for name, (s, _) in scores.items()}
    assert ppl["theta0"] == pytest.approx(ppl["stock"], rel=1e-6)
    assert scores["theta0"][1].drop_share() == 0.0
    assert 0.05 < scores["theta0.3"][1].drop_share() < 0.5
    # measurably worse at each step...
    assert ppl["theta0"] * 1.005 < ppl["theta0.3"] < ppl["top1"]
    assert ppl["top1"] > ppl["theta0"] * 1.03
    # ...but gracefully: forced top-1 is far from broken
    assert ppl["top1"] < ppl["theta0"] * 1.5


@pytest.mark.integration
def test_routing_matters(scores):
    assert scores["random"][0].perplexity > scores["stock"][0].perplexity * 2


@pytest.mark.integration
def test_expert_load_not_collapsed(scores):
    for layer in scores["theta0"][1].load_shares():
        assert max(layer) < 0.5
        assert sum(share > 0.02 for share in layer) >= 4  # no layer leans on one or two


@pytest.mark.integration
def test_multiple_choice_above_chance(tiny, recorded):
    model, tokenizer = tiny
    result = quality.multiple_choice(model, tokenizer, os.path.join(DATA, "mc-heldout.jsonl"),
                                     max_items=200)
    assert result["items"] == 200 and result["chance"] == 0.25
    assert result["acc"] == pytest.approx(recorded["multiple_choice"]["stock"]["acc"], abs=0.02)
    assert result["acc"] >= 0.31  # chance 0.25; one standard error at n = 200 is 0.03


# --- the code that made it -----------------------------------------------------------------

def test_grouped_experts_match_the_eager_loop():
    """Training uses transformers' grouped_mm experts; it must compute the stock function."""
    from testbed.models.make_model import train_tokenizer

    spec = TrainSpec(vocab=300, layers=2, hidden=64, intermediate=96, heads=4)
    tokenizer = train_tokenizer(300, ["some text to train a byte-level tokenizer on"] * 3)
    model = build_model(spec, tokenizer)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = {}
    for impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads[impl] = (out.logits.detach(), out.aux_loss.detach(),
                       model.model.layers[0].mlp.experts.gate_up_proj.grad.clone())
    (l1, a1, g1), (l2, a2, g2) = grads["eager"], grads["grouped_mm"]
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_card_renders_the_committed_readme():
    """The card's text moved out of train_tiny.py into tiny_card.py: the committed records must
    still render the committed README byte for byte."""
    from testbed.models.tiny_card import render_card

    with open(os.path.join(CKPT, "training.json")) as f:
        record = json.load(f)
    with open(os.path.join(CKPT, "eval.json")) as f:
        figures = json.load(f)
    with open(os.path.join(CKPT, "README.md")) as f:
        assert render_card(record, figures, CKPT) == f.read()


@pytest.mark.integration
def test_train_tiny_cli_help():
    """`python -m testbed.models.tiny_cli --help` and `testbed train-tiny --help` still answer."""
    import subprocess
    import sys

    for cmd in ([sys.executable, "-m", "testbed.models.tiny_cli", "--help"],
                [sys.executable, "-m", "testbed", "train-tiny", "--help"]):
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "--no-card" in proc.stdout, proc.stderr


def test_lr_schedule():
    spec = TrainSpec(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, spec) == pytest.approx(1e-4)
    assert lr_at(9, spec) == pytest.approx(1e-3)
    assert lr_at(55, spec) == pytest.approx(0.55e-3)
    assert lr_at(100, spec) == pytest.approx(1e-4)


def test_clean_rst():
    rst = """:mod:`json` --- JSON
====================

.. module:: json
   :synopsis: Encode and decode.

.. index:: single: JSON

See :func:`~json.dumps` and :ref:`the guide <json-guide>`, per :pep:`8`.

.. function:: dumps(obj)

   Serialize *obj*.
"""
    assert clean_rst(rst) == ("json --- JSON\n\nSee json.dumps and the guide, per PEP 8.\n\n"
                              "dumps(obj)\n\n   Serialize *obj*.\n")


def test_heldout_split_is_by_path_and_stable():
    assert is_heldout("library/json.rst.txt") == is_heldout("library/json.rst.txt")
    paths = [f"library/m{i}.rst.txt" for i in range(2000)]
    share = sum(map(is_heldout, paths)) / len(paths)
    assert 0.03 < share < 0.07


def test_choice_items_are_deterministic_and_well_formed():
    def word(doc: int, i: int) -> str:  # alphabetic, unique per (doc, position)
        return "q" + chr(97 + doc) + "".join(chr(97 + int(c)) for c in str(i))

    words = {f"d{k}": [word(k, i) for i in range(60)] for k in range(6)}
    docs = [{"path": path, "text": " ".join(w)} for path, w in words.items()]
    items = make_choice_items(docs, n_items=6, seed=1)
    assert items == make_choice_items(docs, n_items=6, seed=1)
    assert len(items) == 6
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        truth = item["choices"][item["answer"]].split()
        doc_words = words[item["source"]]
        last = doc_words.index(item["question"].split()[-1])
        assert truth == doc_words[last + 1:last + 11]  # the passage's true next 10 words
        for k, choice in enumerate(item["choices"]):
            if k != item["answer"]:  # distractors come from other files
                assert choice.split()[0] not in doc_words

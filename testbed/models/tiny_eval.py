"""Every figure of the tiny model's card: held-out perplexity vs a unigram model, routing load,
random-expert and top-1 ablations, WLR with slow experts, multiple choice, samples.

`write_card` evaluates a checkpoint made by `testbed train-tiny` and writes eval.json and the
card (README.md, rendered by testbed/models/tiny_card.py) beside it.
"""

from __future__ import annotations

import math

from testbed.models.local_routing import LocalRouting

SLOW_EXPERTS_LATENCY_S = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.0, 4.0)  # experts 6, 7 on slow links
SAMPLE_PROMPTS = (
    ("text", "The json module"),
    ("text", "To create a virtual environment,"),
    ("chat", "What does the os.path module do?"),
)


def unigram_nll(counts, ids: list[int]) -> float:
    """Mean NLL (nats) of ids[1:] under an add-one unigram of the training split's counts."""
    import torch

    probs = (counts.double() + 1) / (counts.double().sum() + counts.numel())
    target = torch.tensor(ids[1:])
    return float(-probs[target].log().mean())


def evaluate(ckpt: str, held_docs: list[dict], counts, sample_text: str, mc_path: str,
             max_tokens: int = 32768, mc_items: int = 200, log=print) -> dict:
    """Every figure of the model card, on the bf16 checkpoint computed in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from testbed.models import quality

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    per_doc = max(256, max_tokens // max(1, len(held_docs)))
    ids: list[int] = []
    for doc in held_docs:  # the opening of every held-out file, <s> doc </s>
        ids += [tokenizer.bos_token_id, *quality._token_ids(tokenizer, doc["text"])[:per_doc]]
    ids = ids[:max_tokens]

    def score(text_or_ids, **kw) -> dict:
        with LocalRouting(model, **kw) as r:
            result = quality.score_tokens(model, tokenizer, text_or_ids, max_tokens, bos=False)
        return {**result.to_json(), "drop_share": round(r.drop_share(), 4),
                "load": r.load_shares()}

    figures: dict = {"heldout_tokens_scored": len(ids) - 1}
    stock = score(ids)
    figures["heldout"] = {k: v for k, v in stock.items() if k != "load"}
    figures["unigram_perplexity"] = round(math.exp(unigram_nll(counts, ids)), 2)
    figures["load_share_per_layer"] = [[round(x, 4) for x in layer] for layer in stock["load"]]
    figures["max_load_share"] = round(max(max(layer) for layer in stock["load"]), 4)
    log(f"held-out {figures['heldout']}, unigram {figures['unigram_perplexity']}")
    figures["random_experts"] = {k: v for k, v in score(ids, random_experts=True).items()
                                 if k != "load"}
    figures["top1"] = {k: v for k, v in score(ids, theta=0.5).items() if k != "load"}
    slow = torch.tensor(SLOW_EXPERTS_LATENCY_S)
    figures["theta_slow_experts"] = {
        str(theta): {k: v for k, v in score(ids, theta=theta, latency_s=slow).items()
                     if k != "load"} for theta in (0.0, 0.1, 0.2, 0.3, 0.5)}
    # as the tests score it: the first 4096 tokens after <s>, all scored
    sample_ids = [tokenizer.bos_token_id, *quality._token_ids(tokenizer, sample_text)[:4096]]
    figures["heldout_sample"] = quality.score_tokens(
        model, tokenizer, sample_text, max_tokens=4096).to_json()
    figures["heldout_sample_unigram_perplexity"] = round(
        math.exp(unigram_nll(counts, sample_ids)), 2)
    mc = {}
    for name, kw in (("stock", {}), ("top1", {"theta": 0.5}), ("random_experts",
                                                                {"random_experts": True})):
        with LocalRouting(model, **kw):
            result = quality.multiple_choice(model, tokenizer, mc_path, max_items=mc_items)
        mc[name] = {k: round(v, 4) if isinstance(v, float) else v
                    for k, v in result.items() if k != "predictions"}
    figures["multiple_choice"] = mc
    log(f"multiple choice {mc}")
    figures["samples"] = generate_samples(model, tokenizer)
    return figures


def generate_samples(model, tokenizer, max_new_tokens: int = 60, seed: int = 0) -> list[dict]:
    import torch

    out = []
    for kind, prompt in SAMPLE_PROMPTS:
        if kind == "chat":
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                add_generation_prompt=True, return_tensors="pt",
                                                return_dict=True)["input_ids"]
        else:
            ids = torch.tensor([[tokenizer.bos_token_id,
                                 *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
        torch.manual_seed(seed)
        generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=max_new_tokens, do_sample=True,
                                   temperature=0.7, top_k=40, repetition_penalty=1.1,
                                   pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        out.append({"kind": kind, "prompt": prompt, "text": text})
    return out

"""The tiny model's card (README.md beside the checkpoint), from its training and eval records."""

from __future__ import annotations

import json
import os
import time

from testbed.models.eval_sets import heldout_sample, make_choice_items
from testbed.models.tiny_eval import SLOW_EXPERTS_LATENCY_S, evaluate


def render_card(record: dict, fig: dict, ckpt: str) -> str:
    spec, corpus = record["spec"], record["corpus"]
    size_mb = os.path.getsize(os.path.join(ckpt, "model.safetensors")) / 1e6
    held, uni = fig["heldout"], fig["unigram_perplexity"]
    theta_rows = "\n".join(
        f"| {theta} | {row['perplexity']:.2f} | {100 * row['top1_accuracy']:.1f} % | "
        f"{100 * row['drop_share']:.1f} % |" for theta, row in fig["theta_slow_experts"].items())
    load_rows = "\n".join(f"| {i} | " + " | ".join(f"{100 * x:.1f}" for x in layer) + " |"
                          for i, layer in enumerate(fig["load_share_per_layer"]))
    mc = fig["multiple_choice"]
    samples = "\n\n".join(
        f"**{s['kind']} prompt** `{s['prompt']}` →\n\n```text\n{s['text'].strip()}\n```"
        for s in fig["samples"])
    last = record["history"][-1]

    def pct(row: dict) -> str:
        return f"{100 * row['top1_accuracy']:.1f} %"

    return f"""# tiny-mixtral: a small Mixtral trained on the Python documentation

A Mixtral-architecture model (transformers `MixtralForCausalLM`) trained from scratch on this
repository's CPU so that the testbed's quality-versus-latency figures mean something. Made by
`testbed train-tiny --out DIR --steps {spec['steps']} --seed {spec['seed']}`
(`testbed/models/train_tiny.py`). Not a useful assistant: a {record['parameters'] / 1e6:.1f} M-parameter
language model of Python documentation prose.

## Corpus and licence
The reStructuredText sources of the Python 3.11 documentation from Debian's `python3.11-doc`
(`{corpus['package']}`), lightly cleaned of rst markup (`testbed/models/corpus_docs.py`). The Python
documentation is distributed under the **PSF License Agreement** (Python Software Foundation
License; see `license.rst` in the docs and the package's copyright file); this model and the
held-out text samples shipped beside it are derived from it. Split by file (sha256 of the path,
{corpus['heldout_percent']} % held out): {corpus['train_files']} training files
({record['train_tokens']:,} tokens), {corpus['heldout_files']} held-out files
({record['heldout_tokens']:,} tokens) never seen in training or by the tokenizer trainer.

## Model
| | |
|---|---|
| layers / hidden / heads (KV) | {spec['layers']} / {spec['hidden']} / {spec['heads']} \
({spec['kv_heads']}) |
| experts / top-k / expert FFN | {spec['experts']} / {spec['top_k']} / \
{spec['intermediate']} (SwiGLU) |
| vocabulary | {spec['vocab']}, byte-level BPE (`tokenizers`) trained on the training split |
| parameters | {record['parameters']:,} (active per token ≈ {active_params(spec) / 1e6:.1f} M) |
| weights on disk | bfloat16 safetensors, {size_mb:.1f} MB |
| chat template | Mixtral-Instruct style `[INST] … [/INST]` (the model never saw chats) |

## Training
{spec['steps']} steps × {spec['batch']} sequences × {spec['seq_len']} tokens
({record['tokens_seen']:,} tokens, ≈ {record['tokens_seen'] / record['train_tokens']:.1f} epochs),
AdamW (β 0.9/0.95, weight decay {spec['weight_decay']}), peak LR {spec['lr']} after
{spec['warmup']} warm-up steps, cosine to {spec['min_lr']}, gradient clip {spec['grad_clip']},
router load-balancing loss coefficient {spec['aux_loss_coef']}, seed {spec['seed']}. Expert math
in training: transformers' `grouped_mm` experts implementation (checked equal to the eager loop).
Wall time {record['train_seconds'] / 60:.1f} min of training ({record['total_seconds'] / 60:.1f}
min with corpus and tokenizer) on {record['torch_threads']} CPU threads of a shared 2-core
machine. Final training loss {last['loss']:.3f}; loss on 16 fixed held-out windows
{last.get('heldout_loss', 'n/a')} (the curve is in `training.json`).

## Held-out figures
On the opening of every held-out file ({fig['heldout_tokens_scored']:,} tokens, sliding window
256, stride 128, float32 compute of the bf16 weights; `testbed/models/quality.py`):

| model | perplexity | top-1 next-token accuracy |
|---|---|---|
| unigram of the same tokenizer (add-one, training counts) | {uni:.1f} | — |
| **tiny-mixtral** (router top-2) | **{held['perplexity']:.2f}** | {pct(held)} |
| forced top-1 (θ = 0.5, equal latencies) | {fig['top1']['perplexity']:.2f} | \
{pct(fig['top1'])} |
| 2 random experts per token instead of the router's | \
{fig['random_experts']['perplexity']:.2f} | {pct(fig['random_experts'])} |

The committed sample `testbed/data/heldout-sample.txt` ({fig['heldout_sample']['tokens']} tokens):
perplexity {fig['heldout_sample']['perplexity']:.2f}, unigram
{fig['heldout_sample_unigram_perplexity']:.1f} (the tests check the model stays near this).

WLR selection (`basestation.selector`) with experts 6 and 7 on links 4× slower
(t = {list(SLOW_EXPERTS_LATENCY_S)}):

| θ | perplexity | top-1 accuracy | expert slots dropped |
|---|---|---|---|
{theta_rows}

Routing load on the same text (share of the kept token-expert assignments, %; balanced = 12.5):

| layer | """ + " | ".join(f"e{e}" for e in range(spec["experts"])) + """ |
|---|""" + "---|" * spec["experts"] + f"""
{load_rows}

Largest share of any expert in any layer: {100 * fig['max_load_share']:.1f} %.

Multiple choice (`testbed/data/mc-heldout.jsonl`, {mc['stock']['items']} items: a 30-word
held-out passage, pick its true next 10 words among 4, distractors from other held-out files;
chance {100 * mc['stock']['chance']:.0f} %), summed log-likelihood (acc) and per byte (acc_norm):
stock {100 * mc['stock']['acc']:.1f} % / {100 * mc['stock']['acc_norm']:.1f} %, forced top-1
{100 * mc['top1']['acc']:.1f} % / {100 * mc['top1']['acc_norm']:.1f} %, random experts
{100 * mc['random_experts']['acc']:.1f} % / {100 * mc['random_experts']['acc_norm']:.1f} %.

## Samples
Sampled (temperature 0.7, top-k 40, repetition penalty 1.1, seed 0, 60 new tokens):

{samples}
"""


def active_params(spec: dict) -> int:
    head_dim = spec["hidden"] // spec["heads"]
    attention = spec["hidden"] * head_dim * (2 * spec["heads"] + 2 * spec["kv_heads"])
    experts = spec["top_k"] * 3 * spec["hidden"] * spec["intermediate"]
    return spec["layers"] * (attention + experts) + spec["vocab"] * spec["hidden"]


def write_card(ckpt: str, corpus_cache: str | None = None, data_dir: str | None = None,
               max_tokens: int = 32768, mc_items: int = 200, log=print) -> dict:
    """Evaluate CKPT; write CKPT/eval.json and CKPT/README.md, and the held-out sample and
    multiple-choice set into DATA_DIR (default: CKPT's parent folder). Returns the figures."""
    import torch
    from transformers import AutoTokenizer

    from testbed.models.corpus_docs import DEFAULT_CACHE, build_corpus, load_split
    from testbed.models.train_tiny import encode_docs

    cache = corpus_cache or DEFAULT_CACHE
    build_corpus(cache)
    train_docs, held_docs = load_split(cache, "train"), load_split(cache, "heldout")
    data_dir = data_dir or os.path.dirname(os.path.abspath(ckpt))
    sample_path = os.path.join(data_dir, "heldout-sample.txt")
    mc_path = os.path.join(data_dir, "mc-heldout.jsonl")
    sample_text = heldout_sample(held_docs)
    with open(sample_path, "w") as f:
        f.write(sample_text)
    with open(mc_path, "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in make_choice_items(held_docs))
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    counts = torch.bincount(encode_docs(tokenizer, train_docs).long(),
                            minlength=len(tokenizer))
    t0 = time.perf_counter()
    figures = evaluate(ckpt, held_docs, counts, sample_text, mc_path, max_tokens, mc_items, log)
    figures["eval_seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(ckpt, "eval.json"), "w") as f:
        json.dump(figures, f, indent=1)
    with open(os.path.join(ckpt, "training.json")) as f:
        record = json.load(f)
    with open(os.path.join(ckpt, "README.md"), "w") as f:
        f.write(render_card(record, figures, ckpt))
    return figures


"""`testbed train-tiny`: a small Mixtral trained from scratch on the Python documentation.

transformers' own `MixtralForCausalLM` (so the checkpoint is exactly the on-disk format of real
Mixtrals and splits with shard_tool), a byte-level BPE trained on the training split only, the
router's load-balancing loss on, AdamW with warm-up and a cosine schedule. Expert math in
training is transformers' `grouped_mm` experts implementation (one grouped matmul per
projection, no Python loop over experts; checked against the eager loop: identical logits,
gradients within 1e-6 relative). Deterministic for a seed on a given machine and torch build.

After training the checkpoint is evaluated and its model card written beside it
(testbed/models/tiny_eval.py `write_card`, the card's text in testbed/models/tiny_card.py) unless --no-card.
The routing overrides the evaluation uses are in testbed/models/local_routing.py, its held-out text
sample and multiple-choice set in testbed/models/eval_sets.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass

from common.staging import give_files_folder_mode, staged_dir


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 1200
    seed: int = 0
    seq_len: int = 256  # tokens per training sequence
    batch: int = 16  # sequences per step: 4096 tokens a step
    lr: float = 2e-3  # peak; a 15M-parameter model takes a high rate
    min_lr: float = 1e-4  # cosine floor
    warmup: int = 60  # steps of linear warm-up
    weight_decay: float = 0.1  # matrices only, not norms
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.02  # load-balancing loss weight (Mixtral's default: 0.001)
    vocab: int = 4096
    layers: int = 4
    hidden: int = 256
    intermediate: int = 512  # one expert's FFN size
    experts: int = 8
    top_k: int = 2
    heads: int = 8
    kv_heads: int = 2
    threads: int = 2
    eval_every: int = 100  # steps between held-out loss checks
    corpus_cache: str | None = None  # default: testbed.models.corpus_docs.DEFAULT_CACHE
    deb: str | None = None  # a python3.11-doc .deb already on disk (skips apt-get download)


def lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warm-up to spec.lr, then cosine down to spec.min_lr at spec.steps."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return spec.min_lr + (spec.lr - spec.min_lr) * cosine


def encode_docs(tokenizer, docs: list[dict]):
    """One int32 stream: <s> doc </s> for every document, in order."""
    import torch

    ids: list[int] = []
    for doc in docs:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(doc["text"], add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.int32)


def build_model(spec: TrainSpec, tokenizer):
    import torch
    from transformers import MixtralForCausalLM

    from testbed.models.make_model import mixtral_config

    config = mixtral_config(spec, tokenizer, max_positions=1024, output_router_logits=True,
                            router_aux_loss_coef=spec.aux_loss_coef, router_jitter_noise=0.0)
    torch.manual_seed(spec.seed)
    model = MixtralForCausalLM(config)
    # batched expert math for training (transformers' grouped_mm; same function as the loop)
    model.set_experts_implementation("grouped_mm")
    return model


def train(out: str, spec: TrainSpec, log=print) -> dict:
    """Train and write the checkpoint into OUT (built beside it, renamed at the end).

    Returns the training record (also saved as OUT/training.json). Raises CorpusError when the
    corpus cannot be fetched.
    """
    import torch

    from testbed.models.corpus_docs import DEFAULT_CACHE, build_corpus, load_split
    from testbed.models.make_model import train_tokenizer

    torch.set_num_threads(spec.threads)
    t_start = time.perf_counter()
    cache = spec.corpus_cache or DEFAULT_CACHE
    corpus_info = build_corpus(cache, spec.deb)
    train_docs, held_docs = load_split(cache, "train"), load_split(cache, "heldout")
    tokenizer = train_tokenizer(spec.vocab, [d["text"] for d in train_docs])
    tokenizer.model_max_length = 1024
    train_ids, held_ids = encode_docs(tokenizer, train_docs), encode_docs(tokenizer, held_docs)
    log(f"corpus: {len(train_docs)} train files, {train_ids.numel()} tokens; "
        f"{len(held_docs)} held-out files, {held_ids.numel()} tokens "
        f"({time.perf_counter() - t_start:.0f} s)")

    model = build_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr, betas=(0.9, 0.95), eps=1e-8)
    generator = torch.Generator().manual_seed(spec.seed)
    # fixed held-out windows for the loss curve: 16 x seq_len tokens spread over the split
    n_eval = 16
    starts = torch.linspace(0, held_ids.numel() - spec.seq_len - 2, n_eval).long()
    eval_batch = torch.stack([held_ids[s:s + spec.seq_len] for s in starts]).long()

    def heldout_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=eval_batch, labels=eval_batch, output_router_logits=False).loss
        model.train()
        return loss.item()

    history = []
    model.train()
    t_train = time.perf_counter()
    tokens_seen = 0
    for step in range(spec.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, spec)
        offsets = torch.randint(0, train_ids.numel() - spec.seq_len - 1, (spec.batch,),
                                generator=generator)
        batch = torch.stack([train_ids[o:o + spec.seq_len] for o in offsets.tolist()]).long()
        output = model(input_ids=batch, labels=batch)  # loss includes coef * aux_loss
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        tokens_seen += batch.numel()
        if step % 10 == 0 or step == spec.steps - 1:
            record = {"step": step, "loss": round(output.loss.item(), 4),
                      "aux_loss": round(output.aux_loss.item(), 4),
                      "lr": round(lr_at(step, spec), 6),
                      "elapsed_s": round(time.perf_counter() - t_train, 1)}
            if step % spec.eval_every == 0 or step == spec.steps - 1:
                record["heldout_loss"] = round(heldout_loss(), 4)
            history.append(record)
            log(json.dumps(record))
    train_s = time.perf_counter() - t_train

    # bf16 on disk keeps the checkpoint to tens of MB; experts back to the library default
    model.eval()
    model.config.output_router_logits = False
    model = model.to(torch.bfloat16)
    record = {"spec": asdict(spec), "parameters": n_params, "train_seconds": round(train_s, 1),
              "total_seconds": round(time.perf_counter() - t_start, 1),
              "tokens_seen": tokens_seen, "train_tokens": train_ids.numel(),
              "heldout_tokens": held_ids.numel(), "corpus": corpus_info,
              "torch_threads": spec.threads, "history": history}
    with staged_dir(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "training.json"), "w") as f:
            json.dump(record, f, indent=1)
        give_files_folder_mode(staging)
    return record

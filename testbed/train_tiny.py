"""`testbed train-tiny`: a small Mixtral trained from scratch on the Python documentation.

transformers' own `MixtralForCausalLM` (so the checkpoint is exactly the on-disk format of real
Mixtrals and splits with shard_tool), a byte-level BPE trained on the training split only, the
router's load-balancing loss on, AdamW with warm-up and a cosine schedule. Expert math in
training is transformers' `grouped_mm` experts implementation (one grouped matmul per
projection, no Python loop over experts; checked against the eager loop: identical logits,
gradients within 1e-6 relative). Deterministic for a seed on a given machine and torch build.

After training the checkpoint is evaluated (held-out perplexity vs a unigram model of the same
tokenizer, routing load, random-expert and top-1 ablations, multiple-choice accuracy) and a
model card is written beside it (`write_card`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

TRAIN_TOKENS_FILE = "train_tokens.pt"


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
    corpus_cache: str | None = None  # default: testbed.corpus_docs.DEFAULT_CACHE
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

    from testbed.make_model import mixtral_config

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

    from testbed.corpus_docs import DEFAULT_CACHE, build_corpus, load_split
    from testbed.make_model import train_tokenizer

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
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".train-tiny-", dir=parent)
    record = {"spec": asdict(spec), "parameters": n_params, "train_seconds": round(train_s, 1),
              "total_seconds": round(time.perf_counter() - t_start, 1),
              "tokens_seen": tokens_seen, "train_tokens": train_ids.numel(),
              "heldout_tokens": held_ids.numel(), "corpus": corpus_info,
              "torch_threads": spec.threads, "history": history}
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        with open(os.path.join(staging, "training.json"), "w") as f:
            json.dump(record, f, indent=1)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        for name in os.listdir(staging):
            os.chmod(os.path.join(staging, name), 0o644)
        if os.path.exists(out):
            raise FileExistsError(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


# --- routing overrides: the WLR rule, forced top-1, random experts, on a local model ---------

class LocalMoeBlock:
    """Stand-in for a MixtralSparseMoeBlock's forward that routes like the base station.

    Router top-k (or K random experts) -> basestation.selector.select (theta, latency vector t,
    one expert per box) -> basestation.routing.group_by_expert / combine, expert FFNs computed
    here from the block's own fused weights. theta = 0 reproduces the stock block.
    Shape legend: T = tokens, H = hidden, E = experts, K = top-k.
    """

    def __init__(self, block, top_k: int, theta: float, latency_s, random_experts: bool,
                 seed: int):
        import torch

        self.gate, self.experts, self.top_k = block.gate, block.experts, top_k
        self.theta, self.latency_s, self.random_experts = theta, latency_s, random_experts
        self.generator = torch.Generator().manual_seed(seed)
        num_experts = self.experts.gate_up_proj.shape[0]
        self.load = torch.zeros(num_experts, dtype=torch.long)  # kept (token, slot) pairs
        self.dropped = 0
        self.considered = 0

    def expert_ffn(self, expert: int, x):
        """The agent's own expert math on this block's fused weights (Mixtral's act is SiLU)."""
        from edge_agent.expert_math import ExpertWeights, expert_forward

        return expert_forward(x, ExpertWeights(gate_up=self.experts.gate_up_proj[expert],
                                               down=self.experts.down_proj[expert]))

    def __call__(self, hidden_states):
        import torch
        import torch.nn.functional as F

        from basestation.routing import combine, group_by_expert
        from basestation.selector import select

        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # [T, H]
        w = F.softmax(self.gate(x)[0].float(), dim=-1)  # [T, E]
        num_experts = w.shape[1]
        if self.random_experts:
            experts = torch.rand(w.shape, generator=self.generator).topk(self.top_k).indices
        else:
            experts = torch.topk(w, self.top_k, dim=-1).indices  # [T, K], as Mixtral's router
        top_w = w.gather(1, experts)  # [T, K]: the router's weights of the picks
        weights = top_w / top_w.sum(dim=-1, keepdim=True)  # Mixtral's renormalised top-k
        t = self.latency_s if self.latency_s is not None else torch.ones(num_experts)
        # one expert per box: the paper's Algorithm 1
        theta = 0.0 if self.random_experts else self.theta
        selection = select(experts, weights, torch.arange(num_experts), t, theta)
        outputs = [(e, token_idx, slot, self.expert_ffn(e, x[token_idx]))
                   for e, (token_idx, slot) in group_by_expert(experts, selection.keep).items()]
        self.load += torch.bincount(selection.experts[selection.keep], minlength=len(self.load))
        self.dropped += int(selection.dropped.sum())
        self.considered += selection.keep.numel()
        out = combine(x.shape[0], hidden, x.dtype, selection.weights, outputs)  # [T, H]
        return out.reshape(batch, seq, hidden)


class routing:
    """Context manager: every MoE layer of a local Mixtral routes by LocalMoeBlock.

    theta/latency_s: the WLR rule (latency_s [E] seconds; default all equal, so theta >= 0.5
    is exactly forced top-1); random_experts: K random experts per token instead of the
    router's top-K. `.blocks` holds the per-layer blocks (load, drops) while inside.
    """

    def __init__(self, model, theta: float = 0.0, latency_s=None, random_experts: bool = False,
                 seed: int = 0):
        self.model, self.theta, self.latency_s = model, theta, latency_s
        self.random_experts, self.seed = random_experts, seed
        self.blocks: list[LocalMoeBlock] = []

    def __enter__(self):
        top_k = self.model.config.num_experts_per_tok
        for index, layer in enumerate(self.model.model.layers):
            block = LocalMoeBlock(layer.mlp, top_k, self.theta, self.latency_s,
                                  self.random_experts, self.seed + index)
            layer.mlp.forward = block  # instance attribute shadows the class's forward
            self.blocks.append(block)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.model.model.layers:
            del layer.mlp.forward

    def load_shares(self) -> list[list[float]]:
        """Per layer, each expert's share of the kept (token, slot) assignments."""
        return [(b.load.float() / max(1, int(b.load.sum()))).tolist() for b in self.blocks]

    def drop_share(self) -> float:
        considered = sum(b.considered for b in self.blocks)
        return sum(b.dropped for b in self.blocks) / considered if considered else 0.0


# --- held-out evaluation data: a text sample and a multiple-choice set ----------------------

def _prose_paragraphs(text: str, min_words: int) -> list[list[str]]:
    """Paragraphs of running English (no indented code, no tables), as word lists."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if any(line.startswith((" ", "\t", ">>>", "+", "|", "*", "-", "#")) for line in lines):
            continue
        words = para.split()
        letters = sum(c.isalpha() for c in para)
        if len(words) >= min_words and letters > 0.7 * len(para.replace(" ", "")):
            out.append(words)
    return out


def heldout_sample(held_docs: list[dict], chars_per_doc: int = 900) -> str:
    """A fixed slice of the held-out split: the opening paragraphs of every held-out file."""
    pieces = []
    for doc in held_docs:
        text, cut = doc["text"], 0
        while cut < chars_per_doc and (nxt := text.find("\n\n", cut + 1)) != -1:
            cut = nxt
        pieces.append(text[:cut if cut else chars_per_doc].strip())
    return "\n\n".join(pieces) + "\n"


def make_choice_items(held_docs: list[dict], n_items: int = 200, seed: int = 0,
                      question_words: int = 30, answer_words: int = 10,
                      choices: int = 4) -> list[dict]:
    """{question, choices, answer}: a held-out passage's true next words among passages of the
    same length from other held-out files. Deterministic for a seed."""
    import random

    rng = random.Random(seed)
    paragraphs = [(d["path"], words) for d in held_docs
                  for words in _prose_paragraphs(d["text"], question_words + answer_words)]
    if len(paragraphs) < choices:
        raise ValueError("too few held-out prose paragraphs for a multiple-choice set")
    picked = rng.sample(paragraphs, min(n_items, len(paragraphs)))
    items = []
    for path, words in picked:
        start = rng.randrange(0, len(words) - question_words - answer_words + 1)
        question = " ".join(words[start:start + question_words])
        truth = " ".join(words[start + question_words:start + question_words + answer_words])
        options = [truth]
        while len(options) < choices:
            other_path, other = rng.choice(paragraphs)
            if other_path == path:
                continue
            at = rng.randrange(0, len(other) - answer_words + 1)
            option = " ".join(other[at:at + answer_words])
            if option not in options:
                options.append(option)
        rng.shuffle(options)
        items.append({"question": question, "choices": options,
                      "answer": options.index(truth), "source": path})
    return items


# --- the model card ---------------------------------------------------------------------------

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

    from testbed import quality

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    per_doc = max(256, max_tokens // max(1, len(held_docs)))
    ids: list[int] = []
    for doc in held_docs:  # the opening of every held-out file, <s> doc </s>
        ids += [tokenizer.bos_token_id, *quality._token_ids(tokenizer, doc["text"])[:per_doc]]
    ids = ids[:max_tokens]

    def score(text_or_ids, **kw) -> dict:
        with routing(model, **kw) as r:
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
        with routing(model, **kw):
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


def write_card(ckpt: str, corpus_cache: str | None = None, data_dir: str | None = None,
               max_tokens: int = 32768, mc_items: int = 200, log=print) -> dict:
    """Evaluate CKPT; write CKPT/eval.json and CKPT/README.md, and the held-out sample and
    multiple-choice set into DATA_DIR (default: CKPT's parent folder). Returns the figures."""
    import torch
    from transformers import AutoTokenizer

    from testbed.corpus_docs import DEFAULT_CACHE, build_corpus, load_split

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
        for item in make_choice_items(held_docs):
            f.write(json.dumps(item) + "\n")
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
(`testbed/train_tiny.py`). Not a useful assistant: a {record['parameters'] / 1e6:.1f} M-parameter
language model of Python documentation prose.

## Corpus and licence
The reStructuredText sources of the Python 3.11 documentation from Debian's `python3.11-doc`
(`{corpus['package']}`), lightly cleaned of rst markup (`testbed/corpus_docs.py`). The Python
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
256, stride 128, float32 compute of the bf16 weights; `testbed/quality.py`):

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


def cmd_train_tiny(args) -> int:
    from testbed.corpus_docs import CorpusError

    if os.path.exists(args.out):
        raise SystemExit(f"testbed: error: {args.out} already exists")
    spec = TrainSpec(steps=args.steps, seed=args.seed, seq_len=args.seq_len, batch=args.batch,
                     lr=args.lr, threads=args.threads, corpus_cache=args.corpus_cache,
                     deb=args.deb)
    try:
        record = train(args.out, spec)
    except CorpusError as e:
        raise SystemExit(f"testbed: error: {e}") from None
    print(f"trained {args.out}: {record['parameters']} parameters, {spec.steps} steps in "
          f"{record['train_seconds']:.0f} s")
    if not args.no_card:
        write_card(args.out, corpus_cache=spec.corpus_cache)
        print(f"wrote {os.path.join(args.out, 'README.md')}")
    return 0


def add_parser(subparsers) -> None:
    """Add the `train-tiny` subcommand to testbed's CLI."""
    defaults = TrainSpec()
    p = subparsers.add_parser(
        "train-tiny", help="train a small Mixtral on the Python docs (python3.11-doc)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--seq-len", type=int, default=defaults.seq_len)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--threads", type=int, default=defaults.threads)
    p.add_argument("--corpus-cache", default=None, help="where the cleaned corpus is cached")
    p.add_argument("--deb", default=None, help="a python3.11-doc .deb already downloaded")
    p.add_argument("--no-card", action="store_true", help="skip the evaluation and model card")
    p.set_defaults(func=cmd_train_tiny)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="train_tiny")
    add_parser(parser.add_subparsers(dest="command", required=True))
    import sys

    args = parser.parse_args(["train-tiny", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

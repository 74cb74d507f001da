"""Model-quality measures the testbed's sweeps call: perplexity, next-token accuracy, agreement
of generated sequences, multiple-choice accuracy.

Every function takes any transformers causal LM (`model(input_ids=..., attention_mask=...)`
returning `.logits`) and its tokenizer: the local checkpoint or the base station's distributed
model alike. Work is bounded by explicit limits (max_tokens, max_items) so a sweep over a slow
distributed model stays short.

Shape legend: B = batch, S = sequence, V = vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LmScore:
    """Token-weighted next-token figures over a text."""

    nll_sum: float  # natural-log negative log-likelihood summed over scored tokens
    tokens: int  # tokens scored (each predicted from its preceding context)
    correct: int  # scored tokens that were the model's argmax

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else float("nan")

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else float("nan")

    def to_json(self) -> dict:
        return {"perplexity": round(self.perplexity, 4), "mean_nll": round(self.mean_nll, 5),
                "top1_accuracy": round(self.accuracy, 5), "tokens": self.tokens}


def _device(model) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _token_ids(tokenizer, text_or_ids) -> list[int]:
    if isinstance(text_or_ids, str):
        return list(tokenizer(text_or_ids, add_special_tokens=False, verbose=False)["input_ids"])
    return [int(i) for i in text_or_ids]


@torch.inference_mode()
def score_tokens(model, tokenizer, text_or_ids, max_tokens: int = 4096, window: int = 256,
                 stride: int | None = None, bos: bool = True) -> LmScore:
    """Sliding-window next-token scoring of the first MAX_TOKENS tokens of a text.

    Windows of WINDOW tokens advance by STRIDE (default window // 2); each window scores only
    the tokens no earlier window scored, so every token counts once, with up to
    window - stride tokens of context. With BOS a `<s>` is put before the text and the first
    text token is scored too.
    """
    stride = stride or max(1, window // 2)
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride {stride}, window {window}")
    ids = _token_ids(tokenizer, text_or_ids)[:max_tokens]
    if bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    device = _device(model)
    nll_sum, tokens, correct = 0.0, 0, 0
    scored_up_to = 1  # ids[0] has no context: never scored
    begin = 0
    while scored_up_to < len(ids):
        end = min(begin + window, len(ids))
        chunk = torch.tensor([ids[begin:end]], device=device)  # [1, S]
        logits = model(input_ids=chunk).logits[0].float()  # [S, V]
        # position p predicts ids[begin + p + 1]; score targets in [scored_up_to, end)
        first = scored_up_to - begin - 1
        pred = logits[first:end - begin - 1]  # [n, V]
        target = chunk[0, first + 1:]  # [n]
        nll_sum += F.cross_entropy(pred, target, reduction="sum").item()
        correct += int((pred.argmax(dim=-1) == target).sum())
        tokens += target.numel()
        scored_up_to = end
        begin = min(begin + stride, end - 1)  # keep >= 1 token of context for the next
    return LmScore(nll_sum=nll_sum, tokens=tokens, correct=correct)


def perplexity(model, tokenizer, text_or_ids, max_tokens: int = 4096, window: int = 256,
               stride: int | None = None) -> float:
    """Token-weighted held-out perplexity (sliding window, see score_tokens)."""
    return score_tokens(model, tokenizer, text_or_ids, max_tokens, window, stride).perplexity


def next_token_accuracy(model, tokenizer, text_or_ids, max_tokens: int = 4096,
                        window: int = 256, stride: int | None = None) -> float:
    """Share of tokens that are the model's top-1 prediction (sliding window, as above)."""
    return score_tokens(model, tokenizer, text_or_ids, max_tokens, window, stride).accuracy


def sequence_agreement(reference, candidate) -> dict:
    """How far two generated token sequences agree (e.g. at theta vs theta = 0).

    position: share of the reference's positions where the candidate has the same token
        (a missing candidate token counts as a disagreement);
    prefix: length of the common prefix over the reference's length (1.0: identical start
        to finish; greedy decoding diverges for good after the first different token);
    exact: the two sequences are identical.
    """
    reference, candidate = [int(t) for t in reference], [int(t) for t in candidate]
    if not reference:
        return {"position": 1.0 if not candidate else 0.0,
                "prefix": 1.0 if not candidate else 0.0, "exact": not candidate}
    same = sum(a == b for a, b in zip(reference, candidate))
    prefix = 0
    for a, b in zip(reference, candidate):
        if a != b:
            break
        prefix += 1
    return {"position": same / len(reference), "prefix": prefix / len(reference),
            "exact": reference == candidate}


def load_choice_items(path: str, max_items: int | None = None) -> list[dict]:
    """{question, choices, answer} items of a JSONL file, in file order. Raises ValueError."""
    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            if not {"question", "choices", "answer"} <= item.keys() or not (
                    0 <= int(item["answer"]) < len(item["choices"])):
                raise ValueError(f"{path}:{line_no}: need question, choices, answer in range")
            items.append(item)
            if max_items is not None and len(items) >= max_items:
                break
    return items


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """As evaluation harnesses do: trailing spaces of the context move to the continuation,
    the pair is encoded whole and split where the context's own encoding ends."""
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = _token_ids(tokenizer, context + continuation)
    context_ids = _token_ids(tokenizer, context)
    return whole[:len(context_ids)], whole[len(context_ids):]


@torch.inference_mode()
def choice_loglikelihoods(model, tokenizer, question: str, choices: list[str],
                          delimiter: str = " ", max_context: int = 384) -> list[tuple[float, int]]:
    """(summed log-likelihood, token count) of each choice given the question.

    All choices go through the model in one right-padded batch; the question is cut from the
    left to MAX_CONTEXT tokens, and `<s>` is put first when the tokenizer has one.
    """
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for choice in choices:
        context_ids, choice_ids = _encode_pair(tokenizer, question, delimiter + choice)
        if not choice_ids:
            raise ValueError(f"choice {choice!r} encodes to no tokens")
        rows.append(((bos + context_ids)[-max_context:], choice_ids))
    length = max(len(c) + len(x) for c, x in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, S]
    for b, (context_ids, choice_ids) in enumerate(rows):
        ids = context_ids + choice_ids
        input_ids[b, :len(ids)] = torch.tensor(ids)
        mask[b, :len(ids)] = 1
    device = _device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    logprobs = F.log_softmax(logits.float(), dim=-1).cpu()  # [B, S, V]
    out = []
    for b, (context_ids, choice_ids) in enumerate(rows):
        start = len(context_ids)
        target = torch.tensor(choice_ids)  # [n]
        picked = logprobs[b, start - 1:start - 1 + len(choice_ids)].gather(1, target[:, None])
        out.append((picked.sum().item(), len(choice_ids)))
    return out


def multiple_choice(model, tokenizer, items_or_path, max_items: int | None = 200,
                    delimiter: str = " ", max_context: int = 384) -> dict:
    """Multiple-choice accuracy, scored by log-likelihood as evaluation harnesses do.

    acc: the choice with the largest summed log-likelihood given the question;
    acc_norm: the largest log-likelihood per byte of the choice text (length-normalised).
    ITEMS_OR_PATH: a JSONL path or a list of {question, choices, answer} dicts.
    """
    items = (load_choice_items(items_or_path, max_items) if isinstance(items_or_path, str)
             else list(items_or_path)[:max_items])
    correct = correct_norm = 0
    predictions = []
    for item in items:
        scores = choice_loglikelihoods(model, tokenizer, item["question"], item["choices"],
                                       delimiter, max_context)
        sums = [s for s, _ in scores]
        per_byte = [s / max(1, len((delimiter + c).encode())) for (s, _), c in
                    zip(scores, item["choices"])]
        pick = max(range(len(sums)), key=sums.__getitem__)
        pick_norm = max(range(len(per_byte)), key=per_byte.__getitem__)
        correct += pick == int(item["answer"])
        correct_norm += pick_norm == int(item["answer"])
        predictions.append(pick)
    n = len(items)
    return {"items": n, "acc": correct / n if n else float("nan"),
            "acc_norm": correct_norm / n if n else float("nan"),
            "chance": (sum(1 / len(i["choices"]) for i in items) / n) if n else float("nan"),
            "predictions": predictions}

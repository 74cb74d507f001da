"""Held-out evaluation sets from the corpus's held-out split: a text sample, multiple choice."""

from __future__ import annotations


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


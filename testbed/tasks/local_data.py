"""Datasets of the packaged lm-eval tasks, read from testbed/data (offline, no hub).

lm-eval calls these through `custom_dataset: !function local_data.NAME` in the task YAMLs, so
the YAMLs work from any working directory. Each returns a DatasetDict with a "test" split.
"""

from __future__ import annotations

import json
import os
import re

import datasets

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
HELDOUT_TEXT = os.path.join(DATA_DIR, "heldout-sample.txt")
MC_FILE = os.path.join(DATA_DIR, "mc-heldout.jsonl")
MIN_PARAGRAPH_CHARS = 200  # shorter paragraphs (headings) say little about perplexity
CLOZE_MIN_WORDS = 6  # words of context before the word to predict


def _test(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def mc_heldout(**_) -> datasets.DatasetDict:
    """The tiny model's held-out multiple choice: a passage start, four endings (one real)."""
    with open(MC_FILE) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return _test([{"question": r["question"], "choices": r["choices"], "answer": r["answer"]}
                  for r in rows])


def _paragraphs() -> list[str]:
    with open(HELDOUT_TEXT) as f:
        text = f.read()
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= MIN_PARAGRAPH_CHARS]


def heldout_paragraphs(**_) -> datasets.DatasetDict:
    """Held-out documentation paragraphs, for rolling log-likelihood (perplexity)."""
    return _test([{"text": p} for p in _paragraphs()])


def heldout_next_word(**_) -> datasets.DatasetDict:
    """Each paragraph's first line cut after CLOZE_MIN_WORDS or more words: the next word."""
    rows = []
    for paragraph in _paragraphs():
        words = paragraph.split()
        if len(words) <= CLOZE_MIN_WORDS:
            continue
        cut = min(len(words) - 1, max(CLOZE_MIN_WORDS, len(words) // 3))
        rows.append({"context": " ".join(words[:cut]), "target": words[cut]})
    return _test(rows)

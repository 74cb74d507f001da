"""How far the next-token distribution at θ moves from θ = 0's, over held-out text: the one
harness `testbed eval`, `testbed sweep` and the demo use.

With a few dozen multiple-choice items, accuracy cannot see what dropping experts costs; the
full next-token distribution at every held-out position can. Per position:
- KL(θ=0 || θ) in nats, over the whole vocabulary;
- top-1 agreement: the argmax at θ equals the argmax at θ = 0.
The held-out text is cut into equal blocks, each scored from its own start in one batched
forward pass. Intervals are percentile-bootstrap 95 % over blocks, not positions: positions
of one block share their context (and, at θ > 0, the drops of earlier positions), so they are
not independent. Equal blocks make the mean of block means the mean over positions.

Shape legend: B = blocks, S = positions scored per block, V = vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from testbed.experiments.stats import bootstrap

BLOCK_TOKENS = 64  # tokens per block, <s> included: 63 scored positions each
MAX_TOKENS = 1024  # held-out tokens read (16 blocks of 64)
BLOCKS_PER_FORWARD = 8  # blocks per forward pass (one request per agent per layer for all)


@dataclass(frozen=True)
class BlockFigures:
    """Per-block means of the per-position figures, in block order."""

    kl_nats: list[float]  # [B] mean KL(θ=0 || θ) over the block's positions
    agreement: list[float]  # [B] share of the block's positions whose argmax matches θ = 0's
    positions_per_block: int


def heldout_blocks(tokenizer, text: str, max_tokens: int = MAX_TOKENS,
                   block_tokens: int = BLOCK_TOKENS) -> list[list[int]]:
    """The first MAX_TOKENS tokens of TEXT as whole blocks of BLOCK_TOKENS, each opening with
    `<s>` when the tokenizer has one (the tail that fills no block is left out). Raises
    ValueError when not one block fits."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    body = block_tokens - len(bos)
    if body < 2:
        raise ValueError(f"block_tokens {block_tokens}: need at least 2 positions to score")
    # verbose=False: the whole text may pass the model's length; only MAX_TOKENS are kept
    ids = list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    ids = ids[:max_tokens]
    blocks = [bos + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]
    if not blocks:
        raise ValueError(f"the held-out text has {len(ids)} tokens: fewer than one block "
                         f"({body})")
    return blocks


@torch.inference_mode()
def block_logprobs(model, blocks: list[list[int]],
                   blocks_per_forward: int = BLOCKS_PER_FORWARD) -> torch.Tensor:
    """Float32 next-token log-probabilities [B, S, V] of every block (position i predicts
    token i + 1), BLOCKS_PER_FORWARD blocks a forward pass. The model runs at whatever θ the
    caller set."""
    out = []
    for start in range(0, len(blocks), blocks_per_forward):
        ids = torch.tensor(blocks[start:start + blocks_per_forward])  # [b, S + 1]
        device = getattr(model, "device", None)
        if isinstance(device, torch.device):
            ids = ids.to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        out.append(F.log_softmax(logits[:, :-1].float(), dim=-1).cpu())  # [b, S, V]
    return torch.cat(out)


def compare(reference: torch.Tensor, candidate: torch.Tensor) -> BlockFigures:
    """KL(reference || candidate) and top-1 agreement per block, from log-probabilities
    [B, S, V] of the same blocks. Pure."""
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
    # sum_v p_ref (log p_ref - log p): exact 0 where the two are equal
    kl = (reference.exp() * (reference - candidate)).sum(dim=-1)  # [B, S]
    same = reference.argmax(dim=-1) == candidate.argmax(dim=-1)  # [B, S]
    return BlockFigures(kl_nats=kl.mean(dim=-1).tolist(),
                        agreement=same.float().mean(dim=-1).tolist(),
                        positions_per_block=int(reference.shape[1]))


def summarize(figures: BlockFigures, seed: int = 0) -> dict:
    """Means over positions with their bootstrap-over-blocks 95 % intervals (the record's
    `divergence`)."""
    blocks = len(figures.kl_nats)
    return {"kl_nats": bootstrap(figures.kl_nats, np.mean, seed=seed).as_dict(),
            "top1_agreement": bootstrap(figures.agreement, np.mean, seed=seed).as_dict(),
            "positions": blocks * figures.positions_per_block, "blocks": blocks,
            "interval": "bootstrap 95 % over blocks"}


class Divergence:
    """The θ = 0 reference over held-out blocks, kept to compare every θ against it."""

    def __init__(self, blocks: list[list[int]], reference: torch.Tensor):
        self.blocks = blocks
        self.reference = reference  # [B, S, V] log-probabilities at θ = 0

    @classmethod
    def measure_reference(cls, model, blocks: list[list[int]]) -> Divergence:
        """Runs the blocks through MODEL, which the caller has set to θ = 0."""
        return cls(blocks, block_logprobs(model, blocks))

    def against(self, model) -> dict:
        """The summary of MODEL (the caller has set its θ) against the reference."""
        return summarize(compare(self.reference, block_logprobs(model, self.blocks)))

    def of_reference(self) -> dict:
        """θ = 0 against itself (KL 0, agreement 1), without a second pass."""
        return summarize(compare(self.reference, self.reference))

"""Decode's shortcuts decide and sum exactly as the general paths: combine's one-token sum on
numpy (basestation/combine.py) and the reply check's numpy pre-filter (dispatch.refused)."""

from __future__ import annotations

import pytest
import torch

from basestation.combine import combine
from basestation.dispatch import MAX_EXPERT_GAIN, out_of_bounds, refused, reply_bounds
from basestation.routing import group_by_expert


def eager_sum(weights: torch.Tensor, outputs: list, dtype: torch.dtype) -> torch.Tensor:
    """transformers' eager experts arithmetic, by hand: zeros, then index_add_ per expert."""
    expected = torch.zeros(1, outputs[0][3].shape[1], dtype=dtype)
    for _, token_idx, slot, y in sorted(outputs, key=lambda item: item[0]):
        expected.index_add_(0, token_idx, (y * weights[token_idx, slot, None]).to(dtype))
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16])
@pytest.mark.parametrize("kept", [1, 2, 4])
def test_one_token_sum_is_the_eager_sum_bit_for_bit(dtype, kept):
    """float32 and float64 take the numpy path, float16 and bfloat16 the torch one; both give
    the eager loop's bits, with one kept slot (a θ drop) or several."""
    generator = torch.Generator().manual_seed(kept)
    for _ in range(30):
        top_w, experts = torch.topk(torch.softmax(torch.randn(1, 8, generator=generator), -1),
                                    4)
        weights = (top_w / top_w.sum(-1, keepdim=True)).to(dtype)
        keep = torch.tensor([[slot < kept for slot in range(4)]])
        outputs = [(e, t, s, torch.randn(len(t), 64, generator=generator).to(dtype))
                   for e, (t, s) in group_by_expert(experts, keep).items()]
        got = combine(1, 64, dtype, weights, outputs)
        want = eager_sum(weights, outputs, dtype)
        assert got.dtype == dtype and got.shape == (1, 64)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # -0.0 too


def test_one_token_sum_is_a_new_tensor():
    """The sum never writes into a reply's memory (a view of the received frame)."""
    y = torch.ones(1, 8)
    outputs = [(0, torch.tensor([0]), torch.tensor([0]), y),
               (1, torch.tensor([0]), torch.tensor([1]), y)]
    out = combine(1, 8, torch.float32, torch.tensor([[0.75, 0.25]]), outputs)
    out += 1
    assert y.tolist() == [[1.0] * 8] and out.tolist() == [[2.0] * 8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_one_row_check_decides_as_the_bound(dtype):
    """Rows at, just under and just over MAX_EXPERT_GAIN, NaN and inf: refused says what
    out_of_bounds says of the request's bounds (the numpy pre-filter only passes rows far
    inside them)."""
    request = torch.tensor([[0.6, 0.8] + [0.0] * 254])  # norm 1: the bound is MAX_EXPERT_GAIN
    rows = []
    for scale in (0.0, 0.5, 0.998, 0.9995, 1.0, 1.0 + 1e-6, 1.001, 2.0, 1e30):
        row = torch.zeros(1, 256, dtype=torch.float64)
        row[0, :4] = MAX_EXPERT_GAIN * scale / 2  # norm MAX_EXPERT_GAIN * scale
        rows.append(row)
    rows.append(torch.full((1, 256), float("nan"), dtype=torch.float64))
    rows.append(torch.tensor([[float("inf")] + [0.0] * 255], dtype=torch.float64))
    for row in rows:
        y = row.to(dtype)
        assert refused(y, request) == out_of_bounds(y, reply_bounds(request)), row[0, 0]
    assert not refused(torch.full((1, 256), 1.0, dtype=dtype), request)
    assert refused(torch.full((1, 256), 1e3, dtype=dtype), request)  # norm 16000

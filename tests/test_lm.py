"""The shared language-modelling pieces: entropy, padding, EOS handling, the next-token loss."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from testtime.lm import (
    IGNORE_INDEX,
    before_eos_mask,
    cut_at_eos,
    entropy,
    eos_token_ids,
    left_pad,
    next_token_loss,
    pad,
)


def test_entropy_against_the_formula():
    probs = [[0.5, 0.25, 0.25], [1.0, 0.0, 0.0]]
    logits = torch.tensor([[math.log(p) if p > 0 else -1e9 for p in row] for row in probs])
    by_hand = [-sum(p * math.log(p) for p in row if p > 0) for row in probs]
    assert entropy(logits).tolist() == pytest.approx(by_hand, abs=1e-6)
    assert entropy(torch.zeros(1, 8)).item() == pytest.approx(math.log(8), abs=1e-6)
    # temperature: softmax(z / T); a float and a per-row tensor agree; colder is lower
    z = torch.tensor([[2.0, 1.0, 0.0]])
    p = torch.softmax(z / 0.5, -1)[0].tolist()
    assert entropy(z, 0.5).item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)
    assert entropy(z, torch.tensor([0.5])).item() == pytest.approx(entropy(z, 0.5).item(), abs=1e-7)
    assert entropy(z, 0.5) < entropy(z)
    assert entropy(torch.tensor([[0.0, 1.0]], dtype=torch.bfloat16)).dtype == torch.float32


def test_pad_and_left_pad():
    rows = [[1, 2, 3], [4], []]
    assert pad(rows, 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad(rows, 9, side="left").tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert pad([torch.tensor([5, 6]), torch.tensor([7])], -1, side="left").tolist() == [[5, 6], [-1, 7]]
    ids, mask = left_pad([[1, 2], [3]], pad_id=0)
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="side"):
        pad(rows, 0, side="middle")


def test_eos_ids_come_from_the_generation_config_then_the_tokenizer():
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, 2]),
                            config=SimpleNamespace(eos_token_id=99))
    assert eos_token_ids(model, SimpleNamespace(eos_token_id=2)) == [7, 2]
    assert eos_token_ids(model, SimpleNamespace(eos_token_id=5)) == [7, 2, 5]
    bare = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None), config=SimpleNamespace(eos_token_id=3))
    assert eos_token_ids(bare) == [3]  # the model config only where nothing else names one
    assert eos_token_ids(None, SimpleNamespace(eos_token_id=None)) == []


def test_cut_at_eos_lists_and_tensors():
    assert cut_at_eos([4, 5, 2, 6, 2], [2]) == [4, 5]
    assert cut_at_eos([4, 5, 2, 6], {2}, keep_eos=True) == [4, 5, 2]
    assert cut_at_eos([4, 5], [2]) == [4, 5]
    out = cut_at_eos(torch.tensor([3, 9, 1]), [9], keep_eos=True)
    assert torch.is_tensor(out) and out.tolist() == [3, 9]
    tokens = torch.tensor([[4, 2, 5, 2], [4, 5, 6, 7], [2, 0, 0, 0]])
    assert before_eos_mask(tokens, [2]).tolist() == [[True, False, False, False], [True] * 4, [False] * 4]
    assert before_eos_mask(tokens, [2], keep_eos=True).tolist() == [[True, True, False, False], [True] * 4,
                                                                     [True, False, False, False]]


def test_next_token_loss_shifts_and_ignores():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 3, 4]])
    by_hand = []
    for b in range(2):
        for t in range(3):
            y = int(labels[b, t + 1])
            if y != IGNORE_INDEX:
                by_hand.append(-torch.log_softmax(logits[b, t], -1)[y])
    assert next_token_loss(logits, labels).item() == pytest.approx(float(torch.stack(by_hand).mean().detach()), rel=1e-6)
    empty = next_token_loss(logits, torch.full((2, 4), IGNORE_INDEX))
    assert empty.item() == 0.0
    empty.backward()  # a fully masked batch still has a gradient path, never NaN
    assert torch.isfinite(logits.grad).all()


def test_seeded_rng_repeats_draws_and_restores_the_callers_rng():
    from testtime.lm import seeded_rng

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with seeded_rng(7):
        first = torch.rand(4)
    with seeded_rng(7):
        assert torch.equal(torch.rand(4), first)
    with seeded_rng(8):
        assert not torch.equal(torch.rand(4), first)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's stream continues as if untouched
    with seeded_rng(None):  # no seed: the global stream itself
        assert not torch.equal(torch.rand(3), expected_next)

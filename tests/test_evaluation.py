"""Answer extraction, the accuracy metric and (pluggable) decoding."""

from __future__ import annotations

import re

import pytest
import torch

from datamodules.common import PadCollator
from testtime.lm import encode_prompt
from testtime.evaluation import (
    AnswerAccuracy,
    DecodingSetting,
    default_sampling,
    evaluate,
    extract_answer,
    generate_completions,
    greedy,
    is_correct,
    pick_best,
    sampling,
    sweep_settings,
)
from testtime.io import format_table
from testtime.tasks import make_problems, prompt_messages


@pytest.mark.parametrize("text, expected", [
    ("The answer is 42.", "42"),
    ("17 + 25 = 42. The answer is 42", "42"),
    ("first 3, then 7", "7"),
    ("It is -5.", "-5"),
    ("x = -12", "-12"),
    ("7-5=2", "2"),  # a binary minus is not a sign
    ("10 - 3", "3"),
    ("The total is 1,234 apples.", "1234"),
    ("1,234,567", "1234567"),
    ("1,2345", "2345"),  # not a thousands separator
    ("1,2,3", "3"),
    ("3.0", "3"),
    ("so 3.50.", "3.5"),
    ("-0", "0"),
    ("$12.", "12"),
    ("**42**", "42"),
    ("answer:7", "7"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct():
    assert is_correct("so the answer is 12.", "12")
    assert is_correct("12.0", "12")
    assert is_correct("1,200", "1200")
    assert not is_correct("12 apples, minus 1 is 11", "12")  # the last number counts
    assert not is_correct("I don't know", "12")
    assert not is_correct("-12", "12")


def test_accuracy_averages_over_samples_then_problems():
    metric = AnswerAccuracy()
    metric.update([["4", "4", "5", "4"], ["1", "x", "10", "10"]], ["4", "10"])  # 3/4 and 2/4
    assert metric.compute().item() == pytest.approx((0.75 + 0.5) / 2)
    metric.update([["7"]], ["7"])  # k may differ per batch: 1/1
    assert metric.compute().item() == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert metric.total.item() == 3


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_accuracy_empty_is_zero_and_bad_input_raises():
    metric = AnswerAccuracy()
    assert metric.compute().item() == 0.0
    with pytest.raises(ValueError):
        metric.update([["1"]], ["1", "2"])
    with pytest.raises(ValueError):
        metric.update([[]], ["1"])


def test_accuracy_states_sum_across_ranks():
    """What DDP does: each rank updates its own metric, the states are summed."""
    rank0, rank1, single = AnswerAccuracy(), AnswerAccuracy(), AnswerAccuracy()
    data0 = ([["4", "4", "5", "4"], ["1", "x", "10", "10"]], ["4", "10"])
    data1 = ([["0", "0", "0", "0"]], ["0"])
    rank0.update(*data0)
    rank1.update(*data1)
    single.update(*data0)
    single.update(*data1)
    rank0.merge_state(rank1)
    assert rank0.total.item() == 3
    assert rank0.compute().item() == pytest.approx(single.compute().item()) == pytest.approx(2.25 / 3)
    assert rank0._reductions["correct"] is not None and rank0._reductions["total"] is not None


def test_settings():
    assert greedy().generate_kwargs() == {"do_sample": False}
    kwargs = sampling(0.6, 0.95, k=4).generate_kwargs()
    assert kwargs == {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0}
    assert default_sampling(4).num_samples == 4 and default_sampling(4).temperature == 1.0
    assert DecodingSetting("x", True, extra={"top_k": 5}).generate_kwargs()["top_k"] == 5
    grid = sweep_settings()
    assert len(grid) == 9 and len({s.name for s in grid}) == 9
    assert {(s.temperature, s.top_p) for s in grid} == {(t, p) for t in (0.3, 0.6, 1.0) for p in (0.8, 0.95, 1.0)}
    results = {s.name: 0.2 for s in grid} | {grid[4].name: 0.9, grid[7].name: 0.9}
    assert pick_best(results, grid) is grid[4]  # the first of the tied best
    with pytest.raises(ValueError):
        DecodingSetting("bad", True, temperature=0.0)
    with pytest.raises(ValueError):
        DecodingSetting("bad", True, top_p=1.5)
    with pytest.raises(ValueError):
        DecodingSetting("bad", False, num_samples=0)


# --- decoding on the tiny model ---------------------------------------------------------------


@pytest.fixture
def sharp_llama(tiny_llama):
    """The tiny Llama with larger random weights, so greedy output varies with the prompt."""
    model, tokenizer = tiny_llama
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model, tokenizer


def prompts(tokenizer, problems):
    ids = [encode_prompt(tokenizer, prompt_messages(p)) for p in problems]
    batch = PadCollator(tokenizer.pad_token_id, side="left")([{"input_ids": i} for i in ids])
    return ids, batch["input_ids"], batch["attention_mask"]


def manual_greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """Argmax one token at a time on the unpadded prompt, no cache: the reference decoding."""
    sequence = torch.tensor([ids])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(sequence).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_greedy_matches_a_manual_loop(sharp_llama):
    model, tokenizer = sharp_llama
    problems = make_problems(5, seed=0, difficulty=3)
    ids, input_ids, mask = prompts(tokenizer, problems)
    assert len({len(i) for i in ids}) > 1  # prompts of different lengths: left padding matters
    out = generate_completions(model, tokenizer, input_ids, mask, greedy(), max_new_tokens=10)
    assert [len(c) for c in out] == [1] * 5
    expected = [manual_greedy(model, tokenizer, i, 10) for i in ids]
    assert [c[0] for c in out] == expected
    assert len(set(expected)) > 1 and all(expected)  # not a degenerate constant output
    assert generate_completions(model, tokenizer, input_ids, mask, greedy(), max_new_tokens=10) == out


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(sharp_llama):
    model, tokenizer = sharp_llama
    _, input_ids, mask = prompts(tokenizer, make_problems(3, seed=0, difficulty=2))
    setting = default_sampling(k=3)
    state = torch.get_rng_state()
    a = generate_completions(model, tokenizer, input_ids, mask, setting, max_new_tokens=8, seed=1)
    b = generate_completions(model, tokenizer, input_ids, mask, setting, max_new_tokens=8, seed=1)
    c = generate_completions(model, tokenizer, input_ids, mask, setting, max_new_tokens=8, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(a) == 3 and all(len(samples) == 3 for samples in a)
    assert a == b
    assert a != c
    assert any(len(set(samples)) > 1 for samples in a)  # the k samples of a prompt differ


class AnswerAppender:
    """A generate_fn that reads the question back from the prompt and appends an answer (+ offset)."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer, self.offset, self.calls = tokenizer, offset, []

    def __call__(self, model, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids.shape, kwargs))
        rows = []
        for ids in input_ids.tolist():
            a, op, b = re.search(r"What is (\d+) ([-+*]) (\d+)\?", self.tokenizer.decode(ids)).groups()
            value = eval(f"{a} {op} {b}") + self.offset
            text = f"Let me think: {a} {op} {b} = {value}. The answer is {value}."
            rows.append(ids + self.tokenizer(text)["input_ids"] + [self.tokenizer.eos_token_id]
                        + self.tokenizer("99")["input_ids"])  # after EOS: must be ignored
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.tokenizer.pad_token_id] * (width - len(r)) for r in rows])


def test_custom_generate_fn_is_what_gets_scored(tiny_llama):
    model, tokenizer = tiny_llama
    problems = make_problems(7, seed=0, difficulty=2)
    right, wrong = AnswerAppender(tokenizer), AnswerAppender(tokenizer, offset=1)
    settings = [greedy(right, name="right"), sampling(k=2, generate_fn=wrong, name="wrong"), greedy()]
    model.train()
    results = evaluate(model, tokenizer, problems, settings, batch_size=4, max_new_tokens=16, progress=False)
    assert model.training  # restored
    assert results["right"] == 1.0
    assert results["wrong"] == 0.0
    assert results["greedy"] == 0.0  # the random model itself never produces the answer
    assert [shape[0] for shape, _ in right.calls] == [4, 3]
    assert [shape[0] for shape, _ in wrong.calls] == [8, 6]  # each prompt repeated k=2 times
    kwargs = wrong.calls[0][1]
    assert kwargs["max_new_tokens"] == 16 and kwargs["do_sample"] and kwargs["pad_token_id"] == tokenizer.pad_token_id


def test_generate_fn_must_return_prompt_plus_continuation(tiny_llama):
    model, tokenizer = tiny_llama
    _, input_ids, mask = prompts(tokenizer, make_problems(2, seed=0))
    bad = greedy(lambda m, ids, attention_mask, **kw: ids[:1], name="bad")
    with pytest.raises(ValueError, match="prompt \\+ continuation"):
        generate_completions(model, tokenizer, input_ids, mask, bad, max_new_tokens=4)


def test_evaluate_rejects_duplicate_names(tiny_llama):
    model, tokenizer = tiny_llama
    with pytest.raises(ValueError, match="unique"):
        evaluate(model, tokenizer, make_problems(2, seed=0), [greedy(), greedy()], progress=False)


@pytest.mark.slow
def test_smollm2_greedy_single_digit_addition(smollm2):
    model, tokenizer = smollm2
    problems = make_problems(20, seed=0, difficulty=1, kinds=["add_1digit"])
    results = evaluate(model, tokenizer, problems, [greedy()], batch_size=20, max_new_tokens=24, progress=False)
    print(format_table(results, len(problems)))
    assert results["greedy"] > 0.3

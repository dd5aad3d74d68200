"""Masked diffusion LMs: samplers against naive references, TTA remasking, constraints, model and losses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from testtime.diffusion import constraints as C
from testtime.diffusion.experiments import analyze_icml_results, plot_uncertainty, run_academic_benchmark
from testtime.diffusion.model import (
    MaskedDiffusionLM,
    build_diffusion_tokenizer,
    build_model,
    diffusion_loss,
    forward_process,
    parameter_count,
    pretraining_loss,
    sft_loss,
)
from testtime.diffusion.sampling import (
    as_generate_fn,
    generate,
    generate_fast_dllm,
    generate_random_remasking,
    generate_remdm,
    num_transfer_tokens,
)
from testtime.diffusion.tta import augmentation_mode, generate_with_tta_uncertainty, tta_passes
from testtime.lm import IGNORE_INDEX, cut_at_eos, left_pad
from testtime.tiny import build_tokenizer

SAMPLERS = [generate, generate_random_remasking, generate_fast_dllm, generate_remdm]


@pytest.fixture(scope="module")
def tiny():
    """A tiny random diffusion LM (eval mode) and its tokenizer with a MASK token."""
    return build_model("tiny", seed=0)


class Scripted(nn.Module):
    """A fake mask predictor: `script(call_index, input_ids)` -> logits [B, L, V]; records every input."""

    def __init__(self, script, mask_id: int):
        super().__init__()
        self.script, self.calls = script, []
        self.config = SimpleNamespace(mask_token_id=mask_id)

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.clone())
        return SimpleNamespace(logits=self.script(len(self.calls) - 1, input_ids))


def llada_reference(model, prompt, steps, gen_length, block_length, cfg_scale=0.0, mask_id=None):
    """LLaDA's generate.py (T = 0, low confidence), loop for loop, plus the MASK exclusion."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo = prompt.shape[1] + num_block * block_length
        n = int((x[:, lo:lo + block_length] == mask_id).sum())
        counts = [n // steps + (1 if i < n % steps else 0) for i in range(steps)]
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x])).logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits
            logits = logits.double()
            logits[..., mask_id] = -math.inf
            x0 = logits.argmax(-1)
            x0_p = F.softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
            x0_p[:, lo + block_length:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            _, select = torch.topk(confidence[0], k=counts[i])
            x[0, select] = x0[0, select]
    return x


# --- the LLaDA schedule and sampler --------------------------------------------------------------

def test_transfer_schedule_matches_the_loop_and_sums_to_the_mask_count():
    counts = torch.tensor([0, 1, 7, 32, 33, 100])
    for steps in (1, 3, 8, 32):
        schedule = num_transfer_tokens(counts, steps)
        assert schedule.sum(-1).tolist() == counts.tolist()
        for row, n in zip(schedule.tolist(), counts.tolist()):
            assert row == [n // steps + (1 if i < n % steps else 0) for i in range(steps)]


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_generate_equals_llada_reference_loop(tiny, cfg_scale):
    model, tokenizer = tiny
    prompt = tokenizer.encode("What is 2 + 3?", return_tensors="pt")
    ours, nfe = generate(model, prompt, steps=8, gen_length=16, block_length=8, cfg_scale=cfg_scale,
                         return_nfe=True)
    reference = llada_reference(model, prompt, 8, 16, 8, cfg_scale, tokenizer.mask_token_id)
    assert torch.equal(ours, reference)
    assert nfe == (16 if cfg_scale else 8)


def test_temperature_zero_commits_the_argmax_in_confidence_order():
    # Fixed logits: position p prefers token p % 5 with a margin growing with p, so the most
    # confident positions are the last ones and each commit is the argmax.
    vocab, mask_id, prompt_len, gen = 6, 5, 2, 6
    base = torch.zeros(prompt_len + gen, vocab)
    for p in range(prompt_len + gen):
        base[p, p % 5] = 1.0 + p
    model = Scripted(lambda i, ids: base.expand(ids.shape[0], -1, -1).clone(), mask_id)
    out = generate(model, torch.zeros(1, prompt_len, dtype=torch.long), steps=6, gen_length=gen, block_length=gen)
    assert out[0, prompt_len:].tolist() == [p % 5 for p in range(prompt_len, prompt_len + gen)]
    masked_per_call = [(c[0, prompt_len:] == mask_id).nonzero().flatten().tolist() for c in model.calls]
    assert masked_per_call[1] == list(range(gen - 1))  # the most confident (last) position went first


@pytest.mark.parametrize("sampler", SAMPLERS + [generate_with_tta_uncertainty], ids=lambda f: f.__name__)
def test_no_mask_left_and_prompt_unchanged(tiny, sampler):
    model, tokenizer = tiny
    ids, mask = left_pad([tokenizer.encode("Hi"), tokenizer.encode("What is 1 + 1?")], tokenizer.pad_token_id)
    kwargs = dict(steps=8, gen_length=16, block_length=8, attention_mask=mask, seed=3)
    if sampler is generate_with_tta_uncertainty:
        kwargs.update(tta_k=3, remask_top_pct=0.3)
    elif sampler is generate_remdm:
        kwargs.update(eta_cap=0.5)  # far above the paper's cap, to exercise remasking
    else:
        kwargs.update(temperature=0.7)
    out = sampler(model, ids, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (2, ids.shape[1] + 16)
    assert torch.equal(out[:, :ids.shape[1]], ids)
    assert not (out[:, ids.shape[1]:] == tokenizer.mask_token_id).any()


@pytest.mark.parametrize("sampler", [generate, generate_fast_dllm, generate_with_tta_uncertainty],
                         ids=lambda f: f.__name__)
def test_left_padded_batch_equals_each_prompt_alone(tiny, sampler):
    model, tokenizer = tiny
    prompts = [tokenizer.encode("7 - 2 = ?"), tokenizer.encode("What is 4 + 5? Answer:"), tokenizer.encode("1")]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    kwargs = dict(steps=8, gen_length=16, block_length=8)
    if sampler is generate_with_tta_uncertainty:
        kwargs.update(tta_k=2, tta_temperature_range=(0.0, 0.0), remask_top_pct=0.25, seed=0)
    if sampler is generate_fast_dllm:
        kwargs.update(threshold=0.02)  # a random model is never 0.9 sure; this makes rows finish unevenly
    batch = sampler(model, ids, attention_mask=mask, **kwargs)
    batch = batch[0] if isinstance(batch, tuple) else batch
    for row, prompt in enumerate(prompts):
        alone = sampler(model, torch.tensor([prompt]), **kwargs)
        alone = alone[0] if isinstance(alone, tuple) else alone
        assert batch[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()


def test_same_seed_same_output_and_global_rng_untouched(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("abc", return_tensors="pt")
    state = torch.get_rng_state()
    a = generate(model, prompt, steps=8, gen_length=16, block_length=8, temperature=1.0, seed=5)
    b = generate(model, prompt, steps=8, gen_length=16, block_length=8, temperature=1.0,
                 generator=torch.Generator().manual_seed(5))
    c = generate(model, prompt, steps=8, gen_length=16, block_length=8, temperature=1.0, seed=6)
    ta, _ = generate_with_tta_uncertainty(model, prompt, 8, 16, tta_k=3, seed=1, block_length=8,
                                          tta_temperature_range=(0.5, 1.0), tta_use_dropout=True)
    tb, _ = generate_with_tta_uncertainty(model, prompt, 8, 16, tta_k=3, seed=1, block_length=8,
                                          tta_temperature_range=(0.5, 1.0), tta_use_dropout=True)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(ta, tb)
    assert torch.equal(torch.get_rng_state(), state)


def test_argument_errors_name_the_argument(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("abc", return_tensors="pt")
    with pytest.raises(ValueError, match="gen_length=20 must be a multiple of block_length=8"):
        generate(model, prompt, steps=8, gen_length=20, block_length=8)
    with pytest.raises(ValueError, match="steps=3 must be a multiple"):
        generate(model, prompt, steps=3, gen_length=16, block_length=8)
    with pytest.raises(ValueError, match="mask_id=126336 is outside"):
        generate(model, prompt, steps=8, gen_length=8, block_length=8, mask_id=126336)
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, torch.ones(2, 3, dtype=torch.long), steps=8, gen_length=8, block_length=8,
                 attention_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="remasking must be one of"):
        generate(model, prompt, steps=8, gen_length=8, block_length=8, remasking="lowest")
    with pytest.raises(ValueError, match="tta_k must be a positive integer, got 0"):
        generate_with_tta_uncertainty(model, prompt, tta_k=0)


# --- Fast-dLLM and ReMDM --------------------------------------------------------------------------

def _confidence_model(mask_id, vocab, probs_of_position):
    """Logits whose top probability at generated position j is probs_of_position(j) (token j % (vocab - 1))."""
    def script(call, ids):
        batch, length = ids.shape
        logits = torch.full((batch, length, vocab), -1e4)
        for j in range(length):
            p = probs_of_position(j)
            logits[:, j, :vocab - 1] = math.log((1 - p) / (vocab - 2))
            logits[:, j, j % (vocab - 1)] = math.log(p)
        return logits
    return Scripted(script, mask_id)


def test_fast_dllm_commits_every_confident_token_and_counts_nfe():
    vocab, mask_id = 8, 7
    prompt = torch.zeros(1, 2, dtype=torch.long)
    confident = _confidence_model(mask_id, vocab, lambda j: 0.95)
    out, nfe = generate_fast_dllm(confident, prompt, steps=16, gen_length=16, block_length=8, return_nfe=True)
    assert nfe == 2  # one step per block: all 8 masked tokens are >= 0.9
    assert out[0, 2:].tolist() == [j % 7 for j in range(2, 18)]
    unsure = _confidence_model(mask_id, vocab, lambda j: 0.5)
    _, nfe = generate_fast_dllm(unsure, prompt, steps=16, gen_length=16, block_length=8, return_nfe=True)
    assert nfe == 16  # never confident: LLaDA's schedule (1 per step) sets the pace
    # positions 2..5 (the first half of block 1) are confident: step 1 commits those 4, then 1 per step
    mixed = _confidence_model(mask_id, vocab, lambda j: 0.95 if j < 6 else 0.5)
    _, nfe = generate_fast_dllm(mixed, prompt, steps=16, gen_length=16, block_length=8, return_nfe=True)
    assert [int((c[0, 2:10] == mask_id).sum()) for c in mixed.calls[:3]] == [8, 4, 3]
    assert nfe == 1 + 4 + 8
    _, nfe = generate_fast_dllm(unsure, prompt, steps=16, gen_length=16, block_length=8, cfg_scale=1.0,
                                return_nfe=True)
    assert nfe == 32


def test_remdm_without_remasking_is_llada_and_remasks_follow_the_schedule(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("What is 3 + 4?", return_tensors="pt")
    base = generate(model, prompt, steps=8, gen_length=16, block_length=8)
    assert torch.equal(generate_remdm(model, prompt, steps=8, gen_length=16, block_length=8, eta_cap=0.0), base)

    vocab, mask_id, start = 8, 7, 2
    fake = _confidence_model(mask_id, vocab, lambda j: 0.6 + 0.01 * j)
    out, nfe = generate_remdm(fake, torch.zeros(1, start, dtype=torch.long), steps=8, gen_length=8, block_length=8,
                              eta_cap=1.0, seed=0, return_nfe=True)
    assert nfe == 8 and not (out == mask_id).any()
    seen = [c[0, start:] for c in fake.calls] + [out[0, start:]]
    masks = [int((s == mask_id).sum()) for s in seen]
    assert masks == [8, 7, 6, 5, 4, 3, 2, 1, 0]  # the masks left always follow LLaDA's schedule
    # with eta_cap = 1 every committed token is drawn: the remasks are capped by the masks left after the step
    remasked = [int(((a != mask_id) & (b == mask_id)).sum()) for a, b in zip(seen, seen[1:])]
    assert remasked == [min(i, 7 - i) for i in range(8)]


# --- TTA uncertainty sampling ---------------------------------------------------------------------

def test_tta_with_one_plain_pass_and_no_remasking_is_llada(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("What is 6 - 1?", return_tensors="pt")
    base = generate(model, prompt, steps=8, gen_length=16, block_length=8)
    tokens, logs = generate_with_tta_uncertainty(model, prompt, steps=8, gen_length=16, block_length=8, tta_k=1,
                                                 tta_temperature_range=(0.0, 0.0), remask_top_k=0)
    assert torch.equal(tokens, base)
    assert logs["nfe"] == 8 and logs["total_steps"] == 8 and logs["num_remasked"] == 0


def test_tta_passes_run_as_one_batched_forward_equal_to_k_separate_passes(tiny):
    model, tokenizer = tiny
    calls = []
    model_rows = lambda m, inputs, out: calls.append(inputs[0].shape[0])  # noqa: E731
    ids, mask = left_pad([tokenizer.encode("12 + 30 ="), tokenizer.encode("ab")], tokenizer.pad_token_id)
    x = torch.cat([ids, torch.full((2, 8), tokenizer.mask_token_id)], 1)
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
    temperatures, start, mask_id = [0.0, 0.5, 1.0, 2.0], ids.shape[1], tokenizer.mask_token_id
    handle = model.register_forward_hook(model_rows)
    pred = tta_passes(model, x, full_mask, start, 8, temperatures, mask_id, torch.Generator().manual_seed(0))
    handle.remove()
    assert calls == [4 * 2]  # ONE forward of [K * B, L]

    generator = torch.Generator().manual_seed(0)
    samples, probs = [], []
    for t in temperatures:  # K separate passes, noise drawn pass after pass from the same generator
        with torch.no_grad():
            logits = model(x, attention_mask=full_mask).logits[:, start:].double()
        logits[..., mask_id] = -math.inf
        if t > 0:
            u = torch.rand(logits.shape, dtype=torch.float64, generator=generator)
            samples.append((logits.exp() / (-torch.log(u)) ** t).argmax(-1))
        else:
            samples.append(logits.argmax(-1))
        probs.append(F.softmax(logits, -1))
    assert torch.equal(pred.samples, torch.stack(samples))
    p_mean = torch.stack(probs).mean(0)
    for b in range(2):
        for j in range(8):
            drawn = [int(s[b, j]) for s in samples]
            best = max(set(drawn), key=lambda v: (drawn.count(v), float(p_mean[b, j, v])))
            assert int(pred.consensus[b, j]) == best
            assert float(pred.disagreement[b, j]) == pytest.approx(1 - drawn.count(best) / 4)
            assert float(pred.confidence[b, j]) == pytest.approx(float(p_mean[b, j, best]), abs=1e-6)
            h = -sum(float(q) * math.log(float(q)) for q in p_mean[b, j] if q > 0)
            assert float(pred.entropy[b, j]) == pytest.approx(h / math.log(p_mean.shape[-1]), abs=1e-5)


def test_tta_dropout_differs_per_pass_and_modes_are_restored(tiny):
    model, tokenizer = tiny
    model.layers[0].train()  # a mixed state must come back as it was
    x = torch.tensor([tokenizer.encode("What is 5 + 5?")]).repeat(3, 1)
    with augmentation_mode(model, use_dropout=True):
        assert not model.training and not model.layers[1].mlp_norm.training
        logits = model(x).logits
        assert not torch.allclose(logits[0], logits[1])
    assert [m.training for m in model.layers[0].modules()] == [True] * len(list(model.layers[0].modules()))
    assert not model.training and not model.layers[1].dropout.training
    model.layers[0].eval()
    without, _ = build_model("tiny", hidden_dropout=0.0)
    with pytest.raises(ValueError, match="no nn.Dropout module with p > 0"):
        generate_with_tta_uncertainty(without, x[:1], 8, 8, tta_k=2, block_length=8, tta_use_dropout=True)


def test_tta_nfe_and_one_forward_per_step(tiny):
    model, tokenizer = tiny
    rows = []
    handle = model.register_forward_hook(lambda m, inputs, out: rows.append(inputs[0].shape[0]))
    ids, mask = left_pad([tokenizer.encode("a"), tokenizer.encode("bcd")], tokenizer.pad_token_id)
    _, logs = generate_with_tta_uncertainty(model, ids, steps=8, gen_length=16, block_length=8, tta_k=3,
                                            attention_mask=mask, seed=0)
    handle.remove()
    assert rows == [3 * 2] * 8
    assert logs["nfe"] == 8 * 3 and logs["total_steps"] == 8
    assert all(len(v) == 8 for v in logs["tta_stats"].values())


def _remask_model(mask_id, vocab=8):
    """Constant, position-ordered predictions: nothing ever flips, so only the remask counts matter."""
    return _confidence_model(mask_id, vocab, lambda j: 0.9 - 0.01 * j)


@pytest.mark.parametrize("policy", [dict(remask_top_k=3), dict(remask_top_pct=0.25)], ids=["top_k", "top_pct"])
def test_remask_counts(policy):
    mask_id, gen = 7, 16
    model = _remask_model(mask_id)
    _, logs = generate_with_tta_uncertainty(model, torch.zeros(2, 2, dtype=torch.long), steps=gen, gen_length=gen,
                                            block_length=gen, tta_k=2, freeze_duration=0, seed=0, **policy)
    counts = [round(r * gen) for r in logs["tta_stats"]["remask_ratio_per_step"]]  # ratio is per row, averaged
    # at step i, i tokens are committed (the masks follow the schedule) and 15 - i masks remain after it
    if "remask_top_k" in policy:
        expected = [min(3, i, gen - 1 - i) for i in range(gen)]
    else:
        expected = [min(math.floor(0.25 * i), gen - 1 - i) for i in range(gen)]
    assert counts == expected
    assert logs["num_remasked"] == 2 * sum(expected)


def _oscillating(mask_id, start, vocab=8):
    """Position `start` (the first generated one) flips between tokens 1 and 2 every two calls, very
    confidently; every other position predicts token 3, less confidently the further right."""
    def script(call, ids):
        batch, length = ids.shape
        logits = torch.zeros(batch, length, vocab)
        logits[:, :, 3] = 5.0 - 0.01 * torch.arange(length)
        logits[:, start] = 0.0
        logits[:, start, 1 + (call // 2) % 2] = 10.0
        return logits
    return Scripted(script, mask_id)


@pytest.mark.parametrize("setting, masked_at", [
    (dict(freeze_duration=0), [2, 4, 6, 8, 10, 12, 14]),      # remasked at every odd step, recommitted flipped
    (dict(freeze_duration=3), [2, 4, 6, 11, 13, 15]),         # 3 flips (steps 2, 4, 6) -> frozen for steps 7-9
    (dict(freeze_duration=0, lambda_change=10.0), [2, 9]),   # a recent flip outweighs the violation for 5 steps
], ids=["no_freeze", "freeze", "change_penalty"])
def test_freeze_window_on_a_scripted_oscillation(setting, masked_at):
    mask_id, start, gen = 7, 2, 16
    model = _oscillating(mask_id, start)

    def violation_at_first_token(tokens):  # always blame the oscillating position
        scores = torch.zeros_like(tokens, dtype=torch.float32)
        scores[:, start] = 1.0
        return scores

    kwargs = dict(alpha_entropy=0.0, beta_disagreement=0.0, gamma_violation=1.0, lambda_change=0.0,
                  remask_top_k=1, freeze_window=5, freeze_threshold=3)
    kwargs.update(setting)
    tokens, logs = generate_with_tta_uncertainty(model, torch.zeros(1, start, dtype=torch.long), steps=gen,
                                                 gen_length=gen, block_length=gen, tta_k=1,
                                                 tta_temperature_range=(0.0, 0.0),
                                                 constraint_fn=violation_at_first_token, **kwargs)
    assert [s for s, x in enumerate(model.calls) if x[0, start] == mask_id and s > 0] == masked_at
    frozen = [round(r * gen) for r in logs["tta_stats"]["frozen_ratio_per_step"]]
    if setting["freeze_duration"]:
        assert frozen == [0] * 7 + [1] * 3 + [0] * 6 and logs["num_freezes"] == 1
    else:
        assert sum(frozen) == 0 and logs["num_freezes"] == 0
    assert not (tokens == mask_id).any()


@pytest.mark.parametrize("bad, message", [
    (lambda t: torch.zeros(t.shape[0], t.shape[1] - 1), r"returned shape \[1, 17\]"),
    (lambda t: torch.zeros(t.shape, dtype=torch.float64), "returned dtype torch.float64"),
    (lambda t: -torch.ones(t.shape), "returned negative scores"),
    (lambda t: t.tolist(), "returned a list"),
], ids=["shape", "dtype", "negative", "not_a_tensor"])
def test_bad_constraint_fn_says_what_was_expected(tiny, bad, message):
    model, tokenizer = tiny
    prompt = tokenizer.encode("ab", return_tensors="pt")
    with pytest.raises(ValueError, match=r"float32 tensor of shape \[batch, seq_len\] = \[1, 18\].*" + message):
        generate_with_tta_uncertainty(model, prompt, steps=8, gen_length=16, block_length=8, tta_k=2,
                                      constraint_fn=bad)


# --- constraints ----------------------------------------------------------------------------------

def seed_no_repeat_ngrams(tokens, n=3):
    """The seed's loop, verbatim in behaviour."""
    batch_size, seq_len = tokens.shape
    scores = torch.zeros_like(tokens, dtype=torch.float32)
    for b in range(batch_size):
        seen = set()
        for i in range(n - 1, seq_len):
            ngram = tuple(tokens[b, i - n + 1:i + 1].tolist())
            if ngram in seen:
                scores[b, i] += 1.0
            seen.add(ngram)
    return scores


def test_no_repeat_ngrams_equals_the_seed_loop():
    tokens = torch.randint(0, 3, (4, 40), generator=torch.Generator().manual_seed(0))
    for n in (1, 2, 3, 5):
        assert torch.equal(C.no_repeat_ngrams(tokens, n), seed_no_repeat_ngrams(tokens, n))
    assert C.no_repeat_ngrams(tokens[:, :2], 3).sum() == 0


class PieceTokenizer:
    """A fake tokenizer whose tokens are multi-character strings."""

    def __init__(self, pieces):
        self.pieces = pieces

    def __len__(self):
        return len(self.pieces)

    def batch_decode(self, ids, skip_special_tokens=True):
        return ["".join(self.pieces[i] for i in row) for row in ids]


def stack_reference(row, pieces, pairs):
    """Character-level bracket matching with a stack per kind; unmatched brackets charged to their token."""
    scores = [0.0] * len(row)
    for opener, closer in zip(pairs[::2], pairs[1::2]):
        stack = []
        for i, t in enumerate(row):
            for ch in pieces[t]:
                if ch == opener:
                    stack.append(i)
                elif ch == closer:
                    if stack:
                        stack.pop()
                    else:
                        scores[i] += 1
        for i in stack:
            scores[i] += 1
    return scores


def test_bracket_violations_equal_a_stack_matcher():
    pieces = ["a", "(", ")", "[", "]", "()", ")(", "((", "))", "([", "])", "x)", "{", "}", "}{"]
    tokenizer = PieceTokenizer(pieces)
    tokens = torch.randint(0, len(pieces), (6, 30), generator=torch.Generator().manual_seed(1))
    got = C.bracket_violations(tokens, tokenizer)
    assert got.dtype == torch.float32
    for b in range(tokens.shape[0]):
        assert got[b].tolist() == stack_reference(tokens[b].tolist(), pieces, "()[]{}")


def test_json_and_math_constraints_point_at_the_offending_tokens():
    tokenizer = build_diffusion_tokenizer()
    tokens = torch.tensor([tokenizer.encode('{"a": [1, 2}')])
    scores = C.json_format_constraint(tokens, tokenizer)[0]
    assert scores.nonzero().flatten().tolist() == [6]  # the "[" never closed ("}" closes "{")
    text = "(6/0 + 8/0.5) / (3"
    scores = C.math_constraint(torch.tensor([tokenizer.encode(text)]), tokenizer)[0].tolist()
    assert [i for i, s in enumerate(scores) if s] == [2, 3, 16]
    assert scores[2] == scores[3] == 2.0 and scores[16] == 1.0


# --- the model, tokenizer and losses --------------------------------------------------------------

def test_tokenizer_gets_a_mask_token_without_touching_the_original():
    base = build_tokenizer()
    assert base.mask_token_id is None  # testtime.tiny's tokenizer has none, hence the helper
    tokenizer = build_diffusion_tokenizer(base)
    assert base.mask_token_id is None and tokenizer.mask_token_id == len(base)
    assert build_diffusion_tokenizer(tokenizer) is tokenizer
    assert tokenizer.decode([tokenizer.mask_token_id] + tokenizer.encode("ok"), skip_special_tokens=True) == "ok"


def test_model_saves_reloads_and_hides_padding(tiny, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "masked_diffusion_lm" and config.mask_token_id == tokenizer.mask_token_id
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert isinstance(AutoModel.from_pretrained(tmp_path), MaskedDiffusionLM)
    x = torch.tensor([tokenizer.encode("What is 2 + 2?")])
    assert torch.allclose(reloaded(x).logits, model(x).logits, atol=1e-6)
    padded = torch.cat([torch.full((1, 3), tokenizer.pad_token_id), x], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(x)], 1)
    assert torch.allclose(model(padded, attention_mask=mask).logits[:, 3:], model(x).logits, atol=1e-5)
    small, _ = build_model("small")
    assert 4_000_000 < parameter_count(small) < 6_000_000 and small.config.hidden_dropout > 0


def test_forward_process_and_pretraining_loss_match_the_formula():
    batch, length, vocab, mask_id, eps = 3, 10, 7, 6, 1e-3
    ids = torch.randint(0, 6, (batch, length), generator=torch.Generator().manual_seed(0))
    noisy, masked, p_mask = forward_process(ids, mask_id, eps, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t = torch.rand(batch, generator=g)
    expected_masked = torch.rand(batch, length, generator=g) < ((1 - eps) * t + eps)[:, None]
    assert torch.equal(masked, expected_masked)
    assert torch.equal(noisy, torch.where(masked, mask_id, ids))
    assert torch.allclose(p_mask, ((1 - eps) * t + eps)[:, None].expand(batch, length))

    logits = torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(2), requires_grad=True)
    total = 0.0
    for b in range(batch):
        for i in range(length):
            if masked[b, i]:
                ce = -torch.log_softmax(logits[b, i].detach(), -1)[ids[b, i]]
                total += float(ce) / float(p_mask[b, i])
    loss = pretraining_loss(logits, ids, masked, p_mask)
    assert loss.item() == pytest.approx(total / (batch * length), rel=1e-5)
    loss.backward()
    assert logits.grad is not None
    nothing = pretraining_loss(logits, ids, torch.zeros_like(masked), p_mask)
    assert nothing.item() == 0.0 and nothing.requires_grad


def test_sft_loss_never_masks_the_prompt_and_divides_by_answer_length():
    batch, length, vocab, mask_id = 2, 8, 7, 6
    ids = torch.randint(0, 6, (batch, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX   # prompt of 3, answer of 5
    labels[1, :5] = IGNORE_INDEX   # prompt of 5, answer of 2 ...
    labels[1, 7] = IGNORE_INDEX    # ... and one padding position
    _, masked, p_mask = forward_process(ids, mask_id, maskable=labels != IGNORE_INDEX,
                                        generator=torch.Generator().manual_seed(3))
    assert not (masked & (labels == IGNORE_INDEX)).any()
    logits = torch.randn(batch, length, vocab, generator=torch.Generator().manual_seed(4))
    answer_lengths = [5, 2]
    total = 0.0
    for b in range(batch):
        for i in range(length):
            if masked[b, i]:
                ce = -torch.log_softmax(logits[b, i], -1)[ids[b, i]]
                total += float(ce) / float(p_mask[b, i]) / answer_lengths[b]
    assert float(sft_loss(logits, labels, masked, p_mask)) == pytest.approx(total / batch, rel=1e-5)
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        sft_loss(logits, labels, torch.ones_like(masked), p_mask)


def test_diffusion_loss_trains_the_model():
    model, tokenizer = build_model("tiny", seed=1)
    model.train()
    ids = torch.tensor([tokenizer.encode("1 + 1 = 2. The answer is 2.")] * 4)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        loss, info = diffusion_loss(model, ids, tokenizer.mask_token_id, labels=labels, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    # masked_fraction: the masked share of the answer tokens, from the same draw of the forward process
    _, info = diffusion_loss(model, ids, tokenizer.mask_token_id, labels=labels, generator=torch.Generator().manual_seed(5))
    _, masked, _ = forward_process(ids, tokenizer.mask_token_id, maskable=labels != IGNORE_INDEX,
                                   generator=torch.Generator().manual_seed(5))
    assert float(info["masked_fraction"]) == pytest.approx(float(masked.sum()) / float((labels != IGNORE_INDEX).sum()))
    pretrain, _ = diffusion_loss(model, ids, tokenizer.mask_token_id, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(pretrain)


# --- the seed's usage guide, as written (import path changed, a tiny model instead of LLaDA-8B) ----

def test_seed_usage_examples_run(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from transformers import AutoModel, AutoTokenizer

    from testtime.diffusion import experiments as experiment_utils
    from testtime.diffusion.constraints import json_format_constraint, math_constraint, no_repeat_ngrams

    built, built_tokenizer = build_model("tiny", seed=0, num_hidden_layers=1)  # one layer: the examples run 9 samplings
    built.save_pretrained(tmp_path / "model")
    built_tokenizer.save_pretrained(tmp_path / "model")

    # 1. Basic usage
    model = AutoModel.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    prompt_text = "The capital of France is"
    prompt_tokens = tokenizer.encode(prompt_text, return_tensors='pt').to(model.device)
    result, logs = generate_with_tta_uncertainty(model=model, prompt=prompt_tokens, steps=64, gen_length=64,
                                                 tta_k=5, seed=42)
    generated_text = tokenizer.decode(result[0], skip_special_tokens=True)
    assert generated_text.startswith(prompt_text)

    # 2. Benchmark comparison
    results = experiment_utils.run_academic_benchmark(model=model, tokenizer=tokenizer, baseline_fn=None,
                                                      experimental_fn=generate_with_tta_uncertainty,
                                                      thresholds=[3, 5, 7], samples=20)
    table = experiment_utils.analyze_icml_results(results)
    assert set(results["methods"]) == {"baseline", "tta_k3", "tta_k5", "tta_k7"}
    assert results["methods"]["tta_k5"]["nfe_per_sample"] == 5 * results["methods"]["baseline"]["nfe_per_sample"]
    assert "| tta_k7 | 7 |" in table and len(results["methods"]["baseline"]["correct"]) == 20

    # Custom constraint functions: the template and the three examples
    def my_constraint_fn(tokens: torch.Tensor) -> torch.Tensor:
        scores = torch.zeros_like(tokens, dtype=torch.float32)
        forbidden_tokens = [123, 456, 789]
        for token_id in forbidden_tokens:
            scores[tokens == token_id] += 1.0
        return scores

    result, logs = generate_with_tta_uncertainty(
        model, prompt_tokens,
        constraint_fn=lambda t: no_repeat_ngrams(t, n=3)
    )
    assert not (result == tokenizer.mask_token_id).any()
    for fn in (my_constraint_fn, lambda t: json_format_constraint(t, tokenizer), lambda t: math_constraint(t, tokenizer)):
        result, logs = generate_with_tta_uncertainty(model, prompt_tokens, steps=32, gen_length=32, constraint_fn=fn)
        assert not (result == tokenizer.mask_token_id).any()

    # Logging and analysis
    result, logs = generate_with_tta_uncertainty(model, prompt_tokens, tta_k=5)
    tta_stats = logs['tta_stats']
    print(f"Avg entropy per step: {tta_stats['avg_entropy_per_step']}")
    print(f"Avg disagreement per step: {tta_stats['avg_disagreement_per_step']}")
    print(f"Remask ratio per step: {tta_stats['remask_ratio_per_step']}")
    print(f"Frozen ratio per step: {tta_stats['frozen_ratio_per_step']}")
    print(f"Total steps: {logs['total_steps']}")
    print(f"NFE (forward passes): {logs['nfe']}")
    assert logs['nfe'] == logs['total_steps'] * 5 == 640

    # Visualize uncertainty evolution (the seed's pyplot code) and the packaged figure
    entropy_history = logs['tta_stats']['avg_entropy_per_step']
    disagreement_history = logs['tta_stats']['avg_disagreement_per_step']
    plt.figure(figsize=(12, 4))
    plt.subplot(1, 2, 1)
    plt.plot(entropy_history)
    plt.title('Average Entropy per Step')
    plt.subplot(1, 2, 2)
    plt.plot(disagreement_history)
    plt.tight_layout()
    plt.show()
    plt.close("all")
    png = plot_uncertainty(logs, tmp_path / "uncertainty.png")
    assert png.read_bytes()[:4] == b"\x89PNG"

    # Performance trade-offs
    for k, pct in ((3, 0.05), (5, 0.1), (10, 0.15)):
        result, logs = generate_with_tta_uncertainty(model, prompt_tokens, tta_k=k, remask_top_pct=pct)
        assert logs["nfe"] == 128 * k


def test_benchmark_takes_prompts_and_answers_and_plugs_into_evaluation(tiny):
    from testtime.evaluation import generate_completions, greedy

    model, tokenizer = tiny
    results = run_academic_benchmark(model, tokenizer, baseline_fn=generate_fast_dllm, thresholds=[2],
                                     prompts=["1 + 1 =", "2 + 2 ="], answers=["2", "4"], steps=16, gen_length=16,
                                     block_length=16, batch_size=1)
    assert results["settings"]["baseline"] == "generate_fast_dllm"
    assert results["methods"]["tta_k2"]["nfe_per_sample"] == 32
    assert "n = 2 problems" in analyze_icml_results(results)
    ids, mask = left_pad([tokenizer.encode("1 + 2 ="), tokenizer.encode("3")], tokenizer.pad_token_id)
    setting = greedy(as_generate_fn(generate, steps=16, block_length=16))
    texts = generate_completions(model, tokenizer, ids, mask, setting, max_new_tokens=16)
    tokens = generate(model, ids, steps=16, gen_length=16, block_length=16, attention_mask=mask)
    eos = [tokenizer.eos_token_id]
    assert texts == [[tokenizer.decode(cut_at_eos(row, eos), skip_special_tokens=True).strip()]
                     for row in tokens[:, ids.shape[1]:].tolist()]


"""testtime.grpo: advantages and loss against hand-computed values, log-probabilities against a
plain forward, rollouts, SFT rows as prompts, and a policy-gradient step that raises a toy reward."""

import math

import pytest
import torch

from datamodules.common import PadCollator, tokenize_prompt_completion
from testtime.errors import UsageError
from testtime.grpo import (
    answer_reward,
    completion_logprobs,
    group_advantages,
    grpo_loss,
    load_reward_fn,
    prompts_from_sft_batch,
    sample_rollout,
)
from testtime.lm import encode_prompt, left_pad
from testtime.tasks import make_problems, sft_example
from testtime.tiny import build_tiny_model
from testtime.tinylora import adapter_config, apply_adapter


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 1])
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)  # group 1: mean 1/2, std (n - 1) sqrt(1/3)
    b = 1 / (0.5 + 1e-4)  # group 3: mean 1/4, std 1/2
    expected = [a, -a, -a, a, 0, 0, 0, 0, -0.25 * b, -0.25 * b, -0.25 * b, 0.75 * b]
    torch.testing.assert_close(group_advantages(rewards, 4), torch.tensor(expected))
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match="do not split into groups of 5"):
        group_advantages(rewards, 5)


LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.9]])
OLD = torch.tensor([[-1.2, -1.9, -0.5], [0.0, -1.2, 0.0]])
ADVANTAGES = torch.tensor([1.5, -0.8])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def test_grpo_loss_by_hand():
    loss, stats = grpo_loss(LOGPS, OLD, ADVANTAGES, MASK, epsilon=0.2)
    # row 0 (A = 1.5): ratios e^0.2 = 1.2214 -> clipped to 1.2; e^-0.1 = 0.9048; 1
    row0 = (1.2 * 1.5 + math.exp(-0.1) * 1.5 + 1.5) / 3
    # row 1 (A = -0.8): e^-0.3 = 0.7408 -> min(0.7408 A, 0.8 A) = 0.8 A (clipped); 1; the third token is masked
    row1 = (0.8 * -0.8 + 1.0 * -0.8) / 2
    assert loss.item() == pytest.approx(-(row0 + row1) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(-0.416210, abs=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 5)
    assert "kl" not in stats


def test_grpo_loss_kl_term_by_the_formula():
    ref = torch.tensor([[-1.1, -1.0, -0.7], [-0.2, -3.0, -1.0]])
    beta, eps = 0.1, 0.2
    loss, stats = grpo_loss(LOGPS, OLD, ADVANTAGES, MASK, ref_logps=ref, beta=beta, epsilon=eps)
    rows, kls = [], []
    for i in range(2):
        terms = []
        for t in range(3):
            if not MASK[i, t]:
                continue
            rho = math.exp(LOGPS[i, t] - OLD[i, t])
            a = ADVANTAGES[i].item()
            surrogate = min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
            d = (ref[i, t] - LOGPS[i, t]).item()
            kl = math.exp(d) - d - 1
            kls.append(kl)
            terms.append(surrogate - beta * kl)
        rows.append(sum(terms) / len(terms))
    assert loss.item() == pytest.approx(-sum(rows) / 2, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(sum(kls) / len(kls), abs=1e-6)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(LOGPS, OLD, ADVANTAGES, MASK, beta=0.1)


def test_on_policy_gradient_is_the_policy_gradient():
    logps = LOGPS.clone().requires_grad_()
    loss, _ = grpo_loss(logps, logps.detach(), ADVANTAGES, MASK)
    loss.backward()
    # d loss / d log pi(o_it) = -A_i / (|o_i| G) on completion tokens, 0 elsewhere
    expected = torch.tensor([[-1.5 / 3 / 2] * 3, [0.8 / 2 / 2, 0.8 / 2 / 2, 0.0]])
    torch.testing.assert_close(logps.grad, expected)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # absolute positions; logits_to_keep
def test_completion_logprobs_match_each_row_alone(family):
    model, tok = build_tiny_model(family)
    prompts = [tok("What is 2 + 3?")["input_ids"], tok("Hi")["input_ids"]]
    completion = tok(" It is 5.")["input_ids"]
    ids, mask = left_pad([p + completion for p in prompts], tok.pad_token_id)
    got = completion_logprobs(model, ids, mask, len(completion), temperature=0.7)
    for row, prompt in enumerate(prompts):
        alone = torch.tensor([prompt + completion])
        logits = model(input_ids=alone).logits[0, len(prompt) - 1:-1] / 0.7
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(got[row], expected, rtol=1e-4, atol=1e-5)


def test_sample_rollout_masks_after_eos_and_scores_every_completion(tokenizer):
    model, tok = build_tiny_model("llama", tokenizer=tokenizer)
    prompts = [encode_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 1 + 1?", "Hi")]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    seen = {}

    def reward(completions, answers, prompts, **_):
        seen.update(answers=answers, prompts=prompts)
        return [float(len(c)) for c in completions]

    torch.manual_seed(0)
    rollout = sample_rollout(model, tok, ids, mask, ["2", "7"], reward, num_generations=4, max_new_tokens=48)
    assert seen["answers"] == ["2"] * 4 + ["7"] * 4 and len(seen["prompts"]) == 8
    assert rollout.input_ids.shape[0] == 8 and torch.equal(rollout.input_ids[::4, :ids.shape[1]], ids)
    completion = rollout.input_ids[:, ids.shape[1]:]
    for row, text, keep in zip(completion.tolist(), rollout.completions, rollout.completion_mask.tolist()):
        end = row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        assert keep == [True] * end + [False] * (len(row) - end)
        assert text == tok.decode(row[:end], skip_special_tokens=True).strip()
    assert any(not all(k) for k in rollout.completion_mask.tolist()), "no completion ended: the mask is untested"
    torch.testing.assert_close(rollout.rewards, torch.tensor([float(len(t)) for t in rollout.completions]))
    torch.testing.assert_close(rollout.advantages, group_advantages(rollout.rewards, 4))
    assert torch.equal(rollout.attention_mask[:, ids.shape[1]:], rollout.completion_mask.long())


def test_prompts_from_sft_rows_are_the_prompts_and_references(tokenizer):
    problems = make_problems(3, seed=0)
    records = [sft_example(p) for p in problems]
    batch = PadCollator(tokenizer.pad_token_id)([tokenize_prompt_completion(tokenizer, r) for r in records])
    prompts, references = prompts_from_sft_batch(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 tokenizer)
    assert prompts == [encode_prompt(tokenizer, r["prompt"]) for r in records]
    assert references == [p.solution for p in problems]
    assert answer_reward(references, [p.answer for p in problems]) == [1.0, 1.0, 1.0]
    two_turns = batch["labels"].clone()
    two_turns[1, 3] = batch["input_ids"][1, 3]  # a labelled token inside the prompt: two labelled spans
    with pytest.raises(ValueError, match="SFT row 1 has several labelled spans"):
        prompts_from_sft_batch(batch["input_ids"], batch["attention_mask"], two_turns, tokenizer)
    assert answer_reward(["The answer is 12."], ["13"]) == [0.0]


def test_load_reward_fn():
    assert load_reward_fn("testtime.grpo.answer_reward") is answer_reward
    assert load_reward_fn(len) is len
    with pytest.raises(UsageError, match="'testtime.grpo.missing' cannot be imported"):
        load_reward_fn("testtime.grpo.missing")


def test_policy_gradient_steps_raise_a_toy_reward(tokenizer):
    """Reward 1 when the first completion token is a digit (or, the control, when it is not): the
    expected reward under the policy is exactly the probability mass of the digits after the prompt."""
    digits = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in ("What is 2 + 3?", "Name a number.")]
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)

    def digit_mass(model) -> float:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits[:, -1].softmax(-1)[:, digits].sum(-1).mean().item()

    def train(want_digit: bool) -> tuple[float, float]:
        base, _ = build_tiny_model("llama", tokenizer=tokenizer)
        model = apply_adapter(base, adapter_config(u=13, weight_tying=0.0)).get_base_model()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.2)
        reward = lambda completions, **_: [float(c[:1].isdigit() == want_digit) for c in completions]  # noqa: E731
        before = digit_mass(model)
        torch.manual_seed(0)
        for _ in range(5):
            rollout = sample_rollout(model, tokenizer, ids, mask, ["", ""], reward, num_generations=16,
                                     max_new_tokens=1)
            logps = completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_length)
            loss, _ = grpo_loss(logps, logps.detach(), rollout.advantages, rollout.completion_mask)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return before, digit_mass(model)

    before, after = train(want_digit=True)
    assert after > before + 0.005, (before, after)
    before, after = train(want_digit=False)
    assert after < before - 0.002, (before, after)  # slower: most completions already earn this reward

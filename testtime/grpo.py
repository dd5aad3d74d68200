"""GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300) as plain functions: verifiable
rewards, group-normalized advantages, per-token log-probabilities and the clipped policy loss.

One step, for each prompt q:

1. `sample_rollout`: sample G completions o_1..o_G from the current policy pi_old at temperature T
   and reward each, r_i = reward_fn(o_i, answer) (default `answer_reward`: 1 if the last number of
   o_i equals the answer, else 0);
2. `group_advantages`: A_i = (r_i - mean(r)) / (std(r) + eps) within the group, shared by every
   token of o_i (a group whose rewards are all equal carries no signal: A = 0);
3. `grpo_loss`:

       loss = -(1/G) sum_i (1/|o_i|) sum_t [ min(rho_it A_i, clip(rho_it, 1 - e, 1 + e) A_i) - beta KL_it ]
       rho_it = pi_theta(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
       KL_it  = exp(ref_it - logp_it) - (ref_it - logp_it) - 1

   with logp, ref the log-probabilities of the policy and the frozen reference (the base without
   adapter) and KL_it the k3 estimator of KL(pi_theta || pi_ref) (DeepSeekMath eq. 4). On the first
   update after sampling pi_theta = pi_old, so rho = 1 and the gradient is the policy gradient
   (1/G) sum_i A_i (1/|o_i|) sum_t grad log pi(o_it); the clip acts only when a rollout is reused
   for more updates (its `old_logps` kept from the first).

Defaults: G = 8, e = 0.2, beta = 0, those of TRL's GRPOTrainer (DeepSeekMath itself sampled 64
completions per question, with beta = 0.04). The normalizations match TRL's (`loss_type="grpo"`,
`scale_rewards="group"`): std with Bessel's correction, eps = 1e-4, the mean over a completion's
tokens before the mean over completions. Per-token log-probabilities use TRL's
`selective_log_softmax`.

A reward function is any callable `reward_fn(completions: list[str], answers: list[str], **kwargs)
-> list[float]` (kwargs: `prompts`, the decoded prompts), the keyword convention of TRL's reward
functions; `load_reward_fn` also takes its dotted import path ("package.module.function").
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from trl.trainer.utils import selective_log_softmax

from testtime.errors import UsageError
from testtime.evaluation import is_correct
from testtime.lm import IGNORE_INDEX, before_eos_mask, cut_at_eos, eos_token_ids

RewardFn = Callable[..., Sequence[float]]


def answer_reward(completions: Sequence[str], answers: Sequence[str], **_) -> list[float]:
    """1.0 where the completion's last number equals the answer (`testtime.evaluation.is_correct`), else 0.0."""
    return [float(is_correct(c, a)) for c, a in zip(completions, answers)]


def load_reward_fn(reward_fn: str | RewardFn) -> RewardFn:
    """A reward callable, or the one a dotted import path names."""
    if callable(reward_fn):
        return reward_fn
    module_name, _, name = str(reward_fn).rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise UsageError(f"reward_fn {reward_fn!r} cannot be imported ({err}); give a dotted path "
                         f"such as 'testtime.grpo.answer_reward'") from None
    if not callable(fn):
        raise UsageError(f"reward_fn {reward_fn!r} is not a callable 'package.module.function' path")
    return fn


def group_advantages(rewards: torch.Tensor, num_generations: int, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + eps) for rewards [n * G], groups contiguous.

    std with Bessel's correction (as TRL); G must be >= 2 (one completion has no group to compare with).
    """
    if num_generations < 2:
        raise ValueError(f"num_generations must be >= 2 (advantages compare completions of a prompt), "
                         f"got {num_generations}")
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.float().view(-1, num_generations)
    advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + eps)
    return advantages.view(-1)


def _accepts(model, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_length: int,
                        temperature: float = 1.0) -> torch.Tensor:
    """log pi(token | prefix) / T-tempered, for the last `completion_length` tokens of each row: [B, C].

    `input_ids` is a left-padded prompt followed by the completion. Positions are counted from each
    row's first real token, as `generate` counts them (absolute-position models would otherwise
    score other positions than they sampled at); only the needed logits are computed where the
    model supports `logits_to_keep`.
    """
    kwargs = {}
    if _accepts(model, "position_ids"):
        position_ids = attention_mask.long().cumsum(-1) - 1
        kwargs["position_ids"] = position_ids.masked_fill(attention_mask == 0, 1)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = completion_length + 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
    logits = logits[:, -completion_length - 1:-1]  # position t predicts token t + 1
    return selective_log_softmax(logits.float(), input_ids[:, -completion_length:], temperature=temperature)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, completion_mask: torch.Tensor,
              ref_logps: torch.Tensor | None = None, beta: float = 0.0,
              epsilon: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The module docstring's loss over [B, C] token log-probabilities; advantages [B].

    Returns `(loss, stats)`; stats (detached): `clip_fraction` (share of completion tokens whose
    ratio is clipped), `kl` (mean KL_it, when beta > 0).
    """
    mask = completion_mask.float()
    advantages = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    tokens = mask.sum().clamp(min=1.0)
    is_clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    stats = {"clip_fraction": (is_clipped.float() * mask).sum().detach() / tokens}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs ref_logps, the log-probabilities of the reference model")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        stats["kl"] = (kl * mask).sum().detach() / tokens
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    return loss, stats


@dataclass
class Rollout:
    """G sampled completions per prompt, scored: what `grpo_loss` needs besides the new log-probs.

    `input_ids` / `attention_mask`: [n * G, P + C] prompt (left-padded) + completion;
    `completion_mask`: [n * G, C], the tokens up to and including each completion's first EOS;
    `old_logps`: the sampling policy's log-probs (set at the first update, for reuse);
    `ref_logps`: the reference model's (only with beta > 0).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    completions: list[str]
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None

    @property
    def completion_length(self) -> int:
        return self.completion_mask.shape[1]


@torch.no_grad()
def sample_rollout(model, tokenizer, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: Sequence[str],
                   reward_fn: RewardFn = answer_reward, num_generations: int = 8, max_new_tokens: int = 64,
                   temperature: float = 1.0) -> Rollout:
    """Steps 1-2 of the module docstring for LEFT-padded prompts [n, P] and their answers.

    Sampling is plain ancestral sampling at `temperature` (top-p 1, no top-k) from torch's global
    RNG. Rows i * G .. i * G + G - 1 belong to prompt i.
    """
    ids = prompt_ids.repeat_interleave(num_generations, dim=0)
    mask = prompt_mask.repeat_interleave(num_generations, dim=0)
    sequences = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                               top_p=1.0, top_k=0, max_new_tokens=max_new_tokens,
                               pad_token_id=tokenizer.pad_token_id)
    completion = sequences[:, ids.shape[1]:]
    eos = eos_token_ids(model, tokenizer)
    completion_mask = before_eos_mask(completion, eos, keep_eos=True)
    texts = [tokenizer.decode(cut_at_eos(row, eos), skip_special_tokens=True).strip() for row in completion.tolist()]
    prompts = tokenizer.batch_decode(prompt_ids, skip_special_tokens=True)
    repeated = [a for a in answers for _ in range(num_generations)]
    rewards = reward_fn(completions=texts, answers=repeated,
                        prompts=[p for p in prompts for _ in range(num_generations)])
    if len(rewards) != len(texts):
        raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(texts)} completions")
    rewards = torch.tensor([float(r) for r in rewards], device=sequences.device)
    return Rollout(input_ids=sequences, attention_mask=torch.cat([mask, completion_mask.long()], dim=1),
                   completion_mask=completion_mask, rewards=rewards,
                   advantages=group_advantages(rewards, num_generations), completions=texts)


def prompts_from_sft_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                           tokenizer) -> tuple[list[list[int]], list[str]]:
    """The prompts and reference completions of right-padded SFT rows (prompt tokens labelled -100).

    GRPO then trains on any prompt/completion data: the prompt is each row's tokens before its
    first label, the reference (what `answer_reward` compares with, through its last number) the
    decoded labelled tokens. A row must hold one prompt and one completion: several labelled spans
    (a multi-turn dialog, packed records) are a ValueError.
    """
    prompts, references = [], []
    for index, (row, row_mask, row_labels) in enumerate(zip(input_ids.tolist(), attention_mask.tolist(),
                                                            labels.tolist())):
        labelled = [i for i, (label, m) in enumerate(zip(row_labels, row_mask)) if label != IGNORE_INDEX and m]
        if not labelled:
            raise ValueError(f"SFT row {index} has no labelled token, so no reference completion for GRPO")
        if labelled[-1] - labelled[0] + 1 != len(labelled):
            raise ValueError(f"SFT row {index} has several labelled spans (a multi-turn dialog or packed records); "
                             f"GRPO needs one prompt and one completion per row")
        prompts.append(row[:labelled[0]])
        references.append(tokenizer.decode([row[i] for i in labelled], skip_special_tokens=True).strip())
    return prompts, references

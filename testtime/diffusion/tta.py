"""Test-time-augmentation (TTA) uncertainty remasking for masked diffusion LMs.

No published method does this; it is the project's own sampler (the seed document
`tta_uncertainty_sampling`), built on LLaDA's sampler (Nie et al. 2025, github.com/ML-GSAI/LLaDA)
and, for taking committed tokens back, on ReMDM's remasking idea (Wang et al. 2025).

Each step runs K = `tta_k` augmented predictions of the sequence as ONE batched forward
([K * B, L]). Pass k samples x0_k = argmax(exp(logits_k) / (-log u)^T_k) (Gumbel-max in float64;
T_k = 0: argmax), with T_k spread evenly over `tta_temperature_range` (`torch.linspace`; K = 1
uses the low end). With `tta_use_dropout` the model's nn.Dropout modules are switched on for that
forward only (everything else stays in eval mode), so the K passes also differ in their dropout
masks; without it they differ only in sampling noise. From the K passes, at each position:

- p_mean = mean_k softmax(logits_k) (float64; MASK excluded);
- consensus = the token most passes sampled (ties: the higher p_mean) - the proposal;
- confidence = p_mean[consensus];
- entropy H = entropy(p_mean) / log(V), in [0, 1) (total predictive uncertainty of the ensemble,
  in units of the uniform distribution's entropy, so it is on the scale of the other terms);
- disagreement D = the fraction of the K passes whose sample differs from the consensus.

A step then (a) sends back to MASK the most uncertain committed tokens and (b) commits masked
positions of the current block as LLaDA does (the most confident first, its scheduled count),
plus as many as were remasked, so the masks left follow LLaDA's schedule and every block ends
full. Only generated tokens committed at an EARLIER step and not frozen may be remasked (earlier
blocks included), at most as many as masks remain after the step (none at a block's last step).
How many: `remask_top_k` per row and step if given, else floor(`remask_top_pct` x eligible).
Which: the highest

    score_j = alpha_entropy * H_j + beta_disagreement * D_j + gamma_violation * V_j - lambda_change * C_j

- H_j, D_j: the entropy and disagreement of the step that committed position j's current token
  (measured while j was still masked). A mask predictor is trained only at masked positions, so
  its output at a visible token says nothing about that token; the uncertainty it had when it
  chose the token does (ReMDM's confidence schedule keeps commit-time confidence the same way).
  A remasked token gets fresh values when it is committed again, now with more context.
- V_j >= 0: `constraint_fn(tokens)[:, j]`, called once per step on the current full sequence with
  every masked position (later blocks too) filled by its consensus proposal, prompt included
  ([B, L] ids -> float32 [B, L]); 0 without a constraint_fn. See `testtime.diffusion.constraints`.
- C_j in [0, 1]: the change rate, the number of times j's token flipped (was committed again to a
  different token than before) within the last `freeze_window` steps, / `freeze_window`. The seed
  calls lambda_change a change *penalty* that prevents oscillation: a token that just changed is
  made LESS likely to be taken back again, hence the minus sign.

Freeze window against oscillation: a position that flipped >= `freeze_threshold` times within the
last `freeze_window` steps cannot be remasked for the next `freeze_duration` steps (its flip
history then starts afresh).

With tta_k = 1, tta_temperature_range = (0, 0) and remask_top_k = 0 this is exactly
`testtime.diffusion.sampling.generate` (greedy, low confidence). NFE = steps x tta_k.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from testtime.diffusion.sampling import (
    block_schedule,
    check_mask_id,
    forward_logits,
    init_sequence,
    make_generator,
    num_transfer_tokens,
    resolve_mask_id,
    select_top,
)
from testtime.lm import entropy, seeded_rng

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
ConstraintFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class TTAPrediction:
    """What K augmented passes say about positions [start, start + n): tensors [B, n], float64 for the
    scores (samples: [K, B, n], each pass's sampled token)."""

    consensus: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor
    disagreement: torch.Tensor
    samples: torch.Tensor


def tta_temperatures(tta_k: int, tta_temperature_range: Sequence[float]) -> list[float]:
    """The K sampling temperatures, evenly spread over the range (K = 1: its low end)."""
    low, high = tta_temperature_range
    return torch.linspace(low, high, tta_k, dtype=torch.float64).tolist() if tta_k > 1 else [float(low)]


@contextmanager
def augmentation_mode(model: nn.Module, use_dropout: bool):
    """The model in eval mode, with its nn.Dropout modules on when `use_dropout`; every module's mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    if use_dropout:
        dropouts = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES) and m.p > 0]
        if not dropouts:
            raise ValueError("tta_use_dropout=True but the model has no nn.Dropout module with p > 0, so the K "
                             "passes would be identical; build it with dropout (e.g. hidden_dropout=0.1)")
        for module in dropouts:
            module.train()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@torch.no_grad()
def tta_passes(model, x: torch.Tensor, attention_mask: torch.Tensor | None, start: int, length: int,
               temperatures: Sequence[float], mask_id: int, generator: torch.Generator | None) -> TTAPrediction:
    """K = len(temperatures) augmented predictions of positions [start, start + length), one batched forward.

    Rows of the batched call are pass-major (row k * B + b is pass k of sequence b). The noise of
    the passes with T > 0 is one draw of shape [K_hot, B, length, V]; on the CPU that is the same
    numbers as K_hot draws of [B, length, V] one after another from the same generator.
    """
    k, batch = len(temperatures), x.shape[0]
    mask = None if attention_mask is None else attention_mask.repeat(k, 1)
    logits = forward_logits(model, x.repeat(k, 1), mask)
    check_mask_id(logits, mask_id)
    logits = logits[:, start:start + length].double().reshape(k, batch, length, -1)
    logits[..., mask_id] = float("-inf")
    samples = logits.argmax(-1)
    hot = [i for i, t in enumerate(temperatures) if t > 0]
    if hot:
        t = torch.tensor([temperatures[i] for i in hot], dtype=torch.float64, device=x.device)[:, None, None, None]
        u = torch.rand((len(hot),) + logits.shape[1:], dtype=torch.float64, device=x.device, generator=generator)
        samples[hot] = (logits[hot].exp() / (-torch.log(u)) ** t).argmax(-1)
    p_mean = F.softmax(logits, dim=-1).mean(0)
    votes = torch.zeros_like(p_mean).scatter_add_(-1, samples.permute(1, 2, 0), torch.ones_like(p_mean[..., :k]))
    consensus = (votes + p_mean).argmax(-1)  # p_mean < 1 only breaks ties between vote counts
    agree = votes.gather(-1, consensus[..., None]).squeeze(-1) / k
    vocab = p_mean.shape[-1]
    h = entropy(p_mean.log().clamp_min(-1e4)) / math.log(vocab)  # clamp: log 0 would make 0 * -inf
    return TTAPrediction(consensus=consensus, confidence=p_mean.gather(-1, consensus[..., None]).squeeze(-1),
                         entropy=h.to(torch.float64), disagreement=1.0 - agree, samples=samples)


def check_constraint_scores(scores, shape: tuple[int, int]) -> torch.Tensor:
    """`scores` if it is a float32 tensor of `shape` with finite values >= 0; else a ValueError saying what came back."""
    expected = (f"constraint_fn must return a torch.float32 tensor of shape [batch, seq_len] = "
                f"[{shape[0]}, {shape[1]}] with finite scores >= 0 (higher = more violation)")
    if not torch.is_tensor(scores):
        raise ValueError(f"{expected}; it returned a {type(scores).__name__}")
    if tuple(scores.shape) != tuple(shape):
        raise ValueError(f"{expected}; it returned shape {list(scores.shape)}")
    if scores.dtype != torch.float32:
        raise ValueError(f"{expected}; it returned dtype {scores.dtype}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{expected}; it returned non-finite scores")
    if bool((scores < 0).any()):
        raise ValueError(f"{expected}; it returned negative scores (min {scores.min().item():g})")
    return scores


def _check_args(tta_k, tta_temperature_range, weights: dict, remask_top_k, remask_top_pct, freeze_window,
                freeze_threshold, freeze_duration, constraint_fn) -> None:
    if not isinstance(tta_k, int) or tta_k < 1:
        raise ValueError(f"tta_k must be a positive integer, got {tta_k!r}")
    if len(tta_temperature_range) != 2 or not 0 <= tta_temperature_range[0] <= tta_temperature_range[1]:
        raise ValueError(f"tta_temperature_range must be (low, high) with 0 <= low <= high, got {tta_temperature_range!r}")
    for name, value in weights.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if remask_top_k is not None and (not isinstance(remask_top_k, int) or remask_top_k < 0):
        raise ValueError(f"remask_top_k must be None or an integer >= 0, got {remask_top_k!r}")
    if not 0 <= remask_top_pct <= 1:
        raise ValueError(f"remask_top_pct must be in [0, 1], got {remask_top_pct!r}")
    for name, value, low in (("freeze_window", freeze_window, 1), ("freeze_threshold", freeze_threshold, 1),
                             ("freeze_duration", freeze_duration, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if constraint_fn is not None and not callable(constraint_fn):
        raise ValueError(f"constraint_fn must be callable or None, got {type(constraint_fn).__name__}")


@torch.no_grad()
def generate_with_tta_uncertainty(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                                  tta_k: int = 5, seed: int | None = None,
                                  tta_temperature_range: Sequence[float] = (0.0, 0.3), tta_use_dropout: bool = False,
                                  alpha_entropy: float = 1.0, beta_disagreement: float = 0.5,
                                  gamma_violation: float = 0.3, lambda_change: float = 0.2,
                                  remask_top_k: int | None = None, remask_top_pct: float = 0.1,
                                  freeze_window: int = 5, freeze_threshold: int = 3, freeze_duration: int = 3,
                                  constraint_fn: ConstraintFn | None = None, block_length: int = 32,
                                  mask_id: int | None = None, attention_mask: torch.Tensor | None = None):
    """TTA uncertainty sampling (the module docstring defines every term): `(tokens, logs)`.

    tokens: [B, P + gen_length]. logs: `tta_stats` with per-step lists `avg_entropy_per_step`
    and `avg_disagreement_per_step` (over the block's masked positions at the step, the ones being
    predicted; 0 when there are none), `remask_ratio_per_step` and `frozen_ratio_per_step` (remasked /
    frozen positions / gen_length); `total_steps` (= steps); `nfe` (= steps x tta_k); `tta_k`;
    `temperatures`; `num_remasked` and `num_freezes` (totals over the batch).
    `seed` makes the output reproducible (noise and dropout) without touching the caller's RNG;
    without it, torch's global RNG is used. `prompt` may be left-padded with `attention_mask`.
    """
    _check_args(tta_k, tta_temperature_range, dict(alpha_entropy=alpha_entropy, beta_disagreement=beta_disagreement,
                                                   gamma_violation=gamma_violation, lambda_change=lambda_change),
                remask_top_k, remask_top_pct, freeze_window, freeze_threshold, freeze_duration, constraint_fn)
    num_blocks, block_steps = block_schedule(gen_length, block_length, steps)
    mask_id = resolve_mask_id(model, mask_id)
    temperatures = tta_temperatures(tta_k, tta_temperature_range)
    device = prompt.device
    x, full_mask = init_sequence(prompt, attention_mask, gen_length, mask_id)
    start, (batch, length) = prompt.shape[1], x.shape
    gen = x[:, start:]  # a view: writing to it writes to x
    position = torch.arange(gen_length, device=device)
    commit_entropy = torch.zeros(batch, gen_length, dtype=torch.float64, device=device)
    commit_disagreement = torch.zeros_like(commit_entropy)
    last_token = torch.full_like(gen, mask_id)  # the last token committed at each position (MASK: none yet)
    flips = torch.zeros(freeze_window, batch, gen_length, dtype=torch.bool, device=device)  # ring over steps
    freeze_left = torch.zeros_like(gen)
    stats = {"avg_entropy_per_step": [], "avg_disagreement_per_step": [], "remask_ratio_per_step": [],
             "frozen_ratio_per_step": []}
    num_remasked = num_freezes = step = 0

    with seeded_rng(seed, device), augmentation_mode(model, tta_use_dropout):
        generator = make_generator(device, seed, None)
        for block in range(num_blocks):
            end = (block + 1) * block_length
            schedule = num_transfer_tokens((gen[:, block * block_length:end] == mask_id).sum(-1), block_steps)
            for i in range(block_steps):
                pred = tta_passes(model, x, full_mask, start, gen_length, temperatures, mask_id, generator)
                unfilled = gen == mask_id
                masked = unfilled & (position < end)  # the candidates: masked positions of the block so far
                frozen = freeze_left > 0
                n_masked = masked.sum().clamp_min(1)
                stats["avg_entropy_per_step"].append(float((pred.entropy * masked).sum() / n_masked))
                stats["avg_disagreement_per_step"].append(float((pred.disagreement * masked).sum() / n_masked))
                stats["frozen_ratio_per_step"].append(float(frozen.sum()) / (batch * gen_length))

                violation = 0.0
                if constraint_fn is not None:
                    filled = x.clone()
                    filled[:, start:] = torch.where(unfilled, pred.consensus, gen)
                    scores = check_constraint_scores(constraint_fn(filled), (batch, length))
                    violation = scores.to(device=device, dtype=torch.float64)[:, start:]

                # (a) take back the most uncertain committed tokens, at most as many as masks remain after the step
                eligible = ~unfilled & ~frozen
                if remask_top_k is not None:
                    wanted = torch.full((batch,), remask_top_k, device=device)
                else:
                    wanted = torch.floor(remask_top_pct * eligible.sum(-1).double() + 1e-9).long()
                n_remask = torch.minimum(wanted, schedule[:, i + 1:].sum(-1))
                change = flips.sum(0).double() / freeze_window
                score = (alpha_entropy * commit_entropy + beta_disagreement * commit_disagreement
                         + gamma_violation * violation - lambda_change * change)
                remask = select_top(score.masked_fill(~eligible, float("-inf")), n_remask)

                # (b) commit like LLaDA (most confident masked positions of the block), plus the remasked count
                commit = select_top(pred.confidence.masked_fill(~masked, float("-inf")),
                                    schedule[:, i] + remask.sum(-1))
                flips[step % freeze_window] = commit & (last_token != mask_id) & (last_token != pred.consensus)
                gen[commit] = pred.consensus[commit]
                last_token[commit] = pred.consensus[commit]
                commit_entropy[commit] = pred.entropy[commit]
                commit_disagreement[commit] = pred.disagreement[commit]
                gen[remask] = mask_id

                # freeze positions that keep flipping
                freeze_left = (freeze_left - 1).clamp_min(0)
                new_freeze = flips.sum(0) >= freeze_threshold
                if freeze_duration > 0 and bool(new_freeze.any()):
                    freeze_left[new_freeze] = freeze_duration
                    flips[:, new_freeze] = False
                    num_freezes += int(new_freeze.sum())

                stats["remask_ratio_per_step"].append(float(remask.sum()) / (batch * gen_length))
                num_remasked += int(remask.sum())
                step += 1

    logs = {"tta_stats": stats, "total_steps": steps, "nfe": steps * tta_k, "tta_k": tta_k,
            "temperatures": temperatures, "num_remasked": num_remasked, "num_freezes": num_freezes}
    return x, logs

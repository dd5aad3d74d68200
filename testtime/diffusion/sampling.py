"""Samplers for masked diffusion LMs: LLaDA's baseline, random remasking, Fast-dLLM and ReMDM.

All four share one signature and one picture. The sequence starts as `[prompt | gen_length x
MASK]`; the generation is cut into `gen_length / block_length` blocks, filled left to right, each
in `steps / num_blocks` steps. Each step runs the model on the whole sequence and, at every
masked position, proposes a token x0 with a confidence; the sampler then *commits* some of the
masked positions of the current block to their proposals.

- `generate` (LLaDA: Nie et al. 2025, "Large Language Diffusion Models",
  github.com/ML-GSAI/LLaDA, `generate.py`): a block with n masks commits `n // s` tokens per step,
  the first `n % s` steps one more (s = steps per block), choosing the most confident masked
  positions of the block. Committed tokens are never revised. NFE = steps.
  - x0 = argmax(exp(logits) / (-log u)^T), u ~ U(0, 1) in float64 (Gumbel-max sampling at
    temperature T; float64 because low-precision Gumbel noise hurts masked diffusion models,
    arXiv:2409.02908); T = 0 is a plain argmax.
  - confidence: `remasking="low_confidence"`: softmax(logits)[x0] (float64);
    `remasking="random"`: u ~ U(0, 1) (the random-order baseline, `generate_random_remasking`).
  - classifier-free guidance (`cfg_scale` s > 0): logits = un + (s + 1) (cond - un), where `un`
    is the model run with the prompt replaced by MASK (one batched call; NFE 2 per step).
- `generate_fast_dllm` (Fast-dLLM: Wu et al. 2025, "Fast-dLLM: Training-free Acceleration of
  Diffusion LLM by Enabling KV Cache and Parallel Decoding", github.com/NVlabs/Fast-dLLM):
  confidence-aware parallel decoding. Each step commits EVERY masked token of the block whose
  confidence is >= `threshold` (0.9), and at least LLaDA's scheduled count for that step (at
  least one); the next block starts as soon as this one has no mask. So NFE <= steps and is
  returned. With steps == gen_length (one token per step, Fast-dLLM's setting) the floor is
  exactly Fast-dLLM's "at least one". Its prefix / dual KV cache is NOT implemented: it needs
  cache support inside the model, changes the outputs slightly (an approximation), and brings
  nothing to models as small as ours.
- `generate_remdm` (ReMDM: Wang et al. 2025, "Remasking Discrete Diffusion Models with
  Inference-Time Scaling", github.com/kuleshov-group/remdm), the max-capped schedule on LLaDA's
  count schedule: each step, every generated token committed at an earlier step returns to MASK
  independently with probability sigma = `eta_cap` (0.008, the paper's cap), while the step
  commits its scheduled count PLUS the number remasked, so the block still ends with no mask.
  ReMDM's sigma_t <= (1 - alpha_s) / alpha_t (a remasked token must be re-decodable) becomes: at
  most as many remasks as masks left after the step (a random subset is kept when more are
  drawn), hence none at a block's last step. Earlier blocks are included (that is where early
  mistakes live). NFE = steps, the same as `generate`: like is compared with like.

Shared conventions:
- `prompt` [B, P] may be LEFT-padded, with `attention_mask` [B, P] (1 = token, 0 = padding). The
  model then gets the attention mask of the whole sequence (prompt mask + ones); without padding
  it is called as `model(x)`, so models without an `attention_mask` argument work. Padding does
  not change a row's result as far as the model hides padding (at T = 0 exactly; with noise, the
  random numbers are drawn for the whole batch).
- `mask_id=None` means `model.config.mask_token_id`, else LLaDA-8B's 126336. The MASK token is
  never proposed (its logit is set to -inf before sampling). LLaDA's code does not do this; a
  trained mask predictor gives MASK next to no probability (it is never a target), so the result
  is the same there, and an untrained one cannot leave masks behind.
- Only positions after the prompt ever change; the prompt comes back as it went in.
- Randomness: `generator` (a torch.Generator on the model's device), or `seed` (a fresh
  generator), else torch's global RNG (what `testtime.evaluation` seeds inside a fork_rng).
- Returns the tokens [B, P + gen_length]; with `return_nfe=True`, `(tokens, nfe)`, nfe = number of
  network evaluations per sequence (2 per step with classifier-free guidance).
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch
import torch.nn.functional as F

LLADA_MASK_ID = 126336  # [MASK] of GSAI-ML/LLaDA-8B-Base / -Instruct
REMASKING = ("low_confidence", "random")


# --- pieces every sampler shares --------------------------------------------------------------

def resolve_mask_id(model, mask_id: int | None = None) -> int:
    """`mask_id`, else `model.config.mask_token_id`, else LLaDA's 126336; checked against the
    config's vocab_size when there is one (an id outside it would fail inside the embedding)."""
    config = getattr(model, "config", None)
    if mask_id is None:
        mask_id = getattr(config, "mask_token_id", None)
    mask_id = int(mask_id) if mask_id is not None else LLADA_MASK_ID
    vocab_size = getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} is outside the model's vocabulary (config.vocab_size={vocab_size}); "
                         "pass the model's MASK id (model.config.mask_token_id)")
    return mask_id


def num_transfer_tokens(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step, [B, steps]: `n // steps` each, the first `n % steps` one more."""
    base = masked_count[:, None] // steps
    remainder = masked_count[:, None] % steps
    return base + (torch.arange(steps, device=masked_count.device) < remainder).long()


def block_schedule(gen_length: int, block_length: int, steps: int) -> tuple[int, int]:
    """(num_blocks, steps per block), validated."""
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks "
                         f"(gen_length / block_length = {num_blocks})")
    return num_blocks, steps // num_blocks


def select_top(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool [B, N]: each row's k[b] highest finite entries (ties: the leftmost first)."""
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < k[:, None]) & torch.isfinite(confidence)


def make_generator(device: torch.device, seed: int | None, generator: torch.Generator | None):
    """The generator to draw from: `generator`, else a fresh one seeded with `seed`, else None (global RNG)."""
    if generator is not None and seed is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        return torch.Generator(device=device).manual_seed(int(seed))
    return generator


def init_sequence(prompt: torch.Tensor, attention_mask: torch.Tensor | None, gen_length: int,
                  mask_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(x, full_attention_mask)`: x = [prompt | MASK * gen_length]; the mask is None without padding."""
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be [batch, prompt_length] token ids, got shape {tuple(prompt.shape)}")
    batch, length = prompt.shape
    x = torch.full((batch, length + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :length] = prompt
    if attention_mask is None or bool(attention_mask.all()):
        return x, None
    if attention_mask.shape != prompt.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt {tuple(prompt.shape)}")
    keep = attention_mask.long()
    if bool((keep[:, 1:] < keep[:, :-1]).any()):
        raise ValueError("attention_mask must be LEFT-padded (zeros before the tokens, e.g. testtime.lm.left_pad): "
                         "the generation follows the prompt's last column")
    return x, torch.cat([keep, keep.new_ones(batch, gen_length)], dim=1)


def forward_logits(model, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`model(x).logits`, with the attention mask only when there is padding; shape checked."""
    out = model(x) if attention_mask is None else model(x, attention_mask=attention_mask)
    logits = getattr(out, "logits", None)
    if logits is None or logits.dim() != 3 or logits.shape[:2] != x.shape:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(f"the model must return an object with .logits of shape [batch, length, vocab] = "
                         f"[{x.shape[0]}, {x.shape[1]}, V]; got {shape}")
    return logits


def guided_logits(model, x: torch.Tensor, attention_mask: torch.Tensor | None, prompt_length: int,
                  cfg_scale: float, mask_id: int) -> torch.Tensor:
    """Logits of one step; with `cfg_scale` s > 0, un + (s + 1)(cond - un), the prompt masked in `un`."""
    if cfg_scale <= 0:
        return forward_logits(model, x, attention_mask)
    un_x = x.clone()
    prompt = un_x[:, :prompt_length]
    real = attention_mask[:, :prompt_length].bool() if attention_mask is not None else torch.ones_like(prompt, dtype=torch.bool)
    prompt[real] = mask_id
    both_mask = None if attention_mask is None else attention_mask.repeat(2, 1)
    cond, un = forward_logits(model, torch.cat([x, un_x]), both_mask).chunk(2)
    return un + (cfg_scale + 1) * (cond - un)


def propose(logits: torch.Tensor, temperature: float, remasking: str, mask_id: int,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x0, confidence)` at every position of `logits` [B, N, V], float64.

    x0 = argmax(exp(logits) / (-log u)^T) (T = 0: argmax(logits)); confidence = softmax(logits)[x0]
    ("low_confidence") or u ~ U(0, 1) ("random"). MASK is never proposed.
    """
    logits = logits.double()
    if mask_id < logits.shape[-1]:
        logits[..., mask_id] = float("-inf")
    if temperature > 0:
        u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
        x0 = (logits.exp() / (-torch.log(u)) ** temperature).argmax(-1)
    else:
        x0 = logits.argmax(-1)
    if remasking == "low_confidence":
        confidence = F.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
    else:
        confidence = torch.rand(x0.shape, dtype=torch.float64, device=x0.device, generator=generator)
    return x0, confidence


def check_sampling_args(temperature: float, cfg_scale: float, remasking: str) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not cfg_scale >= 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {REMASKING}, got {remasking!r}")


def check_mask_id(logits: torch.Tensor, mask_id: int) -> None:
    if not 0 <= mask_id < logits.shape[-1]:
        raise ValueError(f"mask_id={mask_id} is outside the model's vocabulary of {logits.shape[-1]} logits; "
                         "pass the model's MASK id (model.config.mask_token_id)")


def prepare(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id,
            attention_mask, seed, generator):
    """What every sampler starts from, its arguments checked: `(num_blocks, block_steps, mask_id,
    generator, x, full_attention_mask)` with x = [prompt | MASK * gen_length]."""
    check_sampling_args(temperature, cfg_scale, remasking)
    num_blocks, block_steps = block_schedule(gen_length, block_length, steps)
    mask_id = resolve_mask_id(model, mask_id)
    generator = make_generator(prompt.device, seed, generator)
    return (num_blocks, block_steps, mask_id, generator) + init_sequence(prompt, attention_mask, gen_length, mask_id)


def predict_step(model, x, full_mask, start: int, cfg_scale: float, mask_id: int, temperature: float,
                 remasking: str, generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One step's `(x0, confidence)` at each generated position, and its NFE (2 with guidance)."""
    logits = guided_logits(model, x, full_mask, start, cfg_scale, mask_id)
    check_mask_id(logits, mask_id)
    x0, confidence = propose(logits[:, start:], temperature, remasking, mask_id, generator)
    return x0, confidence, 2 if cfg_scale > 0 else 1


def _finish(x: torch.Tensor, nfe: int, return_nfe: bool):
    return (x, nfe) if return_nfe else x


# --- the samplers -------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128, block_length: int = 32,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
             mask_id: int | None = None, attention_mask: torch.Tensor | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, return_nfe: bool = False):
    """LLaDA's semi-autoregressive sampler (the module docstring says exactly what it does)."""
    num_blocks, block_steps, mask_id, generator, x, full_mask = prepare(
        model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id, attention_mask,
        seed, generator)
    start = prompt.shape[1]
    gen = x[:, start:]  # a view: writing to it writes to x
    position = torch.arange(gen_length, device=x.device)
    nfe = 0
    for block in range(num_blocks):
        end = (block + 1) * block_length
        schedule = num_transfer_tokens((gen[:, block * block_length:end] == mask_id).sum(-1), block_steps)
        for i in range(block_steps):
            x0, confidence, cost = predict_step(model, x, full_mask, start, cfg_scale, mask_id, temperature,
                                                remasking, generator)
            nfe += cost
            candidates = (gen == mask_id) & (position < end)
            commit = select_top(confidence.masked_fill(~candidates, float("-inf")), schedule[:, i])
            gen[commit] = x0[commit]
    return _finish(x, nfe, return_nfe)


def generate_random_remasking(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                              block_length: int = 32, temperature: float = 0.0, cfg_scale: float = 0.0,
                              remasking: str = "random", mask_id: int | None = None,
                              attention_mask: torch.Tensor | None = None, seed: int | None = None,
                              generator: torch.Generator | None = None, return_nfe: bool = False):
    """LLaDA's sampler committing masked positions in random order (`generate(remasking="random")`)."""
    return generate(model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id,
                    attention_mask, seed, generator, return_nfe)


@torch.no_grad()
def generate_fast_dllm(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128, block_length: int = 32,
                       temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
                       mask_id: int | None = None, attention_mask: torch.Tensor | None = None,
                       seed: int | None = None, generator: torch.Generator | None = None,
                       return_nfe: bool = False, threshold: float = 0.9):
    """Fast-dLLM's threshold parallel decoding: commit every confident (>= threshold) masked token.

    Each step commits max(LLaDA's count for the step, 1) tokens, plus any other masked token of the
    block whose confidence reaches `threshold`; a block ends when it has no mask. NFE <= steps; it is
    the number of steps the batch ran (a batch runs until its slowest row has filled the block).
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    num_blocks, block_steps, mask_id, generator, x, full_mask = prepare(
        model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id, attention_mask,
        seed, generator)
    start = prompt.shape[1]
    gen = x[:, start:]
    position = torch.arange(gen_length, device=x.device)
    nfe = 0
    for block in range(num_blocks):
        end = (block + 1) * block_length
        schedule = num_transfer_tokens((gen[:, block * block_length:end] == mask_id).sum(-1), block_steps)
        i = 0
        while bool((gen[:, :end] == mask_id).any()):
            x0, confidence, cost = predict_step(model, x, full_mask, start, cfg_scale, mask_id, temperature,
                                                remasking, generator)
            nfe += cost
            confidence = confidence.masked_fill(~((gen == mask_id) & (position < end)), float("-inf"))
            # the floor sums to the block's mask count, so the block is full after block_steps steps
            floor = schedule[:, i].clamp_min(1)
            confident = (confidence >= threshold).sum(-1)
            commit = select_top(confidence, torch.maximum(floor, confident))
            gen[commit] = x0[commit]
            i += 1
    return _finish(x, nfe, return_nfe)


@torch.no_grad()
def generate_remdm(model, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128, block_length: int = 32,
                   temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
                   mask_id: int | None = None, attention_mask: torch.Tensor | None = None, seed: int | None = None,
                   generator: torch.Generator | None = None, return_nfe: bool = False, eta_cap: float = 0.008):
    """ReMDM-cap on LLaDA's schedule: committed tokens return to MASK with probability `eta_cap`.

    Per step: draw u ~ U(0, 1) per generated position; the tokens committed before this step (up
    to the current block's end) with u < eta_cap are remasked, at most as many as masks remain
    after the step (the lowest u kept); the step commits its scheduled count plus that number.
    NFE = steps.
    """
    if not 0.0 <= eta_cap <= 1.0:
        raise ValueError(f"eta_cap must be in [0, 1], got {eta_cap}")
    num_blocks, block_steps, mask_id, generator, x, full_mask = prepare(
        model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id, attention_mask,
        seed, generator)
    start = prompt.shape[1]
    gen = x[:, start:]
    position = torch.arange(gen_length, device=x.device)
    nfe = 0
    for block in range(num_blocks):
        end = (block + 1) * block_length
        schedule = num_transfer_tokens((gen[:, block * block_length:end] == mask_id).sum(-1), block_steps)
        for i in range(block_steps):
            x0, confidence, cost = predict_step(model, x, full_mask, start, cfg_scale, mask_id, temperature,
                                                remasking, generator)
            nfe += cost
            in_scope = position < end
            masked = gen == mask_id
            u = torch.rand(gen.shape, dtype=torch.float64, device=x.device, generator=generator)
            drawn = ~masked & in_scope & (u < eta_cap)
            remask = select_top((-u).masked_fill(~drawn, float("-inf")), schedule[:, i + 1:].sum(-1))
            commit = select_top(confidence.masked_fill(~(masked & in_scope), float("-inf")),
                                schedule[:, i] + remask.sum(-1))
            gen[commit] = x0[commit]
            gen[remask] = mask_id
    return _finish(x, nfe, return_nfe)


SAMPLERS: dict[str, Callable] = {"llada": generate, "random": generate_random_remasking,
                                 "fast_dllm": generate_fast_dllm, "remdm": generate_remdm}


def as_generate_fn(sampler: Callable = generate, **sampler_kwargs) -> Callable:
    """A sampler in `testtime.evaluation`'s contract: `fn(model, input_ids, attention_mask, **generate_kwargs)`.

    `max_new_tokens` becomes `gen_length` (unless `sampler_kwargs` sets it); the other generate
    kwargs (`do_sample`, `temperature`, `top_p`, `pad_token_id`, ...) are not used: the sampler's own
    arguments (`sampler_kwargs`) decide. A sampler returning `(tokens, logs)` gives its tokens.
    """
    accepted = set(inspect.signature(sampler).parameters)

    @functools.wraps(sampler)
    def generate_fn(model, input_ids, attention_mask, max_new_tokens=None, **_generate_kwargs):
        kwargs = dict(sampler_kwargs)
        if max_new_tokens is not None and "gen_length" not in kwargs:
            kwargs["gen_length"] = int(max_new_tokens)
        if "attention_mask" in accepted:
            kwargs["attention_mask"] = attention_mask
        out = sampler(model, input_ids, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return generate_fn

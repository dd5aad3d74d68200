"""Head importance scores, each a [num_layers, num_heads] float tensor where HIGHER = MORE IMPORTANT.

- `gradient_importance`: Michel et al. 2019, "Are Sixteen Heads Really Better than One?"
  (github.com/pmichel31415/are-16-heads-really-better-than-1): the sensitivity of the loss to
  each head's gate, I_h = sum over batches |dL_b / dg_h| / (number of tokens), where L_b is
  the batch's summed next-token cross-entropy (so the gradient is summed over its tokens, and
  the absolute value is taken per batch, as in the original code); then each layer's row is
  divided by its L2 norm (their `normalize_scores_by_layer`, exponent 2).
- `attention_entropy`: the mean entropy of each head's attention distribution over its keys
  (optionally divided by log(number of visible keys), so 1 = uniform). It needs the attention
  probabilities, which SDPA/FlashAttention never materialise: the scoring passes switch the
  model to eager attention (`output_attentions=True`) and back. For importance the entropy is
  negated: diffuse (high-entropy) heads rank lowest and are pruned first, the seed's rule.
- `magnitude_importance`: the Frobenius norm of each head's weights: its q rows, its KV head's
  k and v rows, and its columns of the output projection (biases excluded).
- `random_importance`: uniform noise from a seeded generator, the baseline every method must beat.

`head_importance(model, batches, method)` dispatches. Batches are dicts with `input_ids`,
`attention_mask` and (optional) `labels` (default: input_ids with padding set to IGNORE_INDEX).
Scoring runs the model in eval mode (no dropout) and restores its mode afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from testtime.heads.gates import HeadGates, attach_head_gates, attached_gates, head_layout, head_rows, in_dim, \
    output_projections
from testtime.lm import IGNORE_INDEX, next_token_loss

METHODS = ("gradient", "entropy", "magnitude", "random")


def _batches(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]):
    """Each batch on the model's device, with labels (input_ids with padding ignored if absent)."""
    device = next(model.parameters()).device
    for batch in batches:
        input_ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        labels = batch.get("labels")
        labels = input_ids.masked_fill(mask == 0, IGNORE_INDEX) if labels is None else labels.to(device)
        yield input_ids, mask, labels


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def gates_in_force(model: nn.Module, gates: HeadGates | None):
    """Context: the given gates, else those attached to the model, else temporary fixed gates at 1
    (detached on exit)."""
    gates = gates or attached_gates(model)
    if gates is not None:
        yield gates
        return
    gates = attach_head_gates(model, mode="fixed")
    try:
        yield gates
    finally:
        gates.detach()


def gradient_importance(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                        gates: HeadGates | None = None, normalize: bool = True) -> torch.Tensor:
    """Michel et al.'s importance |dL/dg| at the current gates (see the module docstring).

    The gradient is taken with respect to a leaf copy of the gates in force (an override if one is
    set, e.g. by iterative pruning, else `gates.values`, which in hard-concrete mode is the
    deterministic gate; all ones with no gates), through
    `torch.autograd.grad`, so no `.grad` of the model or of learned gates is touched.
    Returns float32 [L, H] on the CPU.
    """
    with gates_in_force(model, gates) as gates, _eval_mode(model), torch.enable_grad():
        leaf = gates.current().detach().clone().float().requires_grad_(True)
        total = torch.zeros_like(leaf)
        tokens = 0
        with gates.overridden(leaf):
            for input_ids, mask, labels in _batches(model, batches):
                count = int((labels[:, 1:] != IGNORE_INDEX).sum())
                if count == 0:
                    continue
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                loss = next_token_loss(logits, labels) * count  # summed over the batch's tokens
                (grad,) = torch.autograd.grad(loss, leaf)
                total += grad.abs()
                tokens += count
    if tokens == 0:
        raise ValueError("gradient_importance: the batches hold no labelled token (all labels are IGNORE_INDEX)")
    importance = total / tokens
    if normalize:
        importance = importance / (importance.norm(dim=-1, keepdim=True) + 1e-20)
    return importance.detach().cpu()


def attention_entropy(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]],
                      normalized: bool = True) -> torch.Tensor:
    """[L, H] mean entropy (nats) of each head's attention over keys, averaged over real query tokens.

    normalized: divide each query's entropy by log(number of keys it sees), so 0 = one key and
    1 = uniform; queries seeing a single key are then left out (their entropy is 0 / 0). The
    number of visible keys is the causal count of unpadded tokens up to the query (a sliding
    window shorter than the batch would see fewer; the scoring batches are assumed shorter).
    Gates of earlier layers change later layers' inputs and so their entropy; a head's own gate
    acts after its attention and does not.
    """
    layout = head_layout(model)
    previous = model.config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    total = torch.zeros(layout.num_layers, layout.num_heads, dtype=torch.float64)
    count = 0
    try:
        with _eval_mode(model), torch.no_grad():
            for input_ids, mask, _ in _batches(model, batches):
                out = model(input_ids=input_ids, attention_mask=mask, output_attentions=True)
                visible = mask.cumsum(-1).float()  # [B, T] keys each query sees
                valid = (mask == 1) & (visible > (1 if normalized else 0))
                for layer, probs in enumerate(out.attentions):
                    ent = torch.special.entr(probs.float()).sum(-1)  # [B, H, T]
                    if normalized:
                        ent = ent / visible.clamp(min=2).log()[:, None, :]
                    total[layer] += (ent * valid[:, None, :]).sum((0, 2)).double().cpu()
                count += int(valid.sum())
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
    if count == 0:
        raise ValueError("attention_entropy: the batches hold no query token to score")
    return (total / count).float()


@torch.no_grad()
def magnitude_importance(model: nn.Module) -> torch.Tensor:
    """[L, H] Frobenius norm of each head's q, k, v rows (k/v of its KV head) and output columns."""
    layout = head_layout(model)
    scores = torch.zeros(layout.num_layers, layout.num_heads)
    for layer, proj in enumerate(output_projections(model)):
        rows = head_rows(model, layer)
        o = proj.weight.float().unflatten(in_dim(proj), (layout.num_heads, layout.head_dim))
        o = o.movedim(in_dim(proj), 0)  # [H, D, out]
        squared = o.pow(2).sum((1, 2))
        for name, (module, idx) in rows.items():
            w = module.weight.float().index_select(1 - in_dim(module), idx.flatten().to(module.weight.device))
            w = w.movedim(1 - in_dim(module), 0).unflatten(0, idx.shape)  # [heads or kv, D, in]
            per = w.pow(2).sum((1, 2))
            if name != "q":  # every query head of a group reads the same KV head
                per = per.repeat_interleave(layout.group_size)
            squared = squared + per
        scores[layer] = squared.sqrt().cpu()
    return scores


def random_importance(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """[L, H] uniform scores from a generator seeded with `seed` (the same plan for the same seed)."""
    layout = head_layout(model)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(layout.num_layers, layout.num_heads, generator=generator)


def head_importance(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]] | None = None,
                    method: str = "gradient", gates: HeadGates | None = None, seed: int = 0) -> torch.Tensor:
    """[L, H] scores, higher = more important, by `method` in ("gradient", "entropy", "magnitude", "random").

    "gradient" and "entropy" need `batches` (an iterable that can be read once; pass a list to
    score several times). `gates`: the gates to differentiate / keep applied (default: those
    attached to the model, if any).
    """
    if method not in METHODS:
        raise ValueError(f"importance method must be one of {', '.join(METHODS)}; got {method!r}")
    if method in ("gradient", "entropy") and batches is None:
        raise ValueError(f"importance method {method!r} needs batches of input_ids/attention_mask/labels")
    if method == "gradient":
        return gradient_importance(model, batches, gates=gates)
    if method == "entropy":
        return -attention_entropy(model, batches)
    if method == "magnitude":
        return magnitude_importance(model)
    return random_importance(model, seed=seed)

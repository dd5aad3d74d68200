"""The inner loop of TTT-E2E: chunked test-time training of the fast weights (MLP').

"End-to-End Test-Time Training for Long Context" (Tandon et al. 2025), official JAX code:
github.com/test-time-training/e2e. The sequence is cut into chunks of b tokens. For chunk i:

    loss_i(W) = mean over the chunk's positions p of CE(logits_p(W), x_{p+1})
    W_i = W_{i-1} - eta * clip(grad loss_i(W_{i-1}))

The chunk's logits (and its outer loss) use W_{i-1}, the weights from BEFORE its update; clip
rescales the gradient to global norm at most `inner_grad_clip` over all fast weights of all TTT
blocks, g * c / max(|g|, c) (optax's clip_by_global_norm). Every sequence has its own fast
weights ([B, ...] tensors, batched matmuls); the gradient is taken of the SUM over samples of the
per-sample mean losses, so no sample's step is scaled by 1/B, and clipped per sample. The targets
x_{p+1} are the sequence's own next tokens (what decoding sees), not the outer labels; the update
on chunk i needs x_{(i+1)b}, the first token of the next chunk.

Meta-gradient: `torch.autograd.grad(..., create_graph=True)` keeps the update differentiable
(full second order, as the paper); `first_order` treats the inner gradient as a constant. The
outer gradient reaches every parameter, W_0 of MLP' included.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from testtime.lm import IGNORE_INDEX
from testtime.ttt.attention import KV, attend_past


class Run(NamedTuple):
    """The settings of one call: config, warm-up and call-time overrides resolved."""

    ttt: bool
    lr: float
    chunk_size: int
    steps: int
    window: int | None  # None: full attention
    clip: float | None
    first_order: bool
    recompute: bool


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE per sample [B], number of targets [B]); position i of `logits` predicts
    `targets[:, i]` (already aligned), -100 ignored; a sample without targets has loss 0."""
    B, t, V = logits.shape
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits.reshape(B * t, V), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                         reduction="none").view(B, t)
    count = (targets != IGNORE_INDEX).sum(1)
    return ce.sum(1) / count.clamp(min=1), count


def clipped_update(flat, grads, lr, clip: float | None, apply: torch.Tensor):
    """W - lr * apply * g * c / max(|g|, c) for every fast weight of every TTT block (flat lists);
    |g| [B] is each sample's global norm over all of them (float32 at least). `lr` a float or a
    0-d tensor; `apply` [B] (0 or 1) skips samples whose chunk is not complete. -> (new, |g|)."""
    dtype = torch.promote_types(grads[0].dtype, torch.float32)
    norm = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1, dtype=dtype) for g in grads], 1), dim=1)
    scale = lr * apply
    if clip is not None:
        scale = scale * (clip / norm.clamp(min=clip))
    return [w - scale.view(-1, *[1] * (w.dim() - 1)).to(w.dtype) * g for w, g in zip(flat, grads)], norm


def unflatten(flat: list[torch.Tensor], per_layer: int) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(flat[i:i + per_layer]) for i in range(0, len(flat), per_layer)]


def sgd_step(loss: torch.Tensor, fast, lr: float, clip: float | None, apply: torch.Tensor,
             create_graph: bool, retain_graph: bool):
    """One clipped SGD step per sample (`clipped_update`) on the gradient of `loss`, the sum over
    samples of their mean losses, so g is each sample's own gradient. Returns (new fast weights,
    |g| [B] before clipping)."""
    flat = [w for layer in fast for w in layer]
    grads = torch.autograd.grad(loss, flat, create_graph=create_graph, retain_graph=retain_graph)
    new, norm = clipped_update(flat, grads, lr, clip, apply)
    return unflatten(new, len(fast[0])), norm.detach()


def chunk_forward(model, x, pos, past, fast, run: Run):
    """The TTT blocks, the final norm and the LM head on one chunk (`TTTQuarter`), plain attention.

    x [B, t, H]: the chunk's output of the lower blocks; past: per TTT block the keys before the
    chunk (KV); fast: per TTT block its (w_gate, w_up, w_down). -> (logits [B, t, V], [(k, v)])."""
    attends = [attend_past(pos, p, run.window, run.chunk_size) for p in past]
    return model.quarter()(x, model.rope_tables(pos), attends, fast)


def inner_update(model, x, pos, past, fast, targets, apply, run: Run, create_graph: bool, retain_graph: bool):
    """The chunk's forward with the weights before its update, then `run.steps` SGD steps.

    -> (logits, kvs, pre-update loss [B], new fast weights, |g| of the first step [B]).
    A differentiable inner gradient (`create_graph`) needs SDPA's math kernel: the fused kernels
    have no double backward."""
    with sdpa_kernel(SDPBackend.MATH) if create_graph else nullcontext():
        logits, kvs = chunk_forward(model, x, pos, past, fast, run)
        loss, _ = per_sample_loss(logits, targets)
        new, norm = sgd_step(loss.sum(), fast, run.lr, run.clip, apply, create_graph, retain_graph)
        for _ in range(run.steps - 1):
            again, _ = per_sample_loss(chunk_forward(model, x, pos, past, new, run)[0], targets)
            new, _ = sgd_step(again.sum(), new, run.lr, run.clip, apply, create_graph, retain_graph)
    return logits, kvs, loss, new, norm


def _extend(past, k, v, pos, window: int | None):
    """The keys a later chunk can see: all of them (full attention) or the last window - 1."""
    if past is not None:
        k, v, pos = torch.cat([past.k, k], 2), torch.cat([past.v, v], 2), torch.cat([past.pos, pos], 1)
    if window is not None:
        start = max(0, k.shape[2] - (window - 1))
        k, v, pos = k[:, :, start:], v[:, :, start:], pos[:, start:]
    return KV(k, v, pos)


def scan_chunks(model, h, next_ids, lengths, max_len: int, run: Run, outer_grad: bool,
                keep_from: int | None, stats: bool, keep: tuple[int, int]):
    """The TTT quarter of the network over the sequence, chunk by chunk, with the inner loop.

    h [B, T, H]: output of the lower blocks (real tokens first); next_ids [B, T]: the inner
    targets; lengths [B]: real tokens per sample (max_len its max, on the host). Chunk i of sample
    n is complete, and updates its weights, once its next token exists: (i + 1) b < length_n.
    Returns (logits [B, hi - lo, V] of the positions keep = (lo, hi), fast weights after the last
    complete chunk, the TTT blocks' (k, v) from position `keep_from` (None: not kept), the
    statistics of `TTTCausalLMOutput` if asked).

    When the caller had grad off (`outer_grad` False) every chunk's graph is dropped after its
    update. `run.recompute` wraps each chunk in a non-reentrant checkpoint: its activations, the
    inner backward's included, are recomputed in the outer backward instead of stored.
    """
    B, T, _ = h.shape
    b = run.chunk_size
    fast = model.initial_fast_weights(B, outer_grad)
    past = [None] * len(fast)
    second_order = outer_grad and not run.first_order
    logits, kept, before, after, norms = [], [[] for _ in fast], [], [], []
    with torch.enable_grad():
        for s in range(0, T, b):
            e = min(s + b, T)
            pos = torch.arange(s, e, device=h.device)[None]
            x, targets = h[:, s:e], next_ids[:, s:e]
            complete = (e < lengths).to(h.dtype)
            if e < max_len or stats:  # some sample updates on this chunk (or the statistics ask)
                apply = torch.ones_like(complete) if stats else complete
                args = (model, x, pos, past, fast, targets, apply, run, second_order, outer_grad)
                if run.recompute and outer_grad:
                    out = checkpoint(inner_update, *args, use_reentrant=False)
                else:
                    out = inner_update(*args)
                chunk_logits, kvs, loss, new, norm = out
            else:  # the last chunk: nothing after it needs its update
                chunk_logits, kvs = chunk_forward(model, x, pos, past, fast, run)
                new = None
            if stats:
                with torch.no_grad():
                    post, count = per_sample_loss(chunk_forward(model, x, pos, past, new, run)[0], targets)
                nan = torch.full_like(post, float("nan"))
                before.append(torch.where(count > 0, loss.detach(), nan))
                after.append(torch.where(count > 0, post, nan))
                norms.append(torch.where(count > 0, norm, nan))
                # the statistics took the step on every chunk with targets; the state keeps it only
                # where the chunk is complete (a prefill's cache must not learn from a partial chunk)
                complete_rows = complete.bool().view(-1, 1, 1)
                new = [tuple(torch.where(complete_rows, w1, w0) for w0, w1 in zip(l0, l1)) for l0, l1 in zip(fast, new)]
            if not outer_grad:
                chunk_logits = chunk_logits.detach()
                kvs = [(k.detach(), v.detach()) for k, v in kvs]
                if new is not None:
                    new = [tuple(w.detach().requires_grad_() for w in layer) for layer in new]
            if s < keep[1] and e > keep[0]:
                logits.append(chunk_logits[:, max(keep[0] - s, 0):keep[1] - s])
            past = [_extend(p, k, v, pos, run.window) for p, (k, v) in zip(past, kvs)]
            if keep_from is not None and e > keep_from:
                lo = max(0, keep_from - s)
                for store, (k, v) in zip(kept, kvs):
                    store.append((k[:, :, lo:], v[:, :, lo:]))
            if new is not None:
                fast = new
    ttt_kv = [] if keep_from is None else [
        (torch.cat([k for k, _ in store], 2), torch.cat([v for _, v in store], 2)) for store in kept]
    out = {}
    if stats:
        out = dict(ttt_loss_before=torch.stack(before, 1), ttt_loss_after=torch.stack(after, 1),
                   ttt_grad_norm=torch.stack(norms, 1))
    return torch.cat(logits, 1), fast, ttt_kv, out

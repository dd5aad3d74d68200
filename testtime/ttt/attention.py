"""Every attention TTT-E2E runs: the plain reference by positions, and the kernels of the fast path.

Sliding-window causal attention with window k: the query at position p sees the keys at
positions j with 0 <= p - j < k (its own included); full attention sees every j <= p.

- The plain path (`attention`, `attend_past`): SDPA with the boolean mask of `visible`, built from
  the positions of queries and keys, so one function serves a whole sequence, a chunk against the
  keys before it and a decoded token against its cache. It runs everywhere and is the reference.
- The fast path (`testtime.ttt.fast`), exact against it:
  - a whole sequence attending to itself (the lower blocks, and the first TTT block's attention,
    which no fast weight reaches): SDPA's causal kernel (flash) when the sequence fits in the
    window (the window then hides nothing); beyond it FlexAttention with a sliding-window block
    mask built once per length (`sequence_block_mask`), so whole tiles outside the window are
    skipped; each block compiled around its kernel (`testtime.ttt.fast.sequence_layer`);
  - a chunk of b queries at positions [s, s + b) against a window of the k keys before it plus its
    own (`window_mask` / `window_block_mask`): in the concatenation [k past slots, b own keys],
    query i sees slot m iff i < m <= i + k, and slot m holds position s - k + m, which must be >= 0
    (`first_valid` = max(k - s, 0) per sample: before position k the window is not full yet). The
    shapes never change, so one compiled graph (and one CUDA graph) serves every chunk.
  - `math_attention`: the same masked softmax written as matmuls, twice differentiable, for the
    second-order meta-gradient (no fused kernel has a double backward).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F


class KV(NamedTuple):
    """Keys and values [B, heads, n, head_dim] (RoPE applied) at positions `pos` [B or 1, n];
    position -1 marks an empty cache slot."""

    k: torch.Tensor
    v: torch.Tensor
    pos: torch.Tensor


# ---------------------------------------------------------------------------------------------
# the plain path: masks from positions
# ---------------------------------------------------------------------------------------------


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [B or 1, 1, tq, tk]: the query at position p sees the key at position j iff
    0 <= p - j < window (every j <= p when window is None) and the key slot is not empty."""
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (dist >= 0) & (k_pos >= 0)[:, None, :]
    if window is not None:
        ok = ok & (dist < window)
    return ok[:, None]


def attention(q, k, v, q_pos, k_pos, window: int | None, block: int) -> torch.Tensor:
    """Causal (sliding-window) softmax attention by positions, through SDPA.

    Up to `block` queries take one SDPA call with the [tq, tk] mask of `visible` (a chunk against
    its window: [b, k - 1 + b]; a decoded token against its cache). A longer sequence attending to
    itself (the one-pass forward of the lower blocks) is cut into blocks of `block` queries, each
    against the keys it can see, so the mask is never [T, T]; full attention uses SDPA's is_causal.
    """
    tq = q.shape[2]
    if tq <= block:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(q_pos, k_pos, window))
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = []
    for s in range(0, tq, block):
        e, lo = min(s + block, tq), max(0, s - window + 1)
        mask = visible(q_pos[:, s:e], k_pos[:, lo:e], window)
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e], attn_mask=mask))
    return torch.cat(out, dim=2)


def attend_past(pos: torch.Tensor, past: KV | None, window: int | None, block: int):
    """The plain attention of queries at `pos` [B or 1, t] against the keys `past` before them
    (None: none) and their own: a function (q, k, v) -> output for `Attention.forward`."""

    def attend(q, k, v):
        if past is None:
            return attention(q, k, v, pos, pos, window, block)
        keys, values = torch.cat([past.k, k], 2), torch.cat([past.v, v], 2)
        k_pos = torch.cat([past.pos.expand(pos.shape[0], -1), pos.expand(past.pos.shape[0], -1)], 1)
        return attention(q, keys, values, pos, k_pos, window, block)

    return attend


# ---------------------------------------------------------------------------------------------
# the fast path: fixed shapes, masks built once
# ---------------------------------------------------------------------------------------------


def window_mask(first_valid: torch.Tensor, chunk: int, window: int) -> torch.Tensor:
    """Bool [B, 1, chunk, window + chunk]: query i sees slot m of [window past slots, chunk own
    keys] iff i < m <= i + window and m >= first_valid (per sample)."""
    i = torch.arange(chunk, device=first_valid.device)[:, None]
    m = torch.arange(window + chunk, device=first_valid.device)[None, :]
    band = (m > i) & (m <= i + window)
    return (band[None] & (m[None] >= first_valid[:, None, None]))[:, None]


def math_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) masked) v as plain matmuls (softmax in float32 at least): twice
    differentiable."""
    scores = q @ k.transpose(-1, -2)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs.to(v.dtype) @ v).to(q.dtype)


def flex_available(device: torch.device) -> bool:
    """FlexAttention with its backward runs on CUDA (torch >= 2.5); on a CPU it has no backward."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def sequence_block_mask(length: int, window: int, device: torch.device):
    """The sliding-window causal block mask of a sequence attending to itself (built once per
    length and device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return (q >= kv) & (q - kv < window)

    build = torch.compile(create_block_mask) if device.type == "cuda" else create_block_mask  # [T, T] never built
    return build(mask_mod, None, None, length, length, device=device)


@functools.cache
def window_block_mask(chunk: int, window: int, device: torch.device, window_key_grads: bool = True):
    """The block mask of a chunk against its window: the band i < m <= i + window, whole tiles
    inside it marked full (built once per shape and device). Slots before position 0 are masked
    by `window_score_mod`, which applies on every tile.

    `window_key_grads=False`: the backward skips the key and value gradients of the window's
    tiles (FlexAttention's backward computes dK and dV per key tile over the query tiles its
    q-direction lists give, and dQ per query tile over the forward's key tiles, so emptying the
    window tiles' query lists leaves the forward and dQ as they are). Only for windows that are
    constants of the graph (the `Stepper`'s: no outer gradient); their key gradients read zero."""
    import copy

    from torch.nn.attention.flex_attention import create_block_mask

    def band(b, h, q, kv):
        return (kv > q) & (kv <= q + window)

    mask = create_block_mask(band, None, None, chunk, window + chunk, device=device)
    if window_key_grads:
        return mask
    past = window // mask.BLOCK_SIZE[1]  # key tiles wholly inside the window
    skip = copy.copy(mask)
    for name in ("q_num_blocks", "full_q_num_blocks"):
        counts = getattr(mask, name)
        if counts is not None:
            counts = counts.clone()
            counts[..., :past] = 0
            setattr(skip, name, counts)
    return skip


def window_score_mod(first_valid: torch.Tensor):
    """FlexAttention score_mod that hides the slots m < first_valid[b] of each sample (the window
    before position `window`, not full yet)."""

    def score_mod(score, b, h, q, kv):
        return torch.where(kv >= first_valid[b], score, -float("inf"))

    return score_mod

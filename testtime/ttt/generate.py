"""Decoding with TTT-E2E: a rolling KV cache that also holds each sample's fast weights.

Follows from training ("End-to-End Test-Time Training for Long Context", Tandon et al. 2025;
the official code at github.com/test-time-training/e2e does not decode): the fast weights start
from W_0 at every `generate` call (one document), the prompt is prefilled in chunks of b with an
update after each complete chunk (the forward's own scan), and every generated token goes through
the network once with attention over its window (a ring of k + b cached positions). When the
first token of chunk j + 1 arrives, chunk j's targets are complete: its TTT blocks are recomputed from the
cached inputs and keys (one chunk forward and backward) and the weights take its update before
that token is processed. This is the chunk grid of the forward, so greedy decoding picks the
argmax of the teacher-forced forward over the same sequence. Cost per token stays constant in the
context length: attention over a bounded window, one chunk update per b tokens.

Every sample keeps its own positions (counted from its first real token), chunk grid and fast
weights: a batch of left-padded prompts decodes as each prompt alone would.
"""

from __future__ import annotations

import torch

from testtime.ttt.attention import KV, attend_past
from testtime.ttt.inner import Run, inner_update


class TTTCache:
    """The decoding state of a batch, created by `model(..., use_cache=True)` (and `generate`).

    - `keys[l]`, `values[l]` [B, heads, C, head_dim]: ring buffers of every layer, slot = position
      mod C with C = k + b (the k positions before a chunk and the chunk: what its update reads);
      with full attention C grows and slot = position. `slot_pos` [B, C]: the position in each slot, -1 empty.
    - `pos` [B]: the next position of each sample, `pos_host` the same as a list (host side, so
      that deciding which sample updates needs no device sync); `max_len`: its maximum.
    - `fast`: per TTT block the per-sample (w_gate, w_up, w_down) after the last complete chunk.
    - `pending_h` [B, b, H], `pending_ids` [B, b]: the inputs of the TTT blocks and the tokens of
      the chunk in progress, slot = position mod b: what its update recomputes.
    """

    is_compileable = False  # generate must not torch.compile the forward: the fast path has its own graphs

    def __init__(self, keys, values, slot_pos, pos, max_len, fast, pending_h, pending_ids,
                 chunk_size: int, window: int | None):
        self.keys, self.values, self.slot_pos = keys, values, slot_pos
        self.pos, self.max_len, self.fast = pos, max_len, fast
        self.pos_host = pos.tolist()
        self.pending_h, self.pending_ids = pending_h, pending_ids
        self.chunk_size, self.window = chunk_size, window
        self.graphs: dict = {}  # the fast path's CUDA graphs over these tensors (testtime.ttt.fast)

    @property
    def capacity(self) -> int:
        return self.slot_pos.shape[1]

    @staticmethod
    def first_kept_position(min_len: int, seq_len: int, run: Run) -> int:
        """The first column of a prefill whose keys any sample's cache needs."""
        capacity = seq_len if run.window is None else run.window + run.chunk_size
        return max(0, min_len - min(capacity, seq_len))

    @classmethod
    def from_prefill(cls, layer_kv, keep_from: int, h_ttt, ids, lengths, fast, run: Run,
                     has_ttt_blocks: bool) -> "TTTCache":
        """The cache after a prefill in the real-tokens-first layout.

        layer_kv: per layer (k, v) of columns keep_from..T-1; h_ttt [B, T, H]: the input of the
        TTT blocks; ids [B, T]; lengths [B]; fast: the weights after each sample's last complete
        chunk. Each sample keeps its last min(C, T) positions (negative ones: empty slots).
        """
        B, T = ids.shape
        b = run.chunk_size
        capacity = T if run.window is None else run.window + b
        width = min(capacity, T)
        position = lengths[:, None] - width + torch.arange(width, device=ids.device)  # [B, width]
        column = (position - keep_from).clamp(min=0)
        slot = position % capacity
        keys, values = [], []
        for k, v in layer_kv:
            shape = (B, k.shape[1], width, k.shape[3])
            take, put = column[:, None, :, None].expand(shape), slot[:, None, :, None].expand(shape)
            ring = k.new_zeros(B, k.shape[1], capacity, k.shape[3])
            keys.append(ring.scatter(2, put, k.detach().gather(2, take)))
            values.append(torch.zeros_like(ring).scatter(2, put, v.detach().gather(2, take)))
        slot_pos = torch.full((B, capacity), -1, dtype=torch.long, device=ids.device)
        slot_pos.scatter_(1, slot, position.masked_fill(position < 0, -1))
        pending_h = pending_ids = None
        if has_ttt_blocks:
            start = (lengths - 1) // b * b  # the chunk of each sample's last token
            cols = (start[:, None] + torch.arange(b, device=ids.device)).clamp(max=T - 1)
            pending_h = h_ttt.gather(1, cols[..., None].expand(-1, -1, h_ttt.shape[-1]))
            pending_ids = ids.gather(1, cols)
        fast = [tuple(w.detach().clone() for w in layer) for layer in fast]
        return cls(keys, values, slot_pos, lengths.clone(), int(lengths.max()), fast, pending_h, pending_ids,
                   b, run.window)

    def grow(self, needed: int) -> None:
        """Full attention: room for `needed` positions (doubling), slot = position unchanged."""
        if needed <= self.capacity:
            return
        extra = max(needed, 2 * self.capacity) - self.capacity
        self.graphs = {}
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:2], extra, t.shape[3])], 2)
        self.keys, self.values = [pad(k) for k in self.keys], [pad(v) for v in self.values]
        self.slot_pos = torch.cat([self.slot_pos, self.slot_pos.new_full((self.slot_pos.shape[0], extra), -1)], 1)

    def copy(self) -> "TTTCache":
        """An independent copy (every tensor cloned)."""
        clone = lambda t: None if t is None else t.clone()
        return TTTCache([clone(k) for k in self.keys], [clone(v) for v in self.values], clone(self.slot_pos),
                        clone(self.pos), self.max_len, [tuple(clone(w) for w in layer) for layer in self.fast],
                        clone(self.pending_h), clone(self.pending_ids), self.chunk_size, self.window)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows `beam_idx` (each beam has its own fast weights)."""
        pick = lambda t: None if t is None else t.index_select(0, beam_idx.to(t.device))
        self.keys, self.values = [pick(k) for k in self.keys], [pick(v) for v in self.values]
        self.slot_pos, self.pos = pick(self.slot_pos), pick(self.pos)
        self.fast = [tuple(pick(w) for w in layer) for layer in self.fast]
        self.pending_h, self.pending_ids = pick(self.pending_h), pick(self.pending_ids)
        self.pos_host = [self.pos_host[i] for i in beam_idx.tolist()]
        self.graphs = {}


@torch.no_grad()
def decode(model, cache: TTTCache, input_ids: torch.LongTensor, run: Run) -> torch.Tensor:
    """Continue `cache` with input_ids [B, t], one token at a time -> logits [B, t, V] (on the
    fast path of `testtime.ttt.fast` where it applies)."""
    if (run.chunk_size, run.window) != (cache.chunk_size, cache.window):
        raise ValueError(f"chunk_size {run.chunk_size} / window {run.window} differ from the cache's "
                         f"({cache.chunk_size} / {cache.window}): the chunk grid is fixed at prefill")
    fast_path = model.fast.choose(run, input_ids.device, False, False, 1)
    if fast_path is not None and fast_path.decode_reason(cache, run) is None:
        return fast_path.decode(cache, input_ids, run)
    return torch.cat([_decode_token(model, cache, input_ids[:, j], run) for j in range(input_ids.shape[1])], 1)


def _decode_token(model, cache: TTTCache, token: torch.LongTensor, run: Run) -> torch.Tensor:
    b = cache.chunk_size
    rows = torch.arange(token.shape[0], device=token.device)
    if run.ttt and cache.fast:
        due = (cache.pos % b == 0) & (cache.pos > 0)  # this token completes the chunk before it
        if bool(due.any()):
            _update(model, cache, due.nonzero().flatten(), token, run)
    if cache.window is None:
        cache.grow(cache.max_len + 1)
    pos = cache.pos[:, None]
    h = model.model.embed_tokens(token[:, None])
    rot = model.rope_tables(pos)
    new = []
    for i, block in enumerate(model.model.layers):
        if i == model.num_lower and cache.pending_h is not None:
            cache.pending_h[rows, cache.pos % b] = h[:, 0]
        fast = cache.fast[i - model.num_lower] if run.ttt and i >= model.num_lower else None
        attend = attend_past(pos, KV(cache.keys[i], cache.values[i], cache.slot_pos), cache.window, b)
        h, k, v = block(h, rot, attend, fast)
        new.append((k, v))
    slot = cache.pos % cache.capacity  # the oldest position, out of every window still needed
    for i, (k, v) in enumerate(new):
        cache.keys[i][rows, :, slot] = k[:, :, 0]
        cache.values[i][rows, :, slot] = v[:, :, 0]
    cache.slot_pos[rows, slot] = cache.pos
    if cache.pending_ids is not None:
        cache.pending_ids[rows, cache.pos % b] = token
    cache.pos = cache.pos + 1
    cache.pos_host = [p + 1 for p in cache.pos_host]
    cache.max_len += 1
    return model.lm_head(model.model.norm(h))


def _update(model, cache: TTTCache, rows: torch.LongTensor, token: torch.LongTensor, run: Run) -> None:
    """The update of the samples `rows`, whose chunk [pos - b, pos) has just got its last target."""
    b = cache.chunk_size
    start = cache.pos[rows] - b
    pos = start[:, None] + torch.arange(b, device=start.device)
    targets = torch.cat([cache.pending_ids[rows, 1:], token[rows, None]], 1)
    slots = cache.slot_pos[rows]
    before = slots.masked_fill(slots >= start[:, None], -1)  # the chunk's own keys are recomputed
    past = [KV(cache.keys[i][rows], cache.values[i][rows], before)
            for i in range(model.num_lower, len(model.model.layers))]
    fast = [tuple(w[rows].requires_grad_() for w in layer) for layer in cache.fast]
    with torch.enable_grad():
        *_, new, _ = inner_update(model, cache.pending_h[rows], pos, past, fast, targets,
                                  torch.ones(len(rows), device=start.device), run,
                                  create_graph=False, retain_graph=False)
    for layer, new_layer in zip(cache.fast, new):
        for w, w_new in zip(layer, new_layer):
            w[rows] = w_new.detach()

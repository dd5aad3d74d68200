"""How TTT-E2E is judged: the loss by position in the context, and the memory test.

- Loss by position bucket. TTT-E2E's claim (Tandon et al. 2025, Fig. 1) is about long context:
  with a sliding window of k tokens, a plain transformer cannot use what lies further back, while
  TTT's fast weights carry it. So the next-token loss is reported per bucket of positions:
  [0, b), [b, 2b), ... up to the window, then everything beyond it ([k, end)), for TTT on and for
  the same weights with TTT off.
- Memory test. A document holds a passage twice with a gap longer than the window in between:
  sliding attention alone cannot see the first copy from the second, so any drop of the loss on
  the second copy from TTT off ("pre") to TTT on ("post") is what the fast weights remembered.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from testtime.lm import IGNORE_INDEX


def position_buckets(window_size: int, chunk_size: int, max_buckets: int = 8) -> list[tuple[int, int | None]]:
    """[(lo, hi)] in token positions: chunk-sized buckets up to the window (merged to at most
    `max_buckets` of equal width), then (window_size, None) for everything beyond it."""
    n = max(1, -(-window_size // chunk_size))
    step = chunk_size * max(1, -(-n // max_buckets))
    edges = list(range(0, window_size, step)) + [window_size]
    return list(zip(edges[:-1], edges[1:])) + [(window_size, None)]


def bucket_name(bucket: tuple[int, int | None]) -> str:
    lo, hi = bucket
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B, T], counted [B, T]): the CE of predicting token t from position t - 1 (float32),
    at the position t of the predicted token; position 0 and labels -100 are not counted."""
    B, T, V = logits.shape
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none",
                         ignore_index=IGNORE_INDEX).view(B, T - 1)
    counted = labels[:, 1:] != IGNORE_INDEX
    zero = ce.new_zeros(B, 1)
    return torch.cat([zero, ce], 1), torch.cat([counted.new_zeros(B, 1), counted], 1)


def bucket_sums(loss: torch.Tensor, counted: torch.Tensor,
                buckets: list[tuple[int, int | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of losses [n], number of tokens [n]) per position bucket, float64 (reduce them over
    batches and ranks, then divide)."""
    pos = torch.arange(loss.shape[1], device=loss.device)
    sums, counts = [], []
    for lo, hi in buckets:
        inside = counted & (pos >= lo) & (pos < hi if hi is not None else True)
        sums.append(loss[inside].double().sum())
        counts.append(inside.sum().double())
    return torch.stack(sums), torch.stack(counts)


def repeated_passage_documents(tokens: np.ndarray, num_documents: int, passage_tokens: int, gap_tokens: int,
                               seed: int = 0, control: bool = False) -> list[dict[str, torch.Tensor]]:
    """Memory-test documents `passage + gap + passage` cut from a token stream, with labels on the
    second copy only (its first token excepted: nothing announces that the copy begins).

    The passage and the gap come from different random places of `tokens`, so the gap is real text
    unrelated to the passage. Deterministic given `seed`. `control=True` gives the control of each
    document instead: `other + gap + passage`, the same gap and final passage (and labels) after
    an unrelated passage of the same length. With the gap beyond the window, attention alone sees
    the same context for the labelled tokens in both, so what TTT lowers on the repeat and not on
    the control is what the fast weights remembered of the first copy.
    """
    need = passage_tokens + gap_tokens
    if passage_tokens < 2 or gap_tokens < 1:
        raise ValueError(f"passage_tokens must be >= 2 and gap_tokens >= 1, got {passage_tokens} and {gap_tokens}")
    if len(tokens) < 3 * need:
        raise ValueError(f"the token stream holds {len(tokens)} tokens; the memory test needs at least "
                         f"{3 * need} (passage_tokens {passage_tokens} + gap_tokens {gap_tokens}, three times)")
    rng = np.random.default_rng(seed)
    piece = lambda start, n: torch.tensor(np.asarray(tokens[start:start + n]), dtype=torch.long)
    documents = []
    for _ in range(num_documents):
        p = int(rng.integers(0, len(tokens) - passage_tokens))
        g = int(rng.integers(0, len(tokens) - gap_tokens))
        while abs(g - p) < need:  # the gap must not contain the passage itself
            g = int(rng.integers(0, len(tokens) - gap_tokens))
        o = int(rng.integers(0, len(tokens) - passage_tokens))
        while abs(o - p) < need or abs(o - g) < need:  # the other passage overlaps neither
            o = int(rng.integers(0, len(tokens) - passage_tokens))
        passage = piece(p, passage_tokens)
        first = piece(o, passage_tokens) if control else passage
        ids = torch.cat([first, piece(g, gap_tokens), passage])
        labels = torch.full_like(ids, IGNORE_INDEX)
        second = need + 1
        labels[second:] = ids[second:]
        documents.append({"input_ids": ids, "labels": labels})
    return documents


def memory_share(pre_repeat: float, post_repeat: float, pre_control: float, post_control: float) -> float:
    """The share of TTT's loss reduction on the repeated passage that it does not also give on the
    control: 1 - (pre_control - post_control) / (pre_repeat - post_repeat), "pre" with TTT off and
    "post" with it on. TTT lowers the loss on any text (the control measures that); what it lowers
    more on the repeat is what the fast weights remembered of the first copy. (Attention alone
    sees a little of the first copy too: each token's window does not reach it, but stacked
    sliding-window layers reach L x (window - 1) back; that part is in both "pre" losses and
    cancels.)"""
    reduction = pre_repeat - post_repeat
    return 1 - (pre_control - post_control) / reduction if reduction else float("nan")

"""Constraint functions for `generate_with_tta_uncertainty(constraint_fn=...)`.

A constraint function maps token ids [batch, seq_len] to violation scores: a float32 tensor of
the same shape, >= 0, higher = more violation. The sampler adds `gamma_violation` x score to the
remasking score of each committed token, so a score is most useful ON the tokens that break the
rule (they are the ones remasking can fix). The seed's examples put whole-text penalties on the
last tokens; these versions locate the offending tokens instead:

- `no_repeat_ngrams(tokens, n=3)`: 1 at the last token of each n-gram that already occurred
  earlier in its row (the seed's rule), vectorized as a pairwise n-gram comparison.
- `bracket_violations(tokens, tokenizer, pairs="()[]{}")`: per bracket kind, 1 for each closing
  bracket that has no opener before it and 1 for each opening bracket that is never closed
  (counted on the token holding it). Vectorized: each token is reduced to its unmatched closers
  then unmatched openers (")))(((": any bracket string reduces to that form), and matching over
  the sequence is cumulative sums and minima.
- `json_format_constraint(tokens, tokenizer)`: `bracket_violations` for {} and [].
- `math_constraint(tokens, tokenizer)`: 2 on the tokens of a division by a literal zero ("/0",
  "/ 0", "/0.0"; not "/0.5"), plus 1 on each unmatched parenthesis.

Texts are read per token from `tokenizer.decode([id], skip_special_tokens=True)` (special tokens,
MASK and padding read as ""), computed once per tokenizer. Use them with a lambda:
`constraint_fn=lambda t: json_format_constraint(t, tokenizer)`.
"""

from __future__ import annotations

import re
import weakref

import torch

_PIECES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> (vocab size, pieces)
_ZERO_DIVISOR = re.compile(r"/\s*0+(?:\.0*)?(?![\d.])")


def token_pieces(tokenizer) -> list[str]:
    """The text of every token id alone (special tokens: ""), cached per tokenizer."""
    size = len(tokenizer)
    cached = _PIECES.get(tokenizer)
    if cached is None or cached[0] != size:
        cached = (size, tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=True))
        _PIECES[tokenizer] = cached
    return cached[1]


def no_repeat_ngrams(tokens: torch.Tensor, n: int = 3) -> torch.Tensor:
    """1.0 at position i when tokens[i-n+1 : i+1] occurred as an n-gram earlier in the row, else 0."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    batch, length = tokens.shape
    scores = torch.zeros(batch, length, dtype=torch.float32, device=tokens.device)
    if length < n:
        return scores
    grams = tokens.unfold(1, n, 1)  # [B, M, n], gram m ends at position m + n - 1
    same = torch.ones(batch, grams.shape[1], grams.shape[1], dtype=torch.bool, device=tokens.device)
    for k in range(n):
        same &= grams[:, :, None, k] == grams[:, None, :, k]
    scores[:, n - 1:] = same.tril(-1).any(-1).float()
    return scores


def _reduced_brackets(piece: str, opener: str, closer: str) -> tuple[int, int]:
    """(unmatched closers, unmatched openers) of one string for one bracket kind."""
    closers = openers = 0
    for ch in piece:
        if ch == opener:
            openers += 1
        elif ch == closer:
            if openers:
                openers -= 1
            else:
                closers += 1
    return closers, openers


def _bracket_table(tokenizer, pairs: str, device: torch.device) -> torch.Tensor:
    """[V, kinds, 2]: each token's (unmatched closers, unmatched openers) per bracket kind."""
    pieces = token_pieces(tokenizer)
    kinds = [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)]
    table = torch.tensor([[_reduced_brackets(p, o, c) for o, c in kinds] for p in pieces], dtype=torch.long)
    return table.to(device)


def bracket_violations(tokens: torch.Tensor, tokenizer, pairs: str = "()[]{}") -> torch.Tensor:
    """Per token: how many of its brackets are unmatched (closers with no opener before, openers never closed).

    Each bracket kind (consecutive characters of `pairs`) is matched on its own, by counting; with
    token t = )^a (^b and D the depth after each token, a closer is unmatched when it takes the
    post-closer depth D_prev - a below every earlier one and below 0, and an opener at level l is
    never closed when no later post-closer depth falls below l.
    """
    if len(pairs) % 2 or not pairs:
        raise ValueError(f"pairs must list opening and closing brackets in pairs, e.g. '()[]', got {pairs!r}")
    table = _bracket_table(tokenizer, pairs, tokens.device)
    known = tokens < table.shape[0]
    counts = table[tokens.clamp(0, table.shape[0] - 1)] * known[..., None, None]  # [B, L, kinds, 2]
    closers, openers = counts[..., 0], counts[..., 1]
    depth = (openers - closers).cumsum(1)
    low = depth - openers  # depth right after each token's closers
    floor = torch.minimum(low.cummin(1).values, torch.zeros_like(low))
    before = torch.cat([torch.zeros_like(floor[:, :1]), floor[:, :-1]], dim=1)
    unmatched_closers = before - floor
    inf = torch.iinfo(low.dtype).max
    later_low = torch.cat([low[:, 1:].flip(1).cummin(1).values.flip(1), torch.full_like(low[:, :1], inf)], dim=1)
    unclosed_openers = (torch.minimum(depth, later_low) - low).clamp(min=0)  # <= openers, since depth - low = openers
    return (unmatched_closers + unclosed_openers).sum(-1).float()


def json_format_constraint(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Unbalanced JSON structure: 1 on each unmatched `{`, `}`, `[` or `]`."""
    return bracket_violations(tokens, tokenizer, pairs="{}[]")


def math_constraint(tokens: torch.Tensor, tokenizer) -> torch.Tensor:
    """Invalid arithmetic: 2 on the tokens of a division by a literal zero, 1 on each unmatched parenthesis."""
    scores = bracket_violations(tokens, tokenizer, pairs="()")
    pieces = token_pieces(tokenizer)
    for b, row in enumerate(tokens.tolist()):
        texts = [pieces[t] if 0 <= t < len(pieces) else "" for t in row]
        text = "".join(texts)
        if "/" not in text:
            continue
        ends = torch.tensor([len(s) for s in texts]).cumsum(0)  # token i covers characters [ends[i-1], ends[i])
        for match in _ZERO_DIVISOR.finditer(text):
            first = int(torch.searchsorted(ends, match.start(), right=True))
            last = int(torch.searchsorted(ends, match.end() - 1, right=True))
            scores[b, first:last + 1] += 2.0
    return scores

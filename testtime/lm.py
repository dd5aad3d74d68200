"""Small language-modelling helpers shared by every method."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: position i of `logits` predicts `labels[i + 1]`.

    Labels -100 are ignored. With no valid label it returns 0 that still carries a gradient
    path (a batch of fully masked records must not produce NaN, as a plain mean would).
    """
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    valid = labels != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], labels[valid])


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt ready for generation (chat template with the generation prompt)."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def pad(sequences: Sequence[Sequence[int]], value: int, side: str = "right") -> torch.Tensor:
    """Stack lists of ids into one [B, max_len] tensor, padding on `side`."""
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            if side == "right":
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, length - len(s):] = torch.as_tensor(s, dtype=torch.long)
    return out

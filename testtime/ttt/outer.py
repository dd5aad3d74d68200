"""The outer optimization of TTT-E2E, as the official code sets it (optax in ttt/optimizers.py).

AdamW (paper at 125M: lr 3e-3, betas 0.9 / 0.95, weight decay 0.1) with the weight decay on every
parameter, norms and embeddings included (the official `adamw` has no mask: `emb_wd` defaults to
true), a linear warm-up from 0 and a cosine decay to `min_learning_rate` at the last step.
"""

from __future__ import annotations

import math

import torch


def outer_optimizer(parameters, learning_rate: float, betas=(0.9, 0.95), weight_decay: float = 0.1):
    """AdamW over every parameter that requires grad, all of them decayed."""
    trainable = [p for p in parameters if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=learning_rate, betas=tuple(betas), weight_decay=weight_decay)


def outer_lr_factor(step: int, warmup_steps: int, total_steps: int | None, floor: float) -> float:
    """The learning rate at `step` as a fraction of the peak: (step + 1) / warmup during the
    warm-up, then a cosine from 1 to `floor` (min / peak) at `total_steps` (None: constant)."""
    warmup = max(1, warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    if not total_steps or total_steps <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

"""Language-modelling pieces every method shares: the ignore label, the next-token loss, entropy,
prompt encoding, padding, and end-of-sequence handling.

One home for each, so that a method never writes its own copy:

- `IGNORE_INDEX` (-100): the label of positions that carry no loss (prompt, padding).
- `next_token_loss(logits, labels)`: mean CE of position i predicting label i + 1; 0 (with a
  gradient path) when no label is valid, never NaN.
- `entropy(logits, temperature)`: nats of softmax(logits / T), float32.
- `encode_prompt(tokenizer, prompt)`: ids of a prompt ready for `generate` (chat template).
- `pad(sequences, value, side)`, `left_pad(sequences, pad_id)`: batches of ids (and masks).
- `eos_token_ids(model, tokenizer)`: every id that ends a completion; `cut_at_eos(ids, eos)` and
  `before_eos_mask(tokens, eos)` for lists and for [B, n] tensors.
- `final_logits(model, hidden)` / `scale_logits(model, raw)`: the logits a causal LM really samples
  from, given the final hidden state (the input of its lm_head), for the families that rescale
  the lm_head output (Gemma-2/3 soft-capping, Cohere's logit_scale, Granite's logits_scaling).
- `seeded_rng(seed, device)`: a block where torch's global RNG (CPU and `device`) is seeded, and
  restored afterwards, so sampling is reproducible without disturbing the caller's RNG.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

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


def entropy(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Entropy in nats of softmax(logits / temperature) over the last dimension, float32.

    `temperature` is a float or a tensor broadcastable to `logits.shape[:-1]` (one per row).
    Computed from log-softmax, so a one-hot distribution gives exactly 0 (not NaN).
    """
    z = logits.float()
    if torch.is_tensor(temperature):
        z = z / temperature.float().unsqueeze(-1)
    elif temperature != 1.0:
        z = z / temperature
    logp = F.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt ready for generation (chat template with the generation prompt)."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def pad(sequences: Sequence[Sequence[int] | torch.Tensor], value: int, side: str = "right") -> torch.Tensor:
    """Stack lists (or 1-D tensors) of ids into one [B, max_len] long tensor, padding on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rows = [s.long() if torch.is_tensor(s) else torch.as_tensor(list(s), dtype=torch.long) for s in sequences]
    return pad_sequence(rows, batch_first=True, padding_value=value, padding_side=side)


def left_pad(sequences: Sequence[Sequence[int] | torch.Tensor], pad_id: int,
             device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of LEFT-padded prompts, the layout `generate` continues."""
    ids = pad(sequences, pad_id, side="left")
    mask = pad([torch.ones(len(s), dtype=torch.long) for s in sequences], 0, side="left")
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def eos_token_ids(model=None, tokenizer=None) -> list[int]:
    """Every token id that ends a completion, without repeats: the generation config's first (the
    id `generate` forces and stops on; it may list several, e.g. <|im_end|> and <|endoftext|>),
    then the tokenizer's, and the model config's where neither names one."""
    ids = _as_ids(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    if not ids and model is not None:
        ids = _as_ids(getattr(getattr(model, "config", None), "eos_token_id", None))
    return list(dict.fromkeys(ids))


def cut_at_eos(ids: Iterable[int] | torch.Tensor, eos: Iterable[int], keep_eos: bool = False):
    """`ids` up to its first EOS (the EOS included with `keep_eos`); a 1-D tensor stays a tensor."""
    values = ids.tolist() if torch.is_tensor(ids) else list(ids)
    eos = set(eos)
    end = next((i for i, t in enumerate(values) if t in eos), None)
    if end is None:
        return ids if torch.is_tensor(ids) else values
    end += 1 if keep_eos else 0
    return ids[:end] if torch.is_tensor(ids) else values[:end]


def before_eos_mask(tokens: torch.Tensor, eos: Iterable[int] | torch.Tensor, keep_eos: bool = False) -> torch.Tensor:
    """Bool [B, n]: the generated tokens before each row's first EOS (that EOS too with `keep_eos`)."""
    eos = eos if torch.is_tensor(eos) else torch.tensor(sorted(set(eos)), dtype=tokens.dtype)
    is_eos = torch.isin(tokens, eos.to(tokens.device)).long()
    seen = is_eos.cumsum(-1)
    if keep_eos:
        seen = seen - is_eos
    return seen == 0


def _logit_transform(config):
    """(kind, value) of the rescaling a config applies after lm_head, or None."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return "softcap", float(cap)
    scale = getattr(config, "logit_scale", None)
    if scale is not None and scale != 1.0:
        return "scale", float(scale)
    divisor = getattr(config, "logits_scaling", None)
    if divisor is not None and divisor != 1.0:
        return "divide", float(divisor)
    return None


def scale_logits(model, raw: torch.Tensor) -> torch.Tensor:
    """The model's logits from the raw lm_head output: `tanh(z / cap) * cap` (Gemma-2/3
    `final_logit_softcapping`), `z * logit_scale` (Cohere), `z / logits_scaling` (Granite), else `z`.
    `model`: the model or its config."""
    transform = _logit_transform(getattr(model, "config", model))
    if transform is None:
        return raw
    kind, value = transform
    if kind == "softcap":
        return torch.tanh(raw / value) * value
    return raw * value if kind == "scale" else raw / value


def final_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from the final hidden state (after the final norm: the input of lm_head), exactly as
    the model's own forward computes them, rescaling included (see `scale_logits`)."""
    return scale_logits(model, model.get_output_embeddings()(hidden))


@contextmanager
def seeded_rng(seed: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block with torch's global RNG seeded with `seed`, then restore it; nothing for None.

    torch.manual_seed reseeds every device of the type, so all of them are forked and restored.
    """
    if seed is None:
        yield
        return
    device = torch.device(device)
    if device.type == "cpu":
        fork = torch.random.fork_rng(devices=[])
    else:
        count = torch.cuda.device_count() if device.type == "cuda" else 1
        fork = torch.random.fork_rng(devices=list(range(count)), device_type=device.type)
    with fork:
        torch.manual_seed(seed)
        yield

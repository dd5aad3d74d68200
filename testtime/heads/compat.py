"""The seed's interface ("sentinel-ai" adaptive transformer) as a thin face over `attach_head_gates`.

    baseline_model = load_baseline_model(model_name, device)
    adaptive_model = load_adaptive_model(model_name, baseline_model, device)
    adaptive_model.blocks[layer]["attn"].gate[head] = torch.tensor(0.001, device=device)
    adaptive_model.generate(input_ids=..., attention_mask=..., max_length=30, do_sample=True)

Unlike the seed, which rebuilt the transformer blocks in Python and drifted from the real
model, the adaptive model IS the Hugging Face model (a copy of the baseline) with fixed-mode
head gates hooked onto it: at gates 1 it computes the baseline exactly, on every supported
architecture, and `generate` is the model's own.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from testtime.heads.gates import HeadGates, attach_head_gates
from testtime.loading import load_model_and_tokenizer


def load_baseline_model(model_name: str, device: str | torch.device = "cpu") -> nn.Module:
    """The causal LM `model_name` (a local folder, a .gguf file, an alias such as `tiny-random-gpt2`
    or `smollm2-135m`, or a cached hub id), float32, eval mode, on `device`."""
    model, _ = load_model_and_tokenizer(model_name, device=device)
    return model


class AttentionGates:
    """`blocks[layer]["attn"]`: `gate` is layer `layer`'s row of the gates (a view: writes go to the
    model's gates), `num_heads` its head count."""

    def __init__(self, gates: HeadGates, layer: int):
        self._gates, self.layer = gates, layer

    @property
    def gate(self) -> torch.Tensor:
        return self._gates.values[self.layer]

    @property
    def num_heads(self) -> int:
        return self._gates.layout.num_heads


class AdaptiveModel(nn.Module):
    """A Hugging Face causal LM with fixed head gates; `forward` and `generate` are the model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.gates = attach_head_gates(model, mode="fixed")
        self.blocks = [{"attn": AttentionGates(self.gates, layer)} for layer in range(self.gates.layout.num_layers)]

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)


def load_adaptive_model(model_name: str, baseline_model: nn.Module | None = None,
                        device: str | torch.device = "cpu") -> AdaptiveModel:
    """An AdaptiveModel over a deep copy of `baseline_model` (loaded from `model_name` when None), so
    the baseline stays untouched for comparisons. Every gate starts at 1 (the baseline exactly)."""
    base = load_baseline_model(model_name, device) if baseline_model is None else copy.deepcopy(baseline_model)
    return AdaptiveModel(base.to(device).eval())

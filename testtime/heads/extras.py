"""The seed's extras, done so that they cannot silently change the model.

- `SkipConnections`: U-Net-style links between mirrored decoder layers: the output of layer i
  is added to the output of layer L-1-i (i < L // 2), scaled by a learned scalar that starts at
  0, so at initialisation the model is unchanged (x + 0 * s == x) and the gradient with respect
  to the scale (the dot product of the skipped activations with the incoming gradient) is not
  zero, so it can learn. (A zero-initialised projection behind a zero gate would never move.)
- `HeadAgency`: per-head state from attention entropy, for a callback to update and a pruning
  controller to read. Utilisation u = 1 - normalised entropy (1: each query attends to one key;
  0: uniform over every visible key), kept as an exponential moving average. States:
      WITHDRAWN   the head's gate <= `withdrawn_gate` (the controller has switched it off), or
                  u < `withdrawn_utilization` (0.05: attention spread almost uniformly, an
                  averaging head that carries little token-specific signal);
      OVERLOADED  u > `overloaded_utilization` (0.95: attention collapsed onto one key per query,
                  e.g. an attention sink: the head is saturated and contributes a fixed pattern);
      ACTIVE      otherwise.
- `entropy_gate_schedule`: the seed's pruning-controller rule as a plain function: every
  `every` steps from `start`, heads whose normalised entropy exceeds `threshold` have their gate
  lowered by `decay` (down to `floor`); the most focused head of each layer is never lowered,
  so no layer is switched off.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from testtime.heads.gates import decoder_layers

ACTIVE, OVERLOADED, WITHDRAWN = 0, 1, 2
STATE_NAMES = ("active", "overloaded", "withdrawn")


def _hidden(output):
    """The hidden states of a decoder layer's output (a tensor, or a tuple starting with it: BLOOM)."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class SkipConnections(nn.Module):
    """Gated skips from layer i to layer L-1-i, on forward hooks; `scale` [num_pairs] starts at 0.

    Works with the KV cache: each forward pass carries the same positions through every layer,
    so the stored output of layer i always matches the positions layer L-1-i is computing.
    The model is held, not registered: the state_dict is `scale` only. `detach()` removes the hooks.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        layers = decoder_layers(model)
        n = len(layers)
        if n < 2:
            raise ValueError(f"skip connections need at least 2 decoder layers, the model has {n}")
        self.pairs = [(i, n - 1 - i) for i in range(n // 2)]
        self.scale = nn.Parameter(torch.zeros(len(self.pairs), device=next(model.parameters()).device))
        object.__setattr__(self, "model", model)
        self._stored: dict[int, torch.Tensor] = {}
        self._handles = []
        for k, (source, target) in enumerate(self.pairs):
            self._handles.append(layers[source].register_forward_hook(self._store(source)))
            self._handles.append(layers[target].register_forward_hook(self._add(k, source)))

    def _store(self, source: int):
        def hook(module, args, output):
            self._stored[source] = _hidden(output)
        return hook

    def _add(self, k: int, source: int):
        def hook(module, args, output):
            hidden = _hidden(output)
            skipped = self._stored[source]
            return _with_hidden(output, hidden + self.scale[k].to(hidden.dtype) * skipped)
        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._stored.clear()


class HeadAgency:
    """Per-head utilisation (EMA of 1 - normalised attention entropy) and state (see the module docstring)."""

    def __init__(self, num_layers: int, num_heads: int, momentum: float = 0.9, withdrawn_gate: float = 0.05,
                 withdrawn_utilization: float = 0.05, overloaded_utilization: float = 0.95):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if not 0.0 <= withdrawn_utilization < overloaded_utilization <= 1.0:
            raise ValueError("need 0 <= withdrawn_utilization < overloaded_utilization <= 1, got "
                             f"{withdrawn_utilization} and {overloaded_utilization}")
        self.momentum = momentum
        self.withdrawn_gate = withdrawn_gate
        self.withdrawn_utilization = withdrawn_utilization
        self.overloaded_utilization = overloaded_utilization
        self.utilization: torch.Tensor | None = None
        self.states = torch.full((num_layers, num_heads), ACTIVE, dtype=torch.long)

    def update(self, normalized_entropy: torch.Tensor, gate_values: torch.Tensor | None = None) -> torch.Tensor:
        """Fold one measurement ([L, H], from `attention_entropy(model, batches, normalized=True)`) into
        the utilisation and recompute the states; returns the states."""
        u = (1.0 - normalized_entropy.detach().float().cpu()).clamp(0.0, 1.0)
        if tuple(u.shape) != tuple(self.states.shape):
            raise ValueError(f"entropy must have shape {tuple(self.states.shape)}, got {tuple(u.shape)}")
        self.utilization = u if self.utilization is None else self.momentum * self.utilization + (1 - self.momentum) * u
        states = torch.full_like(self.states, ACTIVE)
        states[self.utilization > self.overloaded_utilization] = OVERLOADED
        withdrawn = self.utilization < self.withdrawn_utilization
        if gate_values is not None:
            withdrawn |= gate_values.detach().float().cpu() <= self.withdrawn_gate
        states[withdrawn] = WITHDRAWN
        self.states = states
        return states

    def mask(self, state: str) -> torch.Tensor:
        """[L, H] bool: the heads in `state` ("active", "overloaded" or "withdrawn")."""
        if state not in STATE_NAMES:
            raise ValueError(f"state must be one of {', '.join(STATE_NAMES)}; got {state!r}")
        return self.states == STATE_NAMES.index(state)

    def counts(self) -> dict[str, int]:
        return {name: int((self.states == i).sum()) for i, name in enumerate(STATE_NAMES)}


def entropy_gate_schedule(values: torch.Tensor, normalized_entropy: torch.Tensor, step: int, start: int = 0,
                          every: int = 100, threshold: float = 0.8, decay: float = 0.1,
                          floor: float = 0.0) -> torch.Tensor:
    """New gate values [L, H] after the controller's rule at `step` (unchanged off the schedule).

    g <- max(g - decay, floor) for heads with normalised entropy > threshold, except each layer's
    lowest-entropy head. The caller writes the result into the gates (`gates.values.copy_(new)`).
    """
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    values = values.detach().clone()
    if step < start or (step - start) % every:
        return values
    entropy = normalized_entropy.detach().to(values.device)
    lower = entropy > threshold
    lower[torch.arange(entropy.shape[0]), entropy.argmin(1)] = False
    return torch.where(lower, (values - decay).clamp(min=floor), values)

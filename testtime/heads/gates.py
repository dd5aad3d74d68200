"""Per-head gates on the attention of Hugging Face causal LMs, and hard-concrete gates with an L0 penalty.

How a gate acts. Every supported attention module ends the same way: the heads' outputs, laid
out head-major as [..., H * D] (head h in columns [h*D, (h+1)*D)), enter the output projection.
A forward pre-hook on that projection multiplies head h's slice by g[layer, h]. This equals the
`head_mask` of Michel et al. (2019) that transformers 5 removed, and it works under SDPA,
FlashAttention and eager attention alike, with the KV cache and `generate`, because it touches
neither the attention kernel nor the cache. With every gate at 1 the model is the original one
bit for bit: x * 1.0 == x exactly in IEEE arithmetic, so the multiply needs no special case.
`HeadGates.detach()` removes the hooks; the weights are never modified.

Read top to bottom:
1. `ARCHITECTURES`: per architecture, where the decoder layers, the attention module, its output
   projection and its q/k/v rows are (checked against transformers 5's modeling files);
   `head_layout(model)` and `head_rows(model, layer)`.
2. `HardConcreteGates` (Louizos et al. 2018, as used for heads by Voita et al. 2019).
3. `HeadGates` / `attach_head_gates`: the hooks, in three modes (fixed, learned, hard_concrete).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

# ---------------------------------------------------------------------------------------------
# 1. Where the heads are, per architecture
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Module names of one architecture (relative to the *ForCausalLM model).

    layers: dotted path of the ModuleList of decoder layers.
    attention: attribute of a decoder layer holding its self-attention.
    out_proj: attribute of the attention module: the output projection the gates hook.
    qkv: layout of the q/k/v rows: "separate" (q_proj, k_proj, v_proj), "gpt2" (Conv1D c_attn,
        [q | k | v] blocks of H*D columns), "interleaved" (BLOOM and GPT-NeoX query_key_value:
        rows viewed as [H, 3, D], i.e. head h's q, k, v rows are adjacent), "phi3" (qkv_proj,
        [q: H*D | k: KV*D | v: KV*D]).
    per_layer_heads: whether the config can give layers different head counts (none of these can).
    removable: whether heads can be removed from the weights so that the config still describes
        the model: only where the config has an explicit head_dim (Llama, Mistral, Qwen2, Phi3);
        the others derive head_dim = hidden_size / num_heads, so fewer heads would change it.
    heads_divide_hidden: the config refuses a head count that does not divide hidden_size
        (LlamaConfig.validate_architecture), which restricts the counts physical pruning can use.
    """

    layers: str
    attention: str
    out_proj: str
    qkv: str
    removable: bool = False
    heads_divide_hidden: bool = False
    per_layer_heads: bool = False


ARCHITECTURES: dict[str, Family] = {
    "gpt2": Family("transformer.h", "attn", "c_proj", "gpt2"),  # attn.c_proj, not mlp.c_proj
    "opt": Family("model.decoder.layers", "self_attn", "out_proj", "separate"),
    "bloom": Family("transformer.h", "self_attention", "dense", "interleaved"),
    "gpt_neox": Family("gpt_neox.layers", "attention", "dense", "interleaved"),
    "gptj": Family("transformer.h", "attn", "out_proj", "separate"),
    "llama": Family("model.layers", "self_attn", "o_proj", "separate", removable=True, heads_divide_hidden=True),
    "mistral": Family("model.layers", "self_attn", "o_proj", "separate", removable=True),
    "qwen2": Family("model.layers", "self_attn", "o_proj", "separate", removable=True),
    "phi3": Family("model.layers", "self_attn", "o_proj", "phi3", removable=True),
}


def family_of(model: nn.Module) -> tuple[str, Family]:
    """(model_type, Family) of a Hugging Face causal LM; an unsupported architecture is an error."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"head gating does not support architecture {model_type!r} ({type(model).__name__}); "
            f"supported model types: {', '.join(sorted(ARCHITECTURES))}"
        )
    if model_type == "bloom" and config.pretraining_tp > 1 and config.slow_but_exact:
        # BloomAttention then calls F.linear on slices of dense.weight, bypassing the module's hooks.
        raise ValueError("head gating does not support BLOOM with slow_but_exact=True and pretraining_tp > 1 "
                         f"(got pretraining_tp={config.pretraining_tp}): its output projection is not called "
                         "as a module")
    return model_type, ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(family_of(model)[1].layers)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    family = family_of(model)[1]
    return [getattr(layer, family.attention) for layer in decoder_layers(model)]


def output_projections(model: nn.Module) -> list[nn.Module]:
    family = family_of(model)[1]
    return [getattr(attn, family.out_proj) for attn in attention_modules(model)]


def in_dim(module: nn.Module) -> int:
    """The weight dimension indexing input features: 1 for nn.Linear [out, in], 0 for Conv1D [in, out]."""
    return 0 if isinstance(module, Conv1D) else 1


@dataclass(frozen=True)
class HeadLayout:
    num_layers: int
    num_heads: int     # query heads per layer
    num_kv_heads: int  # key/value heads per layer (== num_heads without grouped-query attention)
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head: query head h reads KV head h // group_size."""
        return self.num_heads // self.num_kv_heads


def head_layout(model: nn.Module) -> HeadLayout:
    """Head counts from the config; head_dim = out_proj input features / num_heads (works for any head_dim)."""
    config = model.config
    projections = output_projections(model)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    features = projections[0].weight.shape[in_dim(projections[0])]
    if features % heads or heads % kv:
        raise ValueError(f"{config.model_type}: output projection has {features} input features, not a multiple of "
                         f"num_attention_heads={heads}, or num_key_value_heads={kv} does not divide it")
    return HeadLayout(len(projections), heads, kv, features // heads)


def head_rows(model: nn.Module, layer: int) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    """Where each head's q, k and v live in layer `layer`: {"q": (module, idx [H, D]), "k": (module,
    idx [KV, D]), "v": ...}. idx holds output-feature indices of that module (weight rows of an
    nn.Linear, weight columns of a Conv1D, bias entries of both). Query head h uses q idx[h] and
    the k/v rows of its KV head h // group_size."""
    family = family_of(model)[1]
    attn = attention_modules(model)[layer]
    shape = head_layout(model)
    H, KV, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    if family.qkv == "separate":
        return {"q": (attn.q_proj, torch.arange(H * D).view(H, D)),
                "k": (attn.k_proj, torch.arange(KV * D).view(KV, D)),
                "v": (attn.v_proj, torch.arange(KV * D).view(KV, D))}
    if family.qkv == "gpt2":  # c_attn(x).split(n_embd): [q | k | v], each head-major
        base = torch.arange(H * D).view(H, D)
        return {"q": (attn.c_attn, base), "k": (attn.c_attn, base + H * D), "v": (attn.c_attn, base + 2 * H * D)}
    if family.qkv == "interleaved":  # fused.view(..., H, 3, D): BLOOM _reshape, GPT-NeoX view + chunk(3)
        base = torch.arange(3 * H * D).view(H, 3, D)
        return {"q": (attn.query_key_value, base[:, 0]), "k": (attn.query_key_value, base[:, 1]),
                "v": (attn.query_key_value, base[:, 2])}
    if family.qkv == "phi3":  # qkv[..., :H*D], then KV*D of k, then KV*D of v
        return {"q": (attn.qkv_proj, torch.arange(H * D).view(H, D)),
                "k": (attn.qkv_proj, H * D + torch.arange(KV * D).view(KV, D)),
                "v": (attn.qkv_proj, (H + KV) * D + torch.arange(KV * D).view(KV, D))}
    raise AssertionError(f"unknown qkv layout {family.qkv!r}")


# ---------------------------------------------------------------------------------------------
# 2. Hard-concrete gates (Louizos et al. 2018, "Learning Sparse Neural Networks through L0
#    Regularization"; applied to heads by Voita et al. 2019, "Analyzing Multi-Head
#    Self-Attention: Specialized Heads Do the Heavy Lifting, the Rest Can Be Pruned")
# ---------------------------------------------------------------------------------------------


class HardConcreteGates(nn.Module):
    """One stochastic gate z in [0, 1] per head, with a differentiable expected L0 norm.

    Training sample (reparameterised, u ~ U(0, 1)):
        s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
        z = clamp(s * (zeta - gamma) + gamma, 0, 1)
    The stretch to (gamma, zeta) = (-0.1, 1.1) and the clamp give z exactly 0 or 1 with non-zero
    probability. Deterministic gate (eval, and what pruning reads):
        z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)
    Expected L0 (the probability that a gate is non-zero, summed over heads):
        E[L0] = sum sigmoid(log_alpha - beta * log(-gamma / zeta))

    `init_log_alpha` = 3.0 starts every head open: deterministic gate 1 and P(z != 0) ~ 0.99.
    """

    def __init__(self, num_layers: int, num_heads: int, init_log_alpha: float = 3.0,
                 beta: float = 2 / 3, gamma: float = -0.1, zeta: float = 1.1):
        super().__init__()
        if not (gamma < 0 and zeta > 1 and beta > 0):
            raise ValueError(f"hard-concrete needs gamma < 0 < 1 < zeta and beta > 0; got gamma={gamma}, "
                             f"zeta={zeta}, beta={beta}")
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.log_alpha = nn.Parameter(torch.full((num_layers, num_heads), float(init_log_alpha)))

    def sample(self) -> torch.Tensor:
        eps = torch.finfo(self.log_alpha.dtype).eps
        u = torch.rand_like(self.log_alpha).clamp(eps, 1 - eps)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def forward(self, stochastic: bool) -> torch.Tensor:
        return self.sample() if stochastic else self.deterministic()

    def prob_nonzero(self) -> torch.Tensor:
        """[L, H]: P(z != 0) per head."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def expected_l0(self) -> torch.Tensor:
        return self.prob_nonzero().sum()

    def l0_penalty(self, lam: float, target_sparsity: float | None = None) -> torch.Tensor:
        """The sparsity term to add to the task loss.

        target_sparsity None: Voita et al.'s plain penalty, lam * E[L0] / num_heads (the expected
        active fraction, so lam does not depend on the model's size).
        target_sparsity t in [0, 1): lam * (E[L0] / num_heads - (1 - t))^2, a quadratic pull of the
        expected active fraction toward 1 - t. We chose it over a Lagrangian (Wang et al. 2020,
        "Structured Pruning of Large Language Models") because it needs no multiplier trained by
        gradient ascent; the price is that it settles near, not exactly at, the target: read the
        kept count from `deterministic()` and finish with a pruning plan if it must be exact.
        """
        active = self.expected_l0() / self.log_alpha.numel()
        if target_sparsity is None:
            return lam * active
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
        return lam * (active - (1.0 - target_sparsity)) ** 2


# ---------------------------------------------------------------------------------------------
# 3. The hooks
# ---------------------------------------------------------------------------------------------

MODES = ("fixed", "learned", "hard_concrete")
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, HeadGates]" = weakref.WeakKeyDictionary()


def attached_gates(model: nn.Module) -> "HeadGates | None":
    """The HeadGates currently attached to `model`, if any."""
    return _ATTACHED.get(model)


class HeadGates(nn.Module):
    """Gates g [num_layers, num_heads] multiplying each head's output before the output projection.

    Modes:
    - "fixed": `values` is a buffer (no gradient); write it in place (`gates.values[l, h] = 0`),
      e.g. from a pruning controller.
    - "learned": `values` is an nn.Parameter (continuous gates trained directly).
    - "hard_concrete": gates come from `self.hard_concrete` (HardConcreteGates): a fresh sample
      per forward pass while the MODEL is in training mode, the deterministic gate otherwise.
      `values` then returns the deterministic gate (read-only: train `hard_concrete.log_alpha`).

    The sample is drawn once per forward pass, in a pre-hook on the backbone (`model.base_model`):
    all layers of one pass, and a layer recomputed by gradient checkpointing, see the same sample
    (a layer hook would redraw on recomputation; a hook on the top model would be skipped by PEFT,
    which calls its `forward` directly).

    Attach to the Hugging Face model itself (PEFT wrapping afterwards is fine), and do not put a
    LoRA adapter on the output projection while gates are attached: PEFT's LoRA branch reads the
    projection's input beside the hooked base layer, so it would bypass the gates.

    The gates object holds the model without registering it as a submodule: its state_dict is the
    gates only (`gate`, or `hard_concrete.log_alpha`), and moving the gates does not move the model.
    Gate tensors are created on the model's device. Call `detach()` to remove the hooks (the model
    is then untouched).
    """

    def __init__(self, model: nn.Module, mode: str = "fixed", init: float = 1.0,
                 hard_concrete: HardConcreteGates | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if attached_gates(model) is not None:
            raise ValueError(f"{type(model).__name__} already has head gates attached; call .detach() on them first")
        self.layout = head_layout(model)
        self.mode = mode
        object.__setattr__(self, "model", model)  # not a submodule: keeps the gates' state_dict small
        shape = (self.layout.num_layers, self.layout.num_heads)
        device = next(model.parameters()).device
        self.hard_concrete = None
        if mode == "hard_concrete":
            self.hard_concrete = (hard_concrete or HardConcreteGates(*shape)).to(device)
            if tuple(self.hard_concrete.log_alpha.shape) != shape:
                raise ValueError(f"hard_concrete gates have shape {tuple(self.hard_concrete.log_alpha.shape)}, "
                                 f"the model has {shape} (layers, heads)")
        elif mode == "learned":
            self.gate = nn.Parameter(torch.full(shape, float(init), device=device))
        else:
            self.register_buffer("gate", torch.full(shape, float(init), device=device))
        self._override: torch.Tensor | None = None
        self._sample: torch.Tensor | None = None
        self._handles = [proj.register_forward_pre_hook(self._hook(layer))
                         for layer, proj in enumerate(output_projections(model))]
        if mode == "hard_concrete":
            self._handles.append(model.base_model.register_forward_pre_hook(self._draw))
        _ATTACHED[model] = self

    @property
    def values(self) -> torch.Tensor:
        """[L, H] gate values: the buffer/Parameter (fixed/learned) or the deterministic hard-concrete gate."""
        if self.hard_concrete is not None:
            return self.hard_concrete.deterministic()
        return self.gate

    def current(self) -> torch.Tensor:
        """The gates the next forward pass applies: an override if one is set, else `values`, or in
        hard-concrete mode a sample (model in training mode) or the deterministic gate."""
        if self._override is not None:
            return self._override
        if self.hard_concrete is not None:
            return self.hard_concrete(self.model.training)
        return self.gate

    @contextlib.contextmanager
    def overridden(self, values: torch.Tensor):
        """Apply `values` [L, H] instead of the gates inside the block (importance scoring uses it to
        differentiate with respect to a leaf tensor, and iterative pruning to score a partial plan)."""
        shape = (self.layout.num_layers, self.layout.num_heads)
        if tuple(values.shape) != shape:
            raise ValueError(f"override gates must have shape {shape} (layers, heads), got {tuple(values.shape)}")
        previous, self._override = self._override, values
        try:
            yield self
        finally:
            self._override = previous

    def _draw(self, module, args):
        self._sample = None if self._override is not None else self.current()

    def _hook(self, layer: int):
        def hook(module, args):
            if self._override is not None:
                gates = self._override
            elif self.hard_concrete is not None:
                gates = self._sample if self._sample is not None else self.current()
            else:
                gates = self.gate
            x = args[0]
            g = gates[layer].to(device=x.device, dtype=x.dtype)
            y = (x.unflatten(-1, (g.numel(), -1)) * g[:, None]).flatten(-2)
            return (y, *args[1:])
        return hook

    def detach(self) -> None:
        """Remove every hook; the model computes exactly what it did before the gates were attached."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if _ATTACHED.get(self.model) is self:
            del _ATTACHED[self.model]

    def extra_repr(self) -> str:
        return f"mode={self.mode}, layers={self.layout.num_layers}, heads={self.layout.num_heads}"


def attach_head_gates(model: nn.Module, mode: str = "fixed", init: float = 1.0,
                      hard_concrete: HardConcreteGates | None = None) -> HeadGates:
    """Hook gates onto every attention layer of `model` (GPT-2, OPT, BLOOM, GPT-NeoX/Pythia, GPT-J,
    Llama, Mistral, Qwen2, Phi3) and return them; see HeadGates for the modes.

    init: the starting value of fixed/learned gates (1.0: the model unchanged).
    hard_concrete: a HardConcreteGates to use in "hard_concrete" mode (default: a new one with
    log_alpha = 3, every gate open).
    """
    return HeadGates(model, mode=mode, init=init, hard_concrete=hard_concrete)

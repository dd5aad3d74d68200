"""AutoDeco: learned per-token temperature and top-p on top of a frozen causal LM.

Paper: "The End of Manual Decoding" (AutoDeco). Two small MLP heads read the final hidden
state `h` (after the final norm: the input of `lm_head`) and predict, for every position, the
temperature T in (0, 2) and the top-p P in (0, 1) used to sample the NEXT token. The base model
stays frozen; only the heads train.

Read top to bottom:
1. the heads (`TempHead`, `TopPHead`) and `predict_heads`, the one function that turns
   (hidden state, logits) into (T, P) for training and generation alike;
2. `AutoDecoModel`, the frozen base plus heads;
3. the losses: legacy temperature CE, soft top-p, and the temperature-first extension
   (`required_temperature`, `min_p_hinge_loss`, `goldilocks_mask`);
4. generation with HF `generate` (`HeadsLMHead`, `AutoDecoLogitsProcessor`, `autodeco_generate`).
The original checkpoint format (`save_autodeco`, `load_autodeco`, `merge_autodeco`,
`split_autodeco`) lives in `testtime/autodeco_export.py`; the figures in `testtime/autodeco_plots.py`.

Alignment convention of every loss: tensors are ALIGNED, i.e. position i of `logits`,
`temperature` and `top_p` predicts `labels[i]`. With model outputs over `input_ids` and HF-style
labels (a copy of input_ids, prompt = -100), shift first: `shift_for_next_token`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import weakref
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LogitsProcessor

from testtime.io import atomic_write_text
from testtime.lm import IGNORE_INDEX, scale_logits

CONFIG_FILE = "config.json"

# ---------------------------------------------------------------------------------------------
# 1. Heads
# ---------------------------------------------------------------------------------------------


class TempHead(nn.Module):
    """h [..., H] -> T [...] in (0, 2). Layout (`mlp.0`, `mlp.2`) matches the published heads."""

    def __init__(self, hidden_size: int, width: int = 256):
        super().__init__()
        self.hidden_size = hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.ReLU(), nn.Linear(width, 1), nn.Sigmoid())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden).squeeze(-1) * 2


def _prob_stats_rows(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(z.float() / (t.float()[:, None] + 1e-8), dim=-1)
    entropy = -(p * torch.log(p + 1e-8)).sum(-1)
    top5 = p.topk(min(5, p.shape[-1]), dim=-1).values.sum(-1)
    return torch.stack([p.max(-1).values, entropy, p.var(-1), top5], dim=-1)


def prob_stats(logits: torch.Tensor, temperature: torch.Tensor, chunk: int = 1024, compiled: bool = False):
    """[max p, entropy, var, top-5 mass] of p = softmax(z / (T + 1e-8)), float32, [..., 4].

    The same formulas as the original code (entropy with log(p + 1e-8), unbiased variance) so
    published TopP heads see the features they were trained on. No gradient flows here (the
    logits come from the frozen base and T is detached), so rows are processed in chunks to
    bound the float32 [tokens, vocab] temporaries. `compiled`: through `torch.compile` (see
    `kernel`), which fuses the passes over the vocabulary.
    """
    shape = logits.shape[:-1]
    z = logits.reshape(-1, logits.shape[-1])
    t = temperature.detach().reshape(-1)
    rows = kernel(_prob_stats_rows, compiled)
    with torch.no_grad():
        out = [rows(z[i:i + chunk], t[i:i + chunk]) for i in range(0, z.shape[0], chunk)]
    return torch.cat(out).reshape(*shape, 4) if out else z.new_zeros(*shape, 4, dtype=torch.float32)


_COMPILED: dict = {}


def kernel(fn, compiled: bool):
    """`fn`, or `torch.compile(fn, dynamic=True)` (one per function) when `compiled`.

    The per-token computations over the vocabulary (the top-p head's features, both losses) are
    chains of elementwise ops and reductions: eagerly each is a pass over a float32 [tokens,
    vocab] tensor, compiled they fuse into a few kernels. The first calls compile (seconds on a
    GPU, longer on a CPU); token counts vary between batches, hence dynamic shapes.
    """
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


class TopPHead(nn.Module):
    """(h, T, z) -> P [...] in (0, 1); input [h, T.detach(), max p, entropy, var, top-5 mass]."""

    def __init__(self, hidden_size: int, use_enhanced_features: bool = True, width: int = 256):
        super().__init__()
        self.hidden_size = hidden_size
        self.use_enhanced_features = use_enhanced_features
        in_dim = hidden_size + 1 + (4 if use_enhanced_features else 0)
        self.mlp = nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, 1), nn.Sigmoid())
        self.compiled = False  # compute the features through torch.compile (`prob_stats`); not saved

    def forward(self, hidden: torch.Tensor, temperature: torch.Tensor, logits: torch.Tensor | None = None):
        dtype = self.mlp[0].weight.dtype
        t = temperature.detach()  # the top-p loss must not move the temperature head through P
        feats = [hidden.to(dtype), t.to(dtype).unsqueeze(-1)]
        if self.use_enhanced_features:
            if logits is None:
                raise ValueError("TopPHead(use_enhanced_features=True) needs the logits")
            feats.append(prob_stats(logits, t, compiled=self.compiled).to(dtype))
        return self.mlp(torch.cat(feats, dim=-1)).squeeze(-1)


def _head_dtype(head: nn.Module) -> torch.dtype:
    return next(head.parameters()).dtype


def predict_heads(temp_head: TempHead | None, top_p_head: TopPHead | None, hidden: torch.Tensor,
                  logits: torch.Tensor | None = None):
    """(T, P) from the final hidden state [..., H] and logits [..., V]; None for a missing head.

    The single code path of training and generation, so a head sees identical inputs in both.
    Heads run in their own dtype (float32) with autocast off: under bf16-mixed training they
    would otherwise run in bf16, and generation would not reproduce the trained numbers.
    Without a temperature head the top-p head is fed T = 1.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        temperature = top_p = None
        if temp_head is not None:
            temperature = temp_head(hidden.to(_head_dtype(temp_head)))
        if top_p_head is not None:
            t_in = temperature if temperature is not None else hidden.new_ones(hidden.shape[:-1], dtype=torch.float32)
            top_p = top_p_head(hidden.to(_head_dtype(top_p_head)), t_in, logits)
    return temperature, top_p


# ---------------------------------------------------------------------------------------------
# 2. The wrapper: frozen base + heads
# ---------------------------------------------------------------------------------------------


@dataclass
class AutoDecoConfig:
    """The fields of the original `config.json` (model_type "autodeco").

    `base_config` holds the base model's own config dict; like the original, `to_dict` writes it
    at the top level too, so a merged folder describes the base architecture for serving.
    `hidden_size` is the heads' input size (the width of the lm_head input).
    """

    base_model_name_or_path: str | None = None
    base_model_type: str | None = None
    enable_temperature_head: bool = True
    enable_top_p_head: bool = True
    use_enhanced_features: bool = True
    hidden_size: int | None = None
    head_width: int = 256
    model_type: str = "autodeco"
    base_config: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.base_config.items() if k not in ("architectures", "_name_or_path")}
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "base_config"}
        if out.get("hidden_size", self.hidden_size) != self.hidden_size:
            own.pop("hidden_size")  # keep the base's own value; the heads' size is in *_hidden_size
        out.update(own)
        out.update(
            architectures=["AutoDecoModelForCausalLM"],
            temperature_hidden_size=self.hidden_size,
            top_p_hidden_size=self.hidden_size,
            # aliases read by older versions of the original code
            train_temp=self.enable_temperature_head,
            train_top_p=self.enable_top_p_head,
        )
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "AutoDecoConfig":
        if d.get("model_type") != "autodeco":
            raise ValueError(f"not an AutoDeco config: model_type is {d.get('model_type')!r}, expected 'autodeco'")
        own = {f.name for f in fields(cls)}
        extra = {"architectures", "temperature_hidden_size", "top_p_hidden_size", "train_temp", "train_top_p"}
        base = {k: v for k, v in d.items() if k not in own | extra}
        hidden = d.get("temperature_hidden_size") or d.get("top_p_hidden_size") or d.get("hidden_size")
        if "hidden_size" in d:
            base["hidden_size"] = d["hidden_size"]
        if d.get("base_model_type"):
            base["model_type"] = d["base_model_type"]
        return cls(
            base_model_name_or_path=d.get("base_model_name_or_path"),
            base_model_type=d.get("base_model_type"),
            enable_temperature_head=d.get("enable_temperature_head", d.get("train_temp", True)),
            enable_top_p_head=d.get("enable_top_p_head", d.get("train_top_p", True)),
            use_enhanced_features=d.get("use_enhanced_features", True),
            hidden_size=hidden,
            head_width=d.get("head_width", 256),
            base_config=base,
        )

    def save(self, folder) -> None:
        atomic_write_text(Path(folder) / CONFIG_FILE, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, folder) -> "AutoDecoConfig":
        return cls.from_dict(json.loads((Path(folder) / CONFIG_FILE).read_text()))


def base_config_dict(config) -> dict:
    """The base model's config as written into AutoDeco's config.json: the values that differ from
    the defaults (as `save_pretrained` writes them), without private leftovers of a conversion
    (`_name_or_path`, a GGUF file's `_model_name_or_path`)."""
    return {k: v for k, v in config.to_diff_dict().items() if not k.startswith("_")}


def head_input_size(llm: nn.Module) -> int:
    """Width of the final hidden state that feeds lm_head (what the heads read)."""
    head = llm.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        return weight.shape[1]
    return llm.config.get_text_config().hidden_size


@contextlib.contextmanager
def capture_lm_head(llm: nn.Module, last_only: bool = False):
    """Record the input (final hidden state) and output (logits) of `llm`'s lm_head.

    Yields a dict updated at every lm_head call with "hidden" and "logits"; with `last_only`
    only the last position is kept ([B, H], [B, V]): during generation the prefill call may
    cover the whole prompt while decode calls cover one position.
    """
    head = llm.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(llm).__name__} has no output embeddings (lm_head) to read the hidden state from")
    store: dict = {}

    def pre_hook(module, args):
        store["hidden"] = args[0][:, -1] if last_only else args[0]

    def hook(module, args, output):
        store["logits"] = output[:, -1] if last_only else output
        store["calls"] = store.get("calls", 0) + 1  # lets a reader notice a forward that skipped the hooks

    handles = [head.register_forward_pre_hook(pre_hook), head.register_forward_hook(hook)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class AutoDecoOutput:
    logits: torch.Tensor  # [B, L, V] base logits (base dtype, no grad)
    temperature: torch.Tensor | None  # [B, L] float32, None without a temperature head
    top_p: torch.Tensor | None  # [B, L] float32, None without a top-p head
    hidden_states: torch.Tensor  # [B, L, H] final hidden state (post final norm), no grad


class AutoDecoModel(nn.Module):
    """A frozen HF causal LM (`self.llm`) plus `temp_head` / `top_p_head` (None if disabled)."""

    def __init__(self, llm: nn.Module, enable_temperature_head: bool = True, enable_top_p_head: bool = True,
                 use_enhanced_features: bool = True, width: int = 256, base_model_name_or_path: str | None = None):
        super().__init__()
        if not (enable_temperature_head or enable_top_p_head):
            raise ValueError("enable at least one of the temperature and top-p heads")
        self.llm = llm
        self.llm.requires_grad_(False)
        self.llm.eval()
        hidden = head_input_size(llm)
        # Heads are created in float32 whatever the base dtype is.
        self.temp_head = TempHead(hidden, width).float() if enable_temperature_head else None
        self.top_p_head = TopPHead(hidden, use_enhanced_features, width).float() if enable_top_p_head else None
        base_cfg = base_config_dict(llm.config)
        self.config = AutoDecoConfig(
            base_model_name_or_path=base_model_name_or_path or getattr(llm, "name_or_path", None) or None,
            base_model_type=getattr(llm.config, "model_type", None),
            enable_temperature_head=enable_temperature_head,
            enable_top_p_head=enable_top_p_head,
            use_enhanced_features=use_enhanced_features,
            hidden_size=hidden,
            head_width=width,
            base_config=base_cfg,
        )

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()  # the base is frozen: no dropout, whatever mode the wrapper is in
        return self

    def heads(self):
        return self.temp_head, self.top_p_head

    def heads_state_dict(self) -> dict:
        """Only the trainable weights, with the checkpoint's key names (`temp_head.mlp.0.weight`...)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def forward(self, input_ids=None, attention_mask=None, **kwargs) -> AutoDecoOutput:
        kwargs.setdefault("use_cache", False)
        with torch.no_grad(), capture_lm_head(self.llm) as store:
            out = self.llm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = store["hidden"]
        temperature, top_p = predict_heads(self.temp_head, self.top_p_head, hidden, out.logits)
        return AutoDecoOutput(logits=out.logits, temperature=temperature, top_p=top_p, hidden_states=hidden)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """`autodeco_generate` with this model's heads; see there."""
        return autodeco_generate(self.llm, self, input_ids, attention_mask, **kwargs)

    def save_pretrained(self, output_dir) -> None:
        """The original format (config.json + heads-only model.safetensors); see `testtime.autodeco_export`."""
        from testtime.autodeco_export import save_autodeco  # the export module builds on this one

        save_autodeco(output_dir, self.temp_head, self.top_p_head, self.config)


# ---------------------------------------------------------------------------------------------
# 3. Losses (aligned tensors: position i of logits predicts labels[i])
# ---------------------------------------------------------------------------------------------


def shift_for_next_token(logits, temperature, top_p, labels):
    """Align model outputs over input_ids with HF-style labels: drop the last prediction and the
    first label. Any argument may be None."""
    cut = lambda x: None if x is None else x[:, :-1]  # noqa: E731
    return cut(logits), cut(temperature), cut(top_p), None if labels is None else labels[:, 1:]


def _selected(labels: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    valid = labels != IGNORE_INDEX
    return valid if mask is None else valid & mask.bool()


def _zero(*tensors) -> torch.Tensor:
    """A scalar 0 that still reaches the inputs, so backward works when no token is selected."""
    return sum((t.float() * 0).sum() for t in tensors if t is not None)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, moved to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _label_prob(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untempered base probability of the label, no gradient: the per-token weight."""
    return torch.softmax(z.detach(), dim=-1).gather(-1, y[:, None]).squeeze(-1)


def _temperature_rows(z, t, y):
    z = _f32(z)
    ce = F.cross_entropy(z / _f32(t).clamp_min(1e-2)[:, None], y, reduction="none")
    return ce * _label_prob(z, y)


def temperature_loss(logits, temperature, labels, easy_token_drop: float = 0.6, generator=None, mask=None,
                     compiled: bool = False):
    """Legacy AutoDeco temperature loss.

    Easy tokens (base argmax == label) are dropped with probability `easy_token_drop`, redrawn at
    every call. Per kept token `CE(z / T, y) * stopgrad(softmax(z)[y])` with T clamped at 1e-2;
    mean over kept tokens; 0 (with a gradient path) if none is kept. `compiled`: see `kernel`.
    """
    selected = _selected(labels, mask)
    with torch.no_grad():
        easy = logits.argmax(-1) == labels
        drop = easy & (_rand(labels.shape, generator, labels.device) < easy_token_drop)
    keep = selected & ~drop
    if not keep.any():
        return _zero(temperature)
    return kernel(_temperature_rows, compiled)(logits[keep], temperature[keep], labels[keep]).mean()


def _soft_top_p_rows(z, t, top_p, y, steepness: float, k: int | None):
    """Per row: the label's masked mass p_y m_y, the normalizer sum_v p_v m_v (estimated from the
    top k with its error bound, or exact through the full sort when k is None) and the weight."""
    z = _f32(z)
    p = torch.softmax(z / t[:, None], dim=-1)
    weight = _label_prob(z, y)
    p_y = p.gather(-1, y[:, None]).squeeze(-1)
    # the label's inclusive cumulative mass: what is more likely than it, plus itself (no sort)
    with torch.no_grad():
        above = p > p_y[:, None].detach()
    c_y = (p * above).sum(-1) + p_y
    m_y = torch.exp(-steepness * torch.relu(c_y - top_p))
    if k is None:
        normalizer, error = _exact_normalizer(p, top_p, steepness), torch.zeros_like(p_y)
    else:
        normalizer, error = _top_k_estimate(p, top_p, steepness, k)
    return p_y * m_y, normalizer, error, weight


def soft_top_p_loss(logits, temperature, top_p, labels, steepness: float = 30.0, mask=None, top_k: int | None = 256,
                    tolerance: float = 1e-5, compiled: bool = False):
    """Differentiable top-p surrogate.

    p = softmax(z / T) (T is NOT detached), sorted descending, inclusive cumulative sum c;
    mask m = exp(-steepness * relu(c - P)) put back in vocabulary order; p~ = p m / (sum p m + 1e-9);
    per token -log(p~[y] + 1e-9) * stopgrad(softmax(z)[y]); mean over selected tokens.

    The full sort over the vocabulary is most of an AutoDeco training step, so by default only
    the `top_k` most likely tokens are sorted (`soft_top_p_normalizer`), and rows whose tail
    estimate cannot be certified to within `tolerance` of the exact per-token loss fall back to
    the full sort. `top_k=None` always sorts everything. `compiled`: see `kernel` (the rows that
    fall back are summed eagerly).
    """
    selected = _selected(labels, mask)
    if not selected.any():
        return _zero(temperature, top_p)
    z, y = logits[selected], labels[selected]
    t = _f32(temperature[selected]).clamp_min(1e-8)
    p_top = _f32(top_p[selected])
    k = None if top_k is None or top_k >= z.shape[-1] else top_k
    numerator, normalizer, error, weight = kernel(_soft_top_p_rows, compiled)(z, t, p_top, y, steepness, k)
    if k is not None:
        tolerance = tolerance / weight.clamp_min(1e-12)
        with torch.no_grad():
            todo = (~(error <= tolerance * normalizer.clamp_min(1e-30))).nonzero().squeeze(-1)
        if len(todo):  # a tail too heavy to bound: the normalizer's own rounds (top_k again, 8 x, full sort)
            p_rows = torch.softmax(_f32(z[todo]) / t[todo, None], dim=-1)
            exact, _ = soft_top_p_normalizer(p_rows, p_top[todo], steepness, k, tolerance[todo])
            normalizer = normalizer.index_put((todo,), exact)
    p_label = numerator / (normalizer + 1e-9)
    return (-torch.log(p_label + 1e-9) * weight).mean()


def _exact_normalizer(p, top_p, steepness: float):
    sorted_p = p.sort(dim=-1, descending=True).values
    return (sorted_p * torch.exp(-steepness * torch.relu(sorted_p.cumsum(-1) - top_p[:, None]))).sum(-1)


def soft_top_p_normalizer(p, top_p, steepness: float = 30.0, top_k: int | None = 256, tolerance=1e-5):
    """(sum_v p_v m_v [N], bool [N] rows that took the full sort) with m = exp(-steepness * relu(c - P)),
    c the inclusive cumulative mass in descending order of p; rows p [N, V], P [N]; `tolerance`
    [N] (or a float) bounds the relative error.

    Exact on the `top_k` most likely tokens. The tail (mass tau = 1 - c_k beyond the k-th token)
    has c in (c_k, 1], so its sum lies in [tau exp(-a relu(1 - P)), tau exp(-a relu(c_k - P))]
    (a = steepness). When c_k >= P every tail mask is exp(-a (c_k - P)) exp(-a C) with C the tail's
    own cumulative mass, and sum_tail q (1 - a C) = tau - a (tau^2 + sum q^2) / 2 whatever the order
    (sum_i q_i C_i = ((sum q)^2 + sum q^2) / 2); |exp(-x) - (1 - x)| <= x^2 / 2 bounds its error by
    m_k a^2 tau^3 / 2. Otherwise the midpoint of the interval, error half its width. Rows whose
    error bound exceeds `tolerance` times the estimate try again with 8 x top_k tokens, then are
    summed over the full sort.
    """
    vocab = p.shape[-1]
    if top_k is None or top_k >= vocab:
        return _exact_normalizer(p, top_p, steepness), torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
    tolerance = torch.as_tensor(tolerance, dtype=p.dtype, device=p.device).expand(p.shape[0])
    total = p.new_zeros(p.shape[0])
    todo = torch.arange(p.shape[0], device=p.device)  # rows not certified yet
    for k in (top_k, 8 * top_k):
        if k >= vocab or not len(todo):
            break
        rows, rows_p = p[todo], top_p[todo]
        estimate, error = _top_k_estimate(rows, rows_p, steepness, k)
        with torch.no_grad():
            certified = error <= tolerance[todo] * estimate.clamp_min(1e-30)
        total = total.index_put((todo[certified],), estimate[certified])
        todo = todo[~certified]
    fallback = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
    if len(todo):
        fallback[todo] = True
        total = total.index_put((todo,), _exact_normalizer(p[todo], top_p[todo], steepness))
    return total, fallback


def _top_k_estimate(p, top_p, steepness: float, k: int):
    """(estimate of sum_v p_v m_v, its error bound) from the k most likely tokens: see `soft_top_p_normalizer`."""
    values = p.topk(k, dim=-1, sorted=True).values
    c = values.cumsum(-1)
    head = (values * torch.exp(-steepness * torch.relu(c - top_p[:, None]))).sum(-1)
    c_k = c[:, -1]
    tau = (p.sum(-1) - c_k).clamp_min(0.0)
    m_k = torch.exp(-steepness * torch.relu(c_k - top_p))
    q2 = ((p * p).sum(-1) - (values * values).sum(-1)).clamp_min(0.0)
    linear = m_k * (tau - steepness * 0.5 * (tau * tau + q2))
    upper, lower = tau * m_k, tau * torch.exp(-steepness * torch.relu(1.0 - top_p))
    beyond = c_k >= top_p
    tail = torch.where(beyond, linear, (upper + lower) / 2)
    with torch.no_grad():
        error = torch.where(beyond, m_k * steepness ** 2 * tau ** 3 / 2, (upper - lower) / 2)
    return head + tail, error


def required_temperature(logits, labels, min_p_ratio: float = 0.1) -> torch.Tensor:
    """Smallest T at which min-p (ratio r, applied after temperature) keeps the label, [B, L].

    The label survives iff p_y / p_max = exp(-(z_max - z_y) / T) >= r, i.e.
    T >= T_req = relu(z_max - z_y) / (-ln r). 0 where the label is the argmax; 0 at ignored
    positions. No gradient (it is a target).
    """
    r = min(max(float(min_p_ratio), 1e-6), 1 - 1e-6)
    with torch.no_grad():
        y = labels.clamp_min(0)
        z_y = _f32(logits.gather(-1, y.unsqueeze(-1)).squeeze(-1))
        delta = torch.relu(_f32(logits.max(-1).values) - z_y)
        t_req = delta / -math.log(r)
    return t_req.masked_fill(labels == IGNORE_INDEX, 0.0)


def min_p_hinge_loss(logits, temperature, labels, min_p_ratio: float = 0.1, under_weight: float = 1.0,
                     over_weight: float = 1.0, temp_cap: float | None = 2.0, mask=None):
    """Temperature-first objective ("analytic_min_p_hinge").

    Mean over selected tokens of `under_weight * relu(T_req - T) + over_weight * relu(T - T_req)^2`:
    a linear push up while T is too cold for min-p to keep the label, a quadratic pull down when
    it is hotter than needed.

    temp_cap: T_req is clamped to the cap (default 2.0, the temperature head's range). A target
    above what the head can output would only saturate the sigmoid; with the cap it pulls T
    towards the cap instead. `goldilocks_mask` with the same cap drops those tokens altogether,
    in which case the clamp never binds. None or a value <= 0 (e.g. -1) disables the clamp.
    """
    selected = _selected(labels, mask)
    if not selected.any():
        return _zero(temperature)
    t_req = required_temperature(logits, labels, min_p_ratio)[selected]
    if temp_cap is not None and temp_cap > 0:
        t_req = t_req.clamp_max(temp_cap)
    t = _f32(temperature[selected])
    loss = under_weight * torch.relu(t_req - t) + over_weight * torch.relu(t - t_req) ** 2
    return loss.mean()


def label_rank(logits, labels) -> torch.Tensor:
    """Rank of the label under the base distribution (0 = argmax): tokens with a larger logit."""
    with torch.no_grad():
        z_y = logits.gather(-1, labels.clamp_min(0).unsqueeze(-1))
        return (logits > z_y).sum(-1)


def _keep_random(keep: torch.Tensor, members: torch.Tensor, k: int, generator) -> torch.Tensor:
    """Keep exactly k random positions among `members` (bool, same shape as keep); others untouched."""
    n = int(members.sum())
    if k >= n:
        return keep
    score = _rand(members.shape, generator, members.device).masked_fill(~members, 2.0)
    chosen = torch.zeros(members.numel(), dtype=torch.bool, device=members.device)
    chosen[score.flatten().topk(k, largest=False).indices] = True
    return keep & (~members | chosen.view_as(members))


def goldilocks_mask(logits, labels, min_p_ratio: float = 0.1, temp_cap: float | None = 2.0,
                    rebalance: bool = False, num_bins: int = 20, easy_frac: float | None = None,
                    topk: int | None = None, generator=None) -> torch.Tensor:
    """Select the "just right" tokens to train the temperature on; bool [B, L] (aligned tensors).

    Applied in this order on the valid tokens (label != -100):
    - cap: keep T_req <= temp_cap (the head cannot reach more); None or <= 0 (-1) disables;
    - topk: keep tokens whose label rank under the base distribution is < topk (drop hopeless ones);
    - easy_frac: "easy" means the label is the base argmax (rank 0, equivalently T_req == 0, the
      same notion as the legacy easy-token drop); keep exactly round(easy_frac * n_easy) of them,
      chosen at random;
    - rebalance: bin T_req over [0, cap] (over [0, max T_req] without a cap) into `num_bins` bins
      and downsample each non-empty bin at random to the count of the smallest non-empty bin.
    Random choices use `generator` (on any device). The caller logs the counts.
    """
    keep = labels != IGNORE_INDEX
    t_req = required_temperature(logits, labels, min_p_ratio)
    capped = temp_cap is not None and temp_cap > 0
    if capped:
        keep &= t_req <= temp_cap
    rank = label_rank(logits, labels) if (topk is not None or easy_frac is not None) else None
    if topk is not None:
        keep &= rank < topk
    if easy_frac is not None:
        easy = keep & (rank == 0)
        keep = _keep_random(keep, easy, int(round(easy_frac * int(easy.sum()))), generator)
    if rebalance and keep.any():
        hi = float(temp_cap) if capped else float(t_req[keep].max())
        bins = (t_req / max(hi, 1e-12) * num_bins).floor().long().clamp(0, num_bins - 1)
        counts = torch.bincount(bins[keep], minlength=num_bins)
        smallest = int(counts[counts > 0].min())
        for b in torch.nonzero(counts > smallest).flatten().tolist():
            keep = _keep_random(keep, keep & (bins == b), smallest, generator)
    return keep


def training_losses(output: AutoDecoOutput, labels, objective: str = "legacy_ce", temp_mask=None, top_p_mask=None,
                    generator=None, easy_token_drop: float = 0.6, steepness: float = 30.0, min_p_ratio: float = 0.1,
                    under_weight: float = 1.0, over_weight: float = 1.0, temp_cap: float | None = 2.0,
                    top_k: int | None = 256, compiled: bool = False) -> dict:
    """All losses of one batch: {"loss", "temp_loss", "top_p_loss"} (absent heads give None).

    `labels` are HF-style (aligned with input_ids, prompt = -100); the shift happens here.
    `temp_mask` selects the tokens of the temperature loss (e.g. `goldilocks_mask`), `top_p_mask`
    those of the top-p loss, each over the SHIFTED positions [B, L - 1] (None: every labelled token).
    objective: "legacy_ce" (temperature CE) or "analytic_min_p_hinge" for the temperature head.
    `top_k`: the soft top-p loss sorts only that many tokens per row when it can certify the rest
    (see `soft_top_p_normalizer`; None sorts the whole vocabulary). `compiled`: the per-token
    vocabulary computations of both losses through torch.compile (`kernel`).
    """
    logits, temperature, top_p, labels = shift_for_next_token(output.logits, output.temperature, output.top_p, labels)
    temp_loss = top_p_loss = None
    if temperature is not None:
        if objective == "legacy_ce":
            temp_loss = temperature_loss(logits, temperature, labels, easy_token_drop, generator, mask=temp_mask,
                                         compiled=compiled)
        elif objective == "analytic_min_p_hinge":
            temp_loss = min_p_hinge_loss(logits, temperature, labels, min_p_ratio, under_weight, over_weight,
                                         temp_cap, mask=temp_mask)
        else:
            raise ValueError(f"unknown objective {objective!r}: use 'legacy_ce' or 'analytic_min_p_hinge'")
    if top_p is not None:
        t = temperature if temperature is not None else torch.ones_like(top_p)
        top_p_loss = soft_top_p_loss(logits, t, top_p, labels, steepness, mask=top_p_mask, top_k=top_k,
                                     compiled=compiled)
    loss = sum(x for x in (temp_loss, top_p_loss) if x is not None)
    return {"loss": loss, "temp_loss": temp_loss, "top_p_loss": top_p_loss}


# ---------------------------------------------------------------------------------------------
# 4. Generation with HF generate
# ---------------------------------------------------------------------------------------------


class HeadsLMHead(nn.Module):
    """A stand-in for the model's lm_head that also runs the heads, inside the same forward.

    `forward` returns the wrapped lm_head's logits unchanged and, for the LAST position, writes
    the heads' (T_hat, P_hat) into the float32 buffer `predicted` [B, 2] (1.0 for a missing head)
    and counts the call in `calls`. Both are in-place writes to fixed buffers, so they work in a
    torch.compile'd forward (and its CUDA graphs), where Python hooks do not run. The heads read
    exactly what `capture_lm_head(last_only=True)` records (the lm_head input and its raw
    output), through `predict_heads`, so both paths predict the same T and P.

    `autodeco_generate` installs one with `model.set_output_embeddings` for the duration of
    `generate` (`install_heads_lm_head`) and hands it to the processor with `attach_lm_head`.
    `config`: the base model's, for families that rescale the lm_head output (Gemma-2/3, Cohere,
    Granite: `testtime.lm.scale_logits`), so the heads see the logits they were trained on.
    """

    def __init__(self, lm_head: nn.Module, temp_head=None, top_p_head=None, config=None):
        super().__init__()
        self.lm_head, self.temp_head, self.top_p_head = lm_head, temp_head, top_p_head
        self.config = config
        self.register_buffer("predicted", torch.ones(0, 2), persistent=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long), persistent=False)

    @property
    def weight(self):  # code that reads `get_output_embeddings().weight` keeps working
        return self.lm_head.weight

    def reset(self, batch_size: int, device) -> None:
        """Size the buffers for a generate call of `batch_size` rows (reused when unchanged: the
        buffers' addresses are baked into CUDA graphs) and zero the call counter."""
        device = torch.device(device)
        if self.predicted.shape[0] != batch_size or self.predicted.device != device:
            self.predicted = torch.ones(batch_size, 2, device=device)
            self.calls = torch.zeros((), dtype=torch.long, device=device)
            for buf in (self.predicted, self.calls):
                torch._dynamo.mark_static_address(buf)
        self.calls.zero_()

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        logits = self.lm_head(hidden, *args, **kwargs)
        if hidden.shape[0] != self.predicted.shape[0]:
            raise RuntimeError(f"HeadsLMHead sized for batch {self.predicted.shape[0]} got batch {hidden.shape[0]}")
        last = logits[:, -1] if self.config is None else scale_logits(self.config, logits[:, -1])
        t_hat, p_hat = predict_heads(self.temp_head, self.top_p_head, hidden[:, -1], last)
        ones = torch.ones(hidden.shape[0], device=self.predicted.device, dtype=torch.float32)
        t_hat = ones if t_hat is None else t_hat.float().to(ones.device)
        p_hat = ones if p_hat is None else p_hat.float().to(ones.device)
        self.predicted.copy_(torch.stack([t_hat, p_hat], dim=-1))
        self.calls.add_(1)
        return logits


# One HeadsLMHead per base model, reused across calls while its lm_head and heads are the same
# objects: its buffers keep their addresses, so CUDA graphs recorded for it stay valid.
_HEADS_LM_HEADS: "weakref.WeakKeyDictionary[nn.Module, HeadsLMHead]" = weakref.WeakKeyDictionary()


def _head_device(temp_head, top_p_head, default):
    head = temp_head if temp_head is not None else top_p_head
    return next(head.parameters()).device if head is not None else default


@contextlib.contextmanager
def install_heads_lm_head(llm: nn.Module, temp_head=None, top_p_head=None, batch_size: int = 1):
    """Temporarily replace `llm`'s output embeddings with a `HeadsLMHead`; yields it.

    Raises ValueError when the model has no lm_head or does not accept a replacement (its
    `get_output_embeddings` does not return what `set_output_embeddings` was given); the
    original module is always put back.
    """
    inner = llm.get_output_embeddings()
    if inner is None:
        raise ValueError(f"{type(llm).__name__} has no output embeddings (lm_head) to read the hidden state from")
    if isinstance(inner, HeadsLMHead):
        raise RuntimeError("the model's lm_head is already a HeadsLMHead (nested autodeco_generate?)")
    wrapper = _HEADS_LM_HEADS.get(llm)
    if wrapper is None or wrapper.lm_head is not inner or wrapper.temp_head is not temp_head \
            or wrapper.top_p_head is not top_p_head:
        wrapper = HeadsLMHead(inner, temp_head, top_p_head, llm.config)
        _HEADS_LM_HEADS[llm] = wrapper
    wrapper.reset(batch_size, _head_device(temp_head, top_p_head, next(inner.parameters(), torch.empty(0)).device))
    try:
        llm.set_output_embeddings(wrapper)
        if llm.get_output_embeddings() is not wrapper:
            raise ValueError(f"{type(llm).__name__}.set_output_embeddings did not install the heads' lm_head")
        yield wrapper
    finally:
        if llm.get_output_embeddings() is not inner:
            llm.set_output_embeddings(inner)


class AutoDecoLogitsProcessor(LogitsProcessor):
    """Per-token temperature and top-p from the heads, as the vLLM fork of the original applies them.

    For each row: T = T_hat * user_temperature (user_temperature == 0: greedy), P = clamp(P_hat *
    user_top_p, 0, 1); then temperature, hard top-p (the top token always stays) and, for
    hinge-trained heads, optional min-p (keep p >= min_p * max p). A missing head means T_hat = 1
    or P_hat = 1.

    The heads read the final hidden state and raw logits of the last position. Two ways to get
    them, neither with a second forward; `autodeco_generate` does the wiring:
    - `attach_lm_head(heads_lm_head)`: a `HeadsLMHead` installed as the model's lm_head computes
      (T_hat, P_hat) inside the forward; works with a compiled forward (static cache on GPU);
    - `attach(model)`: hooks on the model's lm_head record its input and output and the heads run
      here. A compiled forward skips Python hooks, so generate with disable_compile=True. By hand:

        proc = AutoDecoLogitsProcessor(temp_head, top_p_head)
        with proc.attach(model):
            model.generate(ids, logits_processor=[proc], do_sample=True, temperature=1.0,
                           top_p=1.0, top_k=0, disable_compile=True)

    With `record=True` the T and P actually used are kept per step (`recorded()` -> [B, steps]).
    The heads' features come from the model's own logits (the lm_head output, rescaled as the
    family does: `testtime.lm.scale_logits`), so processors that run earlier (repetition
    penalty...) change what is sampled from but not what the heads see.
    """

    def __init__(self, temp_head=None, top_p_head=None, user_temperature: float = 1.0, user_top_p: float = 1.0,
                 min_p: float | None = None, record: bool = False):
        self.temp_head, self.top_p_head = temp_head, top_p_head
        self.user_temperature, self.user_top_p, self.min_p = float(user_temperature), float(user_top_p), min_p
        self.record = record
        self.store: dict | None = None
        self.config = None  # the base model's, set by attach (its lm_head output may be rescaled)
        self.lm_head: HeadsLMHead | None = None
        self.steps = 0
        self._last_call = 0
        self.temperatures: list[torch.Tensor] = []
        self.top_ps: list[torch.Tensor] = []

    @contextlib.contextmanager
    def attach(self, model):
        with capture_lm_head(model, last_only=True) as store:
            self.store, self._last_call, self.config = store, 0, model.config
            try:
                yield self
            finally:
                self.store = None

    @contextlib.contextmanager
    def attach_lm_head(self, heads_lm_head: HeadsLMHead):
        """Read (T_hat, P_hat) from an installed `HeadsLMHead` instead of hooks. On exit, raises
        RuntimeError if the model ran fewer forwards through it than the processor was called
        (a compiled graph traced without it would serve stale values)."""
        self.lm_head, self.steps = heads_lm_head, 0
        try:
            yield self
            calls = int(heads_lm_head.calls)
            if calls < self.steps:
                raise RuntimeError(f"the heads ran in {calls} forwards for {self.steps} sampling steps: the forward "
                                   "bypassed the installed HeadsLMHead (a stale compiled graph?)")
        finally:
            self.lm_head = None

    def recorded(self):
        """(T, P) used at each step, float32 [B, steps] each (None before any step)."""
        if not self.temperatures:
            return None, None
        return torch.stack(self.temperatures, 1), torch.stack(self.top_ps, 1)

    def _predicted(self, scores: torch.Tensor):
        """(T_hat, P_hat) float32 [B] on scores' device for this step."""
        if self.lm_head is not None:
            predicted = self.lm_head.predicted
            if predicted.shape[0] != scores.shape[0]:
                raise RuntimeError(f"heads batch {predicted.shape[0]} != scores batch {scores.shape[0]}")
            self.steps += 1
            predicted = predicted.to(scores.device)
            return predicted[:, 0], predicted[:, 1]
        if self.store is None or "hidden" not in self.store:
            raise RuntimeError("AutoDecoLogitsProcessor saw no hidden state: wrap generate in `proc.attach(model)`")
        if self.store["calls"] == self._last_call:
            # e.g. a torch.compile'd forward (static cache on GPU) runs without the Python hooks
            raise RuntimeError("lm_head hooks did not fire for this step (compiled forward?): generate with "
                               "disable_compile=True")
        self._last_call = self.store["calls"]
        hidden, raw = self.store["hidden"], self.store["logits"]
        if hidden.shape[0] != scores.shape[0]:
            raise RuntimeError(f"captured batch {hidden.shape[0]} != scores batch {scores.shape[0]}")
        t_hat, p_hat = predict_heads(self.temp_head, self.top_p_head, hidden, scale_logits(self.config, raw))
        ones = torch.ones(scores.shape[0], device=scores.device, dtype=torch.float32)
        t_hat = ones if t_hat is None else t_hat.float().to(scores.device)
        p_hat = ones if p_hat is None else p_hat.float().to(scores.device)
        return t_hat, p_hat

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        t_hat, p_hat = self._predicted(scores)
        temperature = t_hat * self.user_temperature
        top_p = (p_hat * self.user_top_p).clamp(0.0, 1.0)
        if self.record:
            self.temperatures.append(temperature)
            self.top_ps.append(top_p)
        if self.user_temperature == 0:  # greedy: all mass on the argmax
            return torch.full_like(scores, -float("inf")).scatter(-1, scores.argmax(-1, keepdim=True), 0.0)
        return warp_logits(scores, temperature, top_p, self.min_p)


def warp_logits(scores, temperature, top_p, min_p: float | None = None):
    """Temperature, then hard top-p (top token always kept; P >= 1 keeps all), then min-p.

    scores [B, V]; temperature, top_p [B]. Removed tokens get -inf.
    """
    z = scores / temperature.clamp_min(1e-6)[:, None]
    sorted_z, order = z.sort(dim=-1, descending=True)
    probs = torch.softmax(sorted_z, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    z = z.masked_fill(drop, -float("inf"))
    if min_p is not None and min_p > 0:
        p = torch.softmax(z, dim=-1)  # renormalising does not change p / max p
        z = z.masked_fill(p < min_p * p.max(-1, keepdim=True).values, -float("inf"))
    return z


class AutoDecoGeneration(NamedTuple):
    """Columns of temperature / top_p match the generated tokens; after a row's EOS they hold
    values computed on the padding that follows it."""

    sequences: torch.Tensor  # [B, prompt + new]
    temperature: torch.Tensor  # [B, new] final T used per generated token (0 when greedy)
    top_p: torch.Tensor  # [B, new] final P used per generated token


# generate's sampling arguments, which the heads' per-token T and P replace: what to pass instead.
_REFUSED_SAMPLING = {
    "temperature": "the heads predict the temperature per token; pass user_temperature= (it multiplies the "
                   "heads' T, 0 = greedy)",
    "top_p": "the heads predict top-p per token; pass user_top_p= (it multiplies the heads' P)",
    "do_sample": "AutoDeco always samples with the heads' T and P; for greedy decoding pass user_temperature=0",
    "num_beams": "beam search has no per-token sampling parameters; AutoDeco samples (user_temperature=0 is greedy)",
    "top_k": "top-k would cut what the heads' top-p keeps; AutoDeco applies temperature, top-p and min_p= only",
    "typical_p": "typical sampling cannot be combined with the heads' T and P",
    "epsilon_cutoff": "epsilon sampling cannot be combined with the heads' T and P",
    "eta_cutoff": "eta sampling cannot be combined with the heads' T and P",
}

# generate's own warpers, set to values that do nothing, so only the processor shapes sampling.
_NEUTRAL_SAMPLING = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, typical_p=1.0, epsilon_cutoff=0.0,
                         eta_cutoff=0.0, num_beams=1)


def autodeco_generate(model, heads, input_ids, attention_mask=None, user_temperature: float = 1.0,
                      user_top_p: float = 1.0, min_p: float | None = None, logits_processor=None,
                      heads_in_forward: bool = True, **generate_kwargs) -> AutoDecoGeneration:
    """`model.generate` sampling with the heads' per-token T and P; one forward per token.

    model: any HF causal LM (or an AutoDecoModel, whose `llm` is used). heads: an AutoDecoModel
    or a (temp_head, top_p_head) pair (either may be None); None takes them from `model`.
    Other keyword arguments go to `generate` (max_new_tokens, cache_implementation="static",
    pad_token_id...). For a batch, pad on the left.

    heads_in_forward (default): the heads run inside the model's forward, in a `HeadsLMHead`
    that stands in for the lm_head during the call, so generate's auto-compilation (static cache
    on GPU) stays on, as for plain `generate`. False: the older hook-based capture, which needs an
    eager forward and therefore disables compilation; it is also the fallback for models whose
    lm_head cannot be replaced.

    `generate`'s own sampling arguments would be overridden by the heads, so they are refused with
    the argument to use instead (`temperature=` -> `user_temperature=`, ...).
    """
    for name, value in generate_kwargs.items():
        if name in _REFUSED_SAMPLING:
            raise ValueError(f"autodeco_generate got {name}={value!r}: {_REFUSED_SAMPLING[name]}")
    llm = model.llm if isinstance(model, AutoDecoModel) else model
    if heads is None:
        heads = model
    temp_head, top_p_head = heads.heads() if isinstance(heads, AutoDecoModel) else heads
    proc = AutoDecoLogitsProcessor(temp_head, top_p_head, user_temperature, user_top_p, min_p, record=True)
    config = copy.deepcopy(llm.generation_config)
    config.update(**_NEUTRAL_SAMPLING)  # first too: update() validates, e.g. num_return_sequences needs sampling
    model_kwargs = config.update(**generate_kwargs)
    config.update(**_NEUTRAL_SAMPLING)
    if config.min_p is not None:
        config.min_p = 0.0  # a None would be refilled from the model's own generation config
    if getattr(config, "top_h", None) is not None:
        raise ValueError("top_h sampling cannot be combined with AutoDeco; unset generation_config.top_h")
    processors = list(logits_processor or []) + [proc]
    rows = input_ids.shape[0] * (config.num_return_sequences or 1)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        installed = None
        if heads_in_forward:
            try:
                installed = stack.enter_context(install_heads_lm_head(llm, temp_head, top_p_head, rows))
            except ValueError:
                installed = None  # this model's lm_head cannot be swapped: hooks below
        if installed is not None:
            stack.enter_context(proc.attach_lm_head(installed))
        else:
            config.disable_compile = True  # a compiled forward would skip the hooks that feed the processor
            stack.enter_context(proc.attach(llm))
        out = llm.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                           logits_processor=processors, **model_kwargs)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    temperature, top_p = proc.recorded()
    if temperature is None:
        empty = sequences.new_zeros(sequences.shape[0], 0, dtype=torch.float32)
        temperature, top_p = empty, empty
    return AutoDecoGeneration(sequences, temperature, top_p)


__all__ = [
    "AutoDecoConfig", "AutoDecoGeneration", "AutoDecoLogitsProcessor", "AutoDecoModel", "AutoDecoOutput",
    "HeadsLMHead", "TempHead", "TopPHead", "autodeco_generate", "base_config_dict", "capture_lm_head",
    "goldilocks_mask", "soft_top_p_normalizer",
    "head_input_size", "install_heads_lm_head", "label_rank", "min_p_hinge_loss", "predict_heads", "prob_stats",
    "required_temperature", "shift_for_next_token", "soft_top_p_loss", "temperature_loss", "training_losses",
    "warp_logits",
]

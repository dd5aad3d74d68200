"""TNOT (published as SRGen) and SLOT: a per-sample delta added to the final hidden state.

Papers: SRGen, "Self-Reflective Generation at Test Time" (2025); SLOT, "Sample-specific Language
Model Optimization at Test-time" (2025).

Both learn, at test time, a vector `delta` [1, 1, H] per sample, added to the final hidden state h
(the input of `lm_head`). It starts at zero and takes `times` AdamW(lr, weight_decay=1e-8,
eps=1e-5) steps on the prompt's next-token CE:

    CE(delta) = mean_t -log softmax(z(h_t + delta))[x_{t+1}],   z = the model's final logits
                                                                    (lm_head, then the family's
                                                                    rescaling: `final_logits`)

- `slot`: the delta fitted at the prompt is added at every generated token.
- `srgen`: the entropy H_t = -sum p log p of each next-token distribution p = softmax(z / T) (T
  the sampling temperature) is watched. Above a threshold, static or adaptive over the sample's own
  history (`max(mean(last N) + K * max(std(last N), 0.5), 1.8)` once it holds N values), the sample
  gets a forced EOS. A retry continues from the tokens already generated, fits
  `delta_high` on `(1 - w) * CE + w * H_last` (H_last: the entropy at the stop) and applies it to
  the one token at the stop, which is not judged again. The published code also fits
  `delta_normal` (CE only) at the first prefill but never applies it; it is skipped here unless
  `fit_delta_normal` asks for exactly that (it costs `times` steps per prompt).

Who retries (srgen with entropy control):
- `max_retries > 0` (`TNOTConfig`'s default, `TNOTModule`): `generate` retries each stopped sample
  itself, up to `max_retries` times, then finishes it with one last pass without entropy control,
  as published.
- `max_retries == 0` (the default when the settings come from the environment, as the seed's
  decorator reads them): a forced EOS ends `generate`, with `high_entropy_detected` and
  `high_entropy_position` set; the caller runs the retry loop. As in the seed, a `generate` called
  while `model.delta` is set (by the previous call's prefill) is that loop's retry: it fits
  delta_high on its prompt, applies it to its first token (not judged) and continues the entropy
  history of the same samples; `reset_model_parameters()` starts the next problem.

Done right where the original code was not:
- the transformer body runs once per prefill (the one that fills the KV cache); each optimization
  step recomputes only the logits of `h + delta` over the prompt positions;
- `lm_head` is frozen during the optimization (no vocab x hidden gradient); the CE is computed and
  backpropagated in chunks of positions; delta and its AdamW state are float32;
- one delta per sample ([B, 1, H]), per-sample entropy history, thresholds and stops. The entropy
  control is a `LogitsProcessor` outside the model's forward: per token a dozen batched ops on
  the device, nothing read back until the pass ends, and a compiled forward (static cache) keeps
  its single graph;
- retries continue from token ids (no decode / re-tokenize round trip, chat tokens kept). The
  samples stopped in one pass retry together in one batch that keeps the layout of that pass: each
  row is its previous input and kept tokens, the positions after them masked out, and its last kept
  token last. A plain dynamic KV cache of that pass is reused as is (rows selected and cropped, only
  that last token goes through the body); other caches (static, sliding-window) are re-prefilled.

Use (the seed's interface):
    TNOTModel = enable_tnot(AutoModelForCausalLM)
    model = TNOTModel.from_pretrained(path, tnot_config=TNOTConfig(prompt_only=True, times=3))
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)
or `enable_tnot_model(model, config)` on a loaded model. Without a config, the settings come from
the environment variables of the original code (`TNOTConfig.from_env`). A plain `model(...)`
forward is unchanged; `model.generate_without_tnot` is the original `generate`. The work is done by
a `TNOTGenerator` (`model.tnot`); the seed's attributes (`delta`, `high_entropy_detected`, ...) are
a view of its last result, written at the end of each `generate`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from testtime.errors import UsageError, UserError
from testtime.io import atomic_write_text
from testtime.lm import IGNORE_INDEX, cut_at_eos, entropy, eos_token_ids, final_logits, scale_logits

MODES = ("slot", "srgen")

# ---------------------------------------------------------------------------------------------
# 1. Settings
# ---------------------------------------------------------------------------------------------


class TNOTConfigError(UserError, ValueError):
    """A TNOT setting out of its range (the message names the field, its value and, when it was
    read from the environment, the variable)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class TNOTConfig:
    """The settings; field names are the environment variables of the original TNOT code.

    Defaults are the original code's `os.environ.get` defaults (prompt_only False: the prompt stage
    is off unless asked for), plus `max_retries` (20, the published value; 0 when read from the
    environment, see `from_env`), `mode` and `fit_delta_normal`.
    """

    prompt_only: bool = False          # fit delta at each prefill
    times: int = 1                     # AdamW steps per prefill
    lr: float = 0.1
    entropy_weight: float = 0.1        # w in (1 - w) * CE + w * entropy (delta_high)
    entropy_control: bool = False      # srgen: stop high-entropy samples with a forced EOS
    entropy_threshold: float = 3.0     # static threshold (nats, at the sampling temperature)
    adaptive_entropy: bool = False
    adaptive_entropy_N: int = 20
    adaptive_entropy_K: float = 2.0
    record_entropy: bool = False       # append entropy records to entropy_output_file / response_entropy_file
    entropy_output_file: str = "entropy_analysis.jsonl"
    response_entropy_file: str = "response_entropy.json"
    log_entropy_control: bool = False  # print a line at each forced stop
    max_retries: int = 20              # retries run by generate itself; 0: the caller retries (the seed's way)
    mode: str = "srgen"
    fit_delta_normal: bool = False     # srgen: fit the (never applied) delta_normal at the first prefill, as published
    mask_special_tokens: bool = False  # prompt CE ignores special tokens as labels (chat-template markers)
    ce_chunk: int = 1024               # prompt positions per CE chunk (not an env variable)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = type(f.default)
            if kind is bool and not isinstance(value, bool):
                raise TNOTConfigError(f.name, f"{f.name} must be True or False, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise TNOTConfigError(f.name, f"{f.name} must be an integer, got {value!r}")
            if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value)):
                raise TNOTConfigError(f.name, f"{f.name} must be a number, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise TNOTConfigError(f.name, f"{f.name} must be a string, got {value!r}")
        checks = (
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("times", self.times >= 0, ">= 0"),
            ("lr", 0 <= self.lr < math.inf, ">= 0 and finite"),
            # outside [0, 1] one of the two terms changes sign: the fit would maximize it
            ("entropy_weight", 0 <= self.entropy_weight <= 1, "in [0, 1]"),
            # the window's standard deviation needs two values (N=0 or 1 gives a NaN threshold)
            ("adaptive_entropy_N", self.adaptive_entropy_N >= 2, ">= 2"),
            ("adaptive_entropy_K", 0 <= self.adaptive_entropy_K < math.inf, ">= 0 and finite"),
            ("max_retries", self.max_retries >= 0, ">= 0"),
            ("ce_chunk", self.ce_chunk >= 1, ">= 1"),
        )
        for name, ok, wanted in checks:
            if not ok:
                raise TNOTConfigError(name, f"{name} must be {wanted}, got {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "TNOTConfig":
        """Read every field (but `ce_chunk`) from the environment variable of the same name, as the
        seed's decorator does; absent ones keep the default, except `max_retries`, which defaults
        to 0: the seed's evaluation scripts run their own retry loop around `generate`.

        A malformed or out-of-range value is a `TNOTConfigError` naming the variable; these names
        are generic (`mode`, `times`, `lr`), so the message says where the value came from.
        """
        environ = os.environ if environ is None else environ
        values, texts = {"max_retries": 0}, {}
        for f in dataclasses.fields(cls):
            if f.name == "ce_chunk" or f.name not in environ:
                continue
            text = texts[f.name] = environ[f.name]
            kind = type(f.default)
            try:
                values[f.name] = _parse(kind, text)
            except ValueError:
                raise TNOTConfigError(f.name, _from_env(f.name, text, f"not a valid {_KIND_NAMES[kind]}")) from None
        values.update(overrides)
        try:
            return cls(**values)
        except TNOTConfigError as err:
            if err.field in texts and err.field not in overrides:
                raise TNOTConfigError(err.field, _from_env(err.field, texts[err.field], str(err))) from None
            raise


_KIND_NAMES = {bool: "boolean (True/False)", int: "integer", float: "number", str: "string"}


def _parse(kind, text: str):
    if kind is bool:
        low = text.strip().lower()
        if low not in ("true", "1", "yes", "false", "0", "no", ""):
            raise ValueError(text)
        return low in ("true", "1", "yes")
    return kind(text)


def _from_env(name: str, text: str, problem: str) -> str:
    return (f"environment variable {name}={text!r}: {problem}. TNOT read it because the model was enabled "
            f"without a tnot_config (TNOTConfig.from_env); unset it or pass tnot_config=TNOTConfig(...)")


# ---------------------------------------------------------------------------------------------
# 2. Fitting the delta
# ---------------------------------------------------------------------------------------------


def prompt_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token labels of positions 0..T-2 ([B, T-1]): the token at the next unmasked position.

    Masked positions may sit anywhere (left padding, or the gap a retry row leaves between its kept
    tokens and its last token); they get -100, as does a position with no unmasked one after it.
    """
    if attention_mask is None:
        return input_ids[:, 1:].clone()
    width = input_ids.shape[1]
    valid = attention_mask.bool()
    index = torch.where(valid, torch.arange(width, device=input_ids.device), width)
    # the first valid position after t: a reversed running minimum
    after = index[:, 1:].flip(1).cummin(1).values.flip(1)
    labels = input_ids.gather(1, after.clamp(max=width - 1))
    labels[~valid[:, :-1] | (after == width)] = IGNORE_INDEX
    return labels


def chunked_prompt_ce(model, hidden: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor, chunk: int = 1024,
                      backward: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Sum over samples of each sample's mean next-token CE of `final_logits(model, hidden[:, :-1] + delta)`.

    Positions go through the head (and the family's rescaling of its output) `chunk` at a time.
    With `backward`, each chunk's share (times `scale`) is backpropagated at once, so no more than
    one chunk of logits is alive; the value is then detached. A per-sample mean keeps each sample's
    delta gradient independent of the others.
    """
    hidden = hidden[:, :-1]
    counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1).float()  # [B]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        h = hidden[:, start:start + chunk]
        y = labels[:, start:start + chunk]
        if not (y != IGNORE_INDEX).any():
            continue
        logits = final_logits(model, (h.float() + delta).to(h.dtype)).float()
        # rows of (position, vocab): CE over a transposed [B, V, c] view is ~100x slower on a GPU
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view(y.shape)
        part = (ce.sum(1) / counts).sum()
        if backward:
            (part * scale).backward()
            part = part.detach()
        total = total + part
    return total


def fit_delta(model, hidden: torch.Tensor, labels: torch.Tensor, times: int, lr: float, entropy_weight: float = 0.0,
              temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """A float32 delta [B, 1, H] after `times` AdamW(lr, weight_decay=1e-8, eps=1e-5) steps from zero on

        sum_b (1 - w) * CE_b(delta_b) + w * H(softmax(z(h_b,last + delta_b) / T))

    (`chunked_prompt_ce` for CE_b; w = `entropy_weight`, 0 for slot and delta_normal). `hidden` are
    the final hidden states [B, T, H] of the body (already run). The head's parameters are frozen
    for the duration and come out with no `.grad`. Works inside `torch.inference_mode()` (Lightning's
    validate/test): the optimization leaves it, on copies of the inference tensors.
    """
    head = model.get_output_embeddings()
    params = list(head.parameters())
    saved = [p.requires_grad for p in params]
    w = float(entropy_weight)
    with torch.inference_mode(False), torch.enable_grad():
        # inference tensors (Lightning's test) cannot enter autograd: copies of them can
        hidden = hidden.detach().clone() if hidden.is_inference() else hidden.detach()
        labels = labels.clone()
        delta = torch.zeros(hidden.shape[0], 1, hidden.shape[-1], dtype=torch.float32, device=hidden.device,
                            requires_grad=True)
        opt = torch.optim.AdamW([delta], lr=lr, weight_decay=1e-8, eps=1e-5)
        try:
            for p in params:
                p.requires_grad_(False)
            for _ in range(times):
                opt.zero_grad(set_to_none=True)
                chunked_prompt_ce(model, hidden, delta, labels, chunk, backward=True, scale=1.0 - w)
                if w > 0:
                    last = hidden[:, -1]
                    logits = final_logits(model, (last.float() + delta[:, 0]).to(last.dtype)).float()
                    (w * entropy(logits, temperature).sum()).backward()
                opt.step()
        finally:
            for p, r in zip(params, saved):
                p.requires_grad_(r)
    assert all(p.grad is None for p in params), "lm_head received a gradient during the TNOT optimization"
    return delta.detach()


# ---------------------------------------------------------------------------------------------
# 3. Entropy control: a logits processor, vectorized over the batch
# ---------------------------------------------------------------------------------------------


class EntropyControl(LogitsProcessor):
    """Entropy control for one pass of `generate`: the entropy of each row's next-token distribution
    at the sampling temperature and, with `watch`, a forced EOS (every logit -1e4, EOS +1e4, as the
    original) where it exceeds the row's threshold: static, or adaptive, `max(mean(w) + K *
    max(std(w), 0.5), 1.8)` over the row's last N judged entropies w (unbiased std) once it has N.

    Per token it only writes the entropies (and stops, and adaptive thresholds) into preallocated
    buffers with a dozen batched tensor ops: nothing is read back to the host, and the model's
    forward (compiled or not) never sees it. `result` reads the buffers once, after the pass, and
    decides there which values count: a row is judged at a step while it has not ended (no EOS
    among its earlier tokens) and is within its budget (a retry batch runs to its longest budget),
    except at the first step with `skip_first` (the token a retry reflects on). A row that has ended
    may still be "stopped" on the device: its tokens are padding or past its budget, never kept.

    `history`: each row's earlier judged entropies (the adaptive window starts from them).
    """

    def __init__(self, history: list[list[float]], budgets: list[int], eos_ids: torch.Tensor, config: TNOTConfig,
                 temperature: float, watch: bool, skip_first: bool, record: bool, original=None):
        rows, steps, device = len(budgets), max(budgets), eos_ids.device
        self.budgets, self.eos_ids, self.cfg, self.temperature = budgets, eos_ids, config, temperature
        self.watch, self.first, self.record = watch, int(skip_first), record
        self.original = original  # () -> entropy without the delta at this step, or None (none applied)
        self.entropies = torch.zeros(rows, steps, device=device)
        self.stops = torch.zeros(rows, steps, dtype=torch.bool, device=device)
        self.originals = torch.zeros(rows, steps, device=device) if record else None
        self.applied: list[bool] = []
        self.calls = 0
        self._forced = None
        if config.adaptive_entropy:
            n = config.adaptive_entropy_N
            tails = [h[-n:] for h in history]  # right-aligned: the last n of each row
            self.prior = torch.tensor([[0.0] * (n - len(t)) + t for t in tails], device=device)
            self.prior_count = torch.tensor([len(h) for h in history], device=device)
            self.thresholds = torch.zeros(rows, steps, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        i = self.calls
        self.calls += 1
        ent = entropy(scores, self.temperature)
        self.entropies[:, i] = ent
        if self.record:
            original = self.original() if self.original is not None else None
            self.originals[:, i] = ent if original is None else original
            self.applied.append(original is not None)
        if not self.watch or i < self.first:
            return scores
        stop = ent > self._threshold(i)
        self.stops[:, i] = stop
        if self._forced is None:  # (index_fill: an index read back to the host would sync the device)
            self._forced = torch.full_like(scores[0], -1e4).index_fill_(0, self.eos_ids[:1], 1e4)
        return torch.where(stop[:, None], self._forced, scores)

    def _threshold(self, i: int):
        cfg = self.cfg
        if not cfg.adaptive_entropy:
            return cfg.entropy_threshold
        n, k = cfg.adaptive_entropy_N, i - self.first  # k: steps judged before this one in this pass
        # a row still judged was judged at every step since `first`: its window is a plain slice
        window = (self.entropies[:, i - n:i] if k >= n
                  else torch.cat([self.prior[:, k:], self.entropies[:, self.first:i]], 1))
        std, mean = torch.std_mean(window, 1)
        threshold = (mean + cfg.adaptive_entropy_K * std.clamp(min=0.5)).clamp(min=1.8)
        if k < n:  # fewer than N values yet: the static threshold
            threshold = torch.where(self.prior_count >= n - k, threshold, cfg.entropy_threshold)
        self.thresholds[:, i] = threshold
        return threshold

    def result(self, new: torch.Tensor) -> list[dict]:
        """Per row, from the buffers and the pass's tokens `new` [R, n] (one read-back): `judged`
        (the entropies that enter its history), `threshold` (its last), `stop_at` (index of the
        forced EOS, -1 for none) and `steps`: (entropy, entropy_original, delta_applied, threshold or
        None where not judged, stopped) for each step it was active."""
        n = self.calls
        entropies = self.entropies[:, :n].tolist()
        stops = self.stops[:, :n].tolist()
        thresholds = self.thresholds[:, :n].tolist() if self.cfg.adaptive_entropy else None
        originals = self.originals[:, :n].tolist() if self.record else entropies
        eos = set(self.eos_ids.tolist())
        out = []
        for r, tokens in enumerate(new[:, :n].tolist()):
            row = {"judged": [], "threshold": None, "stop_at": -1, "steps": []}
            for i in range(min(n, self.budgets[r])):
                if i > 0 and tokens[i - 1] in eos:
                    break
                judged = self.watch and i >= self.first
                threshold = (thresholds[r][i] if thresholds else self.cfg.entropy_threshold) if judged else None
                stopped = judged and stops[r][i]
                row["steps"].append((entropies[r][i], originals[r][i], self.record and self.applied[i], threshold,
                                     stopped))
                if judged:
                    row["judged"].append(entropies[r][i])
                    row["threshold"] = threshold
                if stopped:
                    row["stop_at"] = i
                    break
            out.append(row)
        return out


# ---------------------------------------------------------------------------------------------
# 4. The generator: passes of HF generate with the delta hooks armed, and the retries
# ---------------------------------------------------------------------------------------------


@dataclass
class _Prefill:
    """What the next body forward (the prefill of a pass) does with its hidden states."""

    ids: torch.Tensor              # the pass's input [R, W] and mask
    mask: torch.Tensor
    context: torch.Tensor | None   # final hidden states of the cached prefix [R, C, H]: the body sees the rest
    stage: str                     # "first", "reflect" (srgen retry: delta_high, applied once), "final" (nothing)


@dataclass
class Pass:
    """One call of HF generate over some samples: what it made, and what a retry of them continues from."""

    samples: list[int]                # the sample of each row
    ids: torch.Tensor                 # input [R, W] (the previous layout; masked positions anywhere)
    mask: torch.Tensor
    kept: list[int]                   # per row: the sample's tokens kept before this pass
    new: torch.Tensor                 # generated tokens [R, n]
    stop_at: list[int]                # per row: index in `new` of the forced EOS, -1 for none
    cache: DynamicCache | None        # its KV cache when a retry can reuse it (a plain dynamic one)
    hidden: torch.Tensor | None       # final hidden states of the cache's positions [R, W + n - 1, H]
    records: list[dict]               # per-token entropy records (record_entropy)


class _Samples:
    """Per sample of one `generate`: tokens kept, stops, retries, delta, entropy history and threshold."""

    def __init__(self, batch: int, config: TNOTConfig, history: list[list[float]] | None):
        self.history = [list(h) for h in history] if history else [[] for _ in range(batch)]
        self.thresholds = [config.entropy_threshold] * batch
        self.tokens: list[torch.Tensor | None] = [None] * batch
        self.stops: list[list[int]] = [[] for _ in range(batch)]
        self.retries = [0] * batch
        self.delta: torch.Tensor | None = None
        self.records: list[dict] = []


def reusable(cache) -> bool:
    """Whether a retry can reuse `cache` by selecting rows and cropping: a plain, full-attention dynamic cache."""
    return (type(cache) is DynamicCache and not cache.offloading and cache.is_croppable
            and not any(cache.is_sliding))


def _resolve(model, kwargs: dict, name: str, default=None):
    config = kwargs.get("generation_config") or model.generation_config
    value = kwargs.get(name, getattr(config, name, default))
    return default if value is None else value


def _max_new_tokens(model, kwargs: dict, width: int) -> int:
    """The new-token budget as generate resolves it: max_new_tokens, else max_length - prompt width."""
    config = kwargs.get("generation_config") or model.generation_config
    for source in (kwargs, vars(config)):
        if source.get("max_new_tokens") is not None:
            return int(source["max_new_tokens"])
        if source.get("max_length") is not None:
            return int(source["max_length"]) - width
    return 20


class TNOTGenerator:
    """TNOT's `generate` for one model (`model.tnot`; `model.generate` calls it).

    Two hooks, inert outside a pass: on the body (its output is the final hidden state of every
    position) it fits the delta at a pass's prefill and, where a retry may reuse the pass's cache,
    keeps the hidden states; on `lm_head`'s input it adds the delta (slot: at every forward of the
    pass; delta_high: once). The entropy control is an `EntropyControl` processor per pass.

    `reuse_cache` (default True): retries reuse a plain dynamic cache of their prefix; False
    re-prefills them (what the published code does), e.g. to measure what the reuse saves.
    """

    def __init__(self, model, body: nn.Module, head: nn.Module, original_generate):
        self.model, self.original_generate = model, original_generate
        self.reuse_cache = True
        self.prefill: _Prefill | None = None
        self.apply: tuple[torch.Tensor, bool] | None = None  # (delta [R, 1, H], once)
        self.hidden: list[torch.Tensor] | None = None
        self.fitted: torch.Tensor | None = None
        self.temperature = 1.0
        self._original_entropy = None
        body.register_forward_hook(self._body_hook)
        head.register_forward_pre_hook(self._head_pre_hook)

    # -- hooks -------------------------------------------------------------------------------
    def _body_hook(self, module, args, output):
        if self.hidden is not None:
            self.hidden.append(output[0].detach())
        prefill, self.prefill = self.prefill, None
        if prefill is None:
            return None
        cfg = self.model.tnot_config
        if not cfg.prompt_only or prefill.stage == "final":
            return None
        hidden = output[0]
        if prefill.context is not None:  # the cached prefix was not recomputed: its states were kept
            hidden = torch.cat([prefill.context.to(hidden.dtype), hidden], dim=1)
        reflect = prefill.stage == "reflect"
        if cfg.mode == "srgen" and not reflect and not cfg.fit_delta_normal:
            # delta_normal would not be applied: a zero delta marks the prefill as done (the seed's marker)
            self.fitted = hidden.new_zeros(hidden.shape[0], 1, hidden.shape[-1], dtype=torch.float32)
            return None
        labels = prompt_labels(prefill.ids, prefill.mask).to(hidden.device)
        if cfg.mask_special_tokens:
            special = torch.tensor(sorted(_special_ids(self.model)), dtype=labels.dtype, device=labels.device)
            labels[torch.isin(labels, special)] = IGNORE_INDEX  # only special tokens: a zero loss, not NaN
        self.fitted = fit_delta(self.model, hidden, labels, cfg.times, cfg.lr, cfg.entropy_weight if reflect else 0.0,
                                self.temperature, cfg.ce_chunk)
        if cfg.mode == "slot":
            self.apply = (self.fitted, False)
        elif reflect:  # delta_high: only the token at the stop
            self.apply = (self.fitted, True)
        return None

    def _head_pre_hook(self, module, args):
        if self.apply is None:
            return None
        delta, once = self.apply
        if once:
            self.apply = None
        hidden = args[0]
        if self.model.tnot_config.record_entropy:  # for the record's entropy without the delta
            raw = module.forward(hidden[:, -1])  # .forward: not through this hook again
            self._original_entropy = entropy(scale_logits(self.model, raw), self.temperature)
        return ((hidden.float() + delta.to(hidden.device)).to(hidden.dtype),) + tuple(args[1:])

    def _take_original_entropy(self):
        value, self._original_entropy = self._original_entropy, None
        return value

    # -- generate ----------------------------------------------------------------------------
    def generate(self, input_ids=None, attention_mask=None, **kwargs) -> torch.LongTensor:
        model, cfg = self.model, self.model.tnot_config
        if input_ids is None:
            input_ids = kwargs.pop("inputs")
        if kwargs.pop("return_dict_in_generate", False):
            raise ValueError("TNOT generate returns the token ids only (return_dict_in_generate is not supported)")
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("TNOT generate starts from a prompt; a cache (past_key_values) is not supported")
        for name in ("num_return_sequences", "num_beams"):
            if (_resolve(model, kwargs, name, 1) or 1) > 1:
                raise ValueError(f"TNOT generate supports {name}=1 only, got {_resolve(model, kwargs, name)}: "
                                 "repeat the prompts instead (input_ids.repeat_interleave(n, dim=0)), each row gets "
                                 "its own delta")
        sampling = _resolve(model, kwargs, "do_sample")
        self.temperature = float(_resolve(model, kwargs, "temperature", 1.0)) if sampling else 1.0
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch, width = input_ids.shape
        builtin = cfg.mode == "srgen" and cfg.entropy_control and cfg.max_retries > 0
        # the seed's way (the caller retries): a call while model.delta is set is the caller's retry
        reflect = (not builtin and cfg.mode == "srgen" and cfg.prompt_only and model.delta is not None)
        continued = reflect and len(model.entropy_history) == batch
        max_new = _max_new_tokens(model, kwargs, width)
        samples = _Samples(batch, cfg, model.entropy_history if continued else None)
        eos = torch.tensor(eos_token_ids(model, getattr(model, "tokenizer", None)), dtype=torch.long,
                           device=input_ids.device)
        if cfg.entropy_control and eos.numel() == 0:
            raise UsageError("TNOT entropy control needs an eos_token_id in the generation config or model config")
        self._samples, self._eos, self._max_new = samples, eos, max_new
        pad_id = _resolve(model, kwargs, "pad_token_id", int(eos[0]) if eos.numel() else 0)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("max_length", "max_new_tokens")}

        last = self._pass(input_ids, attention_mask, list(range(batch)), [0] * batch, "reflect" if reflect else "first",
                          {**kwargs, "max_new_tokens": max_new}, keep=builtin)
        self._settle(last, retry=False)
        for round_ in range(1, cfg.max_retries + 2 if builtin else 1):
            stopped = [r for r, s in enumerate(last.stop_at) if s >= 0]
            if not stopped:
                break
            # retries used up: one last pass finishes these samples without fitting or stops, as published
            last = self._retry(last, stopped, "final" if round_ > cfg.max_retries else "reflect", round_, kwargs)
            self._settle(last, retry=round_ <= cfg.max_retries)
        self._samples = None
        return self._finish(samples, input_ids, pad_id)

    def _pass(self, ids, mask, rows: list[int], kept: list[int], stage: str, kwargs: dict, cache=None, context=None,
              keep: bool = False, round_: int = 0) -> Pass:
        """One call of the original generate over `rows` of the batch, the hooks armed for `stage`.

        With `cache` (of all but the last position of `ids`) and `context` (its final hidden states)
        only the last token goes through the body. `keep`: keep what a retry of this pass reuses.
        """
        cfg, s = self.model.tnot_config, self._samples
        control = None
        processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        if cfg.entropy_control or cfg.record_entropy:
            control = EntropyControl([s.history[b] for b in rows], [self._max_new - k for k in kept], self._eos, cfg,
                                     self.temperature, watch=cfg.entropy_control and stage != "final",
                                     skip_first=stage == "reflect", record=cfg.record_entropy,
                                     original=self._take_original_entropy if cfg.record_entropy else None)
            processors.append(control)
        # only a plain dynamic cache is reused: keep nothing for the others (nor step a compiled forward's hooks)
        keep = (keep and self.reuse_cache and kwargs.get("use_cache", True) is not False
                and _resolve(self.model, kwargs, "cache_implementation", "dynamic") == "dynamic")
        extra = {"return_dict_in_generate": True, "logits_processor": processors}
        if cache is not None:
            extra["cache"] = cache
            kwargs = {k: v for k, v in kwargs.items() if k != "cache_implementation"}  # the cache is given
        self.prefill, self.hidden, self.fitted = _Prefill(ids, mask, context, stage), [] if keep else None, None
        try:
            out = self.original_generate(input_ids=ids, attention_mask=mask, **kwargs, **extra)
        finally:
            hidden, self.prefill, self.apply, self.hidden, self._original_entropy = self.hidden, None, None, None, None
        if self.fitted is not None:  # one delta row per sample of the whole batch
            if s.delta is None:
                s.delta = torch.zeros(len(s.tokens), *self.fitted.shape[1:], device=self.fitted.device)
            s.delta[torch.tensor(rows, device=ids.device)] = self.fitted
        new = out.sequences[:, ids.shape[1]:]
        stop_at, records = [-1] * len(rows), []
        for r, row in enumerate(control.result(new) if control is not None else []):  # the pass's one read-back
            b, stop_at[r] = rows[r], row["stop_at"]
            s.history[b] += row["judged"]
            if row["threshold"] is not None:
                s.thresholds[b] = row["threshold"]
            for i, (ent, original, applied, threshold, stopped) in enumerate(row["steps"]):
                if cfg.record_entropy:
                    records.append({"sample": b, "step": kept[r] + i, "retry": round_, "entropy": ent,
                                    "entropy_original": original, "delta_applied": applied, "threshold": threshold,
                                    "stopped": stopped})
                if stopped and cfg.log_entropy_control:
                    print(f"[tnot] sample {b}: entropy {ent:.3f} > threshold {threshold:.3f} at token {kept[r] + i}: "
                          "EOS")
        kept_cache = out.cache if keep and reusable(out.cache) else None
        states = None
        if kept_cache is not None:
            states = torch.cat(([context] if context is not None else []) + hidden, dim=1)
        return Pass(rows, ids, mask, kept, new, stop_at, kept_cache, states, records)

    def _retry(self, last: Pass, rows: list[int], stage: str, round_: int, kwargs: dict) -> Pass:
        """The stopped `rows` of `last` again, in `last`'s layout: row r is its input and the tokens it
        kept (n_r positions), the positions after them masked (C = max n_r - 1 in all), then its last
        kept token, which goes through the body again (its hidden state is what the retry judges)."""
        index = torch.tensor(rows, device=last.ids.device)
        length = torch.tensor([last.ids.shape[1] + last.stop_at[r] for r in rows], device=index.device)
        cut = int(length.max()) - 1
        seq = torch.cat([last.ids, last.new], 1)[index]
        full_mask = torch.cat([last.mask, torch.ones_like(last.new)], 1)[index]
        kept_positions = torch.arange(cut, device=index.device)[None] < (length - 1)[:, None]
        ids = torch.cat([seq[:, :cut], seq.gather(1, (length - 1)[:, None])], 1)
        mask = torch.cat([full_mask[:, :cut] * kept_positions, torch.ones_like(length)[:, None]], 1)
        cache = context = None
        if last.cache is not None:
            cache = last.cache
            if len(rows) < len(last.samples):
                cache.batch_select_indices(index)
            cache.crop(cut - cache.get_seq_length())
            context = last.hidden[index, :cut]
        kept = [last.kept[r] + last.stop_at[r] for r in rows]
        return self._pass(ids, mask, [last.samples[r] for r in rows], kept, stage,
                          {**kwargs, "max_new_tokens": self._max_new - min(kept)}, cache, context,
                          keep=stage == "reflect", round_=round_)

    def _settle(self, done: Pass, retry: bool) -> None:
        """Each row's tokens into its sample: up to its forced EOS, else within its budget up to its EOS."""
        s = self._samples
        for r, b in enumerate(done.samples):
            budget = self._max_new - done.kept[r]
            at = done.stop_at[r]
            if at >= 0:
                new = done.new[r, :at + 1]
            else:
                new = cut_at_eos(done.new[r, :budget], self._eos.tolist(), keep_eos=True)
            s.tokens[b] = new if s.tokens[b] is None else torch.cat([s.tokens[b][:done.kept[r]], new])
            if at >= 0:
                s.stops[b].append(done.kept[r] + at)
            s.retries[b] += int(retry)
        s.records += done.records

    def _finish(self, s: _Samples, input_ids, pad_id: int) -> torch.LongTensor:
        """Write the seed's attributes (the view of this call) and the records; the output ids."""
        model = self.model
        batch, width = input_ids.shape
        stopped_now = [bool(stops) for stops in s.stops]
        model.delta = s.delta
        model.high_entropy_samples = stopped_now
        model.high_entropy_detected = any(stopped_now)
        model.high_entropy_position = [stops[-1] if stops else None for stops in s.stops]
        model.stop_positions = s.stops
        model.retries = s.retries
        model.entropy_history = s.history
        model.sample_thresholds = s.thresholds
        model.entropy_threshold = model.sample_thresholds[0]
        model.entropy_records = s.records
        model.index = None
        _write_records(model, s.tokens)
        out = torch.full((batch, width + max(len(t) for t in s.tokens)), pad_id, dtype=torch.long,
                         device=input_ids.device)
        out[:, :width] = input_ids
        for b, tokens in enumerate(s.tokens):
            out[b, width:width + len(tokens)] = tokens
        return out


def _config_ids(model, name: str) -> list[int]:
    """Token ids named `name` (eos_token_id, pad_token_id) in the generation config, else the model config."""
    value = getattr(model.generation_config, name, None)
    if value is None:
        value = getattr(model.config, name, None)
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _special_ids(model) -> set[int]:
    """The tokenizer's special tokens (ChatML's <|im_start|> ...) if one was given, plus bos/eos/pad."""
    ids = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids.update(_config_ids(model, name))
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        ids.update(int(i) for i in tokenizer.all_special_ids)
        # added tokens marked special (not all of them are named in all_special_ids)
        ids.update(int(i) for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
                   if getattr(tok, "special", False))
    return ids


# ---------------------------------------------------------------------------------------------
# 5. Records and traces
# ---------------------------------------------------------------------------------------------


def _label_records(model, generated) -> None:
    """Give each entropy record its token: the forced EOS where stopped, else the token kept at that step."""
    eos = next(iter(eos_token_ids(model, getattr(model, "tokenizer", None))), None)
    for rec in model.entropy_records:
        tokens = generated[rec["sample"]]
        if rec["stopped"] and eos is not None:
            rec["token_id"] = eos
        elif rec["step"] < len(tokens):
            rec["token_id"] = int(tokens[rec["step"]])
        if "token_id" in rec:
            rec["token"] = model._safe_decode_token(rec["token_id"])
    model.index = max((rec["step"] for rec in model.entropy_records), default=None)


def sample_traces(model) -> list[dict]:
    """Per sample of the last `generate` (recorded with `record_entropy`): the tokens kept.

    Each trace: entropy, entropy_original and threshold of each kept token in order (a retry's
    record replaces the forced stop it continues from), the forced stop positions with the
    entropies that triggered them, and the retries.
    """
    final: dict[tuple[int, int], dict] = {}  # (sample, step) -> the record of the kept token (the last pass wins)
    stop_entropies: dict[int, list[float]] = {}
    for rec in model.entropy_records:
        final[(rec["sample"], rec["step"])] = rec
        if rec["stopped"]:
            stop_entropies.setdefault(rec["sample"], []).append(rec["entropy"])
    traces = []
    for b in range(len(model.retries)):
        kept = [final[key] for key in sorted(k for k in final if k[0] == b)]
        traces.append({"sample": b, "entropy": [r["entropy"] for r in kept],
                       "entropy_original": [r["entropy_original"] for r in kept],
                       "threshold": [r["threshold"] for r in kept],
                       "stop_positions": list(model.stop_positions[b]), "stop_entropies": stop_entropies.get(b, []),
                       "retries": int(model.retries[b])})
    return traces


def _write_records(model, generated):
    """Write this generate's entropy records (with `record_entropy`; an empty file name skips it).

    `entropy_output_file`: one JSON line per watched token: sample, step (index of the generated
    token), retry (0 = first pass), entropy (of the distribution sampled from, delta included),
    entropy_original (same position without the delta; equal where none was applied),
    delta_applied, threshold (None where not judged), stopped (a forced EOS was given there),
    token_id and token (the EOS where stopped, else the token kept at that step).
    `response_entropy_file`: a JSON array with one object per response (appended to across calls):
    its token ids and text, mean entropy, then its `sample_traces` entry. Tokens are decoded with
    the tokenizer given to `enable_tnot_model` (loaded once).
    """
    cfg = model.tnot_config
    if not (cfg.record_entropy and model.entropy_records):
        return
    _label_records(model, generated)
    if cfg.entropy_output_file:
        with open(cfg.entropy_output_file, "a") as f:
            for rec in model.entropy_records:
                f.write(json.dumps(rec) + "\n")
    if cfg.response_entropy_file:
        responses = []
        if os.path.exists(cfg.response_entropy_file) and os.path.getsize(cfg.response_entropy_file):
            with open(cfg.response_entropy_file) as f:
                try:
                    responses = json.load(f)
                except json.JSONDecodeError as err:
                    raise ValueError(f"response_entropy_file {cfg.response_entropy_file}: not a JSON array ({err}); "
                                     "move it away or name another file") from err
            if not isinstance(responses, list):
                raise ValueError(f"response_entropy_file {cfg.response_entropy_file}: holds a JSON "
                                 f"{type(responses).__name__}, not the array of responses it appends to")
        for trace, tokens in zip(sample_traces(model), generated):
            entropies = trace["entropy"]
            responses.append({"token_ids": [int(t) for t in tokens], "response": model._safe_decode_sequence(tokens),
                              "mean_entropy": sum(entropies) / len(entropies) if entropies else None, **trace})
        atomic_write_text(cfg.response_entropy_file, json.dumps(responses))  # a killed run keeps the old array


# ---------------------------------------------------------------------------------------------
# 6. The seed's face: the decorator, its attributes and methods
# ---------------------------------------------------------------------------------------------


def _reset_entropy_detection(self, batch_size: int = 1):
    """Clear stops, positions and entropy histories (one list per sample)."""
    self.high_entropy_detected = False
    self.high_entropy_samples = [False] * batch_size
    self.high_entropy_position = [None] * batch_size
    self.stop_positions = [[] for _ in range(batch_size)]  # every forced stop of each sample, retries included
    self.retries = [0] * batch_size
    self.entropy_history = [[] for _ in range(batch_size)]
    self.sample_thresholds = [self.tnot_config.entropy_threshold] * batch_size
    self.entropy_threshold = self.tnot_config.entropy_threshold
    self.index = None


def _reset_model_parameters(self):
    """Forget the fitted delta (the next `generate` starts a new problem) and every entropy state."""
    self.delta = None
    self.entropy_records = []
    self.reset_entropy_detection()


def _safe_decode_token(self, token_id) -> str:
    tok = getattr(self, "tokenizer", None)
    if tok is None:
        return str(int(token_id))
    try:
        return tok.decode([int(token_id)], skip_special_tokens=False)
    except Exception:  # an id outside the tokenizer's vocabulary (padded embedding rows)
        return f"<{int(token_id)}>"


def _safe_decode_sequence(self, token_ids) -> str:
    ids = [int(t) for t in (token_ids.tolist() if torch.is_tensor(token_ids) else token_ids)]
    tok = getattr(self, "tokenizer", None)
    if tok is not None:
        try:  # whole-sequence decoding keeps SentencePiece spaces and multi-byte characters
            return tok.decode(ids, skip_special_tokens=False)
        except Exception:  # an id outside the tokenizer's vocabulary: token by token
            pass
    return "".join(self._safe_decode_token(t) for t in ids)


def enable_tnot_model(model: nn.Module, config: TNOTConfig | None = None, tokenizer=None) -> nn.Module:
    """Give a loaded causal LM the TNOT attributes, hooks and a TNOT `generate` (in place; returns it).

    `config` defaults to `TNOTConfig.from_env()`. `tokenizer` (optional) is used by the
    `_safe_decode_*` methods; it is loaded once, by the caller.
    """
    if getattr(model, "tnot", None) is not None:
        model.tnot_config = config or model.tnot_config
        return model
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head) to add the delta before")
    # the module whose output is the final hidden state: get_decoder() where the causal LM
    # calls it directly (OPT calls model.decoder, skipping OPTModel.forward), else base_model
    try:
        body = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        body = None
    body = body if isinstance(body, nn.Module) else model.base_model
    if body is model:
        raise ValueError(f"{type(model).__name__} has no separate transformer body to read the final hidden state from")
    model.tnot_config = config if config is not None else TNOTConfig.from_env()
    model.tokenizer = tokenizer
    cls = type(model)
    for name, fn in (("reset_entropy_detection", _reset_entropy_detection),
                     ("reset_model_parameters", _reset_model_parameters),
                     ("_safe_decode_token", _safe_decode_token),
                     ("_safe_decode_sequence", _safe_decode_sequence)):
        setattr(model, name, fn.__get__(model, cls))
    model.reset_model_parameters()
    model.generate_without_tnot = model.generate  # the plain generate, for baselines
    model.tnot = TNOTGenerator(model, body, head, model.generate_without_tnot)
    model.generate = model.tnot.generate
    return model


def enable_tnot(model_class):
    """Make `model_class` produce TNOT-enabled models.

    - A concrete causal-LM class (e.g. `LlamaForCausalLM`; also usable as a class decorator):
      returns a subclass whose instances (from `__init__` or `from_pretrained`) are enabled,
      with the config from the environment (`TNOTConfig.from_env`); set `model.tnot_config`
      to change it.
    - `AutoModelForCausalLM` (a factory): returns a class whose `from_pretrained` /
      `from_config` enable the loaded model. Extra keyword arguments `tnot_config` and
      `tokenizer` go to `enable_tnot_model`; the rest to the factory.
    """
    from transformers import PreTrainedModel

    if isinstance(model_class, type) and issubclass(model_class, PreTrainedModel):
        class TNOTSubclass(model_class):
            def __init__(self, config, *args, **kwargs):
                super().__init__(config, *args, **kwargs)
                enable_tnot_model(self)

        TNOTSubclass.__name__ = TNOTSubclass.__qualname__ = f"TNOT{model_class.__name__}"
        return TNOTSubclass

    class TNOTModelClass:
        base_class = model_class

        @classmethod
        def from_pretrained(cls, *args, tnot_config: TNOTConfig | None = None, tokenizer=None, **kwargs):
            model = model_class.from_pretrained(*args, **kwargs)
            return enable_tnot_model(model, tnot_config, tokenizer)

        @classmethod
        def from_config(cls, *args, tnot_config: TNOTConfig | None = None, tokenizer=None, **kwargs):
            return enable_tnot_model(model_class.from_config(*args, **kwargs), tnot_config, tokenizer)

    TNOTModelClass.__name__ = TNOTModelClass.__qualname__ = f"TNOT{getattr(model_class, '__name__', 'Model')}"
    return TNOTModelClass

"""TNOT (published as SRGen) and SLOT: a per-sample delta added to the final hidden state.

Both methods learn, at test time, a vector `delta` of shape [1, 1, H] that is added to the
final hidden state (the input of `lm_head`). It is fitted on the prompt with next-token CE:

- `slot`: the delta found at the prompt is added at every generated token.
- `srgen`: the first prefill fits `delta_normal` (CE only; as published it is not applied, it
  only marks that a later prefill is a reflection). During generation the entropy of each next
  token distribution is watched; above a threshold (static, or adaptive over the sample's own
  history) the sample is stopped with a forced EOS. A retry continues from the tokens already
  generated, fits `delta_high` with `(1 - w) * CE + w * entropy(last position)` and applies it
  to the one token after the high-entropy point. Up to `max_retries` retries.

Papers: SRGen, "Self-Reflective Generation at Test Time" (2025), and SLOT, "Sample-specific
Language Model Optimization at Test-time" (2025).
Done right where the original code was not:
- the transformer body runs once per prefill (the normal one, which fills the KV cache); each
  optimization step recomputes only `lm_head(h + delta)` over the prompt positions;
- `lm_head` weights are frozen during the optimization (no vocab x hidden gradient);
- the CE is computed (and backpropagated) in chunks of positions, so a long prompt never holds
  positions x vocab logits at once;
- delta and its AdamW state are float32 whatever the model dtype;
- one delta per sample ([B, 1, H]), per-sample entropy history, thresholds and stops;
- retries continue from token ids (no decode / re-tokenize round trip, chat tokens kept) and
  reuse the KV cache and final hidden states of their prefix: only the last kept token goes
  through the body again (a full re-prefill only for caches that are not plain dynamic ones);
  the samples stopped in one pass retry together, as one left-padded batch.

Use:
    TNOTModel = enable_tnot(AutoModelForCausalLM)
    model = TNOTModel.from_pretrained(path, tnot_config=TNOTConfig(prompt_only=True, times=3))
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)
or `enable_tnot_model(model, config)` on a loaded model. Without a config, the settings come
from the environment variables of the original code (`TNOTConfig.from_env`).

The optimization happens inside `generate` (the wrapped one); a plain `model(...)` forward
is unchanged, and `model.generate_without_tnot` is the original `generate` (the baseline).
`model.delta` keeps the last fitted delta for inspection.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from testtime.lm import IGNORE_INDEX, cut_at_eos, entropy, eos_token_ids, pad

MODES = ("slot", "srgen")


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no", ""):
        return False
    raise ValueError(f"environment variable {name}={text!r} is not a boolean (True/False)")


@dataclass
class TNOTConfig:
    """The settings; field names are the environment variables of the original TNOT code.

    Defaults are the original code's `os.environ.get` defaults (prompt_only False: the prompt
    stage is off unless asked for, as in the original), plus `max_retries` (20, the published
    value) and `mode`.
    """

    prompt_only: bool = False          # fit delta at each prefill
    times: int = 1                     # optimization steps per prefill
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
    max_retries: int = 20
    mode: str = "srgen"
    mask_special_tokens: bool = False  # prompt CE ignores special tokens as labels (chat-template markers)
    ce_chunk: int = 1024               # prompt positions per CE chunk (not an env variable)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.times < 0:
            raise ValueError(f"times must be >= 0, got {self.times}")

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "TNOTConfig":
        """Read every field from its environment variable (same name); absent ones keep the default."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == "ce_chunk" or f.name not in environ:
                continue
            text = environ[f.name]
            kind = type(f.default)
            try:
                if kind is bool:
                    values[f.name] = _parse_bool(f.name, text)
                elif kind is int:
                    values[f.name] = int(text)
                elif kind is float:
                    values[f.name] = float(text)
                else:
                    values[f.name] = text
            except ValueError as err:
                if kind is bool:
                    raise
                raise ValueError(f"environment variable {f.name}={text!r} is not a valid {kind.__name__}") from err
        values.update(overrides)
        return cls(**values)


def adaptive_threshold(history, n: int, k: float, static: float) -> float:
    """`max(mean(last n) + k * max(std(last n), 0.5), 1.8)` once the history holds n values, else `static`.

    `history`: the sample's earlier entropies (not the one being judged). As the original
    (`len(history) + 1 > n`), with the sample (unbiased) std of `torch.std`.
    """
    if len(history) < n:
        return static
    window = torch.tensor(history[-n:], dtype=torch.float64)
    return max(float(window.mean()) + k * max(float(window.std()), 0.5), 1.8)


def prompt_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Next-token labels for positions 0..T-2 ([B, T-1]); -100 where either side is padding."""
    labels = input_ids[:, 1:].clone()
    if attention_mask is not None:
        labels[(attention_mask[:, 1:] == 0) | (attention_mask[:, :-1] == 0)] = IGNORE_INDEX
    return labels


def chunked_prompt_ce(head: nn.Module, hidden: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor,
                      chunk: int = 1024, backward: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Sum over samples of each sample's mean next-token CE of `head(hidden[:, :-1] + delta)`.

    Positions go through the head `chunk` at a time. With `backward`, each chunk's share
    (times `scale`) is backpropagated at once, so no more than one chunk of logits is alive.
    Returns the loss value (detached when `backward`). A per-sample mean keeps each sample's
    delta gradient independent of the others in the batch.
    """
    hidden = hidden[:, :-1]
    counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1).float()  # [B]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[1], chunk):
        h = hidden[:, start:start + chunk]
        y = labels[:, start:start + chunk]
        if not (y != IGNORE_INDEX).any():
            continue
        logits = head((h.float() + delta).to(h.dtype)).float()
        # rows of (position, vocab): CE over a transposed [B, V, c] view is ~100x slower on a GPU
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none").view(y.shape)  # [B, c]
        part = (ce.sum(1) / counts).sum()
        if backward:
            (part * scale).backward()
            part = part.detach()
        total = total + part
    return total


class _State:
    """What the hooks need between calls inside one generate."""

    def __init__(self):
        self.reset_call()

    def reset_call(self):
        self.pending_prefill = False   # next body forward is a prefill to optimize on
        self.prefill_ids = None
        self.prefill_mask = None
        self.stage = "first"           # "first" pass, "reflect" (srgen retry: fit delta_high, apply it once),
                                       # "final" (after the last retry: no fitting, no stops)
        self.unwatched = False         # the next lm_head call is not watched (the reflected token)
        self.apply_delta = None        # [B,1,H] float32 added by the lm_head pre-hook
        self.apply_once = False        # drop apply_delta after one lm_head call
        self.in_generate = False
        self.temperature = 1.0
        self.rows = None               # original batch index of each current row
        self.stopped = None            # [B] bool: forced EOS already given to this row
        self.done = None               # [B] bool: row already ended (EOS fed back in): not watched
        self.steps = None              # [B] tokens generated so far (before this call)
        self.busy = False              # inside the optimization: hooks stand aside
        self.context_hidden = None     # retry: final hidden states of the cached prefix [B, C, H]
        self.hidden_log = None         # final hidden states of every body call of this pass
        self.unshifted = None          # record_entropy: last-position head input before the delta
        self.retry = 0                 # 0: first pass; r: the r-th retry round
        self.limits = None             # per row of the pass: the step at which watching stops


def _config_ids(model, name: str) -> list[int]:
    """Token ids named `name` (eos_token_id, pad_token_id) in the generation config, else the model config."""
    value = getattr(model.generation_config, name, None)
    if value is None:
        value = getattr(model.config, name, None)
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_id(model) -> int:
    eos = eos_token_ids(model, getattr(model, "tokenizer", None))
    if not eos:
        raise ValueError("TNOT entropy control needs an eos_token_id in the generation config or model config")
    return eos[0]


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


def _pad_id(model, eos: int | None) -> int:
    pad = _config_ids(model, "pad_token_id")
    return pad[0] if pad else int(eos if eos is not None else 0)


def optimize_delta(model, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask, reflect: bool) -> torch.Tensor:
    """Fit a per-sample float32 delta [B,1,H] on the prompt's hidden states (body already run).

    `reflect` (srgen retry) adds `entropy_weight * entropy(last position at the sampling
    temperature)` to `(1 - entropy_weight) * CE`. The head's parameters are frozen for the
    duration and must come out with no `.grad`. Works inside `torch.inference_mode()` (Lightning's
    validate/test run there): the optimization leaves it, on copies of the inference tensors.
    """
    with torch.inference_mode(False), torch.enable_grad():
        if hidden.is_inference():
            hidden, input_ids = hidden.clone(), input_ids.clone()
            attention_mask = attention_mask.clone() if attention_mask is not None else None
        return _fit_delta(model, hidden.detach(), input_ids, attention_mask, reflect)


def _fit_delta(model, hidden, input_ids, attention_mask, reflect: bool) -> torch.Tensor:
    cfg = model.tnot_config
    head = model.get_output_embeddings()
    delta = torch.zeros(hidden.shape[0], 1, hidden.shape[-1], dtype=torch.float32, device=hidden.device,
                        requires_grad=True)
    if cfg.times == 0:
        return delta.detach()
    labels = prompt_labels(input_ids, attention_mask).to(hidden.device)
    if cfg.mask_special_tokens:
        special = torch.tensor(sorted(_special_ids(model)), dtype=labels.dtype, device=labels.device)
        labels[torch.isin(labels, special)] = IGNORE_INDEX  # a prompt of only special tokens gives a zero loss, not NaN
    w = cfg.entropy_weight if reflect else 0.0
    opt = torch.optim.AdamW([delta], lr=cfg.lr, weight_decay=1e-8, eps=1e-5)
    params = list(head.parameters())
    saved = [p.requires_grad for p in params]
    model._tnot.busy = True
    try:
        for p in params:
            p.requires_grad_(False)
        for _ in range(cfg.times):
            opt.zero_grad(set_to_none=True)
            chunked_prompt_ce(head, hidden, delta, labels, cfg.ce_chunk, backward=True, scale=1.0 - w)
            if w > 0:
                last = hidden[:, -1:]
                logits = head((last.float() + delta).to(last.dtype))[:, -1]
                (w * entropy(logits, model._tnot.temperature).sum()).backward()
            opt.step()
    finally:
        for p, r in zip(params, saved):
            p.requires_grad_(r)
        model._tnot.busy = False
    assert all(p.grad is None for p in params), "lm_head received a gradient during the TNOT optimization"
    return delta.detach()


def _body_hook(model):
    def hook(module, args, output):
        st = model._tnot
        if st.busy or not st.in_generate:
            return None
        if st.hidden_log is not None:  # kept so a retry can reuse the KV cache of a prefix
            st.hidden_log.append(output[0].detach())
        if not st.pending_prefill:
            return None
        st.pending_prefill = False
        cfg = model.tnot_config
        if not cfg.prompt_only or st.stage == "final":
            return None
        hidden = output[0]
        if st.context_hidden is not None:  # the cached prefix was not recomputed: its states were kept
            hidden = torch.cat([st.context_hidden.to(hidden.dtype), hidden], dim=1)
        delta = optimize_delta(model, hidden, st.prefill_ids, st.prefill_mask, st.stage == "reflect")
        if cfg.mode == "slot":
            model.delta = delta
            st.apply_delta, st.apply_once = delta, False
        elif st.stage == "reflect":  # delta_high: only the token right after the high-entropy point
            if model.delta is not None and model.delta.shape[0] > max(st.rows):
                model.delta = model.delta.clone()  # keep one row per sample of the whole batch
                model.delta[st.rows] = delta
            else:
                model.delta = delta
            st.apply_delta, st.apply_once = delta, True
        else:  # delta_normal: as published, not applied; marks that a later prefill reflects
            model.delta = delta
            st.apply_delta = None
        return None
    return hook


def _head_pre_hook(model):
    def pre_hook(module, args):
        st = model._tnot
        if st.busy or st.apply_delta is None:
            return None
        hidden = args[0]
        delta = st.apply_delta
        if delta.shape[0] != hidden.shape[0]:
            if delta.shape[0] != 1:
                return None  # a forward outside the generate that fitted this delta
        if st.in_generate and model.tnot_config.record_entropy:
            st.unshifted = hidden[:, -1:].detach()  # for the record's entropy without the delta
        new = (hidden.float() + delta.to(hidden.device)).to(hidden.dtype)
        if st.apply_once:
            st.apply_delta = None
        return (new,) + tuple(args[1:])
    return pre_hook


def _head_hook(model):
    def hook(module, args, output):
        st = model._tnot
        cfg = model.tnot_config
        if st.busy or not st.in_generate or not (cfg.entropy_control or cfg.record_entropy):
            return None
        logits = output
        ent = entropy(logits[:, -1].detach(), st.temperature)  # [B]
        ent_original = None
        if st.unshifted is not None:  # a delta was added to this call's input: entropy without it too
            st.busy = True
            try:
                ent_original = entropy(module(st.unshifted)[:, -1].detach(), st.temperature)
            finally:
                st.busy, st.unshifted = False, None
        eos = _eos_id(model) if cfg.entropy_control else None
        # the token a retry reflects on (delta_high) and everything after the last retry are not
        # watched: as in the original, where entropy control runs in the generation stage only
        watch = cfg.entropy_control and st.stage != "final" and not st.unwatched
        st.unwatched = False
        forced = []
        for i in range(logits.shape[0]):
            row = st.rows[i]
            if st.stopped[i] or st.done[i] or (st.limits is not None and st.steps[i] >= st.limits[i]):
                continue
            hist = model.entropy_history[row]
            thr = None
            if watch:
                thr = cfg.entropy_threshold
                if cfg.adaptive_entropy:
                    thr = adaptive_threshold(hist, cfg.adaptive_entropy_N, cfg.adaptive_entropy_K,
                                             cfg.entropy_threshold)
                model.sample_thresholds[row] = thr
            e = float(ent[i])
            if watch:
                hist.append(e)
            stop = thr is not None and e > thr
            if cfg.record_entropy:
                model.entropy_records.append({
                    "sample": row, "step": int(st.steps[i]), "retry": st.retry, "entropy": e,
                    "entropy_original": float(ent_original[i]) if ent_original is not None else e,
                    "delta_applied": ent_original is not None, "threshold": thr, "stopped": stop})
            if stop:
                forced.append(i)
                st.stopped[i] = True
                model.high_entropy_samples[row] = True
                model.high_entropy_position[row] = int(st.steps[i])
                model.stop_positions[row].append(int(st.steps[i]))
                model.high_entropy_detected = True
                if cfg.log_entropy_control:
                    print(f"[tnot] sample {row}: entropy {e:.3f} > threshold {thr:.3f} at token {int(st.steps[i])}: EOS")
            st.steps[i] += 1
        model.entropy_threshold = model.sample_thresholds[st.rows[0]] if st.rows else None
        if not forced:
            return None
        out = logits.clone()
        out[forced, -1, :] = -1e4
        out[forced, -1, eos] = 1e4
        return out
    return hook


def _model_pre_hook(model):
    """At each decode step, mark rows whose fed-back token is EOS as done (generate keeps
    running finished rows on padding; their entropies must not count)."""
    def pre_hook(module, args, kwargs):
        st = model._tnot
        if not st.in_generate or st.pending_prefill or st.busy or st.done is None:
            return None
        cfg = model.tnot_config
        if not (cfg.entropy_control or cfg.record_entropy):
            return None  # nothing is watched: no per-token device-to-host copy
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return None
        eos = model._tnot_eos_ids
        for i, tok in enumerate(ids[:, -1].tolist()):
            if tok in eos:
                st.done[i] = True
        return None
    return pre_hook


def _generate_pass(model, input_ids, attention_mask, rows, kwargs, stage="first", past=None, context_hidden=None,
                   keep_hidden=False, retry=0, limits=None):
    """One call of the original generate with the hooks armed (`stage`: see `_State.stage`).

    Returns (new tokens [B, n], the KV cache, the final hidden states of every position in that
    cache [B, T, H] or None). With `past` (a cache of all but the last token of `input_ids`)
    and `context_hidden` (its final hidden states), only the last token goes through the body.
    """
    st = model._tnot
    st.pending_prefill = True
    st.prefill_ids, st.prefill_mask = input_ids, attention_mask
    st.stage = stage
    st.unwatched = stage == "reflect"
    st.retry = retry
    st.apply_delta = None
    st.rows = rows
    st.stopped = [False] * len(rows)
    st.done = [False] * len(rows)
    st.steps = [model._generated_so_far[r] for r in rows]
    st.limits = limits  # per row: steps at and past its limit are not watched (a batch runs to its longest budget)
    st.context_hidden = context_hidden
    st.hidden_log = [] if keep_hidden else None
    st.in_generate = True
    model._tnot_eos_ids = set(eos_token_ids(model, getattr(model, "tokenizer", None)))
    extra = {"return_dict_in_generate": True}
    if past is not None:
        extra["cache"] = past
        kwargs = {k: v for k, v in kwargs.items() if k != "cache_implementation"}  # the cache is given
    try:
        out = model._tnot_original_generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs, **extra)
    finally:
        st.in_generate = False
        st.pending_prefill = False
        st.apply_delta = None  # a later plain forward is not shifted
        st.context_hidden = None
    hidden = None
    if keep_hidden and st.hidden_log:
        parts = ([context_hidden] if context_hidden is not None else []) + st.hidden_log
        hidden = torch.cat([h.to(parts[-1].dtype) for h in parts], dim=1)
    st.hidden_log = None
    seqs = out.sequences if hasattr(out, "sequences") else out
    cache = getattr(out, "cache", None)
    return seqs[:, input_ids.shape[1]:], cache, hidden


def _stack_rows(items):
    """One DynamicCache of the given (cache, row, length) rows, each cut to its first `length`
    positions and left-padded with zeros to the longest (the padding is masked out by the caller).

    None when a source is not a plain dynamic cache (static, sliding-window, quantized ...): the
    caller then recomputes those prefixes.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    for cache, _, _ in items:
        if type(cache) is not DynamicCache or getattr(cache, "offloading", False):
            return None
        if not all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers):
            return None
    longest = max(n for _, _, n in items)
    out = DynamicCache()
    for i in range(len(items[0][0].layers)):
        keys = torch.cat([F.pad(c.layers[i].keys[r:r + 1, :, :n], (0, 0, longest - n, 0)) for c, r, n in items])
        values = torch.cat([F.pad(c.layers[i].values[r:r + 1, :, :n], (0, 0, longest - n, 0)) for c, r, n in items])
        out.update(keys, values, i)
    return out


def _max_new_tokens(kwargs: dict, gen_cfg, width: int) -> int:
    """The new-token budget as generate resolves it: max_new_tokens, else max_length - prompt width."""
    for source in (kwargs, vars(gen_cfg)):
        if source.get("max_new_tokens") is not None:
            return int(source["max_new_tokens"])
        if source.get("max_length") is not None:
            return int(source["max_length"]) - width
    return 20


def _tnot_generate(model):
    original = model.generate

    def generate(input_ids=None, attention_mask=None, **kwargs):
        cfg = model.tnot_config
        if input_ids is None:
            input_ids = kwargs.pop("inputs")
        if kwargs.pop("return_dict_in_generate", False):
            raise ValueError("TNOT generate returns the token ids only (return_dict_in_generate is not supported)")
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("TNOT generate starts from a prompt; a cache (past_key_values) is not supported")
        gen_cfg = kwargs.get("generation_config", model.generation_config)
        for name in ("num_return_sequences", "num_beams"):
            value = kwargs.get(name, getattr(gen_cfg, name, 1)) or 1
            if value > 1:
                raise ValueError(f"TNOT generate supports {name}=1 only, got {value}: repeat the prompts instead "
                                 "(input_ids.repeat_interleave(n, dim=0)), each row gets its own delta")
        do_sample = kwargs.get("do_sample", gen_cfg.do_sample)
        temperature = kwargs.get("temperature", gen_cfg.temperature) if do_sample else 1.0
        batch, width = input_ids.shape
        st = model._tnot
        st.reset_call()
        st.temperature = float(temperature or 1.0)
        model.reset_entropy_detection(batch)
        model._generated_so_far = [0] * batch
        model.entropy_records = []
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        srgen = cfg.mode == "srgen" and cfg.entropy_control and cfg.max_retries > 0
        reuse = kwargs.get("use_cache", True) is not False  # without a cache there is nothing to reuse

        new, cache, hidden = _generate_pass(model, input_ids, attention_mask, list(range(batch)), kwargs,
                                            keep_hidden=srgen and reuse)
        if not srgen:  # (max_retries 0: a forced EOS ends its sample, entropy control as early stopping)
            _write_records(model, [new[b] for b in range(batch)])
            return torch.cat([input_ids, new], dim=1)

        eos = _eos_id(model)
        eos_ids = model._tnot_eos_ids
        pad_id = _pad_id(model, eos)
        max_new = _max_new_tokens(kwargs, gen_cfg, width)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("max_length", "max_new_tokens")}
        # per sample: kept new tokens (cut after the first EOS), and where its cache lives: the pass
        # that made it, its row there, that row's input (with its padding) and how many of the
        # sample's kept tokens came before that pass
        generated = [cut_at_eos(new[b], eos_ids, keep_eos=True) for b in range(batch)]
        source = [(cache, hidden, b, input_ids[b], attention_mask[b], 0) for b in range(batch)]
        del new, cache, hidden
        retries = [0] * batch
        for round_ in range(1, cfg.max_retries + 2):
            # every sample stopped by entropy retries, all of them in one batch per round
            todo = [b for b in range(batch) if model.high_entropy_samples[b] and model._stopped_by_entropy(b, generated[b])]
            for b in set(range(batch)) - set(todo):
                source[b] = None  # finished: its caches can go
            if not todo:
                break
            # retries used up: one last pass finishes these samples without fitting or stops, as published
            final = round_ > cfg.max_retries
            rows, kept = [], {}
            for b in todo:
                retries[b] += 0 if final else 1
                kept[b] = generated[b][:-1]  # drop the forced EOS
                model._generated_so_far[b] = len(kept[b])
                model.high_entropy_samples[b] = False
                _, _, _, ids_b, mask_b, before = source[b]
                since = kept[b][before:]  # the tokens this sample's source pass generated and kept
                rows.append((torch.cat([ids_b, since]), torch.cat([mask_b, torch.ones_like(since)])))
            width_r = max(len(ids) for ids, _ in rows)
            ids, mask = pad([i for i, _ in rows], pad_id, side="left"), pad([m for _, m in rows], 0, side="left")
            # reuse the prefixes' KV caches: only the last kept token of each row goes through the body
            past = context = None
            items = [(source[b][0], source[b][2], len(i) - 1) for b, (i, _) in zip(todo, rows)]
            if all(source[b][1] is not None for b in todo):
                past = _stack_rows(items)
            if past is not None:
                context = torch.stack([F.pad(source[b][1][r, :n], (0, 0, width_r - 1 - n, 0))
                                       for b, (_, r, n) in zip(todo, items)])
            budget = {b: max_new - len(kept[b]) for b in todo}
            more, cache_r, hidden_r = _generate_pass(
                model, ids, mask, todo, {**kwargs, "max_new_tokens": max(budget.values())},
                stage="final" if final else "reflect", past=past, context_hidden=context,
                keep_hidden=reuse and not final, retry=round_, limits=[max_new] * len(todo))
            for i, b in enumerate(todo):
                generated[b] = torch.cat([kept[b], cut_at_eos(more[i, :budget[b]], eos_ids, keep_eos=True)])
                source[b] = (cache_r, hidden_r, i, ids[i], mask[i], len(kept[b]))
        model.retries = retries
        model.high_entropy_samples = [bool(p) for p in model.stop_positions]
        model.high_entropy_detected = any(model.high_entropy_samples)
        _write_records(model, generated)
        out = torch.full((batch, width + max(len(g) for g in generated)), pad_id, dtype=torch.long,
                         device=input_ids.device)
        out[:, :width] = input_ids
        for b, g in enumerate(generated):
            out[b, width: width + len(g)] = g
        return out

    return generate, original


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
    delta_applied, threshold (None without entropy control), stopped (a forced EOS was given
    there), token_id and token (the EOS where stopped, else the token kept at that step).
    `response_entropy_file`: a JSON array with one object per response (appended to across
    calls): its token ids and text, mean entropy, then its `sample_traces` entry. Tokens are decoded with the tokenizer given to `enable_tnot_model`
    (loaded once).
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
        with open(cfg.response_entropy_file, "w") as f:
            json.dump(responses, f)


# ---- methods attached to the model (the seed's interface) ----

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
    """Forget the fitted delta and every entropy state."""
    self.delta = None
    self._tnot.reset_call()
    self.reset_entropy_detection()


def _stopped_by_entropy(self, b: int, tokens) -> bool:
    return self.high_entropy_position[b] is not None and self.high_entropy_position[b] == len(tokens) - 1


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
    if getattr(model, "_tnot", None) is not None:
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
    model._tnot = _State()
    model.delta = None
    cls = type(model)
    for name, fn in (("reset_entropy_detection", _reset_entropy_detection),
                     ("reset_model_parameters", _reset_model_parameters),
                     ("_stopped_by_entropy", _stopped_by_entropy),
                     ("_safe_decode_token", _safe_decode_token),
                     ("_safe_decode_sequence", _safe_decode_sequence)):
        setattr(model, name, fn.__get__(model, cls))
    model.reset_entropy_detection()
    model._generated_so_far = []
    model.entropy_records = []
    model._tnot_handles = [body.register_forward_hook(_body_hook(model)),
                           head.register_forward_pre_hook(_head_pre_hook(model)),
                           head.register_forward_hook(_head_hook(model)),
                           model.register_forward_pre_hook(_model_pre_hook(model), with_kwargs=True)]
    model.generate, model._tnot_original_generate = _tnot_generate(model)
    model.generate_without_tnot = model._tnot_original_generate  # the plain generate, for baselines
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

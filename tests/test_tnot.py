"""TNOT / SLOT: prompt-stage delta optimization and entropy-controlled generation."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, CompileConfig, Gemma2Config

from testtime.tiny import FAMILIES, build_tiny_model
from testtime.tnot import (
    EntropyControl,
    TNOTConfig,
    TNOTConfigError,
    TNOTGenerator,
    chunked_prompt_ce,
    enable_tnot,
    enable_tnot_model,
    prompt_labels,
)


def _tiny(tokenizer, family="llama"):
    return build_tiny_model(family, tokenizer=tokenizer)[0]


def _prompt(tokenizer, texts):
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _greedy(model, ids, mask, n=8, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=model.config.pad_token_id, **kwargs)


def _hand_entropy(logits, temperature=1.0):
    p = torch.softmax(logits.double() / temperature, -1)
    return -(p * p.log()).sum(-1)


def _naive_delta(model, ids, times, lr, w=0.0, temperature=1.0):
    """The published fit by hand, for one unpadded prompt [1, T]: a full forward per step with the
    delta added to lm_head's input, the model's own output logits (its rescaling included), loss
    (1 - w) * mean CE + w * entropy(last position at T), torch's AdamW(lr, weight_decay=1e-8, eps=1e-5)."""
    model.requires_grad_(False)
    delta = torch.zeros(1, 1, model.get_output_embeddings().weight.shape[1], requires_grad=True)
    opt = torch.optim.AdamW([delta], lr=lr, weight_decay=1e-8, eps=1e-5)
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda mod, args: (args[0] + delta,))
    try:
        for _ in range(times):
            logits = model(input_ids=ids, logits_to_keep=0).logits[0]
            ce = F.cross_entropy(logits[:-1], ids[0, 1:])
            p = torch.softmax(logits[-1] / temperature, -1)
            loss = (1 - w) * ce + w * -(p * p.log()).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        handle.remove()
    return delta.detach()


# ---- the fit ------------------------------------------------------------------------------------


def test_slot_delta_matches_naive_adamw_reference(tokenizer):
    texts = ["The quick brown fox jumps.", "Hi there"]
    ids, mask = _prompt(tokenizer, texts)
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=3, lr=0.1, mode="slot"))
    head = model.get_output_embeddings()
    before = head.weight.detach().clone()
    _greedy(model, ids, mask, n=2)
    assert torch.equal(head.weight, before) and all(p.grad is None for p in model.parameters())
    assert model.delta.dtype == torch.float32  # whatever the model dtype (bf16 below)
    reference = _tiny(tokenizer)
    for b, text in enumerate(texts):  # each padded row gets the delta its prompt gets alone
        one, _ = _prompt(tokenizer, [text])
        assert torch.allclose(model.delta[b], _naive_delta(reference, one, 3, 0.1)[0], atol=2e-5)


def test_delta_high_matches_naive_reference_of_ce_plus_entropy(tokenizer):
    # threshold 0: every sample stops at its first token; the retry fits delta_high on the prompt with
    # (1 - w) * CE + w * entropy at the sampling temperature, and the last pass fits nothing
    texts = ["Count: 1 2 3", "Hello"]
    ids, mask = _prompt(tokenizer, texts)
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=3, lr=0.1, mode="srgen",
                                                           entropy_control=True, entropy_threshold=0.0,
                                                           entropy_weight=0.5, max_retries=1))
    torch.manual_seed(0)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=True, temperature=0.6,
                   pad_token_id=0)
    assert model.retries == [1, 1] and model.stop_positions == [[0, 1], [0, 1]]
    reference = _tiny(tokenizer)
    for b, text in enumerate(texts):
        one, _ = _prompt(tokenizer, [text])
        expected = _naive_delta(reference, one, 3, 0.1, w=0.5, temperature=0.6)[0]
        assert torch.allclose(model.delta[b], expected, atol=2e-5)
        # the entropy term matters here: CE alone lands elsewhere
        assert not torch.allclose(model.delta[b], _naive_delta(reference, one, 3, 0.1)[0], atol=1e-3)


def test_srgen_fits_delta_normal_only_when_asked(tokenizer):
    ids, mask = _prompt(tokenizer, ["What is 2+3?"])
    steps, outs = [], []
    for fit in (False, True):
        model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=3, mode="srgen",
                                                               entropy_control=True, entropy_threshold=1e9,
                                                               fit_delta_normal=fit))
        calls = []
        handle = model.get_output_embeddings().register_forward_hook(lambda mod, a, o: calls.append(o.shape[1]))
        outs.append(_greedy(model, ids, mask, n=4))
        handle.remove()
        steps.append(len(calls) - 4)  # lm_head calls beyond the 4 of generate's own forwards
        if fit:  # delta_normal, as published: the CE fit
            assert torch.allclose(model.delta[0], _naive_delta(_tiny(tokenizer), ids, 3, 0.1)[0], atol=2e-5)
        else:  # skipped: a zero delta marks the prefill as done
            assert torch.count_nonzero(model.delta) == 0
    assert steps == [0, 3]
    assert torch.equal(outs[0], outs[1])  # never applied: skipping it changes nothing but the cost


def test_softcapped_family_fits_on_the_models_own_logits(tokenizer):
    # Gemma-2 rescales lm_head's output (tanh(z / cap) * cap): CE and entropy must see what it samples from
    def gemma(cap=1.0):
        config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                              final_logit_softcapping=cap, initializer_range=0.2, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()

    ids, mask = _prompt(tokenizer, ["Softly capped logits here"])
    reflect = dict(mode="srgen", entropy_control=True, entropy_threshold=0.0, max_retries=1, entropy_weight=0.5)
    for cfg, w in ((dict(mode="slot"), 0.0), (reflect, 0.5)):
        model = enable_tnot_model(gemma(), TNOTConfig(prompt_only=True, times=3, lr=0.1, **cfg))
        _greedy(model, ids, mask, n=3)
        expected = _naive_delta(gemma(), ids, 3, 0.1, w=w)[0]
        assert torch.allclose(model.delta[0], expected, atol=2e-5)
        # the same fit on lm_head's raw output lands elsewhere
        assert not torch.allclose(expected, _naive_delta(gemma(cap=None), ids, 3, 0.1, w=w)[0], atol=0.1)


def test_chunked_ce_equals_unchunked(tokenizer):
    model = _tiny(tokenizer)
    head = model.get_output_embeddings()
    ids, mask = _prompt(tokenizer, ["a longer prompt of several words", "short"])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask)[0]
    labels = prompt_labels(ids, mask)
    torch.manual_seed(0)
    d0 = (0.1 * torch.randn(2, 1, hidden.shape[-1])).requires_grad_(True)
    d1 = d0.detach().clone().requires_grad_(True)
    full = chunked_prompt_ce(model, hidden, d0, labels, chunk=10_000)
    full.backward()
    part = chunked_prompt_ce(model, hidden, d1, labels, chunk=3, backward=True)
    logits = head(hidden[:, :-1] + d0.detach()).float()
    ref = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    ref = (ref.sum(1) / (labels != -100).sum(1)).sum()
    assert torch.allclose(full, ref, atol=1e-5) and torch.allclose(part, ref, atol=1e-5)
    assert torch.allclose(d0.grad, d1.grad, atol=1e-6)


def test_prompt_labels_skip_masked_positions_anywhere():
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 9, 9, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 0, 1]])  # left padding; a gap before the last token
    assert prompt_labels(ids, mask).tolist() == [[-100, -100, 6, 7], [6, 7, -100, -100]]


def test_times_zero_reproduces_plain_greedy(tokenizer):
    ids, mask = _prompt(tokenizer, ["What is 2+3? Answer:", "Hi"])
    plain = _greedy(_tiny(tokenizer), ids, mask)
    for mode in ("slot", "srgen"):
        model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=0, mode=mode))
        assert torch.equal(_greedy(model, ids, mask), plain)
        assert model.delta.shape == (2, 1, 32) and torch.count_nonzero(model.delta) == 0


def test_slot_delta_changes_generation_and_is_not_left_behind(tokenizer):
    ids, mask = _prompt(tokenizer, ["abcabcabcabcabcabc"])
    base = _tiny(tokenizer)
    with torch.no_grad():
        plain_logits = base(input_ids=ids, attention_mask=mask).logits
    model = enable_tnot_model(base, TNOTConfig(prompt_only=True, times=3, lr=0.5, mode="slot"))
    _greedy(model, ids, mask, n=4)
    assert torch.count_nonzero(model.delta) > 0
    with torch.no_grad():  # a plain forward after generate is not shifted
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, plain_logits)


def test_body_runs_once_per_prefill(tokenizer):
    ids, mask = _prompt(tokenizer, ["What is 2+3? Answer:", "Hi"])
    counts = {}
    for times in (0, 5):
        model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=times, mode="slot"))
        calls = []
        model.get_decoder().register_forward_hook(lambda mod, a, o: calls.append(o[0].shape[1]))
        _greedy(model, ids, mask, n=6)
        counts[times] = calls
    assert counts[0] == counts[5] == [ids.shape[1]] + [1] * 5


# ---- settings -----------------------------------------------------------------------------------


def test_env_variables_map_to_config():
    env = {"prompt_only": "True", "times": "5", "lr": "0.01", "entropy_weight": "0.05", "entropy_control": "True",
           "entropy_threshold": "2.5", "adaptive_entropy": "True", "adaptive_entropy_N": "25",
           "adaptive_entropy_K": "4", "record_entropy": "False", "entropy_output_file": "e.jsonl",
           "response_entropy_file": "r.json", "log_entropy_control": "True", "max_retries": "7", "mode": "slot",
           "fit_delta_normal": "yes"}
    cfg = TNOTConfig.from_env(env)
    assert (cfg.prompt_only, cfg.times, cfg.lr, cfg.entropy_weight, cfg.entropy_control) == (True, 5, 0.01, 0.05, True)
    assert (cfg.entropy_threshold, cfg.adaptive_entropy, cfg.adaptive_entropy_N, cfg.adaptive_entropy_K) == \
        (2.5, True, 25, 4.0)
    assert (cfg.record_entropy, cfg.entropy_output_file, cfg.response_entropy_file) == (False, "e.jsonl", "r.json")
    assert (cfg.log_entropy_control, cfg.max_retries, cfg.mode, cfg.fit_delta_normal) == (True, 7, "slot", True)
    default = TNOTConfig.from_env({})
    assert (default.prompt_only, default.times, default.lr, default.entropy_threshold) == (False, 1, 0.1, 3.0)
    assert (default.adaptive_entropy_N, default.adaptive_entropy_K, default.entropy_control) == (20, 2.0, False)
    # the seed's evaluation scripts retry themselves: from the environment, generate runs no retries
    assert default.max_retries == 0 and TNOTConfig().max_retries == 20


@pytest.mark.parametrize("field, value, wanted", [
    ("adaptive_entropy_N", 0, ">= 2"), ("adaptive_entropy_N", 1, ">= 2"), ("entropy_weight", 1.5, r"in \[0, 1\]"),
    ("entropy_weight", -0.1, r"in \[0, 1\]"), ("lr", -0.01, ">= 0 and finite"), ("max_retries", -1, ">= 0"),
    ("times", -1, ">= 0"), ("mode", "train", r"one of \('slot', 'srgen'\)"),
    ("adaptive_entropy_K", -1.0, ">= 0 and finite"), ("ce_chunk", 0, ">= 1"), ("lr", math.inf, ">= 0 and finite"),
    ("times", 1.5, "an integer"), ("entropy_control", "yes", "True or False"),
    ("entropy_threshold", math.nan, "a number"),
])
def test_config_errors_name_the_field_and_value(field, value, wanted):
    with pytest.raises(TNOTConfigError, match=f"^{field} must be {wanted}, got {value!r}"):
        TNOTConfig(**{field: value})


def test_env_errors_name_the_variable_and_say_where_it_came_from():
    for env, problem in (({"mode": "train"}, "mode must be one of"), ({"lr": "-1"}, "lr must be >= 0"),
                         ({"adaptive_entropy_N": "0"}, "adaptive_entropy_N must be >= 2"),
                         ({"times": "abc"}, "not a valid integer"),
                         ({"entropy_control": "maybe"}, "not a valid boolean")):
        (name, text), = env.items()
        with pytest.raises(TNOTConfigError, match="without a tnot_config") as err:
            TNOTConfig.from_env(env)
        assert str(err.value).startswith(f"environment variable {name}={text!r}: {problem}")
        assert isinstance(err.value, ValueError) and err.value.field == name
    # a value given in code is reported as such, not as the environment's
    with pytest.raises(TNOTConfigError, match="^lr must be"):
        TNOTConfig.from_env({"lr": "0.1"}, lr=-1.0)


# ---- entropy control ----------------------------------------------------------------------------


def _control(history, budgets, cfg, temperature=1.0, skip_first=False, device="cpu", eos=3):
    return EntropyControl(history, budgets, torch.tensor([eos], device=device), cfg, temperature, watch=True,
                          skip_first=skip_first, record=False)


def test_adaptive_threshold_formula():
    cfg = TNOTConfig(entropy_control=True, entropy_threshold=3.0, adaptive_entropy=True, adaptive_entropy_N=4,
                     adaptive_entropy_K=2.0)
    history = [[1.0] * 4, [0.0, 10.0] * 3, [0.1] * 10, [1.0] * 3, [9.0] * 2 + [1.0, 2.0, 3.0, 4.0]]
    control = _control(history, [1] * 5, cfg)
    control(torch.zeros(5, 1, dtype=torch.long), torch.zeros(5, 8))
    out = control.thresholds[:, 0].tolist()
    window = [0.0, 10.0, 0.0, 10.0]
    assert out[0] == pytest.approx(2.0)  # N values: the window applies; std floor 0.5: 1 + 2 * 0.5
    assert out[1] == pytest.approx(statistics.mean(window) + 2.0 * statistics.stdev(window))  # unbiased std
    assert out[2] == pytest.approx(1.8)  # the floor: 0.1 + 2 * 0.5 < 1.8
    assert out[3] == 3.0  # fewer than N values yet: the static threshold
    assert out[4] == pytest.approx(2.5 + 2.0 * statistics.stdev([1.0, 2.0, 3.0, 4.0]))  # the last N only


def _reference_control(fed, logits, budgets, history, n, k, static, adaptive, temperature, skip_first, eos):
    """The per-row, per-token rule written out: returns stops (step or -1), thresholds, histories."""
    rows = len(budgets)
    stops, thresholds, history = [-1] * rows, [static] * rows, [list(h) for h in history]
    done = [False] * rows
    for i, z in enumerate(logits):
        for r in range(rows):
            if i > 0 and fed[i][r] == eos:
                done[r] = True
            if done[r] or i >= budgets[r] or (skip_first and i == 0):
                continue
            e = float(_hand_entropy(z[r], temperature))
            h = history[r]
            thr = static
            if adaptive and len(h) >= n:
                w = h[-n:]
                thr = max(statistics.mean(w) + k * max(statistics.stdev(w), 0.5), 1.8)
            thresholds[r] = thr
            h.append(e)
            if e > thr:
                stops[r] = i
    return stops, thresholds, history


@pytest.mark.parametrize("adaptive, skip_first", [(True, False), (False, True)])
def test_entropy_control_matches_the_rule_row_by_row_without_reading_back(adaptive, skip_first):
    torch.manual_seed(0)
    rows, vocab, eos, steps = 4, 12, 3, 7
    cfg = TNOTConfig(entropy_control=True, entropy_threshold=2.2, adaptive_entropy=adaptive, adaptive_entropy_N=3,
                     adaptive_entropy_K=0.5)
    start = [[2.0, 2.1, 2.3], [], [1.0], [2.4, 2.45]]
    budgets = [8, 7, 8, 5]
    logits = [torch.randn(rows, vocab) * torch.tensor([[0.2], [1.0], [3.0], [0.5]]) for _ in range(steps)]
    logits[2][2, eos] = 50.0  # row 2 ends by itself: nothing after its EOS is judged
    # on the meta device tensors hold no data: a value read back to the host per token would raise
    meta = _control(start, budgets, cfg, 0.7, skip_first, device="meta")
    for z in logits:
        meta(torch.zeros(rows, 1, dtype=torch.long, device="meta"), z.to("meta"))
    control = _control(start, budgets, cfg, 0.7, skip_first)
    fed, ids = [], torch.zeros(rows, 1, dtype=torch.long)
    for z in logits:
        fed.append(ids[:, -1].tolist())
        ids = torch.cat([ids, control(ids, z.clone()).argmax(-1, keepdim=True)], 1)
    rows_out = control.result(ids[:, 1:])
    stops, thresholds, history = _reference_control(fed, logits, budgets, start, 3, 0.5, 2.2, adaptive, 0.7,
                                                    skip_first, eos)
    assert [row["stop_at"] for row in rows_out] == stops and any(s >= 0 for s in stops)
    for r, row in enumerate(rows_out):
        assert start[r] + row["judged"] == pytest.approx(history[r], abs=1e-5)
        assert (row["threshold"] or 2.2) == pytest.approx(thresholds[r], abs=1e-5)
        if stops[r] >= 0:  # the forced EOS is what came out for that row
            assert ids[r, stops[r] + 1] == eos


def test_entropy_threshold_zero_stops_at_first_token(tokenizer):
    eos = tokenizer.eos_token_id
    ids, mask = _prompt(tokenizer, ["Tell me a story", "Hi"])
    P = ids.shape[1]
    # max_retries 0: the forced EOS ends the sample (the caller retries)
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=1, entropy_control=True,
                                                           entropy_threshold=0.0, mode="srgen", max_retries=0))
    out = _greedy(model, ids, mask, n=6)
    assert out[:, P].tolist() == [eos, eos] and out.shape[1] == P + 1
    assert model.high_entropy_detected and model.high_entropy_samples == [True, True]
    assert model.high_entropy_position == [0, 0] and model.retries == [0, 0]
    # with retries: the token reflected on is not judged again, so each retry moves one token on;
    # once they are used up the sample finishes without entropy control (as published)
    model.tnot_config.max_retries = 2
    out = _greedy(model, ids, mask, n=6)
    assert model.stop_positions == [[0, 1, 2], [0, 1, 2]] and model.retries == [2, 2]
    assert out.shape[1] == P + 6 and not (out[:, P:P + 3] == eos).any()
    assert [len(h) for h in model.entropy_history] == [3, 3]  # only the judged tokens enter the history


def test_seed_settings_end_generate_at_the_stop_and_the_callers_loop_reflects(tiny_model_dir, tokenizer, monkeypatch):
    # the seed's way: settings from the environment, no tnot_config; its scripts run the retry loop
    for name, value in (("prompt_only", "True"), ("times", "2"), ("lr", "0.1"), ("entropy_control", "True"),
                        ("entropy_threshold", "0"), ("entropy_weight", "0.5")):
        monkeypatch.setenv(name, value)
    eos = tokenizer.eos_token_id
    model = enable_tnot(AutoModelForCausalLM).from_pretrained(tiny_model_dir, tokenizer=tokenizer)
    assert model.tnot_config.max_retries == 0
    ids, mask = _prompt(tokenizer, ["Once upon"])
    P = ids.shape[1]
    kept, history = [], []
    for call in range(3):  # the caller's loop: prompt + the tokens kept so far, generate again
        prefix = torch.cat([ids, torch.tensor([kept], dtype=torch.long)], 1)
        out = _greedy(model, prefix, torch.ones_like(prefix), n=6)
        new = out[0, prefix.shape[1]:].tolist()
        assert model.high_entropy_detected and new[-1] == eos and len(new) == (1 if call == 0 else 2)
        # a retry call reflects on its first token (not judged), so it stops one token later
        assert model.high_entropy_position == [0 if call == 0 else 1]
        assert torch.count_nonzero(model.delta) == (0 if call == 0 else model.delta.numel())
        kept += new[:-1]
        history = model.entropy_history[0]
    assert len(history) == 3  # the retries continued the same sample's history
    # what generate's own loop does with 2 retries: the same tokens, stops, delta and history
    model.reset_model_parameters()
    assert model.delta is None and model.entropy_history == [[]]
    model.tnot_config = dataclasses.replace(model.tnot_config, max_retries=2)
    out = _greedy(model, ids, mask, n=6)
    assert out[0, P:P + 2].tolist() == kept and model.stop_positions == [[0, 1, 2]]
    assert model.entropy_history[0] == pytest.approx(history, abs=1e-5)


# ---- retries: batches, KV reuse, families -------------------------------------------------------


def _count_passes(monkeypatch):
    passes = []
    original = TNOTGenerator._pass

    def counting(self, ids, mask, rows, kept, stage, *args, **kwargs):
        passes.append((stage, list(rows), mask.sum(1).tolist()))
        return original(self, ids, mask, rows, kept, stage, *args, **kwargs)

    monkeypatch.setattr(TNOTGenerator, "_pass", counting)
    return passes


def test_srgen_high_threshold_equals_plain_and_retries_continue(tokenizer, monkeypatch):
    ids, mask = _prompt(tokenizer, ["Count: 1 2 3", "Hello there"])
    plain = _greedy(_tiny(tokenizer), ids, mask)
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=2, entropy_control=True,
                                                           entropy_threshold=1e9, mode="srgen"))
    assert torch.equal(_greedy(model, ids, mask), plain)  # delta_normal is not applied
    assert not model.high_entropy_detected
    assert [len(h) for h in model.entropy_history] == [8, 8]

    # a threshold among the entropies seen: samples stop, retries continue from their own tokens
    model.tnot_config.entropy_threshold = float(torch.tensor(model.entropy_history[0]).median())
    model.tnot_config.max_retries = 3
    prefills = []

    def record(mod, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is not None and x.shape[1] > 1:
            prefills.append((x.clone(), kwargs.get("attention_mask")))

    passes = _count_passes(monkeypatch)
    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    out = _greedy(model, ids, mask)
    handle.remove()
    P = ids.shape[1]
    assert torch.equal(out[:, :P], ids) and out.shape[1] <= P + 8
    assert model.retries == [3, 3]
    assert all(p == sorted(set(p)) for p in model.stop_positions)  # each retry moves on
    # the samples stopped in a pass retry together: one pass per round, both rows in it, then the
    # last pass without entropy control
    assert [(stage, rows) for stage, rows, _ in passes] == \
        [("first", [0, 1])] + [("reflect", [0, 1])] * 3 + [("final", [0, 1])]
    assert len(prefills) == 1  # retries reuse the KV cache of their prefix: no second prefill
    reused = (out.clone(), model.delta.clone(), list(model.high_entropy_position), list(model.retries))

    # the same retries with a full re-prefill of prompt + own tokens give the same result
    model.tnot.reuse_cache = False
    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    prefills.clear()
    out2 = _greedy(model, ids, mask)
    handle.remove()
    assert len(prefills) == 1 + max(model.retries) + 1
    assert torch.equal(out2, reused[0]) and model.high_entropy_position == reused[2] and model.retries == reused[3]
    assert torch.allclose(model.delta, reused[1], atol=1e-5)
    for x, m in prefills[1:]:  # each re-prefill row is a sample's prompt + its own generated tokens
        for row, row_mask in zip(x, m):
            tokens = row[row_mask.bool()]
            own = [torch.cat([ids[b][mask[b].bool()], out[b, P:P + len(tokens) - int(mask[b].sum())]])
                   for b in range(2)]
            assert any(torch.equal(tokens, expected) for expected in own)


def test_batched_retries_equal_each_sample_alone(tokenizer, monkeypatch):
    # padding a sample next to others (first pass and retry rounds) changes none of its tokens or stops
    texts = ["Count: 1 2 3 4", "Hi", "What is 12+7?"]
    config = dict(prompt_only=True, times=2, mode="srgen", entropy_control=True, max_retries=3)
    probe = enable_tnot_model(_tiny(tokenizer), TNOTConfig(**config, entropy_threshold=1e9))
    ids, mask = _prompt(tokenizer, texts)
    _greedy(probe, ids, mask)
    seen = sorted(e for h in probe.entropy_history for e in h)
    k = len(seen) // 2  # between two observed values: float noise of padding cannot flip a stop
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(**config, entropy_threshold=(seen[k] + seen[k + 1]) / 2))
    passes = _count_passes(monkeypatch)
    together = _greedy(model, ids, mask)
    monkeypatch.undo()
    joint = (list(model.retries), list(model.stop_positions), model.delta.clone())
    # a retry round held several samples whose rows (prompt + kept tokens) have different lengths
    assert any(stage == "reflect" and len(rows) >= 2 and len(set(lengths)) >= 2 for stage, rows, lengths in passes)
    assert len({p[0] for p in joint[1] if p}) >= 2  # they stopped at different positions
    for b, text in enumerate(texts):
        one_ids, one_mask = _prompt(tokenizer, [text])
        alone = _greedy(model, one_ids, one_mask)
        row = together[b][mask[b].bool().tolist() + [True] * (together.shape[1] - ids.shape[1])]
        assert torch.equal(row[: alone.shape[1]], alone[0]) and (row[alone.shape[1]:] == 0).all()
        assert (model.retries[0], model.stop_positions[0]) == (joint[0][b], joint[1][b])
        assert torch.allclose(model.delta[0], joint[2][b], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_generates(family, tiny_model_dirs, tokenizer):
    cls = enable_tnot(AutoModelForCausalLM)
    ids, mask = _prompt(tokenizer, ["What is 1+1?", "Hi"])
    plain = _greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family]), ids, mask, n=5)
    zero = cls.from_pretrained(tiny_model_dirs[family], tnot_config=TNOTConfig(prompt_only=True, times=0, mode="slot"))
    assert torch.equal(_greedy(zero, ids, mask, n=5), plain)
    for mode in ("slot", "srgen"):
        model = cls.from_pretrained(tiny_model_dirs[family], tokenizer=tokenizer,
                                    tnot_config=TNOTConfig(prompt_only=True, times=2, mode=mode,
                                                           entropy_control=mode == "srgen", max_retries=2))
        out = _greedy(model, ids, mask, n=5)
        assert torch.equal(out[:, :ids.shape[1]], ids) and out.shape[1] == ids.shape[1] + 5
        assert model.delta.shape == (2, 1, model.get_output_embeddings().weight.shape[1])
        assert torch.count_nonzero(model.delta) == model.delta.numel()  # every sample got its own fitted delta
        assert not torch.allclose(model.delta[0], model.delta[1])
        assert all(p.grad is None for p in model.parameters())
        assert model._safe_decode_sequence(out[0]) == tokenizer.decode(out[0], skip_special_tokens=False)
        if mode == "srgen":  # tiny random models sit near log(vocab) > 3.0: every sample stops and retries
            assert model.retries == [2, 2] and model.stop_positions == [[0, 1, 2]] * 2
            # the retries' reused KV caches give what full re-prefills of the same rows give
            model.tnot.reuse_cache = False
            assert torch.equal(_greedy(model, ids, mask, n=5), out)
        model.reset_model_parameters()
        assert model.delta is None and model.entropy_history == [[]]


def test_concrete_class_decorator_and_bf16(tiny_model_dirs, tokenizer, monkeypatch):
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("prompt_only", "True")
    monkeypatch.setenv("times", "3")
    monkeypatch.setenv("mode", "slot")
    cls = enable_tnot(LlamaForCausalLM)
    model = cls.from_pretrained(tiny_model_dirs["llama"], dtype=torch.bfloat16)
    assert isinstance(model, LlamaForCausalLM) and model.tnot_config.times == 3
    ids, mask = _prompt(tokenizer, ["bf16 prompt here"])
    out = _greedy(model, ids, mask, n=3)
    assert out.shape[1] == ids.shape[1] + 3
    assert model.delta.dtype == torch.float32 and torch.count_nonzero(model.delta) > 0
    assert all(p.grad is None for p in model.parameters())
    # the float32 delta is close to the one fitted on the float32 model
    ref = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=3, mode="slot"))
    _greedy(ref, ids, mask, n=1)
    assert torch.allclose(model.delta, ref.delta, atol=0.02)


# ---- records ------------------------------------------------------------------------------------


def test_sampling_records_entropy(tokenizer, tmp_path):
    path = tmp_path / "entropy.jsonl"
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=1, entropy_control=True,
                                                           adaptive_entropy=True, adaptive_entropy_N=2,
                                                           entropy_threshold=10.0,
                                                           record_entropy=True, entropy_output_file=str(path),
                                                           response_entropy_file=str(tmp_path / "responses.json"),
                                                           max_retries=1), tokenizer=tokenizer)
    ids, mask = _prompt(tokenizer, ["Sample me", "and me too"])
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=True, temperature=0.6,
                         pad_token_id=0)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["sample"] for r in records} == {0, 1}
    assert sum(len(h) for h in model.entropy_history) == len(records)
    kept = [r for r in records if not r["stopped"]]
    assert kept and all(out[r["sample"], ids.shape[1] + r["step"]].item() == r["token_id"] for r in kept)
    assert all(r["token"] == tokenizer.decode([r["token_id"]]) for r in kept)
    for b in range(2):  # each sample's threshold comes from its own history only
        mine = [r for r in records if r["sample"] == b]
        for j, r in enumerate(mine):
            prior = [q["entropy"] for q in mine[:j]]
            w = prior[-2:]
            expected = 10.0 if len(prior) < 2 else max(statistics.mean(w) + 2.0 * max(statistics.stdev(w), 0.5), 1.8)
            assert r["threshold"] == pytest.approx(expected, abs=1e-5)
        assert len(mine) > 2 and mine[-1]["threshold"] != 10.0
    # each entropy is that of the distribution sampled from, at temperature 0.6 (recomputed here)
    full = torch.cat([mask, torch.ones(2, out.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=full).logits[:, ids.shape[1] - 1:-1]
    for r in kept:
        assert r["entropy"] == pytest.approx(float(_hand_entropy(logits[r["sample"], r["step"]], 0.6)), abs=1e-4)


def test_slot_records_entropy_with_and_without_delta(tokenizer, tmp_path):
    tokens_file, responses_file = tmp_path / "tokens.jsonl", tmp_path / "responses.json"
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=3, lr=0.5, mode="slot",
                                                           record_entropy=True, entropy_output_file=str(tokens_file),
                                                           response_entropy_file=str(responses_file)),
                              tokenizer=tokenizer)
    ids, mask = _prompt(tokenizer, ["Once upon a time", "Hi"])
    out = _greedy(model, ids, mask, n=4)
    records = [json.loads(line) for line in tokens_file.read_text().splitlines()]
    assert len(records) == 8 and all(r["delta_applied"] and r["threshold"] is None for r in records)
    # "entropy" is what the sampler saw (delta added), "entropy_original" the same position without the delta
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=out[:, :-1], attention_mask=torch.cat(
            [mask, torch.ones(2, 3, dtype=mask.dtype)], 1))[0][:, ids.shape[1] - 1:]
        head = model.get_output_embeddings()
        plain = _hand_entropy(head(hidden))
        shifted = _hand_entropy(head(hidden + model.delta))
    for r in records:
        assert r["entropy"] == pytest.approx(float(shifted[r["sample"], r["step"]]), abs=1e-4)
        assert r["entropy_original"] == pytest.approx(float(plain[r["sample"], r["step"]]), abs=1e-4)
        assert r["token_id"] == out[r["sample"], ids.shape[1] + r["step"]].item()
    assert any(abs(r["entropy"] - r["entropy_original"]) > 1e-3 for r in records)
    responses = json.loads(responses_file.read_text())
    assert [r["sample"] for r in responses] == [0, 1]
    for b, r in enumerate(responses):
        assert r["token_ids"] == out[b, ids.shape[1]:].tolist() and len(r["entropy"]) == len(r["threshold"]) == 4
        assert r["response"] == tokenizer.decode(r["token_ids"]) and r["retries"] == 0
        assert r["mean_entropy"] == pytest.approx(statistics.mean(float(shifted[b, s]) for s in range(4)), abs=1e-4)
    _greedy(model, ids, mask, n=2)  # a second generate appends to the same array
    assert [r["sample"] for r in json.loads(responses_file.read_text())] == [0, 1, 0, 1]
    responses_file.write_text("{}")
    with pytest.raises(ValueError, match="responses.json: holds a JSON dict"):
        _greedy(model, ids, mask, n=2)


def test_special_tokens_can_be_masked_from_the_prompt_ce(tokenizer):
    # a prompt of chat-template markers only: masked, nothing is left to fit and delta stays zero
    ids = torch.tensor([tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"])])
    mask = torch.ones_like(ids)
    deltas = {}
    for masked in (False, True):
        model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=2, mode="slot",
                                                               mask_special_tokens=masked), tokenizer=tokenizer)
        _greedy(model, ids, mask, n=1)
        deltas[masked] = model.delta
    assert torch.count_nonzero(deltas[False]) > 0
    assert torch.count_nonzero(deltas[True]) == 0 and torch.isfinite(deltas[True]).all()


# ---- cache paths, the compiled path, generate's arguments ---------------------------------------


def test_static_cache_matches_dynamic(tokenizer):
    ids, mask = _prompt(tokenizer, ["What is 2+3? Answer:", "Hi"])
    outs = {}
    for cache in ("dynamic", "static"):
        model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=3, mode="slot"))
        outs[cache] = (_greedy(model, ids, mask, n=6, cache_implementation=cache), model.delta)
    assert torch.equal(outs["static"][0], outs["dynamic"][0])
    assert torch.allclose(outs["static"][1], outs["dynamic"][1], atol=1e-6)
    # srgen retries with a static cache (not reusable: full re-prefills) match the dynamic ones
    config = dict(prompt_only=True, times=2, mode="srgen", entropy_control=True, entropy_threshold=0.0, max_retries=2)
    results = []
    for cache in (None, "static"):
        model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(**config))
        out = _greedy(model, ids, mask, n=4, cache_implementation=cache)
        results.append((out, list(model.retries)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] == [2, 2]


def test_srgen_on_the_compiled_static_path_has_no_graph_break(tokenizer):
    # generate compiles the decode step with a static cache (on CPU only when asked: _compile_all_devices);
    # fullgraph=True raises at any graph break, and the eager backend keeps the compile to seconds
    from torch._dynamo.utils import counters

    compiled = CompileConfig(backend="eager", fullgraph=True, mode=None)
    compiled._compile_all_devices = True
    ids, mask = _prompt(tokenizer, ["What is 2+3? Answer:", "Hi"])
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=3, mode="srgen",
                                                           entropy_control=True, entropy_threshold=1e9, max_retries=2))
    kw = dict(n=6, cache_implementation="static", compile_config=compiled)
    graphs = counters["stats"]["unique_graphs"]
    plain = model.generate_without_tnot(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                        pad_token_id=0, cache_implementation="static", compile_config=compiled)
    assert counters["stats"]["unique_graphs"] > graphs  # the decode step was compiled
    graphs = counters["stats"]["unique_graphs"]
    out = _greedy(model, ids, mask, **kw)
    assert torch.equal(out, plain) and [len(h) for h in model.entropy_history] == [6, 6]
    assert counters["stats"]["unique_graphs"] == graphs  # srgen's decode step is plain's graph: no recompile
    # samples that stop: the same tokens and stops as on the eager dynamic path
    seen = sorted(e for h in model.entropy_history for e in h)
    model.tnot_config.entropy_threshold = (seen[5] + seen[6]) / 2
    out = _greedy(model, ids, mask, **kw)
    stops = list(model.stop_positions)
    assert any(stops)
    assert torch.equal(_greedy(model, ids, mask, n=6), out) and model.stop_positions == stops


def test_generate_arguments_as_hf_resolves_them(tokenizer):
    ids, mask = _prompt(tokenizer, ["What is 2+3? Answer:", "Hi"])
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=1, mode="srgen",
                                                           entropy_control=True, max_retries=2))
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    reference = model.generate(**kw, max_new_tokens=6)
    assert model.retries == [2, 2]
    # max_length instead of max_new_tokens: the retries get the same budget
    assert torch.equal(model.generate(**kw, max_length=ids.shape[1] + 6), reference)
    # an explicit dynamic cache is not passed twice to the retries (they bring their own)
    assert torch.equal(model.generate(**kw, max_new_tokens=6, cache_implementation="dynamic"), reference)
    with pytest.raises(ValueError, match="num_return_sequences=1 only"):
        model.generate(**kw, max_new_tokens=6, num_return_sequences=2)

"""TNOT / SLOT: prompt-stage delta optimization and entropy-controlled generation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from testtime import tnot
from testtime.lm import entropy
from testtime.tiny import FAMILIES, build_tiny_model
from testtime.tnot import (
    TNOTConfig,
    adaptive_threshold,
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


def _greedy(model, ids, mask, n=8):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          pad_token_id=model.config.pad_token_id)


def test_times_zero_reproduces_plain_greedy(tokenizer):
    ids, mask = _prompt(tokenizer, ["What is 2+3? Answer:", "Hi"])
    plain = _greedy(_tiny(tokenizer), ids, mask)
    for mode in ("slot", "srgen"):
        model = enable_tnot_model(_tiny(tokenizer),
                                  TNOTConfig(prompt_only=True, times=0, mode=mode))
        assert torch.equal(_greedy(model, ids, mask), plain)
        assert model.delta is not None and torch.count_nonzero(model.delta) == 0


def test_optimization_lowers_prompt_ce_and_leaves_lm_head_alone(tokenizer):
    model = enable_tnot_model(_tiny(tokenizer),
                              TNOTConfig(prompt_only=True, times=5, lr=0.1, mode="slot"))
    head = model.get_output_embeddings()
    before = head.weight.detach().clone()
    ids, mask = _prompt(tokenizer, ["The quick brown fox jumps over the lazy dog."])
    _greedy(model, ids, mask, n=4)
    assert torch.equal(head.weight, before)
    assert all(p.grad is None for p in model.parameters())
    assert model.delta.dtype == torch.float32 and model.delta.shape == (1, 1, head.weight.shape[1])
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, attention_mask=mask)[0]
        labels = prompt_labels(ids, mask)
        zero = torch.zeros_like(model.delta)
        assert chunked_prompt_ce(head, hidden, model.delta, labels) < chunked_prompt_ce(head, hidden, zero, labels) - 1e-3


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


def test_batch_gets_one_delta_per_sample(tokenizer):
    model = enable_tnot_model(_tiny(tokenizer),
                              TNOTConfig(prompt_only=True, times=3, mode="slot"))
    ids, mask = _prompt(tokenizer, ["1 2 3 4 5 6 7 8", "zzzz yyyy"])
    out = _greedy(model, ids, mask, n=4)
    assert out.shape[0] == 2 and model.delta.shape[0] == 2
    assert not torch.allclose(model.delta[0], model.delta[1])
    # the padded sample's delta is the one it would get alone
    alone = enable_tnot_model(_tiny(tokenizer),
                              TNOTConfig(prompt_only=True, times=3, mode="slot"))
    ids1, mask1 = _prompt(tokenizer, ["zzzz yyyy"])
    _greedy(alone, ids1, mask1, n=2)
    assert torch.allclose(alone.delta[0], model.delta[1], atol=1e-4)


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
    full = chunked_prompt_ce(head, hidden, d0, labels, chunk=10_000)
    full.backward()
    part = chunked_prompt_ce(head, hidden, d1, labels, chunk=3, backward=True)
    logits = head(hidden[:, :-1] + d0.detach()).float()
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    ref = (ref.sum(1) / (labels != -100).sum(1)).sum()
    assert torch.allclose(full, ref, atol=1e-5) and torch.allclose(part, ref, atol=1e-5)
    assert torch.allclose(d0.grad, d1.grad, atol=1e-6)


def test_env_variables_map_to_config():
    env = {"prompt_only": "True", "times": "5", "lr": "0.01", "entropy_weight": "0.05", "entropy_control": "True",
           "entropy_threshold": "2.5", "adaptive_entropy": "True", "adaptive_entropy_N": "25",
           "adaptive_entropy_K": "4", "record_entropy": "False", "entropy_output_file": "e.jsonl",
           "response_entropy_file": "r.json", "log_entropy_control": "True", "max_retries": "7", "mode": "slot"}
    cfg = TNOTConfig.from_env(env)
    assert (cfg.prompt_only, cfg.times, cfg.lr, cfg.entropy_weight, cfg.entropy_control) == (True, 5, 0.01, 0.05, True)
    assert (cfg.entropy_threshold, cfg.adaptive_entropy, cfg.adaptive_entropy_N, cfg.adaptive_entropy_K) == (2.5, True, 25, 4.0)
    assert (cfg.record_entropy, cfg.entropy_output_file, cfg.response_entropy_file) == (False, "e.jsonl", "r.json")
    assert (cfg.log_entropy_control, cfg.max_retries, cfg.mode) == (True, 7, "slot")
    default = TNOTConfig.from_env({})
    assert (default.prompt_only, default.times, default.lr, default.entropy_threshold) == (False, 1, 0.1, 3.0)
    assert (default.adaptive_entropy_N, default.adaptive_entropy_K, default.entropy_control) == (20, 2.0, False)
    for bad in ({"times": "abc"}, {"entropy_control": "maybe"}, {"lr": "fast"}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            TNOTConfig.from_env(bad)
    with pytest.raises(ValueError, match="mode"):
        TNOTConfig.from_env({"mode": "other"})


def test_adaptive_threshold_formula():
    assert adaptive_threshold([1.0] * 4, n=5, k=2.0, static=3.0) == 3.0  # fewer than N values yet
    assert adaptive_threshold([1.0] * 5, n=5, k=2.0, static=3.0) == 2.0  # N values: the window applies
    hist = [0.0, 10.0] * 3  # last 4: 0,10,0,10 -> mean 5, std 5.7735
    t = adaptive_threshold(hist, n=4, k=2.0, static=3.0)
    assert t == pytest.approx(5.0 + 2.0 * torch.tensor([0.0, 10.0, 0.0, 10.0]).std().item())
    assert adaptive_threshold([1.0] * 10, n=4, k=2.0, static=3.0) == pytest.approx(2.0)  # std floor 0.5
    assert adaptive_threshold([0.1] * 10, n=4, k=1.0, static=3.0) == 1.8  # floor 1.8


def test_entropy_threshold_zero_stops_at_first_token(tokenizer):
    eos = tokenizer.eos_token_id
    ids, mask = _prompt(tokenizer, ["Tell me a story", "Hi"])
    P = ids.shape[1]
    # max_retries 0: entropy control as early stopping, the forced EOS ends the sample
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=1, entropy_control=True,
                                                           entropy_threshold=0.0, mode="srgen", max_retries=0))
    model.generation_config.eos_token_id = eos
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


def test_srgen_high_threshold_equals_plain_and_retries_continue(tokenizer, monkeypatch):
    ids, mask = _prompt(tokenizer, ["Count: 1 2 3", "Hello there"])
    plain = _greedy(_tiny(tokenizer), ids, mask)
    model = enable_tnot_model(_tiny(tokenizer),
                              TNOTConfig(prompt_only=True, times=2, entropy_control=True, entropy_threshold=1e9,
                                         mode="srgen"))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
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

    passes = []
    original_pass = tnot._generate_pass

    def counting_pass(model, input_ids, attention_mask, rows, *args, **kwargs):
        passes.append(list(rows))
        return original_pass(model, input_ids, attention_mask, rows, *args, **kwargs)

    monkeypatch.setattr(tnot, "_generate_pass", counting_pass)
    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    out = _greedy(model, ids, mask)
    handle.remove()
    P = ids.shape[1]
    assert torch.equal(out[:, :P], ids) and out.shape[1] <= P + 8
    assert model.retries == [3, 3]
    assert all(p == sorted(set(p)) for p in model.stop_positions)  # each retry moves on
    # the samples stopped in a pass retry together: one pass per round, both rows in it, then the
    # last pass without entropy control
    assert passes == [[0, 1]] * 5
    assert len(prefills) == 1  # retries reuse the KV cache of their prefix: no second prefill
    reused = (out.clone(), model.delta.clone(), list(model.high_entropy_position), list(model.retries))

    # the same retries with a full re-prefill of prompt + own tokens give the same result
    monkeypatch.setattr(tnot, "_stack_rows", lambda items: None)
    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    prefills.clear()
    out2 = _greedy(model, ids, mask)
    handle.remove()
    assert len(prefills) == 1 + max(model.retries) + 1
    assert torch.equal(out2, reused[0]) and model.high_entropy_position == reused[2] and model.retries == reused[3]
    assert torch.allclose(model.delta, reused[1], atol=1e-5)
    for x, m in prefills[1:]:  # each re-prefill row is a sample's prompt + its own generated tokens, left-padded
        for row, row_mask in zip(x, m):
            tokens = row[row_mask.bool()]
            assert any(torch.equal(tokens, torch.cat([ids[b][mask[b].bool()], out[b, P: P + len(tokens) - int(mask[b].sum())]]))
                       for b in range(2))


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
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    passes = []
    original_pass = tnot._generate_pass

    def counting_pass(model, input_ids, attention_mask, rows, kwargs, stage="first", **rest):
        passes.append((stage, list(rows), [len(rows) and int(m.sum()) for m in attention_mask]))
        return original_pass(model, input_ids, attention_mask, rows, kwargs, stage=stage, **rest)

    monkeypatch.setattr(tnot, "_generate_pass", counting_pass)
    together = _greedy(model, ids, mask)
    monkeypatch.setattr(tnot, "_generate_pass", original_pass)
    joint = (list(model.retries), list(model.stop_positions))
    # a retry round held several samples whose rows (prompt + kept tokens) have different lengths
    assert any(stage == "reflect" and len(rows) >= 2 and len(set(lengths)) >= 2 for stage, rows, lengths in passes)
    assert len({p[0] for p in joint[1] if p}) >= 2  # they stopped at different positions
    for b, text in enumerate(texts):
        one_ids, one_mask = _prompt(tokenizer, [text])
        alone = _greedy(model, one_ids, one_mask)
        row = together[b][mask[b].bool().tolist() + [True] * (together.shape[1] - ids.shape[1])]
        assert torch.equal(row[: alone.shape[1]], alone[0]) and (row[alone.shape[1]:] == 0).all()
        assert (model.retries[0], model.stop_positions[0]) == (joint[0][b], joint[1][b])


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
        assert out.shape[0] == 2 and out.shape[1] > ids.shape[1]
        assert model.delta.shape[0] == 2 and torch.count_nonzero(model.delta) > 0
        assert all(p.grad is None for p in model.parameters())
        assert isinstance(model._safe_decode_sequence(out[0]), str)
        if mode == "srgen":  # tiny random models sit near log(vocab) > 3.0: every sample stops and retries
            assert model.retries == [2, 2] and model.stop_positions == [[0, 1, 2]] * 2
            # the retries' stacked KV caches give what full re-prefills of the same rows give
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(tnot, "_stack_rows", lambda items: None)
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


def test_sampling_records_entropy(tokenizer, tmp_path):
    import json

    path = tmp_path / "entropy.jsonl"
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=1, entropy_control=True,
                                                           adaptive_entropy=True, adaptive_entropy_N=2, entropy_threshold=10.0,
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
    assert all(isinstance(r["token"], str) for r in kept)
    for b in range(2):  # each sample's threshold comes from its own history only
        mine = [r for r in records if r["sample"] == b]
        for j, r in enumerate(mine):
            prior = [q["entropy"] for q in mine[:j]]
            assert r["threshold"] == pytest.approx(adaptive_threshold(prior, 2, 2.0, 10.0))
        assert len(mine) > 2 and mine[-1]["threshold"] != 10.0
    # at temperature 0.6 the entropy is below the entropy at temperature 1
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    assert (entropy(logits, 0.6) < entropy(logits)).all()


def test_slot_records_entropy_with_and_without_delta(tokenizer, tmp_path):
    import json

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
        plain = entropy(head(hidden))
        shifted = entropy(head(hidden + model.delta))
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


def test_static_cache_matches_dynamic(tokenizer):
    ids, mask = _prompt(tokenizer, ["What is 2+3? Answer:", "Hi"])
    outs = {}
    for cache in ("dynamic", "static"):
        model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=3, mode="slot"))
        outs[cache] = (model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0, cache_implementation=cache if cache == "static" else None),
                       model.delta)
    assert torch.equal(outs["static"][0], outs["dynamic"][0])
    assert torch.allclose(outs["static"][1], outs["dynamic"][1], atol=1e-6)
    # srgen retries with a static cache (not cropped per sample: full re-prefills) match the dynamic ones
    config = dict(prompt_only=True, times=2, mode="srgen", entropy_control=True, entropy_threshold=0.0, max_retries=2)
    results = []
    for cache in (None, "static"):
        model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(**config))
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             cache_implementation=cache)
        results.append((out, list(model.retries)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1] == [2, 2]


def test_generate_arguments_as_hf_resolves_them(tokenizer):
    ids, mask = _prompt(tokenizer, ["What is 2+3? Answer:", "Hi"])
    model = enable_tnot_model(_tiny(tokenizer), TNOTConfig(prompt_only=True, times=1, mode="srgen",
                                                           entropy_control=True, max_retries=2))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    kw = dict(input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0)
    reference = model.generate(**kw, max_new_tokens=6)
    assert model.retries == [2, 2]
    # max_length instead of max_new_tokens: the retries get the same budget
    assert torch.equal(model.generate(**kw, max_length=ids.shape[1] + 6), reference)
    # an explicit dynamic cache is not passed twice to the retries (they bring their own)
    assert torch.equal(model.generate(**kw, max_new_tokens=6, cache_implementation="dynamic"), reference)
    with pytest.raises(ValueError, match="num_return_sequences=1 only"):
        model.generate(**kw, max_new_tokens=6, num_return_sequences=2)



"""testtime.tinylora: parameter counts against hand-computed formulas, identity at init, PEFT
export / reload / merge with identical logits, the frozen-factor signature, TinyLoRA on the
TTT-E2E model, and the chat's history window."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from testtime.lm import encode_prompt
from testtime.loading import load_model_and_tokenizer
from testtime.tiny import build_tiny_model
from tests.conftest import ROOT
from testtime.tinylora import (
    adapter_config,
    adapter_layers,
    apply_adapter,
    chat,
    expected_trainable_parameters,
    frozen_factor_signature,
    save_adapter,
    save_merged,
    trainable_parameters,
)

# PeftModel.from_pretrained reads a transformers property deprecated in 5.x; nothing these tests can change
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# The tiny Llama (testtime.tiny): 2 layers x 7 linear modules = 14, hidden 32, MLP 64, 4 heads of 8
# with 2 KV heads, so (in, out) per layer: q (32, 32), k (32, 16), v (32, 16), o (32, 32),
# gate (32, 64), up (32, 64), down (64, 32): sum(in + out) = 512 per layer, sum(out) = 256.
CASES = [
    ("tinylora", dict(u=13, weight_tying=1.0), 13),  # the paper's 13: one vector for all 14 modules
    ("tinylora", dict(u=1, weight_tying=1.0), 1),
    ("tinylora", dict(u=4, weight_tying=0.0), 4 * 14),  # one vector per module
    ("tinylora", dict(u=4, weight_tying=0.5), 4 * 7),  # round(14 * 0.5) = 7 groups
    ("tinylora", dict(u=3, weight_tying=0.3), 3 * 10),  # round(14 * 0.7) = round(9.8) = 10
    ("tinylora", dict(u=5, weight_tying=0.9), 5 * 1),  # round(1.4) = 1
    ("lora", dict(r=1), 1 * 2 * 512),
    ("lora", dict(r=8), 8 * 2 * 512),
    ("vera", dict(r=4), 2 * (256 + 7 * 4)),
]


def _adapted(method="tinylora", family="llama", **kwargs):
    model, tokenizer = build_tiny_model(family)
    return apply_adapter(model, adapter_config(method, **kwargs)), tokenizer


def _randomize(model, seed=0, scale=0.05):
    """Give the trainable adapter tensors non-trivial values (a trained adapter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return torch.tensor([tokenizer("What is 3 + 4? The answer is")["input_ids"]])


@pytest.mark.parametrize("method, kwargs, expected", CASES)
def test_trainable_parameters_equal_the_formula(method, kwargs, expected):
    model, _ = _adapted(method, **kwargs)
    assert len(adapter_layers(model)) == 14
    assert trainable_parameters(model) == expected
    assert expected_trainable_parameters(model) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(s in n for s in ("tinylora_v", "lora_A", "lora_B", "vera_lambda")) for n in trainable), trainable


def test_tying_shares_one_vector_among_consecutive_modules():
    model, _ = _adapted(u=2, weight_tying=0.5)  # 7 groups of 2 consecutive modules
    keys = [layer._tinylora_v_key["default"] for _, layer in adapter_layers(model)]
    assert keys == [str(i // 2) for i in range(14)]


def test_gpt2_conv1d_layers_count_too():
    # Conv1D layers: c_attn (32 -> 96), attn c_proj (32 -> 32), c_fc (32 -> 128), mlp c_proj (128 -> 32)
    model, _ = _adapted("lora", family="gpt2", r=2)
    assert trainable_parameters(model) == expected_trainable_parameters(model) == 2 * 2 * (128 + 64 + 160 + 160)


@pytest.mark.parametrize("method", ["tinylora", "lora", "vera"])
def test_adapter_at_init_leaves_logits_unchanged(method, ids):
    base, _ = build_tiny_model("llama")
    reference = base(input_ids=ids).logits
    model, _ = _adapted(method)
    assert torch.equal(model(input_ids=ids).logits, reference)
    _randomize(model)
    assert not torch.allclose(model(input_ids=ids).logits, reference)  # the check above could fail


@pytest.mark.parametrize("method", ["tinylora", "lora", "vera"])
def test_export_reload_and_merge_give_identical_logits(method, ids, tmp_path):
    model, _ = _adapted(method, weight_tying=0.5) if method == "tinylora" else _adapted(method)
    _randomize(model)
    expected = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    reloaded = PeftModel.from_pretrained(build_tiny_model("llama")[0], tmp_path / "adapter")
    assert torch.equal(reloaded(input_ids=ids).logits, expected)

    save_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert not any("tinylora" in k or "lora_" in k or "vera" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    assert torch.equal(model(input_ids=ids).logits, expected)  # merging a copy left the adapter in place


def test_frozen_factor_signature_tells_sign_flips_and_bases_apart():
    model, _ = _adapted()
    signature = frozen_factor_signature(model)
    assert signature.shape == (14,)
    assert torch.equal(frozen_factor_signature(_adapted()[0]), signature)  # rebuilt on the same base
    layer = adapter_layers(model)[0][1]
    a, b = layer.tinylora_A["default"], layer.tinylora_B["default"]
    product = b @ a
    a[0].neg_()
    b[:, 0].neg_()  # the other SVD sign of the first singular pair: B A is the same, B P A is not
    torch.testing.assert_close(b @ a, product)
    flipped = frozen_factor_signature(model)
    assert not torch.isclose(flipped[0], signature[0]) and torch.equal(flipped[1:], signature[1:])
    other = apply_adapter(build_tiny_model("llama", seed=1)[0], adapter_config())
    assert not torch.allclose(frozen_factor_signature(other), signature)
    assert frozen_factor_signature(_adapted("lora")[0]).numel() == 0


def test_tinylora_on_the_ttt_model(tokenizer, tmp_path):
    from testtime.ttt import TTTConfig, TTTForCausalLM

    config = TTTConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    TTTForCausalLM(config).save_pretrained(tmp_path / "ttt")
    tokenizer.save_pretrained(tmp_path / "ttt")
    base, _ = load_model_and_tokenizer(tmp_path / "ttt")  # registers the model type from the folder
    ids = torch.tensor([tokenizer("What is 3 + 4? The answer is 7.")["input_ids"]])
    reference = base(input_ids=ids).logits
    model = apply_adapter(base, adapter_config(u=3, weight_tying=0.0))
    # 2 blocks x q, k, v, o, gate, up, down; MLP' (the fast weights) and the head are not linear layers here
    assert trainable_parameters(model) == expected_trainable_parameters(model) == 3 * 14
    assert torch.equal(model(input_ids=ids).logits, reference)
    _randomize(model)
    logits = model(input_ids=ids).logits  # the inner loop runs inside
    logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)

    save_adapter(model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model_and_tokenizer(tmp_path / "ttt")[0], tmp_path / "adapter")
    assert torch.equal(reloaded(input_ids=ids).logits, logits)
    save_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=0, atol=1e-5)


def test_chat_keeps_the_last_turns_and_its_own_replies(tokenizer):
    model, _ = build_tiny_model("llama", tokenizer=tokenizer)
    prompts = []
    generate = model.generate

    def recording(**kwargs):
        prompts.append([row[mask.bool()].tolist() for row, mask in zip(kwargs["input_ids"], kwargs["attention_mask"])])
        return generate(**kwargs)

    model.generate = recording
    conversations = [{"user_turns": ["a", "b", "c"], "system": "S"}, {"user_turns": ["x"], "system": None}]
    replies = chat(model, tokenizer, conversations, history_turns=3, max_new_tokens=4)
    assert [len(r) for r in replies] == [3, 1]
    r0, r1 = replies[0][0], replies[0][1]
    system = [{"role": "system", "content": "S"}]
    user, assistant = (lambda t: {"role": "user", "content": t}), (lambda t: {"role": "assistant", "content": t})
    assert prompts[0] == [encode_prompt(tokenizer, system + [user("a")]), encode_prompt(tokenizer, [user("x")])]
    assert prompts[1] == [encode_prompt(tokenizer, system + [user("a"), assistant(r0), user("b")])]
    # turn 3 of 5 messages so far: the last 3 (b, the reply to b, c) after the system message
    assert prompts[2] == [encode_prompt(tokenizer, system + [user("b"), assistant(r1), user("c")])]


def test_benchmark_smoke_modes(tmp_path):
    from benchmarks.tinylora import main

    study = main(["study", "--tiny", "--adapters", "tinylora_u13_tied,lora_r1", "--objectives", "grpo",
                  "--out", str(tmp_path / "study")])
    counts = {(r["adapter"], r["objective"]): r["trainable_parameters"] for r in study["rows"]}
    assert counts == {("base", None): 0, ("tinylora_u13_tied", "grpo"): 13, ("lora_r1", "grpo"): 1024}
    assert all(0 <= r["greedy"] <= 1 and 0 <= r["pass1_T1"] <= 1 for r in study["rows"])
    assert {p.name for p in (tmp_path / "study").iterdir()} == {"study.json", "study.md", "study.png"}
    # step-time runs on the GPU image, which has neither trl nor datasets: a process where importing them fails
    code = ("import sys; sys.modules['trl'] = sys.modules['datasets'] = None; from benchmarks.tinylora import main; "
            f"main(['step-time', '--tiny', '--device', 'cpu', '--out', {str(tmp_path / 'steps')!r}])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads((tmp_path / "steps" / "step_time.json").read_text())["rows"]
    assert row["trainable_parameters"] == {"no_adapter": 0, "lora_r2": 4096, "tinylora_r2_u13_tied": 13,
                                           "tinylora_r2_u64_untied": 64 * 14}
    assert row["tinylora_r2_u13_tied/decode_ms"] > 0 and row["tinylora_r2_u13_tied/train_step_ms"] > 0
    assert {p.name for p in (tmp_path / "steps").iterdir()} == {"step_time.json", "step_time.md", "step_time.png"}

"""Head gating, importance and pruning against references written here (hooks, loops, finite differences)."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPTJConfig, LlamaConfig, MistralConfig, Phi3Config

from testtime.heads import (HardConcreteGates, attach_head_gates, attention_entropy, gradient_importance,
                            head_importance, head_layout, head_rows, iterative_pruning_plan, keep_from_gates,
                            magnitude_importance, output_projections, plan_pruning, prune_heads, random_importance)
from testtime.heads.compat import load_adaptive_model, load_baseline_model
from testtime.heads.extras import OVERLOADED, WITHDRAWN, HeadAgency, SkipConnections, entropy_gate_schedule
from testtime.tiny import FAMILIES, build_tiny_model, build_tokenizer

TOKENIZER = build_tokenizer()
EXTRA = ("mistral", "phi3", "gptj")
ALL = FAMILIES + EXTRA
REMOVABLE = ("llama", "qwen2", "mistral", "phi3")


def extra_config(family: str, kv_heads: int = 2):
    common = dict(vocab_size=len(TOKENIZER), pad_token_id=TOKENIZER.pad_token_id,
                  eos_token_id=TOKENIZER.eos_token_id, bos_token_id=TOKENIZER.eos_token_id)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=kv_heads, max_position_embeddings=256)
    if family == "mistral":
        return MistralConfig(**small, **common)
    if family == "phi3":
        return Phi3Config(**small, original_max_position_embeddings=256, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=256, **common)
    if family == "llama":
        return LlamaConfig(**small, **common)
    raise ValueError(family)


def build(family: str, seed: int = 0, kv_heads: int | None = None) -> nn.Module:
    """A tiny model of `family` (testtime.tiny's, or one of EXTRA); kv_heads overrides the KV head count."""
    if family in FAMILIES and kv_heads is None:
        return build_tiny_model(family, seed=seed, tokenizer=TOKENIZER)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(extra_config(family, kv_heads or 2), dtype=torch.float32)
    model.generation_config.pad_token_id = TOKENIZER.pad_token_id
    model.generation_config.eos_token_id = TOKENIZER.eos_token_id
    return model.eval()


def batch(seed: int = 0, rows: int = 2, length: int = 9) -> dict:
    """Random ids, the second row left-padded by 3 (labels ignore the padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 90, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = TOKENIZER.pad_token_id
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def logits(model, b):
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def hand_gate(model, gates: torch.Tensor):
    """The reference: a pre-hook written here multiplying head h's input columns of each output
    projection by gates[layer, h]. Returns the hook handles."""
    layout = head_layout(model)
    handles = []
    for layer, proj in enumerate(output_projections(model)):
        def hook(module, args, layer=layer):
            x = args[0].clone()
            for h in range(layout.num_heads):
                x[..., h * layout.head_dim:(h + 1) * layout.head_dim] *= gates[layer, h]
            return (x,)
        handles.append(proj.register_forward_pre_hook(hook))
    return handles


def greedy_without_cache(model, ids, steps):
    """Greedy decoding by full forward passes (no KV cache), for a single unpadded row; EOS is
    never chosen, as `generate(..., min_new_tokens=steps)` does."""
    for _ in range(steps):
        with torch.no_grad():
            scores = model(input_ids=ids, use_cache=False).logits[:, -1]
        scores[:, TOKENIZER.eos_token_id] = -float("inf")
        nxt = scores.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


# ------------------------------------------------------------------------------------------
# gates


@pytest.mark.parametrize("family", ALL)
def test_gates_exact_and_per_head(family):
    """Gates at 1 are the model bit for bit; gates equal the hand-written hook; detach restores it."""
    model, b = build(family), batch()
    ref = logits(model, b)
    gates = attach_head_gates(model)
    assert tuple(gates.values.shape) == (2, 4)
    assert torch.equal(logits(model, b), ref)
    gates.values[0, 1] = 0.0
    gates.values[1, 2] = 0.3
    gated = logits(model, b)
    assert not torch.allclose(gated, ref)
    expected = gates.values.clone()
    gates.detach()
    assert torch.equal(logits(model, b), ref)
    handles = hand_gate(model, expected)
    by_hand = logits(model, b)
    for handle in handles:
        handle.remove()
    torch.testing.assert_close(gated, by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ALL)
def test_zero_gate_equals_zeroed_output_columns(family):
    """A zero gate on head h equals zeroing head h's columns of the output projection's weight."""
    model, b = build(family), batch(1)
    gates = attach_head_gates(model)
    gates.values[1, 3] = 0.0
    gated = logits(model, b)
    gates.detach()
    proj, D = output_projections(model)[1], head_layout(model).head_dim
    with torch.no_grad():
        if type(proj).__name__ == "Conv1D":
            proj.weight[3 * D:4 * D, :] = 0  # Conv1D weight is [in, out]
        else:
            proj.weight[:, 3 * D:4 * D] = 0
    torch.testing.assert_close(logits(model, b), gated, rtol=0, atol=1e-6)


def zero_rows(module, idx):
    """Zero output features `idx` of a Linear ([out, in]) or Conv1D ([in, out]) and their bias."""
    with torch.no_grad():
        module.weight.index_fill_(1 if type(module).__name__ == "Conv1D" else 0, idx, 0.0)
        if module.bias is not None:
            module.bias[idx] = 0.0


@pytest.mark.parametrize("family", ALL)
def test_head_rows_locate_each_heads_q_k_v(family):
    """head_rows is what magnitude and physical pruning slice. Zeroing head 2's q rows makes its
    attention uniform: only head 2's slice of the output projection's input changes, and not to 0;
    zeroing KV head 0's k rows does that to the query heads of group 0; zeroing KV head 0's v rows
    equals their gates at 0."""
    b = batch(2)
    layout = head_layout(build(family))
    for part, expected in (("q", [2]), ("k", list(range(layout.group_size)))):
        model = build(family)
        seen = []
        handle = output_projections(model)[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        logits(model, b)
        module, idx = head_rows(model, 0)[part]
        zero_rows(module, idx[expected[0] // layout.group_size if part == "k" else 2])
        logits(model, b)
        handle.remove()
        before, after = (x.unflatten(-1, (layout.num_heads, -1)) for x in seen)
        changed = [h for h in range(layout.num_heads) if not torch.equal(before[..., h, :], after[..., h, :])]
        assert changed == expected, part
        assert after[..., expected, :].abs().sum() > 0, part  # uniform attention over v, not v zeroed
    model = build(family)
    gates = attach_head_gates(model)
    gates.values[0, :layout.group_size] = 0.0  # the heads reading KV head 0
    silenced = logits(model, b)
    gates.detach()
    module, idx = head_rows(model, 0)["v"]
    zero_rows(module, idx[0])
    torch.testing.assert_close(logits(model, b), silenced, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ALL)
def test_generation_with_cache_after_gating_and_pruning(family):
    """Gated generate (KV cache) equals cache-free greedy decoding of the gated model, and the
    physically pruned model generates the same tokens."""
    model = build(family)
    prompt = batch(3)["input_ids"][:1]
    gates = attach_head_gates(model)
    keep = torch.tensor([[True, False, False, True], [True, True, False, True]])
    gates.values.copy_(keep.float())
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                            min_new_tokens=6)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 6))
    gates.detach()
    prune_heads(model, keep)
    pruned = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                            min_new_tokens=6)
    assert torch.equal(pruned, cached)


def test_unsupported_architecture_is_named():
    model = nn.Linear(2, 2)
    model.config = types.SimpleNamespace(model_type="falcon")
    with pytest.raises(ValueError, match=r"'falcon'.*gpt2.*llama"):
        attach_head_gates(model)


def test_gates_cannot_be_attached_twice_and_prune_refuses_attached_gates():
    model = build("llama")
    gates = attach_head_gates(model)
    with pytest.raises(ValueError, match="already has head gates"):
        attach_head_gates(model)
    with pytest.raises(ValueError, match="detach"):
        prune_heads(model, torch.ones(2, 4, dtype=torch.bool))
    gates.detach()
    attach_head_gates(model).detach()


# ------------------------------------------------------------------------------------------
# physical pruning


@pytest.mark.parametrize("family", ALL)
def test_pruned_model_equals_gated_and_reloads(family, tmp_path):
    model, b = build(family), batch(4)
    keep = torch.tensor([[True, False, False, True], [False, True, True, False]])  # one head per KV group
    values = torch.tensor([[1.0, 1.0, 1.0, 0.5], [1.0, 0.8, 1.0, 1.0]])
    gates = attach_head_gates(model)
    gates.values.copy_(values * keep)
    gated = logits(model, b)
    gates.detach()
    report = prune_heads(model, keep, gate_values=values)
    json.dumps(report)  # written beside exports
    torch.testing.assert_close(logits(model, b), gated, rtol=1e-5, atol=1e-5)
    assert report["heads_kept"] == 4 and report["heads_pruned"] == 4 and report["gates_folded"]
    assert report["heads_removed"] + report["heads_zeroed"] == 4
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded, b), gated, rtol=1e-5, atol=1e-5)
    if family in REMOVABLE:  # 2 KV heads x 1 query head in every layer
        assert report["method"] == "removed" and report["heads_per_layer_after"] == 2
        assert reloaded.config.num_attention_heads == 2 and report["parameters_after"] < report["parameters_before"]
    else:
        assert report["method"] == "folded" and report["heads_removed"] == 0
        assert report["parameters_after"] == report["parameters_before"]


def test_grouped_query_pruning_keeps_each_head_on_its_kv_head():
    """Tiny Llama, 4 query heads on 2 KV heads: layer 0 keeps heads 0, 1 (KV head 0); layer 1 keeps
    head 2 (KV head 1). The shape is 1 KV head x 2 query heads; layer 1 pads with head 3 (zeroed)."""
    model, b = build("llama"), batch(5)
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    keep = torch.tensor([[True, True, False, False], [False, False, True, False]])
    gates = attach_head_gates(model)
    gates.values.copy_(keep.float())
    gated = logits(model, b)
    gates.detach()
    report = prune_heads(model, keep)
    assert report["method"] == "removed+folded" and report["physical_heads"] == [[0, 1], [2, 3]]
    assert (report["heads_per_layer_after"], report["kv_heads_per_layer_after"], report["heads_zeroed"]) == (2, 1, 1)
    D = 8
    for layer, kv_head, heads in ((0, 0, [0, 1]), (1, 1, [2, 3])):
        attn = model.model.layers[layer].self_attn
        prefix = f"model.layers.{layer}.self_attn."
        assert torch.equal(attn.k_proj.weight, original[prefix + "k_proj.weight"][kv_head * D:(kv_head + 1) * D])
        assert torch.equal(attn.v_proj.weight, original[prefix + "v_proj.weight"][kv_head * D:(kv_head + 1) * D])
        rows = torch.cat([original[prefix + "q_proj.weight"][h * D:(h + 1) * D] for h in heads])
        assert torch.equal(attn.q_proj.weight, rows)
    assert torch.equal(model.model.layers[1].self_attn.o_proj.weight[:, D:], torch.zeros(32, D))
    torch.testing.assert_close(logits(model, b), gated, rtol=1e-5, atol=1e-5)


def test_llama_head_counts_must_divide_hidden_size():
    """LlamaConfig refuses 3 heads for hidden 32: a plan keeping 3 heads keeps 4 (one zeroed);
    Mistral, with no such rule, removes down to 3."""
    keep = torch.tensor([[True, True, True, False], [True, False, False, False]])
    for family, after in (("llama", 4), ("mistral", 3)):
        model, b = build(family, kv_heads=4), batch(6)
        gates = attach_head_gates(model)
        gates.values.copy_(keep.float())
        gated = logits(model, b)
        gates.detach()
        report = prune_heads(model, keep)
        assert report["heads_per_layer_after"] == after
        torch.testing.assert_close(logits(model, b), gated, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------
# importance


def test_gradient_importance_equals_finite_differences():
    """Michel et al.: sum over batches of |d(summed CE)/d gate|, / tokens, normalized per layer.
    Reference: central differences on a float64 model gated by the hand-written hook."""
    model = build("gpt2").double()
    batches = [batch(7), batch(8)]
    got = gradient_importance(model, batches, normalize=False)
    eps = 1e-5
    total = torch.zeros(2, 4, dtype=torch.float64)
    tokens = 0
    for b in batches:
        labels = b["labels"][:, 1:]
        tokens += int((labels != -100).sum())

        def summed_ce(g):
            handles = hand_gate(model, g)
            out = logits(model, b)[:, :-1]
            for handle in handles:
                handle.remove()
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")

        for layer in range(2):
            for head in range(4):
                up, down = torch.ones(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64)
                up[layer, head] += eps
                down[layer, head] -= eps
                total[layer, head] += abs(float(summed_ce(up) - summed_ce(down)) / (2 * eps))
    reference = total / tokens
    torch.testing.assert_close(got.double(), reference, rtol=1e-4, atol=1e-8)
    normalized = gradient_importance(model, batches)
    torch.testing.assert_close(normalized.double(), reference / reference.norm(dim=-1, keepdim=True),
                               rtol=1e-4, atol=1e-8)


def test_gradient_importance_at_current_gates_leaves_grads_alone():
    model = build("qwen2")
    gates = attach_head_gates(model, mode="learned")
    with torch.no_grad():
        gates.values[0, 0] = 0.0
    scores = gradient_importance(model, [batch(9)], gates=gates, normalize=False)
    assert gates.values.grad is None and all(p.grad is None for p in model.parameters())
    gates.detach()
    # the same as temporary gates with head (0, 0) at 0
    fixed = attach_head_gates(model)
    fixed.values[0, 0] = 0.0
    torch.testing.assert_close(scores, gradient_importance(model, [batch(9)], normalize=False))
    fixed.detach()


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_attention_entropy_against_a_loop(family):
    """Mean over real query tokens (seeing >= 2 keys) of H(p) / log(keys seen), from eager attentions."""
    model, b = build(family), batch(10)
    got = attention_entropy(model, [b])
    assert model.config._attn_implementation == ("eager" if family == "bloom" else "sdpa")  # restored
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           output_attentions=True).attentions
    mask = b["attention_mask"]
    for layer in range(2):
        for head in range(4):
            values = []
            for row in range(mask.shape[0]):
                for t in range(mask.shape[1]):
                    keys = int(mask[row, :t + 1].sum())
                    if mask[row, t] == 0 or keys < 2:
                        continue
                    p = attentions[layer][row, head, t, :t + 1].tolist()
                    values.append(-sum(x * math.log(x) for x in p if x > 0) / math.log(keys))
            assert got[layer, head].item() == pytest.approx(sum(values) / len(values), rel=1e-4)
    assert torch.equal(head_importance(model, [b], method="entropy"), -got)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_magnitude_importance_against_explicit_slices(family):
    model = build(family)
    got = magnitude_importance(model)
    D = 8
    for layer in range(2):
        for h in range(4):
            if family == "llama":
                attn, g = model.model.layers[layer].self_attn, h // 2
                parts = [attn.q_proj.weight[h * D:(h + 1) * D], attn.k_proj.weight[g * D:(g + 1) * D],
                         attn.v_proj.weight[g * D:(g + 1) * D], attn.o_proj.weight[:, h * D:(h + 1) * D]]
            elif family == "gpt2":  # Conv1D: weight [in, out]; c_attn columns [q | k | v]
                attn = model.transformer.h[layer].attn
                parts = [attn.c_attn.weight[:, part * 32 + h * D: part * 32 + (h + 1) * D] for part in range(3)]
                parts.append(attn.c_proj.weight[h * D:(h + 1) * D])
            else:  # BLOOM: query_key_value rows viewed as [heads, 3, D]
                attn = model.transformer.h[layer].self_attention
                parts = [attn.query_key_value.weight[h * 3 * D:(h + 1) * 3 * D],
                         attn.dense.weight[:, h * D:(h + 1) * D]]
            expected = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in parts))
            assert got[layer, h].item() == pytest.approx(expected, rel=1e-5)


def test_random_importance_is_seeded():
    model = build("opt")
    assert torch.equal(random_importance(model, seed=3), random_importance(model, seed=3))
    assert not torch.equal(random_importance(model, seed=3), random_importance(model, seed=4))
    with pytest.raises(ValueError, match="'fisher'"):
        head_importance(model, [batch()], method="fisher")


# ------------------------------------------------------------------------------------------
# plans


def test_plans_hit_the_target_and_keep_a_head_per_layer():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.05, 0.9, 0.95, 0.99]])
    keep = plan_pruning(scores, 0.25, scope="global")  # 3 of 12, the lowest
    assert keep.tolist() == [[False, False, True, True], [True] * 4, [False, True, True, True]]
    keep = plan_pruning(scores, 0.5, scope="layer")
    assert keep.sum(1).tolist() == [2, 2, 2] and keep[:, 2:].all()
    keep = plan_pruning(scores, 0.9, scope="global")  # 11 wanted, 9 possible
    assert keep.sum(1).tolist() == [1, 1, 1] and keep[:, 3].all()
    already = torch.ones(3, 4, dtype=torch.bool)
    already[1, 3] = False
    keep = plan_pruning(scores, 0.25, scope="global", keep=already)
    assert not keep[1, 3] and int((~keep).sum()) == 3
    with pytest.raises(ValueError, match="fraction"):
        plan_pruning(scores, 1.0)


def test_uniform_plan_is_removable_for_grouped_query_attention():
    model = build("llama")  # 4 heads on 2 KV heads
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2], [0.1, 0.2, 0.3, 0.4]])
    keep = plan_pruning(scores, 0.5, scope="uniform", model=model)
    assert keep.tolist() == [[True, False, True, False], [False, True, False, True]]
    report = prune_heads(model, keep)
    assert report["method"] == "removed" and report["heads_zeroed"] == 0
    llama_mha = build("llama", kv_heads=4)  # 3 heads cannot divide hidden 32: the nearest allowed count is 2 or 4
    assert plan_pruning(scores, 0.25, scope="uniform", model=llama_mha).sum(1).tolist() == [4, 4]
    assert plan_pruning(scores, 0.25, scope="uniform", model=build("gpt2")).sum(1).tolist() == [3, 3]


def test_iterative_plan_rescores_with_pruned_heads_at_zero():
    model, batches = build("gpt_neox"), [batch(11)]
    keep, history = iterative_pruning_plan(model, batches, fraction=0.5, step=0.25)
    assert [h["pruned"] for h in history] == [2, 4] and int((~keep).sum()) == 4
    first = plan_pruning(history[0]["scores"], 0.25)
    assert int((~first).sum()) == 2
    gates = attach_head_gates(model)
    gates.values.copy_(first.float())
    torch.testing.assert_close(history[1]["scores"], gradient_importance(model, batches))
    gates.detach()
    assert torch.equal(keep, plan_pruning(history[1]["scores"], 0.5, keep=first))


def test_keep_from_gates_never_empties_a_layer():
    values = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.7, 0.0, 1.0]])
    assert keep_from_gates(values).tolist() == [[True, False, False, False], [False, True, False, True]]


# ------------------------------------------------------------------------------------------
# hard-concrete gates


def test_hard_concrete_formulas():
    hc = HardConcreteGates(1, 3)
    with torch.no_grad():
        hc.log_alpha.copy_(torch.tensor([[-3.0, 0.0, 2.0]]))
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    prob = [1 / (1 + math.exp(-(a - beta * math.log(-gamma / zeta)))) for a in (-3.0, 0.0, 2.0)]
    assert hc.expected_l0().item() == pytest.approx(sum(prob), rel=1e-6)
    samples = torch.stack([hc.sample() for _ in range(20000)])
    torch.testing.assert_close((samples > 0).float().mean(0)[0], torch.tensor(prob), atol=0.015, rtol=0)
    assert ((samples == 0) | (samples == 1)).float().mean() > 0.1  # the stretch makes exact 0 and 1 likely
    det = [min(1.0, max(0.0, 1 / (1 + math.exp(-a)) * (zeta - gamma) + gamma)) for a in (-3.0, 0.0, 2.0)]
    torch.testing.assert_close(hc.deterministic()[0], torch.tensor(det))
    active = sum(prob) / 3
    assert hc.l0_penalty(2.0).item() == pytest.approx(2.0 * active, rel=1e-6)
    assert hc.l0_penalty(2.0, target_sparsity=0.5).item() == pytest.approx(2.0 * (active - 0.5) ** 2, rel=1e-5)


def test_hard_concrete_gates_on_a_model():
    """Eval at init is the model exactly; training samples differ per pass and train log_alpha."""
    model, b = build("llama"), batch(12)
    ref = logits(model, b)
    gates = attach_head_gates(model, mode="hard_concrete", hard_concrete=HardConcreteGates(2, 4, init_log_alpha=0.0))
    with torch.no_grad():
        gates.hard_concrete.log_alpha.fill_(3.0)
    assert torch.equal(logits(model, b), ref) and torch.equal(gates.values, torch.ones(2, 4))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        gates.hard_concrete.log_alpha.fill_(0.0)
    first, second = logits(model, b), logits(model, b)
    assert not torch.equal(first, second)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    (out.loss + gates.hard_concrete.l0_penalty(0.1, target_sparsity=0.5)).backward()
    assert gates.hard_concrete.log_alpha.grad.abs().sum() > 0
    model.eval()
    handles = hand_gate(model, gates.values.detach())
    gates.detach()
    by_hand = logits(model, b)
    for handle in handles:
        handle.remove()
    gates = attach_head_gates(model, mode="hard_concrete")  # log_alpha 3: every gate 1
    gates.detach()
    assert torch.equal(logits(model, b), ref)
    assert not torch.equal(by_hand, ref)


# ------------------------------------------------------------------------------------------
# the seed's interface


def test_seed_pruning_example_runs_as_written(tiny_model_dirs):
    """The seed's usage, verbatim apart from the model name (a local folder)."""
    model_name = tiny_model_dirs["gpt2"]
    device = torch.device("cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenizer.pad_token = tokenizer.eos_token
    baseline_model = load_baseline_model(model_name, device)
    adaptive_model = load_adaptive_model(model_name, baseline_model, device)
    prompt = "The future of AI is"
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    outputs = adaptive_model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                      max_length=30, do_sample=True)
    tokenizer.decode(outputs[0], skip_special_tokens=True)
    greedy_before = adaptive_model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                            max_length=30, do_sample=False)
    assert torch.equal(greedy_before, baseline_model.generate(input_ids=inputs.input_ids,
                                                              attention_mask=inputs.attention_mask,
                                                              max_length=30, do_sample=False))

    pruning_level = 0.5
    num_layers = len(adaptive_model.blocks)
    num_heads = adaptive_model.blocks[0]["attn"].num_heads
    total_heads = num_layers * num_heads
    heads_to_prune = int(total_heads * pruning_level)
    all_heads = [(l, h) for l in range(num_layers) for h in range(num_heads)]
    pruned_head_indices = np.random.choice(len(all_heads), heads_to_prune, replace=False)
    with torch.no_grad():
        for idx in pruned_head_indices:
            layer_idx, head_idx = all_heads[idx]
            adaptive_model.blocks[layer_idx]["attn"].gate[head_idx] = torch.tensor(0.001, device=device)
    outputs = adaptive_model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                      max_length=30, do_sample=True)
    tokenizer.decode(outputs[0], skip_special_tokens=True)
    assert (adaptive_model.gates.values == 0.001).sum() == heads_to_prune
    b = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask}
    assert not torch.allclose(logits(adaptive_model, b), logits(baseline_model, b))  # the baseline is untouched


def test_seed_face_loads_tiny_aliases(tmp_path, monkeypatch):
    monkeypatch.setenv("TESTTIME_CACHE", str(tmp_path))
    model = load_adaptive_model("tiny-random-bloom", device="cpu")
    model.blocks[1]["attn"].gate[0] = 0.0
    assert model.gates.values[1, 0] == 0 and model.blocks[1]["attn"].num_heads == 4
    assert model.generate(torch.tensor([[7, 8, 9]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


# ------------------------------------------------------------------------------------------
# extras


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_skip_connections_start_as_the_model_and_learn(family):
    model, b = build(family), batch(13)
    ref = logits(model, b)
    skips = SkipConnections(model)
    assert skips.pairs == [(0, 1)]
    assert torch.equal(logits(model, b), ref)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    out.loss.backward()
    assert skips.scale.grad.abs().item() > 0
    with torch.no_grad():
        skips.scale.fill_(0.5)
    assert not torch.allclose(logits(model, b), ref)
    prompt = b["input_ids"][:1]
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                            min_new_tokens=4)
    assert torch.equal(cached, greedy_without_cache(model, prompt, 4))
    skips.detach()
    assert torch.equal(logits(model, b), ref)


def test_agency_states_and_the_entropy_schedule():
    agency = HeadAgency(1, 4, momentum=0.0)
    states = agency.update(torch.tensor([[0.5, 0.02, 0.99, 0.5]]), gate_values=torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    # utilisation 0.5 -> active; 0.98 -> overloaded; 0.01 -> withdrawn; gate 0 -> withdrawn
    assert states.tolist() == [[0, OVERLOADED, WITHDRAWN, WITHDRAWN]]
    assert agency.counts() == {"active": 1, "overloaded": 1, "withdrawn": 2}
    assert agency.mask("withdrawn").tolist() == [[False, False, True, True]]
    values, entropy = torch.ones(2, 3), torch.tensor([[0.9, 0.95, 0.5], [0.85, 0.9, 0.95]])
    assert torch.equal(entropy_gate_schedule(values, entropy, step=5, every=10), values)
    new = entropy_gate_schedule(values, entropy, step=10, every=10, threshold=0.8, decay=0.25)
    assert new.tolist() == [[0.75, 0.75, 1.0], [1.0, 0.75, 0.75]]  # the lowest-entropy head of a layer stays


def test_agency_reads_a_real_model():
    model = build("qwen2")
    agency = HeadAgency(2, 4)
    agency.update(attention_entropy(model, [batch(14)]))
    assert agency.utilization.shape == (2, 4) and sum(agency.counts().values()) == 8

"""TTT-E2E model (testtime/ttt): checked against references written here from the paper and the
official code (github.com/test-time-training/e2e).

The naive reference below is a plain transformer over one sequence with a full [T, T] mask, in
the official formulation (a pre-norm and a post-norm on every sublayer, RoPE on interleaved pairs
as complex numbers), and an inner loop that gives every chunk its own copy of the fast weights
and takes the clipped SGD step by hand. The model must match it (float64), and decode exactly as
its teacher-forced forward. `official_logits` runs parameters in the official layout itself.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from testtime.lm import left_pad
from testtime.ttt import TTTConfig, TTTForCausalLM
from testtime.ttt.attention import attention

PAD = 0


def tiny(seed: int = 0, dtype=torch.float64, **overrides) -> TTTForCausalLM:
    """4 blocks, the last 2 TTT blocks (so clipping spans several), window 8, chunk 4. Weights
    larger than usual so the outputs depend on the context."""
    settings = dict(num_hidden_layers=4, ttt_layer_fraction=0.5, initializer_range=0.3, inner_lr=1.0,
                    pad_token_id=PAD)
    settings.update(overrides)
    torch.manual_seed(seed)
    return TTTForCausalLM(TTTConfig.from_preset("tiny", **settings)).to(dtype).eval()


def tokens(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 128, (n,), generator=g) for n in lengths]


# --- the naive reference ---------------------------------------------------------------------


def rms(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, theta, interleaved=True):
    """RoPE on x [T, heads, d]: the official pairs (x_2i, x_2i+1) as the complex number
    x_2i + i x_2i+1 times exp(i * position * theta^(-2i/d)); else Llama's pairs (i, i + d/2)."""
    T, _, d = x.shape
    angle = torch.arange(T, dtype=x.dtype)[:, None] * theta ** (-torch.arange(0, d, 2, dtype=x.dtype) / d)
    turn = torch.polar(torch.ones_like(angle), angle)[:, None]  # [T, 1, d/2]
    if interleaved:
        return torch.view_as_real(torch.view_as_complex(x.reshape(T, -1, d // 2, 2).contiguous()) * turn).flatten(-2)
    half = d // 2
    out = torch.view_as_real(torch.complex(x[..., :half], x[..., half:]) * turn)
    return torch.cat([out[..., 0], out[..., 1]], -1)


def swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def naive_logits(model, ids, chunk_weights):
    """Logits [T, V] of one sequence; at the positions of chunk c, TTT block j's MLP' uses
    chunk_weights[c][j] = (w_gate, w_up, w_down). Post-norms and the RoPE layout as the config
    says (the official layout by default)."""
    cfg = model.config
    T, heads, b, eps = len(ids), cfg.num_attention_heads, cfg.chunk_size, cfg.rms_norm_eps
    d = cfg.hidden_size // heads
    p = torch.arange(T)
    seen = p[None, :] <= p[:, None]
    if cfg.attention == "sliding":
        seen = seen & (p[:, None] - p[None, :] < cfg.window_size)
    post = (lambda norm, y: rms(y, norm.weight, eps)) if cfg.post_norm else (lambda norm, y: y)
    h = model.model.embed_tokens.weight[ids]
    j = 0
    for block in model.model.layers:
        a = block.self_attn
        x = rms(h, block.input_layernorm.weight, eps)
        heads_of = lambda w: (x @ w.T).view(T, heads, d)
        q = rotate(rms(heads_of(a.q_proj.weight), a.q_norm.weight, eps), cfg.rope_theta, cfg.rope_interleaved)
        k = rotate(rms(heads_of(a.k_proj.weight), a.k_norm.weight, eps), cfg.rope_theta, cfg.rope_interleaved)
        v = heads_of(a.v_proj.weight)
        scores = torch.einsum("tnd,snd->nts", q, k) / math.sqrt(d)
        probs = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        h = h + post(block.post_attn_norm, torch.einsum("nts,snd->tnd", probs, v).reshape(T, -1) @ a.o_proj.weight.T)
        if block.fast_mlp is not None:
            x = rms(h, block.fast_norm.weight, eps)
            fast = torch.cat([swiglu(x[c * b:(c + 1) * b], *chunk_weights[c][j]) for c in range(math.ceil(T / b))])
            h = h + post(block.post_fast_norm, fast)
            j += 1
        m = block.mlp
        h = h + post(block.post_mlp_norm, swiglu(rms(h, block.post_attention_layernorm.weight, eps),
                                                 m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight))
    return rms(h, model.model.norm.weight, eps) @ model.lm_head.weight.T


def official_logits(params, cfg, ids):
    """The official forward with TTT off, written from its code on official-layout parameters
    (Equinox names, layers stacked, matrices [in, out]; `testtime.ttt.convert`'s docstring)."""
    P = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in params.items()}
    blocks, prime = "language_model.model.h.blocks.", "language_model.model.h.prime_storage."
    T, heads, eps = len(ids), cfg.num_attention_heads, cfg.rms_norm_eps
    d = cfg.hidden_size // heads
    p = torch.arange(T)
    seen = (p[None, :] <= p[:, None]) & (p[:, None] - p[None, :] < cfg.window_size)
    h = P["language_model.model.wte.weight"][ids]
    L, S = cfg.num_hidden_layers, cfg.num_ttt_layers
    for i in range(L):
        w = lambda name: P[blocks + name][i]
        x = rms(h, w("seq_norm.weight"), eps)
        q = rotate(rms((x @ w("seq_modeling_block.wq.weight")).view(T, heads, d), w("seq_modeling_block.q_norm.weight"),
                       eps), cfg.rope_theta)
        k = rotate(rms((x @ w("seq_modeling_block.wk.weight")).view(T, heads, d), w("seq_modeling_block.k_norm.weight"),
                       eps), cfg.rope_theta)
        v = (x @ w("seq_modeling_block.wv.weight")).view(T, heads, d)
        probs = (torch.einsum("tnd,snd->nts", q, k) / math.sqrt(d)).masked_fill(~seen, float("-inf")).softmax(-1)
        attn = torch.einsum("nts,snd->tnd", probs, v).reshape(T, -1) @ w("seq_modeling_block.wo.weight")
        h = h + rms(attn, w("seq_post_norm.weight"), eps)
        if i >= L - S:
            f = lambda name: P[prime + name][i - (L - S)]
            x = rms(h, f("ffn_prime_norm.weight"), eps)
            y = (F.silu(x @ f("feed_forward_prime.w1.weight")) * (x @ f("feed_forward_prime.w3.weight"))) \
                @ f("feed_forward_prime.w2.weight")
            h = h + rms(y, f("ffn_prime_post_norm.weight"), eps)
        x = rms(h, w("ffn_norm.weight"), eps)
        y = (F.silu(x @ w("feed_forward.w1.weight")) * (x @ w("feed_forward.w3.weight"))) @ w("feed_forward.w2.weight")
        h = h + rms(y, w("ffn_post_norm.weight"), eps)
    return rms(h, P["language_model.model.ln_f.weight"], eps) @ P["language_model.model.wte.weight"].T


def naive_inner_loop(model, ids, lr, clip, steps=1):
    """Per-chunk fast weights of one sequence: W_c = W_{c-1} - lr * min(1, clip / |g|) * g with
    g the gradient of chunk c-1's mean next-token CE at W_{c-1}, |g| over all TTT blocks (`steps`
    such steps on the same chunk, each at the weights the previous one left)."""
    b, T = model.config.chunk_size, len(ids)
    n = math.ceil(T / b)
    weights = [[tuple(w.detach() for w in blk.fast_mlp.weights()) for blk in model.ttt_blocks]]
    norms = []
    for c in range(n - 1):  # a chunk updates once the next chunk's first token exists
        current = weights[c]
        for step in range(steps):
            current = [tuple(w.clone().requires_grad_() for w in layer) for layer in current]
            logits = naive_logits(model, ids, weights[:c] + [current] * (n - c))
            s, e = c * b, (c + 1) * b
            loss = F.cross_entropy(logits[s:e], ids[s + 1:e + 1])
            flat = [w for layer in current for w in layer]
            grads = torch.autograd.grad(loss, flat)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            scale = lr * min(1.0, clip / norm.item())
            new = [(w - scale * g).detach() for w, g in zip(flat, grads)]
            current = [tuple(new[i:i + 3]) for i in range(0, len(new), 3)]
            norms += [norm.item()] if step == 0 else []
        weights.append(current)
    return weights, norms


def naive_ttt_logits(model, ids, lr=1.0, clip=1.0, steps=1):
    with torch.enable_grad():
        weights, _ = naive_inner_loop(model, ids, lr, clip, steps)
    return naive_logits(model, ids, weights).detach()


def static_weights(model, T):
    w0 = [tuple(blk.fast_mlp.weights()) for blk in model.ttt_blocks]
    return [w0] * math.ceil(T / model.config.chunk_size)


# --- the layers ------------------------------------------------------------------------------


def test_sliding_window_attention_sees_exactly_the_last_k_positions():
    torch.manual_seed(0)
    T, window, block = 40, 8, 4
    q, k, v = (torch.randn(2, 3, T, 6, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(T)[None]
    out = attention(q, k, v, pos, pos, window, block)  # blocked queries: the one-pass forward
    dist = pos[0][:, None] - pos[0][None, :]
    mask = (dist >= 0) & (dist < window)
    naive = (torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(6)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, naive.softmax(-1) @ v, rtol=0, atol=1e-12)

    p = 30
    for j, should_change in ((p - window, False), (p - window + 1, True)):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, j] += 1.0
        v2[:, :, j] += 1.0
        changed = attention(q, k2, v2, pos, pos, window, block)[:, :, p]
        assert (not torch.allclose(changed, out[:, :, p], atol=1e-9)) == should_change, j


def test_chunk_larger_than_window_is_rejected():
    with pytest.raises(ValueError, match=r"chunk_size \(16\).*window_size \(8\)"):
        TTTConfig.from_preset("tiny", chunk_size=16)
    model = tiny()
    with pytest.raises(ValueError, match=r"chunk_size \(9\).*window_size \(8\)"):
        model(torch.ones(1, 5, dtype=torch.long), chunk_size=9)


def test_ttt_off_is_the_plain_transformer_and_inner_lr_zero_is_ttt_off():
    model = tiny()
    ids = tokens(22)[0]  # several chunks, longer than the window
    with torch.no_grad():
        off = model(ids[None], ttt=False).logits[0]
        zero = model(ids[None], inner_lr=0.0).logits[0]
        naive = naive_logits(model, ids, static_weights(model, len(ids)))
    torch.testing.assert_close(off, naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(zero, off, rtol=0, atol=1e-10)


# --- the inner loop --------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [0.05, 1e6])  # clipping active / inactive
def test_one_inner_step_is_the_hand_computed_clipped_sgd_step(clip):
    model = tiny(inner_grad_clip=clip, inner_lr=0.7)
    b = model.config.chunk_size
    ids = tokens(b + 1)[0]  # chunk 0 complete (the next chunk's first token exists)
    with torch.enable_grad():
        weights, norms = naive_inner_loop(model, ids, lr=0.7, clip=clip)
    assert (norms[0] > clip) == (clip < 1)
    with torch.no_grad():
        cache = model(ids[None], use_cache=True).cache
    for layer, expected in zip(cache.fast, weights[1]):
        for w, w_ref in zip(layer, expected):
            torch.testing.assert_close(w[0], w_ref, rtol=0, atol=1e-12)


def test_forward_matches_the_naive_inner_loop_per_sample_with_padding():
    model = tiny()
    rows = tokens(22, 13)
    ids, mask = left_pad(rows, PAD)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
    for n, row in enumerate(rows):
        torch.testing.assert_close(batch[n, ids.shape[1] - len(row):], naive_ttt_logits(model, row), rtol=0, atol=1e-9)


def test_several_inner_steps_per_chunk():
    model = tiny(inner_lr=0.5)
    row = tokens(14)[0]
    with torch.no_grad():
        logits = model(row[None], inner_steps=2).logits[0]
    torch.testing.assert_close(logits, naive_ttt_logits(model, row, lr=0.5, steps=2), rtol=0, atol=1e-9)


def test_ttt_is_causal():
    model = tiny()
    ids = tokens(23)[0]
    with torch.no_grad():
        base = model(ids[None]).logits[0]
        for t in (8, 10):  # the first token of a chunk (it completes the previous chunk) and a middle one
            changed = ids.clone()
            changed[t] = (changed[t] + 1) % 128
            out = model(changed[None]).logits[0]
            torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=1e-12)
            assert not torch.allclose(out[t:], base[t:])


def test_fast_weights_are_per_sample():
    model = tiny()
    a, b, c = tokens(21, 21, 21)
    with torch.no_grad():
        first = model(torch.stack([a, b])).logits
        second = model(torch.stack([a, c])).logits
        alone = model(a[None]).logits
    torch.testing.assert_close(second[0], first[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(alone[0], first[0], rtol=0, atol=1e-12)  # no 1/B in a sample's step
    assert not torch.allclose(second[1], first[1])


def test_second_order_meta_gradient_matches_finite_differences():
    model = tiny(inner_lr=1.0).train()
    ids = torch.stack(tokens(18, 18))
    params = dict(model.named_parameters())

    def loss():  # the outer loss in float64, from the logits
        logits = model(ids).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    grads = torch.autograd.grad(loss(), list(params.values()))
    assert all(g.abs().sum() > 0 for g in grads)  # every parameter learns: lower blocks and W_0 too
    torch.manual_seed(3)
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    analytic = sum((g * direction[n]).sum() for g, n in zip(grads, params)).item()
    eps = 1e-6
    with torch.no_grad():
        for n, p in params.items():
            p.add_(eps * direction[n])
        up = loss().item()
        for n, p in params.items():
            p.sub_(2 * eps * direction[n])
        down = loss().item()
        for n, p in params.items():
            p.add_(eps * direction[n])
    numeric = (up - down) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-6)

    model.config.first_order = True
    first = torch.autograd.grad(loss(), list(params.values()))
    first_order = sum((g * direction[n]).sum() for g, n in zip(first, params)).item()
    assert abs(first_order - numeric) > 0.01 * abs(numeric)

    model.config.first_order, model.config.recompute = False, True
    again = torch.autograd.grad(loss(), list(params.values()))
    for g, h in zip(grads, again):
        torch.testing.assert_close(h, g, rtol=0, atol=1e-12)


def test_padding_gives_finite_meta_gradient_and_loss_ignores_padding():
    model = tiny().train()
    ids, mask = left_pad(tokens(17, 6), PAD)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        logits = [model(row[None]).logits[0] for row in tokens(17, 6)]
    ce = torch.cat([F.cross_entropy(lg[:-1], row[1:], reduction="none") for lg, row in zip(logits, tokens(17, 6))])
    assert out.loss.item() == pytest.approx(ce.mean().item(), rel=1e-6)  # the loss is float32


def test_ttt_stats_report_each_chunk_before_and_after_its_update():
    model = tiny()
    ids, mask = left_pad(tokens(18, 9), PAD)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, return_ttt_stats=True, inner_lr=0.02)
    b = model.config.chunk_size
    assert out.ttt_loss_before.shape == out.ttt_loss_after.shape == out.ttt_grad_norm.shape == (2, 5)
    # sample 2 has 9 tokens: targets in chunks 0 and 1 only (its last token, alone in chunk 2, has none)
    assert torch.isnan(out.ttt_loss_before[1, 2:]).all() and not torch.isnan(out.ttt_loss_before[1, :2]).any()
    seen = ~torch.isnan(out.ttt_loss_before)
    assert (out.ttt_loss_after[seen] < out.ttt_loss_before[seen]).all()  # a small step helps its own chunk
    assert (out.ttt_grad_norm[seen] > 0).all()
    row = tokens(18)[0]
    for c in range(5):
        s, e = c * b, min((c + 1) * b, len(row) - 1)
        expected = F.cross_entropy(out.logits[0, s:e], row[s + 1:e + 1]).item()
        assert out.ttt_loss_before[0, c].item() == pytest.approx(expected, rel=1e-9)


def test_inner_lr_warmup():
    model = tiny(inner_lr=2.0, inner_lr_warmup_steps=100)
    assert model.inner_lr_at(0) == pytest.approx(0.2)
    assert model.inner_lr_at(50) == pytest.approx(1.1)
    assert model.inner_lr_at(100) == model.inner_lr_at(10_000) == model.inner_lr_at(None) == 2.0
    ids = tokens(13)[0][None]
    with torch.no_grad():
        model.set_inner_lr_step(0)
        warm = model(ids).logits
        model.set_inner_lr_step(None)
        assert torch.equal(warm, model(ids, inner_lr=0.2).logits)
        assert not torch.allclose(warm, model(ids).logits)


# --- decoding --------------------------------------------------------------------------------


@pytest.mark.parametrize("attention_kind", ["sliding", "full"])
def test_greedy_generate_is_the_teacher_forced_argmax(attention_kind):
    model = tiny(attention=attention_kind)
    prompts = tokens(5, 11, 8)
    ids, mask = left_pad(prompts, PAD)
    new = 30  # up to 41 tokens: many chunk boundaries, far beyond the window of 8
    result = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                            return_dict_in_generate=True)
    out = result.sequences
    if attention_kind == "sliding":  # constant cost per token: the cache never outgrows k + b
        assert result.cache.capacity == model.config.window_size + model.config.chunk_size
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                           ttt=False)
    assert not torch.equal(out, plain)  # the inner loop changes what is decoded
    for n, prompt in enumerate(prompts):
        generated = out[n, ids.shape[1]:]
        with torch.no_grad():
            logits = model(torch.cat([prompt, generated])[None]).logits[0]
        assert torch.equal(logits[len(prompt) - 1:-1].argmax(-1), generated)
        alone = model.generate(prompt[None], max_new_tokens=new, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, len(prompt):], generated)


def test_generate_and_forward_under_inference_mode():
    model = tiny(dtype=torch.float32)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    ids = tokens(10)[0][None]
    with torch.no_grad():
        expected = model(ids).logits
    with torch.inference_mode():
        logits = model(ids).logits
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=5, eos_token_id=None)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert sampled.shape == (1, 22)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # decoding never writes W_0


def test_save_and_reload_give_identical_logits(tmp_path):
    model = tiny(dtype=torch.float32)
    ids, mask = left_pad(tokens(14, 7), PAD)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, TTTForCausalLM)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, expected)


# --- sizes and adapters ----------------------------------------------------------------------


def test_presets_keep_the_parameter_count_of_the_model_without_ttt():
    counts = {}
    for fraction in (0.25, 0.0):
        config = TTTConfig.from_preset("125m", ttt_layer_fraction=fraction)
        with torch.device("meta"):
            model = TTTForCausalLM(config)
        counts[fraction] = sum(p.numel() for p in model.parameters())
        assert config.intermediate_size == {0.25: 1664, 0.0: 2048}[fraction]
    assert len(model.ttt_blocks) == 0
    assert abs(counts[0.25] / counts[0.0] - 1) < 0.01
    assert sum(p.numel() for p in TTTForCausalLM(TTTConfig.from_preset("tiny")).parameters()) < 20_000


def test_lora_wraps_the_static_layers_and_never_a_fast_weight():
    from peft import LoraConfig, get_peft_model

    model = tiny(dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = tokens(13)[0][None]
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, peft_model(ids, ttt=False).logits)  # W_0 frozen, TTT on
    peft_model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_" in n)


# --- the official layout, older layouts, precision, kept logits ----------------------------------


def test_official_parameters_convert_to_the_official_forward():
    from testtime.ttt.convert import from_official, to_official

    config = TTTConfig.from_preset("tiny", num_hidden_layers=4, ttt_layer_fraction=0.5, window_size=8)
    shapes = {k: v.shape for k, v in to_official(TTTForCausalLM(config)).items()}
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.3, s).astype(np.float32) for k, s in shapes.items()}
    params = {k.replace(".", "/"): v for k, v in params.items()}  # an Orbax tree path spells it so
    model = TTTForCausalLM(config).double().eval()
    model.load_state_dict(from_official(params, config))
    ids = tokens(21)[0]  # beyond the window of 8
    with torch.no_grad():
        ours = model(ids[None], ttt=False).logits[0]
    torch.testing.assert_close(ours, official_logits({k.replace("/", "."): v for k, v in params.items()}, config, ids),
                               rtol=0, atol=1e-9)
    back = to_official(model)
    assert all(np.allclose(back[k.replace("/", ".")], v, atol=1e-7) for k, v in params.items())
    del params["language_model/model/ln_f/weight"]
    with pytest.raises(KeyError, match="ln_f"):
        from_official(params, config)


def test_a_config_saved_before_post_norms_loads_as_it_was_saved(tmp_path):
    model = tiny(post_norm=False, rope_interleaved=False)
    assert not any("post_" in n and "norm" in n and "post_attention_layernorm" not in n
                   for n, _ in model.named_parameters())
    ids = tokens(22)[0]
    with torch.no_grad():  # the pre-norm, half-split layout against the naive reference too
        torch.testing.assert_close(model(ids[None], ttt=False).logits[0],
                                   naive_logits(model, ids, static_weights(model, len(ids))), rtol=0, atol=1e-10)
        expected = model(ids[None]).logits
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for field in ("post_norm", "rope_interleaved"):  # what a folder written before these fields holds
        del config[field]
    (tmp_path / "config.json").write_text(json.dumps(config))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert (reloaded.config.post_norm, reloaded.config.rope_interleaved) == (False, False)
    with torch.no_grad():
        assert torch.equal(reloaded(ids[None]).logits, expected)
    assert TTTConfig.from_preset("125m").post_norm and TTTConfig.from_preset("125m").rope_interleaved


def _first_update(model, ids, **autocast):
    """(W_0, W_1) of every fast weight, flat: W_1 after chunk 0's update (a prefill of b + 1 tokens)."""
    w0 = [w.detach().float().clone() for block in model.ttt_blocks for w in block.fast_mlp.weights()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(autocast)):
        w1 = [w[0] for layer in model(ids, use_cache=True).cache.fast for w in layer]
    return w0, w1


def test_fast_weights_and_their_update_stay_float32_under_bf16():
    settings = dict(initializer_range=0.5, inner_grad_clip=0.05, dtype=torch.float32)  # small steps on large W
    model = tiny(**settings)
    ids = tokens(model.config.chunk_size + 1)[0][None]
    w0, reference = _first_update(model, ids)
    delta = [r - w for r, w in zip(reference, w0)]
    size = torch.sqrt(sum(d.pow(2).sum() for d in delta))

    def error(w_start, w_end):
        return (torch.sqrt(sum(((e - s) - d).pow(2).sum() for s, e, d in zip(w_start, w_end, delta))) / size).item()

    _, auto = _first_update(model, ids, autocast=True)  # bf16 autocast: matmuls in bf16
    assert all(w.dtype == torch.float32 for w in auto)
    assert error(w0, auto) < 0.06
    # the same step stored in bf16 would lose most of it: the weights' bf16 spacing exceeds the step
    assert error(w0, [(w.bfloat16() + d.bfloat16()).float() for w, d in zip(w0, delta)]) > 0.5
    cast = tiny(**settings).to(torch.bfloat16)  # a model cast to bf16: W_0 bf16, its updates float32
    w0_cast, updated = _first_update(cast, ids)
    assert all(w.dtype == torch.float32 for w in updated)
    assert error(w0_cast, updated) < 0.06


def test_logits_to_keep_returns_the_last_columns():
    model = tiny()
    ids, mask = left_pad(tokens(17, 9), PAD)
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}, {"attention_mask": mask, "ttt": False}):
            full = model(ids, **kwargs).logits
            for keep in (1, 5, ids.shape[1], 100):
                torch.testing.assert_close(model(ids, logits_to_keep=keep, **kwargs).logits, full[:, -keep:],
                                           rtol=0, atol=1e-12)
        labelled = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), logits_to_keep=2)
        assert labelled.loss == model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)

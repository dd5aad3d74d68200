"""AutoDeco: heads, losses against hand computations, generation through HF generate."""

from __future__ import annotations

import math
import re

import pytest
import torch

from testtime.autodeco import (
    AutoDecoLogitsProcessor,
    AutoDecoModel,
    HeadsLMHead,
    TempHead,
    TopPHead,
    autodeco_generate,
    goldilocks_mask,
    install_heads_lm_head,
    label_rank,
    min_p_hinge_loss,
    predict_heads,
    prob_stats,
    required_temperature,
    shift_for_next_token,
    soft_top_p_loss,
    soft_top_p_normalizer,
    temperature_loss,
    training_losses,
    warp_logits,
)
from testtime.tiny import FAMILIES, build_tiny_model

# ------------------------------------------------------------------------------------------
# hand-checkable references (plain python, no torch)


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def ref_temperature_loss(z, t, y, keep):
    terms = []
    for zi, ti, yi, ki in zip(z, t, y, keep):
        if not ki:
            continue
        ti = max(ti, 1e-2)
        ce = -math.log(softmax([v / ti for v in zi])[yi])
        terms.append(ce * softmax(zi)[yi])
    return sum(terms) / len(terms) if terms else 0.0


def ref_soft_top_p_loss(z, t, p_top, y, steepness=30.0):
    terms = []
    for zi, ti, pi, yi in zip(z, t, p_top, y):
        if yi == -100:
            continue
        p = softmax([v / ti for v in zi])
        order = sorted(range(len(p)), key=lambda j: -p[j])
        m, c = [0.0] * len(p), 0.0
        for j in order:
            c += p[j]
            m[j] = math.exp(-steepness * max(c - pi, 0.0))
        pm = [a * b for a, b in zip(p, m)]
        terms.append(-math.log(pm[yi] / (sum(pm) + 1e-9) + 1e-9) * softmax(zi)[yi])
    return sum(terms) / len(terms)


Z = [[2.0, 1.0, 0.0, -1.0], [0.0, 1.0, 3.0, 0.5], [1.0, 1.0, -2.0, 1.2], [0.3, -2.0, 0.1, 0.0]]
Y = [1, 2, 2, 3]  # token 1: label is argmax (easy); others hard
T = [0.7, 1.3, 0.005, 1.9]  # 0.005 exercises the 1e-2 clamp
P = [0.5, 0.95, 0.2, 0.7]


def tensors(requires_grad=True):
    z = torch.tensor([Z], dtype=torch.float64)
    y = torch.tensor([Y])
    t = torch.tensor([T], dtype=torch.float64, requires_grad=requires_grad)
    p = torch.tensor([P], dtype=torch.float64, requires_grad=requires_grad)
    return z, t, p, y


# ------------------------------------------------------------------------------------------
# heads


def test_heads_ranges_layout_and_features():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 32) * 10
    z = torch.randn(3, 5, 11) * 5
    temp, top_p = TempHead(32), TopPHead(32)
    t = temp(h)
    p = top_p(h, t, z)
    assert t.shape == p.shape == (3, 5)
    assert set(temp.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    assert top_p.mlp[0].in_features == 37 and TopPHead(32, use_enhanced_features=False).mlp[0].in_features == 33
    # the statistics, by hand for one position
    stats = prob_stats(z, t)
    q = softmax([v / (t[1, 2].item() + 1e-8) for v in z[1, 2].tolist()])
    mean = sum(q) / len(q)
    expect = [max(q), -sum(v * math.log(v + 1e-8) for v in q), sum((v - mean) ** 2 for v in q) / (len(q) - 1),
              sum(sorted(q)[-5:])]
    assert stats[1, 2].tolist() == pytest.approx(expect, rel=1e-4, abs=1e-7)
    # P gets no gradient path into T (T is detached inside the top-p head)
    p.sum().backward()
    assert all(prm.grad is None for prm in temp.parameters())


def test_heads_run_in_float32_under_bf16_autocast():
    temp, top_p = TempHead(8), TopPHead(8)
    h = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    z = torch.randn(2, 3, 7, dtype=torch.bfloat16)
    ref = predict_heads(temp, top_p, h, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = predict_heads(temp, top_p, h, z)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


# ------------------------------------------------------------------------------------------
# losses against hand computations


def test_temperature_loss_by_hand():
    z, t, _, y = tensors()
    got = temperature_loss(z, t, y, easy_token_drop=0.0)
    assert got.item() == pytest.approx(ref_temperature_loss(Z, T, Y, [1, 1, 1, 1]), rel=1e-9)
    # drop probability 1: the easy token (position 1) always goes
    got = temperature_loss(z, t, y, easy_token_drop=1.0)
    assert got.item() == pytest.approx(ref_temperature_loss(Z, T, Y, [1, 0, 1, 1]), rel=1e-9)
    got.backward()
    assert t.grad[0, 1] == 0 and t.grad[0, 2] == 0  # dropped; clamped below 1e-2
    assert t.grad[0, 0] != 0 and t.grad[0, 3] != 0
    # -100 and the optional mask both ignore tokens
    y2 = y.clone()
    y2[0, 1] = -100
    mask = torch.tensor([[True, True, True, False]])
    got = temperature_loss(z, t, y2, easy_token_drop=0.0, mask=mask)
    assert got.item() == pytest.approx(ref_temperature_loss(Z, T, Y, [1, 0, 1, 0]), rel=1e-9)


def test_easy_token_drop_statistics():
    g = torch.Generator().manual_seed(0)
    n = 10_000
    z = torch.randn(1, 2 * n, 6, generator=g)
    y = z.argmax(-1)
    y[0, n:] = (y[0, n:] + 1) % 6  # second half: label is not the argmax (hard)
    t = torch.ones(1, 2 * n, requires_grad=True)
    temperature_loss(z, t, y, easy_token_drop=0.6, generator=g).backward()
    kept = t.grad[0] != 0
    assert kept[n:].all()  # hard tokens are never dropped
    assert kept[:n].float().mean().item() == pytest.approx(0.4, abs=0.03)
    # redrawn each call, reproducible with the same generator state
    a = temperature_loss(z, t, y, generator=torch.Generator().manual_seed(1))
    b = temperature_loss(z, t, y, generator=torch.Generator().manual_seed(1))
    c = temperature_loss(z, t, y, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c


def test_soft_top_p_loss_by_hand():
    z, t, p, y = tensors()
    got = soft_top_p_loss(z, t, p, y)
    assert got.item() == pytest.approx(ref_soft_top_p_loss(Z, T, P, Y), rel=1e-7)
    got.backward()
    assert (t.grad != 0).any() and (p.grad != 0).any()  # T is not detached here
    y2 = y.clone()
    y2[0, 0] = -100
    assert soft_top_p_loss(z, t, p, y2, steepness=5.0).item() == pytest.approx(
        ref_soft_top_p_loss(Z, T, P, y2[0].tolist(), 5.0), rel=1e-7)


def test_required_temperature_is_the_min_p_threshold():
    z, _, _, y = tensors()
    r = 0.1
    t_req = required_temperature(z, y, r)
    expect = [max(max(zi) - zi[yi], 0.0) / -math.log(r) for zi, yi in zip(Z, Y)]
    assert t_req[0].tolist() == pytest.approx(expect)
    assert t_req[0, 1] == 0  # label is the argmax
    # min-p after temperature keeps the label exactly from T_req on
    for i in (0, 2, 3):
        for scale, survives in ((1.01, True), (0.99, False)):
            t = torch.tensor([t_req[0, i].item() * scale], dtype=torch.float64)
            out = warp_logits(z[0, i:i + 1], t, torch.ones(1, dtype=torch.float64), min_p=r)
            assert bool(torch.isfinite(out[0, Y[i]])) == survives
    y2 = y.clone()
    y2[0, 3] = -100
    assert required_temperature(z, y2, r)[0, 3] == 0


def test_min_p_hinge_loss_by_hand():
    z, t, _, y = tensors()
    r, wh, wr = 0.1, 1.0, 0.5
    t_req = [max(max(zi) - zi[yi], 0.0) / -math.log(r) for zi, yi in zip(Z, Y)]

    def ref(cap):
        tr = [min(v, cap) for v in t_req] if cap else t_req
        return sum(wh * max(a - b, 0) + wr * max(b - a, 0) ** 2 for a, b in zip(tr, T)) / 4

    assert max(t_req) > 1.0  # so a cap of 1 binds
    got = min_p_hinge_loss(z, t, y, r, under_weight=wh, over_weight=wr, temp_cap=-1)
    assert got.item() == pytest.approx(ref(None), rel=1e-9)
    got = min_p_hinge_loss(z, t, y, r, under_weight=wh, over_weight=wr, temp_cap=1.0)
    assert got.item() == pytest.approx(ref(1.0), rel=1e-9)
    got.backward()
    assert (t.grad != 0).all()


def test_no_valid_token_gives_a_finite_zero_with_gradient():
    z, t, p, y = tensors()
    y = torch.full_like(y, -100)
    for loss in (temperature_loss(z, t, y), soft_top_p_loss(z, t, p, y), min_p_hinge_loss(z, t, y),
                 temperature_loss(z, t, torch.tensor([Y]), mask=torch.zeros(1, 4, dtype=torch.bool))):
        assert loss.item() == 0 and torch.isfinite(loss) and loss.requires_grad
        loss.backward()
    assert torch.equal(t.grad, torch.zeros_like(t)) and torch.equal(p.grad, torch.zeros_like(p))
    # all easy tokens dropped also counts as "none kept"
    easy = torch.tensor([[0, 2, 3, 0]])
    loss = temperature_loss(z, t, easy, easy_token_drop=1.0)
    assert loss.item() == 0 and loss.requires_grad


def test_losses_accept_bf16_logits():
    z, t, p, y = tensors()
    zb = z.to(torch.bfloat16)
    tf, pf = t.float(), p.float()
    for loss in (temperature_loss(zb, tf, y, 0.0), soft_top_p_loss(zb, tf, pf, y), min_p_hinge_loss(zb, tf, y)):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_shift_for_next_token():
    logits, t, p = torch.randn(2, 5, 7), torch.rand(2, 5), None
    labels = torch.arange(10).view(2, 5)
    sl, st, sp, sy = shift_for_next_token(logits, t, p, labels)
    assert torch.equal(sl, logits[:, :-1]) and torch.equal(st, t[:, :-1]) and sp is None
    assert torch.equal(sy, labels[:, 1:])


# ------------------------------------------------------------------------------------------
# Goldilocks selection


def test_goldilocks_cap_topk_easy_frac():
    z, _, _, y = tensors()
    t_req = required_temperature(z, y)
    cap = 0.5
    assert torch.equal(goldilocks_mask(z, y, temp_cap=cap), t_req <= cap)
    assert goldilocks_mask(z, y, temp_cap=-1).all()
    ranks = label_rank(z, y)
    assert ranks[0].tolist() == [1, 0, 3, 2]
    assert torch.equal(goldilocks_mask(z, y, temp_cap=-1, topk=2), ranks < 2)
    y2 = y.clone()
    y2[0, 2] = -100
    assert not goldilocks_mask(z, y2, temp_cap=-1)[0, 2]
    # easy_frac keeps that exact fraction of the argmax tokens, hard ones untouched
    g = torch.Generator().manual_seed(0)
    zz = torch.randn(1, 1000, 5, generator=g)
    yy = zz.argmax(-1)
    yy[0, 500:] = (yy[0, 500:] + 1) % 5
    keep = goldilocks_mask(zz, yy, temp_cap=-1, easy_frac=0.3, generator=g)
    assert keep[0, :500].sum() == 150 and keep[0, 500:].all()


def test_goldilocks_rebalance_equalizes_bins():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 500, 8, generator=g) * 2
    y = torch.randint(0, 8, (4, 500), generator=g)
    y[0, :50] = -100
    cap, bins = 2.0, 20
    keep = goldilocks_mask(z, y, temp_cap=cap, rebalance=True, num_bins=bins, generator=g)
    t_req = required_temperature(z, y)
    before = (y != -100) & (t_req <= cap)
    assert not (keep & ~before).any()
    idx = (t_req / cap * bins).floor().long().clamp(0, bins - 1)
    counts_before = torch.bincount(idx[before], minlength=bins)
    counts = torch.bincount(idx[keep], minlength=bins)
    smallest = counts_before[counts_before > 0].min()
    assert ((counts == smallest) | (counts_before == 0)).all()
    assert (counts_before > 0).sum() > 3  # the test means something: several bins


# ------------------------------------------------------------------------------------------
# the wrapper


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_every_family(family, tokenizer):
    llm, _ = build_tiny_model(family, tokenizer=tokenizer)
    model = AutoDecoModel(llm)
    ids = torch.randint(5, len(tokenizer), (2, 6))
    out = model(ids, attention_mask=torch.ones_like(ids))
    ref = llm(ids, output_hidden_states=True)
    assert torch.equal(out.hidden_states, ref.hidden_states[-1]) and torch.equal(out.logits, ref.logits)
    h = ref.hidden_states[-1]
    assert torch.equal(out.temperature, model.temp_head(h))  # the heads on the final hidden state
    assert torch.equal(out.top_p, model.top_p_head(h, out.temperature, ref.logits))
    torch.manual_seed(0)
    gen = autodeco_generate(llm, model, ids, torch.ones_like(ids), max_new_tokens=3)
    assert torch.equal(gen.sequences[:, :6], ids)
    # each generated token was sampled with the heads' T at the position before it
    forced = model(gen.sequences)
    assert torch.allclose(gen.temperature, forced.temperature[:, 5:-1], atol=1e-5)


def test_base_is_frozen_and_stays_in_eval(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm, enable_top_p_head=False).train()
    assert model.training and not llm.training and model.temp_head.training
    assert model.top_p_head is None
    ids = torch.randint(5, 100, (2, 8))
    out = model(ids)
    assert out.top_p is None and not out.logits.requires_grad
    training_losses(out, ids)["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in llm.parameters())
    assert all(p.grad is not None for p in model.temp_head.parameters())
    assert set(model.heads_state_dict()) == {f"temp_head.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}


def test_heads_float32_on_bf16_base(tokenizer):
    llm, _ = build_tiny_model("llama", tokenizer=tokenizer)
    model = AutoDecoModel(llm.to(torch.bfloat16))
    out = model(torch.randint(5, 100, (1, 5)))
    assert out.logits.dtype == torch.bfloat16
    assert out.temperature.dtype == out.top_p.dtype == torch.float32


@pytest.mark.parametrize("objective", ["legacy_ce", "analytic_min_p_hinge"])
def test_training_lowers_each_loss(tiny_llama, objective):
    llm, tok = tiny_llama
    torch.manual_seed(0)
    model = AutoDecoModel(llm)
    texts = ["the quick brown fox jumps over the lazy dog", "hello world, hello tests, hello again!!"]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    labels[:, :4] = -100  # a "prompt"
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)

    def losses(drop):
        out = model(**batch)
        return training_losses(out, labels, objective, easy_token_drop=drop, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        before = losses(0.0)
    for _ in range(40):
        opt.zero_grad()
        losses(0.6)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = losses(0.0)
    assert after["temp_loss"] < before["temp_loss"] and after["top_p_loss"] < before["top_p_loss"]


# ------------------------------------------------------------------------------------------
# generation


def test_warp_logits_top_p_and_min_p_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    z = probs.log()
    one = torch.ones(1)
    keep = lambda out: torch.isfinite(out[0]).tolist()  # noqa: E731
    assert keep(warp_logits(z, one, torch.tensor([0.5]))) == [True, False, False, False]
    assert keep(warp_logits(z, one, torch.tensor([0.51]))) == [True, True, False, False]
    assert keep(warp_logits(z, one, torch.tensor([0.0]))) == [True, False, False, False]  # top token stays
    assert keep(warp_logits(z, one, one)) == [True] * 4
    assert keep(warp_logits(z, one, one, min_p=0.25)) == [True, True, True, False]
    # temperature scales the logits first
    out = warp_logits(z, torch.tensor([2.0]), one)
    assert torch.allclose(out, z / 2)


def _prompts(tok, texts):
    # left padding for generation, without changing the session-wide tokenizer
    return tok(texts, return_tensors="pt", padding=True, padding_side="left")


def test_zero_temperature_is_greedy(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    batch = _prompts(tok, ["abc", "hello"])
    greedy = llm.generate(**batch, max_new_tokens=12, do_sample=False)
    gen = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, max_new_tokens=12,
                            user_temperature=0.0)
    assert torch.equal(gen.sequences, greedy)
    assert (gen.temperature == 0).all()


def test_user_temperature_controls_diversity(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    ids = tok(["once upon"], return_tensors="pt").input_ids.repeat(64, 1)

    def distinct(user_t):
        torch.manual_seed(0)
        gen = autodeco_generate(llm, model, ids, torch.ones_like(ids), max_new_tokens=2, user_temperature=user_t)
        return len({tuple(row) for row in gen.sequences[:, -2:].tolist()})

    cold, hot = distinct(0.05), distinct(3.0)
    assert cold <= 3 and hot > 20


def test_recorded_parameters_match_the_heads(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    batch = _prompts(tok, ["the cat", "a dogs!"])  # same length: no padding
    assert batch.attention_mask.all()
    torch.manual_seed(0)
    gen = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, max_new_tokens=6,
                            user_temperature=1.5, user_top_p=0.8)
    prompt_len = batch.input_ids.shape[1]
    out = model(gen.sequences)
    # the token at position j was sampled with the heads' values at position j - 1
    t_ref = out.temperature[:, prompt_len - 1:-1]
    p_ref = out.top_p[:, prompt_len - 1:-1]
    assert torch.allclose(gen.temperature, t_ref * 1.5, atol=1e-5)
    assert torch.allclose(gen.top_p, (p_ref * 0.8).clamp(0, 1), atol=1e-5)


def test_static_cache_matches_dynamic(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    batch = _prompts(tok, ["abc", "xyz"])
    kw = dict(max_new_tokens=8, user_temperature=0.0)
    dyn = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, **kw)
    static = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, cache_implementation="static", **kw)
    assert torch.equal(dyn.sequences, static.sequences)
    # the T the heads predicted (before the user T of 0) agree too: record with user T = 1
    torch.manual_seed(0)
    a = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, max_new_tokens=8)
    torch.manual_seed(0)
    b = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, max_new_tokens=8,
                          cache_implementation="static")
    assert torch.allclose(a.temperature[:, 0], b.temperature[:, 0], atol=1e-5)
    assert torch.equal(a.sequences, b.sequences)


def test_padded_batch_matches_single_rows(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    texts = ["hi", "a longer prompt"]
    batch = _prompts(tok, texts)
    assert not batch.attention_mask.all()
    both = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, max_new_tokens=5,
                             user_temperature=1.0, user_top_p=0.0)  # top-p 0: the top token, every row
    for i, text in enumerate(texts):
        single = tok([text], return_tensors="pt")
        one = autodeco_generate(llm, model, single.input_ids, single.attention_mask, max_new_tokens=5,
                                user_temperature=1.0, user_top_p=0.0)
        assert torch.equal(both.sequences[i, -5:], one.sequences[0, -5:])
        assert torch.allclose(both.temperature[i], one.temperature[0], atol=1e-5)


def test_processor_by_hand_and_min_p(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm, enable_top_p_head=False)
    ids = tok(["abc"], return_tensors="pt").input_ids
    proc = AutoDecoLogitsProcessor(model.temp_head, None, user_temperature=1.0, min_p=0.5, record=True)
    with pytest.raises(RuntimeError, match="attach"):
        proc(ids, torch.zeros(1, len(tok)))
    with proc.attach(llm):
        llm.generate(ids, max_new_tokens=4, logits_processor=[proc], do_sample=True, temperature=1.0, top_p=1.0,
                     top_k=0)
    t, p = proc.recorded()
    assert t.shape == (1, 4) and (p == 1).all()  # no top-p head: P = user top-p
    # hooks are gone after the context
    assert not llm.get_output_embeddings()._forward_pre_hooks
    # a step whose forward skipped the hooks (e.g. a compiled forward) is refused, not served stale
    with proc.attach(llm):
        scores = llm(ids).logits[:, -1]
        proc(ids, scores)
        with pytest.raises(RuntimeError, match="disable_compile"):
            proc(ids, scores)


# ------------------------------------------------------------------------------------------
# heads inside the forward (HeadsLMHead): the default path, the one that survives torch.compile


def _both_paths(llm, heads, batch, **kw):
    out = {}
    for path in (True, False):
        torch.manual_seed(0)
        out[path] = autodeco_generate(llm, heads, batch.input_ids, batch.attention_mask, heads_in_forward=path, **kw)
    return out[True], out[False]


def _assert_same(a, b, atol=1e-6):
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.temperature, b.temperature, atol=atol)
    assert torch.allclose(a.top_p, b.top_p, atol=atol)


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("heads", ["both", "temp", "top_p"])
def test_heads_in_forward_matches_hooks(tiny_llama, cache, heads):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm, enable_temperature_head=heads != "top_p", enable_top_p_head=heads != "temp")
    batch = _prompts(tok, ["hi", "a longer prompt"])  # left padding
    kw = dict(max_new_tokens=8, user_temperature=1.3, user_top_p=0.9)
    if cache:
        kw["cache_implementation"] = cache
    fast, hooks = _both_paths(llm, model, batch, **kw)
    _assert_same(fast, hooks)
    assert fast.temperature.shape == (2, 8)
    assert type(llm.get_output_embeddings()) is torch.nn.Linear  # the original lm_head is back
    assert not any(isinstance(m, HeadsLMHead) for m in llm.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_in_forward_every_family(family, tokenizer):
    llm, _ = build_tiny_model(family, tokenizer=tokenizer)
    head = llm.get_output_embeddings()
    model = AutoDecoModel(llm)
    ids = torch.randint(5, len(tokenizer), (2, 6))
    batch = type("B", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    fast, hooks = _both_paths(llm, model, batch, max_new_tokens=4, user_top_p=0.8)
    _assert_same(fast, hooks)
    assert llm.get_output_embeddings() is head


def test_heads_in_forward_num_return_sequences(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    batch = _prompts(tok, ["abc", "hello"])
    fast, hooks = _both_paths(llm, model, batch, max_new_tokens=5, num_return_sequences=3)
    _assert_same(fast, hooks)
    assert fast.sequences.shape[0] == fast.temperature.shape[0] == 6


def test_heads_in_forward_restores_the_lm_head_on_error(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    head = llm.get_output_embeddings()
    ids = tok(["abc"], return_tensors="pt").input_ids

    def boom(input_ids, scores):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        autodeco_generate(llm, model, ids, max_new_tokens=3, logits_processor=[boom])
    assert llm.get_output_embeddings() is head
    # and the next call works (the cached HeadsLMHead is reused, its buffers re-sized)
    gen = autodeco_generate(llm, model, ids.repeat(3, 1), max_new_tokens=3)
    assert gen.temperature.shape == (3, 3)


def test_heads_lm_head_outputs_and_stale_forward_is_refused(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm, enable_top_p_head=False)
    ids = tok(["abc", "xyz"], return_tensors="pt").input_ids
    ref = model(ids)
    with torch.no_grad(), install_heads_lm_head(llm, model.temp_head, None, batch_size=2) as lm_head:
        logits = llm(ids).logits
        assert torch.equal(logits, ref.logits)  # the logits are untouched
        assert torch.allclose(lm_head.predicted[:, 0], ref.temperature[:, -1])
        assert (lm_head.predicted[:, 1] == 1).all() and int(lm_head.calls) == 1  # no top-p head: P = 1
        with pytest.raises(RuntimeError, match="batch 2"):
            llm(ids[:1])
    # a processor fed by a HeadsLMHead that the forward never runs (as a compiled graph traced
    # without it would) is refused instead of sampling with stale values
    stale = HeadsLMHead(llm.get_output_embeddings(), model.temp_head, None)
    stale.reset(2, "cpu")
    proc = AutoDecoLogitsProcessor(model.temp_head, None)
    with pytest.raises(RuntimeError, match="bypassed"):
        with proc.attach_lm_head(stale):
            llm.generate(ids, max_new_tokens=3, logits_processor=[proc], do_sample=True, top_k=0)


def test_falls_back_to_hooks_when_the_lm_head_cannot_be_replaced(tiny_llama, monkeypatch):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    batch = _prompts(tok, ["abc", "hello"])
    torch.manual_seed(0)
    ref = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, max_new_tokens=5)
    monkeypatch.setattr(llm, "set_output_embeddings", lambda module: None)  # ignores the replacement
    torch.manual_seed(0)
    gen = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, max_new_tokens=5)
    _assert_same(gen, ref)


def _cpu_compile_config():
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", fullgraph=False)
    if not hasattr(config, "_compile_all_devices"):
        pytest.skip("this transformers cannot auto-compile generate on CPU")
    config._compile_all_devices = True  # generate compiles only on accelerators otherwise
    return config


def test_compiled_forward_runs_the_heads(tiny_llama):
    """generate's auto-compilation (static cache) forced on CPU: the heads inside the compiled
    forward give the tokens and T/P of the eager hook path; hooks would not fire there."""
    torch._dynamo.reset()
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    batch = _prompts(tok, ["hi", "a longer prompt"])
    kw = dict(max_new_tokens=6, user_top_p=0.9, cache_implementation="static")
    torch.manual_seed(0)
    hooks = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask, heads_in_forward=False, **kw)
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    compiled = autodeco_generate(llm, model, batch.input_ids, batch.attention_mask,
                                 compile_config=_cpu_compile_config(), **kw)
    assert counters["stats"]["unique_graphs"] >= 1  # the decode steps really ran a compiled forward
    _assert_same(compiled, hooks, atol=1e-5)
    # plain generate afterwards compiles its own graph (dynamo guards on the lm_head's type)
    plain = llm.generate(**batch, max_new_tokens=4, do_sample=False, cache_implementation="static",
                         compile_config=_cpu_compile_config())
    assert torch.equal(plain, llm.generate(**batch, max_new_tokens=4, do_sample=False))
    torch._dynamo.reset()


def test_the_token_filter_restricts_the_temperature_loss_only(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    ids = torch.randint(5, len(tok), (2, 12))
    out = model(ids)
    torch.manual_seed(1)
    temp_mask = torch.rand(2, 11) < 0.5
    plain = training_losses(out, ids, "analytic_min_p_hinge")
    filtered = training_losses(out, ids, "analytic_min_p_hinge", temp_mask=temp_mask)
    assert torch.equal(filtered["top_p_loss"], plain["top_p_loss"])  # the top-p head sees every token
    logits, temperature, _, labels = shift_for_next_token(out.logits, out.temperature, None, ids)
    assert torch.equal(filtered["temp_loss"], min_p_hinge_loss(logits, temperature, labels, mask=temp_mask))
    assert not torch.equal(filtered["temp_loss"], plain["temp_loss"])
    top_p_mask = ~temp_mask
    only_top_p = training_losses(out, ids, "analytic_min_p_hinge", top_p_mask=top_p_mask)
    assert torch.equal(only_top_p["temp_loss"], plain["temp_loss"])
    assert not torch.equal(only_top_p["top_p_loss"], plain["top_p_loss"])


@pytest.mark.parametrize("shape", ["peaked", "flat"])
def test_top_k_soft_top_p_matches_the_full_sort_and_the_formula(shape):
    """The certified top-k path (peaked rows) and its fallback to the full sort (flat rows) against
    the exact loss and, on a small vocabulary, the formula written as a loop."""
    torch.manual_seed(0)
    V = 64
    scale = 9.0 if shape == "peaked" else 0.3
    z = torch.randn(1, 16, V, dtype=torch.float64) * scale
    y = torch.randint(0, V, (1, 16))
    t = torch.rand(1, 16, dtype=torch.float64) * 0.8 + 0.4
    p = torch.rand(1, 16, dtype=torch.float64) * 0.9 + 0.05
    p_rows = torch.softmax(z[0] / t[0, :, None], -1)
    _, fallback = soft_top_p_normalizer(p_rows, p[0], 30.0, top_k=8, tolerance=1e-6)
    if shape == "peaked":
        assert fallback.float().mean() < 0.3  # most rows certified without the full sort
    else:
        assert fallback.all()  # the tail is too heavy to bound: exact for every row
    t.requires_grad_(True)
    p.requires_grad_(True)
    fast = soft_top_p_loss(z, t, p, y, top_k=8)
    exact = soft_top_p_loss(z, t, p, y, top_k=None)
    assert fast.item() == pytest.approx(exact.item(), abs=1e-5)
    # the heads train on the gradient: the certified path must give the exact one too
    for g_fast, g_exact in zip(torch.autograd.grad(fast, (t, p)), torch.autograd.grad(exact, (t, p))):
        assert torch.allclose(g_fast, g_exact, rtol=1e-4, atol=1e-9)
    expected = ref_soft_top_p_loss(z[0].tolist(), t[0].detach().tolist(), p[0].detach().tolist(), y[0].tolist(), 30.0)
    assert fast.item() == pytest.approx(expected, abs=1e-5)


def test_generate_refuses_the_sampling_arguments_the_heads_replace(tiny_llama):
    llm, tok = tiny_llama
    model = AutoDecoModel(llm)
    ids = torch.randint(5, len(tok), (1, 4))
    for kwargs, named in [({"temperature": 0.7}, "user_temperature="), ({"top_p": 0.9}, "user_top_p="),
                          ({"do_sample": False}, "user_temperature=0"), ({"num_beams": 2}, "beam search"),
                          ({"top_k": 50}, "min_p=")]:
        with pytest.raises(ValueError, match=re.escape(named)):
            autodeco_generate(llm, model, ids, max_new_tokens=2, **kwargs)


def test_heads_see_the_rescaled_logits_of_a_soft_capping_family(tokenizer):
    """Gemma-2 soft-caps its logits after lm_head: the top-p head's features must come from the
    capped logits at generation as in training."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        llm.lm_head.weight.mul_(40)  # raw logits well beyond the cap of 2, so capping matters
    model = AutoDecoModel(llm)
    ids = torch.randint(5, len(tokenizer), (2, 5))
    for heads_in_forward in (True, False):
        torch.manual_seed(0)
        gen = autodeco_generate(llm, model, ids, torch.ones_like(ids), max_new_tokens=4,
                                heads_in_forward=heads_in_forward, pad_token_id=tokenizer.pad_token_id)
        forced = model(gen.sequences)
        assert torch.allclose(gen.top_p, forced.top_p[:, 4:-1], atol=1e-5)
        assert (forced.logits.abs() <= 2.0 + 1e-5).all()



def test_compiled_features_and_losses_match_eager(tiny_llama, monkeypatch):
    """`compiled=True` runs the top-p features and both losses through torch.compile with dynamic
    shapes (aot_eager here: the graphs and their autograd, without a GPU's code generation): the same
    P, losses and head gradients as eagerly, over two token counts and with rows that take the
    full-sort fallback."""
    import testtime.autodeco as autodeco
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", **kw))
    monkeypatch.setattr(autodeco, "_COMPILED", {})
    llm, tok = tiny_llama
    torch.manual_seed(0)
    model = AutoDecoModel(llm)
    counters.clear()
    for length in (9, 14):  # a second token count reuses the dynamic graphs
        ids = torch.randint(5, len(tok), (2, length))
        results = []
        for compiled in (False, True):
            model.top_p_head.compiled = compiled
            out = model(ids)
            losses = training_losses(out, ids, generator=torch.Generator().manual_seed(0), top_k=8, compiled=compiled)
            grads = torch.autograd.grad(losses["loss"], [p for p in model.parameters() if p.requires_grad])
            results.append((out.top_p, losses["temp_loss"], losses["top_p_loss"], grads))
        (p0, t0, s0, g0), (p1, t1, s1, g1) = results
        assert torch.allclose(p0, p1, atol=1e-6)
        assert torch.allclose(t0, t1, atol=1e-6) and torch.allclose(s0, s1, atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
    assert counters["stats"]["unique_graphs"] >= 3  # features, temperature loss, top-p loss really compiled
    # peaked rows certified by the top-k estimate beside flat ones that fall back to the full sort
    z = torch.randn(1, 16, 64, dtype=torch.float64) * torch.tensor([9.0, 0.3]).repeat(8)[None, :, None]
    y = torch.randint(0, 64, (1, 16))
    t = (torch.rand(1, 16, dtype=torch.float64) + 0.4).requires_grad_(True)  # T gets the top-p loss's gradient too
    p = (torch.rand(1, 16, dtype=torch.float64) * 0.9 + 0.05).requires_grad_(True)
    exact = soft_top_p_loss(z, t, p, y, top_k=None)
    fast = soft_top_p_loss(z, t, p, y, top_k=8, compiled=True)
    assert fast.item() == pytest.approx(exact.item(), abs=1e-7)
    for g_fast, g_exact in zip(torch.autograd.grad(fast, (t, p)), torch.autograd.grad(exact, (t, p))):
        assert torch.allclose(g_fast, g_exact, rtol=1e-5, atol=1e-9)
    torch._dynamo.reset()

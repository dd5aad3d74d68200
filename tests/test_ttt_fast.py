"""TTT-E2E's fast path (testtime/ttt/fast.py) against the plain path it replaces.

On a CPU the fast path runs the same fixed-shape code as on a GPU (rolled key windows, the chunk
step's forward, inner gradient and update, the in-place decode step), with SDPA masks instead of
FlexAttention and without torch.compile or CUDA graphs (benchmarks/ttt.py checks those on the GPU
before timing them). Every comparison is in float64, so any difference is a different function.
`TESTTIME_TTT_COMPILE=1` also runs the compiled graphs here (inductor on the CPU: minutes).
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

from testtime.lm import left_pad
from tests.test_ttt import PAD, tiny, tokens


def both(model, fn):
    """fn() on the plain path, then on the fast path."""
    model.config.fast_path = "off"
    plain = fn()
    model.config.fast_path = "on"
    try:
        return plain, fn()
    finally:
        model.config.fast_path = "off"


@pytest.mark.parametrize("lengths", [(7,), (22, 13), (30, 30)])  # within the window; padded; chunks past it
def test_prefill_logits_cache_and_kept_logits_equal_the_plain_path(lengths):
    model = tiny()
    ids, mask = left_pad(tokens(*lengths), PAD)

    def prefill():
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            kept = model(ids, attention_mask=mask, logits_to_keep=3).logits
            steps = model(ids, attention_mask=mask, inner_steps=2, inner_lr=0.5).logits
        return out, kept, steps

    (plain, plain_kept, plain_steps), (fast, fast_kept, fast_steps) = both(model, prefill)
    assert model.fast.failed is None
    torch.testing.assert_close(fast.logits, plain.logits, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast_kept, plain_kept, rtol=0, atol=1e-10)
    torch.testing.assert_close(fast_steps, plain_steps, rtol=0, atol=1e-10)
    for layer_fast, layer_plain in zip(fast.cache.fast, plain.cache.fast):  # the weights after the last chunk
        for w_fast, w_plain in zip(layer_fast, layer_plain):
            torch.testing.assert_close(w_fast, w_plain, rtol=0, atol=1e-10)
    occupied = plain.cache.slot_pos >= 0
    assert torch.equal(fast.cache.slot_pos, plain.cache.slot_pos)
    for k_fast, k_plain in zip(fast.cache.keys, plain.cache.keys):
        torch.testing.assert_close(k_fast.transpose(1, 2)[occupied], k_plain.transpose(1, 2)[occupied],
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("first_order", [True, False])
def test_meta_gradient_equals_the_plain_path(first_order):
    model = tiny(first_order=first_order).train()
    ids, mask = left_pad(tokens(23, 17), PAD)
    labels = ids.masked_fill(mask == 0, -100)

    def gradient():
        loss = model(ids, attention_mask=mask, labels=labels).loss
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    (loss, grads), (fast_loss, fast_grads) = both(model, gradient)
    assert model.fast.failed is None
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=1e-12)
    for g_fast, g in zip(fast_grads, grads):
        torch.testing.assert_close(g_fast, g, rtol=0, atol=1e-10)


def test_decoding_equals_the_plain_path_across_updates_of_different_samples():
    model = tiny()
    ids, mask = left_pad(tokens(5, 11, 8), PAD)  # each sample reaches its chunk boundaries at other steps

    def decode():
        with torch.no_grad():
            sequences = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None)
            out = model(ids, attention_mask=mask, use_cache=True)
            logits = [model(sequences[:, ids.shape[1] + j:ids.shape[1] + j + 1], cache=out.cache).logits
                      for j in range(30)]
        return sequences, torch.cat(logits, 1), out.cache

    (sequences, logits, cache), (fast_sequences, fast_logits, fast_cache) = both(model, decode)
    assert torch.equal(fast_sequences, sequences)
    torch.testing.assert_close(fast_logits, logits, rtol=0, atol=1e-10)
    assert fast_cache.pos_host == cache.pos_host == cache.pos.tolist()
    for layer_fast, layer_plain in zip(fast_cache.fast, cache.fast):
        for w_fast, w_plain in zip(layer_fast, layer_plain):
            torch.testing.assert_close(w_fast, w_plain, rtol=0, atol=1e-10)


def test_under_bf16_autocast_the_fast_path_stays_within_bf16_of_the_plain_one():
    model = tiny(dtype=torch.float32)
    ids = torch.stack(tokens(26, 26))

    def prefill():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, use_cache=True)
        return out.logits.float(), out.cache

    (plain, plain_cache), (fast, fast_cache) = both(model, prefill)
    assert fast_cache.keys[0].dtype == plain_cache.keys[0].dtype == torch.bfloat16
    assert fast_cache.fast[0][0].dtype == torch.float32
    assert ((fast - plain).norm() / plain.norm()).item() < 2e-2


def test_settings_it_cannot_take_run_the_plain_path_and_say_so(caplog):
    model = tiny()
    ids = tokens(18)[0][None]
    with torch.no_grad():
        plain = model(ids, return_ttt_stats=True)
        model.config.fast_path = "on"
        with caplog.at_level(logging.INFO, logger="testtime.ttt.fast"):
            fast = model(ids, return_ttt_stats=True)
            model(ids, return_ttt_stats=True)
    assert torch.equal(fast.ttt_loss_before, plain.ttt_loss_before)
    said = [r.message for r in caplog.records if "return_ttt_stats" in r.message]
    assert len(said) == 1  # one line per reason, not one per call
    with pytest.raises(ValueError, match="fast_path"):
        tiny(fast_path="fastest")


@pytest.mark.skipif(os.environ.get("TESTTIME_TTT_COMPILE") != "1", reason="set TESTTIME_TTT_COMPILE=1: minutes")
def test_compiled_graphs_on_the_cpu_equal_the_plain_path():
    model = tiny(dtype=torch.float32, first_order=False).train()
    ids = torch.stack(tokens(23, 23))

    def run():
        with torch.no_grad():
            logits = model(ids).logits
        loss = model(ids, labels=ids).loss
        return logits, loss, torch.autograd.grad(loss, list(model.parameters()))

    (logits, loss, grads), (fast_logits, fast_loss, fast_grads) = both(model, run)
    assert model.fast.failed is None
    torch.testing.assert_close(fast_logits, logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast_loss, loss, rtol=0, atol=1e-5)
    for g_fast, g in zip(fast_grads, grads):
        torch.testing.assert_close(g_fast, g, rtol=0, atol=1e-4)


def test_flexattention_masks_equal_the_plain_masks():
    """The GPU's kernel choices, in their forward (a CPU runs FlexAttention unfused, without a
    backward): the sliding-window block mask of a sequence, and a chunk's band with its score_mod
    for the slots before position 0, against SDPA with the plain masks."""
    from torch.nn.attention.flex_attention import flex_attention

    from testtime.ttt.attention import attention, sequence_block_mask, window_block_mask
    from testtime.ttt.fast import chunk_logits

    torch.manual_seed(0)
    T, W = 300, 100
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64) for _ in range(3))
    pos = torch.arange(T)[None]
    with torch.no_grad():
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=sequence_block_mask(T, W, q.device)),
                                   attention(q, k, v, pos, pos, W, 64), rtol=0, atol=1e-12)
    model = tiny(window_size=16, chunk_size=8)
    quarter = model.quarter()
    params = {n: p.detach() for n, p in quarter.named_parameters()}
    B, b, W = 2, 8, 16
    x = torch.randn(B, b, model.config.hidden_size, dtype=torch.float64)
    windows = [tuple(torch.randn(B, 2, W, 8, dtype=torch.float64) for _ in "kv") for _ in model.ttt_blocks]
    fast = model.initial_fast_weights(B, outer_grad=False)
    rope = (8, model.config.rope_theta, torch.float64)
    for start in (0, 8, 16, 40):  # windows empty, half full, full, long past
        positions = torch.arange(start, start + b)[None]
        first_valid = torch.full((B,), W - start) if start < W else None
        with torch.no_grad():
            sdpa, _ = chunk_logits(quarter, params, x, positions, windows, first_valid, fast, "sdpa", None, rope)
            flex, _ = chunk_logits(quarter, params, x, positions, windows, first_valid, fast, "flex",
                                   window_block_mask(b, W, x.device), rope)
        torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-12)


def test_an_adapter_wrapped_in_gets_new_graphs_and_the_plain_path_result():
    """A CUDA graph holds the parameters it was captured with: the fast path keys its state on the
    TTT quarter's modules and parameter storage, so wrapping a LoRA adapter in (or loading weights
    by assignment) builds new state instead of replaying the old."""
    from peft import LoraConfig, get_peft_model

    model = tiny()
    ids = torch.stack(tokens(18, 18))
    model.config.fast_path = "on"
    with torch.no_grad():
        model(ids)
    before = set(model.fast._steppers)
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"],
                                               init_lora_weights=False))
    with torch.no_grad():
        fast = adapted(ids).logits
        model.config.fast_path = "off"
        plain = adapted(ids).logits
    assert set(model.fast._steppers).isdisjoint(before)
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-10)


def test_skipping_the_window_key_gradients_leaves_the_forward_as_it_is():
    """`window_key_grads=False` empties the query lists of the window's key tiles (what
    FlexAttention's backward walks for dK and dV) and nothing else: the forward (and dQ, which
    walks the key lists) is untouched. The backward itself runs on the GPU only (the benchmark's
    check compares it with the plain path there)."""
    from torch.nn.attention.flex_attention import flex_attention

    from testtime.ttt.attention import window_block_mask

    b, W = 128, 256
    full, skip = (window_block_mask(b, W, torch.device("cpu"), grads) for grads in (True, False))
    past = W // full.BLOCK_SIZE[1]
    listed = lambda m: m.q_num_blocks + m.full_q_num_blocks  # noqa: E731  (query tiles per key tile)
    assert past == 2 and (listed(full)[..., :past] > 0).all() and (listed(skip)[..., :past] == 0).all()
    assert torch.equal(listed(skip)[..., past:], listed(full)[..., past:])
    assert torch.equal(skip.kv_num_blocks, full.kv_num_blocks) and torch.equal(skip.kv_indices, full.kv_indices)
    torch.manual_seed(0)
    q = torch.randn(1, 2, b, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, W + b, 8, dtype=torch.float64) for _ in "kv")
    with torch.no_grad():
        assert torch.equal(flex_attention(q, k, v, block_mask=skip), flex_attention(q, k, v, block_mask=full))


@pytest.mark.parametrize("layers, fraction", [(4, 0.5), (2, 0.5)])  # two TTT blocks; one (then no window is held)
def test_the_first_ttt_blocks_attention_runs_once_over_the_sequence(layers, fraction):
    """The first TTT block's attention reads only the lower blocks' output, so the fast path runs
    it over the whole sequence (`FastPath.hoist`) and its chunk steps hold no window for it; the
    prefill and the meta-gradient stay the plain path's."""
    model = tiny(num_hidden_layers=layers, ttt_layer_fraction=fraction, first_order=False).train()
    ids = torch.stack(tokens(30, 30))

    def run():
        with torch.no_grad():
            logits = model(ids, use_cache=True).logits
        loss = model(ids, labels=ids).loss
        return logits, torch.autograd.grad(loss, list(model.parameters()))

    (logits, grads), (fast_logits, fast_grads) = both(model, run)
    assert model.fast.failed is None
    held = [s for s in model.fast._steppers.values() if s.windows[0] is None]
    assert held and all(len(s.held()) == model.config.num_ttt_layers - 1 for s in held)
    torch.testing.assert_close(fast_logits, logits, rtol=0, atol=1e-10)
    for g_fast, g in zip(fast_grads, grads):
        torch.testing.assert_close(g_fast, g, rtol=0, atol=1e-10)

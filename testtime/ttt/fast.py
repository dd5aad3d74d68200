"""The fast path of TTT-E2E: fixed shapes, compiled kernels and CUDA graphs, equal to the plain path.

The plain path (`testtime.ttt.inner.scan_chunks`, `testtime.ttt.generate.decode`) is the
reference and runs everywhere. This one computes the same function faster; `config.fast_path`
chooses: "auto" (the default) on a GPU, "on" on any device (a CPU runs the same fixed-shape code
with SDPA masks instead of FlexAttention, eager unless `TESTTIME_TTT_COMPILE=1`: what the tests
check against the plain path), "off" never; `TESTTIME_TTT_COMPILE_MODE` passes a torch.compile mode
(`max-autotune-no-cudagraphs` tunes the kernels: minutes more compiling). What it changes:

- Lower blocks: each one compiled graph over the whole sequence (`sequence_layer`) around one
  causal flash call when the sequence fits in the window, else FlexAttention with a
  sliding-window block mask built once per length (`testtime.ttt.attention`).
- The first TTT block's attention sublayer reads only the lower blocks' output, which no fast
  weight reaches: it runs once over the sequence the same way (`FastPath.hoist`), and each chunk
  step starts at that block's MLP'.
- The chunk scan keeps, per TTT block (the hoisted one's aside), the keys and values of the `window` positions before the
  chunk in a fixed-size tensor (rolled by one chunk after each), so every chunk is the same
  computation on the same shapes: its forward (`chunk_logits`), the inner gradient, the clipped
  SGD step (`clipped_update`), compiled once.
  - Without an outer graph (prefill, evaluation, decoding's chunk updates): a `Stepper` holds
    the state in static tensors and, on a GPU, replays one CUDA graph per chunk (two: before
    position `window` the window is not full yet and its mask differs). The model's parameters
    go in detached, so the backward computes the fast weights' gradient only.
  - First-order meta-training: the compiled forward per chunk, the inner gradient through its
    compiled backward, the outer backward through the same graphs.
  - Second-order meta-training: `torch.func.grad` of the chunk loss inside one compiled graph
    (with attention as plain matmuls: no fused kernel has a double backward), so the outer
    backward through the inner gradient is a compiled graph too.
- Decoding (`decode`): the step of one token through every layer on a static ring cache,
  captured as a CUDA graph per cache; the chunk update through the `Stepper`.
- Logits: only the positions the caller keeps (`logits_to_keep`) leave the chunk step.

Settings it cannot take (per-chunk statistics, `recompute`, full attention in the TTT blocks)
run the plain path, with one logged line per reason; a failure of the fast path (a compiler
error, say) is logged once and turns it off for the model.
"""

from __future__ import annotations

import logging
import os
import traceback

import torch
import torch.nn.functional as F
from torch.func import functional_call

from testtime.ttt.attention import attend_past, flex_available, math_attention, sequence_block_mask, visible, \
    window_block_mask, window_mask, window_score_mod
from testtime.ttt.inner import Run, clipped_update, per_sample_loss, scan_chunks, unflatten
from testtime.ttt.model import rotary

log = logging.getLogger(__name__)

def _compile_on_cpu() -> bool:
    return os.environ.get("TESTTIME_TTT_COMPILE", "0") == "1"


# ---------------------------------------------------------------------------------------------
# the chunk at fixed shapes (pure functions: what gets compiled)
# ---------------------------------------------------------------------------------------------


def chunk_logits(quarter, params, x, pos, windows, first_valid, fast, attn: str, block_mask, rope: tuple,
                 kernel_options: dict | None = None):
    """The TTT quarter (`TTTQuarter`) on one chunk at fixed shapes, its parameters `params`.

    x [B, b, H] at positions pos [1, b]; windows: per TTT block the (k, v) [B, heads, W, d] of the
    W positions before the chunk (slots before position 0 hold anything: `first_valid` [B] masks
    them, None when the window is full), or None for a block whose attention sublayer x already
    holds (the first TTT block's, applied over the whole sequence: `FastPath.hoist`); attn: "flex"
    (with the band's `block_mask`), "sdpa" or "math" (twice differentiable); rope: (head_dim,
    theta, dtype); kernel_options: FlexAttention's tile sizes (None: its defaults).
    -> (logits [B, b, V], [(k, v)] of the chunk per TTT block, (None, None) where its window is None)."""
    present = [w for w in windows if w is not None]
    b, W = x.shape[1], present[0][0].shape[2] if present else 0
    rot = rotary(pos, *rope)
    valid = torch.zeros_like(pos[0, :1]) if first_valid is None else first_valid
    mask = None if attn == "flex" or not present else window_mask(valid, b, W)
    score_mod = None if attn != "flex" or first_valid is None else window_score_mod(first_valid)

    def attend_window(past_k, past_v):
        def attend(q, k, v):
            keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            if attn == "flex":
                from torch.nn.attention.flex_attention import flex_attention

                return flex_attention(q, keys, values, score_mod=score_mod, block_mask=block_mask,
                                      kernel_options=kernel_options)
            if attn == "math":
                return math_attention(q, keys, values, mask)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

        return attend

    attends = [None if w is None else attend_window(*w) for w in windows]
    return functional_call(quarter, params, (x, rot, attends, fast))


def chunk_loss(quarter, params, x, pos, windows, first_valid, fast, targets, attn: str, block_mask, rope: tuple,
               kernel_options: dict | None = None):
    """`chunk_logits` and the inner loss per sample [B] (mean CE over the chunk's targets)."""
    logits, kvs = chunk_logits(quarter, params, x, pos, windows, first_valid, fast, attn, block_mask, rope,
                               kernel_options)
    return per_sample_loss(logits, targets)[0], logits, kvs


def meta_step(quarter, params, x, pos, windows, first_valid, flat, targets, apply, lr, clip, steps: int,
              per_layer: int, rope: tuple, first_order: bool):
    """The chunk with its inner update, as one function of everything: `torch.func.grad` of the
    chunk loss, then `steps` clipped SGD steps; attention as matmuls (twice differentiable).
    Second order: the outer gradient flows through the inner one. First order (`first_order`):
    the inner gradient is a constant of the outer graph (detached), so its compiled backward is a
    chunk's plain backward. -> (loss [B] before the update, logits, kvs, new flat fast weights)."""

    def inner(weights):
        loss, logits, kvs = chunk_loss(quarter, params, x, pos, windows, first_valid, unflatten(weights, per_layer),
                                       targets, "math", None, rope)
        return loss.sum(), (loss, logits, [kv for kv in kvs if kv[0] is not None])  # aux: tensors only

    grads, (loss, logits, held) = torch.func.grad(inner, has_aux=True)(flat)
    held = iter(held)
    kvs = [(None, None) if w is None else next(held) for w in windows]
    new = flat
    for step in range(steps):
        if step:
            grads, _ = torch.func.grad(inner, has_aux=True)(new)
        if first_order:
            grads = [g.detach() for g in grads]
        new, _ = clipped_update(new, grads, lr, clip, apply)
    return loss, logits, kvs, new


def sequence_layer(block, h, rot, block_mask, kind: str, attention_only: bool):
    """One block (`attention_only`: its attention sublayer) over a whole sequence h [B, T, H]
    attending to itself: `kind` "flex" (the sliding window's `block_mask`) or "causal" (SDPA's
    flash kernel: full attention, or a sequence within the window). -> (h, k, v)."""

    def attend(q, k, v):
        if kind == "flex":
            from torch.nn.attention.flex_attention import flex_attention

            return flex_attention(q, k, v, block_mask=block_mask)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return block.attention_sublayer(h, rot, attend) if attention_only else block(h, rot, attend, None)


def _roll(window: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """The window after a chunk: its oldest b positions out, the chunk's b in."""
    return torch.cat([window[:, :, new.shape[2]:], new], 2)


def decode_token(model, token, pos, slot_pos, keys, values, fast, pending_h, pending_ids, chunk: int, window: int):
    """One token [B, 1] at every sample's next position `pos` [B] through every layer, on a cache's
    tensors (`TTTCache`; `fast` None: TTT off): its keys go into the ring (the oldest slot, outside
    every window) before attention reads the ring, so no concatenation -> logits [B, 1, V]. In
    place on those tensors: what a CUDA graph captures."""
    rows = torch.arange(token.shape[0], device=token.device)
    slot = pos % slot_pos.shape[1]
    slot_pos[rows, slot] = pos
    mask = visible(pos[:, None], slot_pos, window)
    rot = model.rope_tables(pos[:, None])
    h = model.model.embed_tokens(token)
    for i, block in enumerate(model.model.layers):
        if i == model.num_lower and pending_h is not None:
            pending_h[rows, pos % chunk] = h[:, 0].to(pending_h.dtype)
        ring_k, ring_v = keys[i], values[i]

        def attend(q, k, v, ring_k=ring_k, ring_v=ring_v):
            ring_k[rows, :, slot] = k[:, :, 0]
            ring_v[rows, :, slot] = v[:, :, 0]
            return F.scaled_dot_product_attention(q, ring_k, ring_v, attn_mask=mask)

        weights = fast[i - model.num_lower] if fast is not None and i >= model.num_lower else None
        h = block(h, rot, attend, weights)[0]
    if pending_ids is not None:
        pending_ids[rows, pos % chunk] = token[:, 0]
    pos.add_(1)
    return model.lm_head(model.model.norm(h))


def _decode_args(model, cache, token, ttt: bool) -> tuple:
    return (model, token, cache.pos, cache.slot_pos, cache.keys, cache.values, cache.fast if ttt else None,
            cache.pending_h, cache.pending_ids, cache.chunk_size, cache.window)


# ---------------------------------------------------------------------------------------------
# the fast path of one model
# ---------------------------------------------------------------------------------------------


class FastPath:
    """The fast path of one `TTTForCausalLM`: its compiled functions, block masks and steppers."""

    def __init__(self, model):
        self.model = model
        self.failed: str | None = None
        self.failure_trace: str | None = None  # the traceback of the failure, for a bug report
        self._said: set[str] = set()
        self._fns: dict = {}
        self._steppers: dict = {}
        # without an outer graph, FlexAttention's backward may skip the key gradients of the
        # window (constants there): `window_block_mask`'s window_key_grads=False. An experiment
        # until the GPU check has compared it with the plain path; off by default.
        self.skip_window_key_grads = False
        # FlexAttention's tile sizes for a chunk against its window, e.g. {"BLOCK_M": 64, ...}: at
        # batch 1 its 1,024 queries make few query tiles per head, too few to fill the GPU with
        # the default 128-row tiles. An experiment the benchmark times beside the default; None.
        self.chunk_kernel_options: dict | None = None

    def _say(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.info("TTT-E2E fast path not used: %s; the plain path runs", reason)

    def _fail(self, error: Exception, what: str) -> None:
        """A compiler or kernel failure: logged once; the plain path from now on."""
        self.failed = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        self.failure_trace = traceback.format_exc()
        log.warning("TTT-E2E fast path%s failed (%s); the plain path runs from now on", what, self.failed)

    def fn(self, name: str, device: torch.device):
        """`name` of this module's pure functions, compiled on a GPU (and on a CPU if asked)."""
        compiled = device.type == "cuda" or _compile_on_cpu()
        key = (name, compiled)
        if key not in self._fns:
            raw = {"forward": chunk_loss, "update": clipped_update, "meta": meta_step, "decode": decode_token,
                   "sequence": sequence_layer}[name]
            mode = os.environ.get("TESTTIME_TTT_COMPILE_MODE") or None  # e.g. max-autotune-no-cudagraphs
            # the chunk's functions see one shape; a sequence's length varies (dynamic after the second)
            dynamic = None if name == "sequence" else False
            self._fns[key] = torch.compile(raw, dynamic=dynamic, mode=mode) if compiled else raw
        return self._fns[key]

    def fingerprint(self) -> tuple:
        """What a captured CUDA graph holds on to: the TTT quarter's modules and the storage of its
        parameters. An optimizer step changes neither (it writes in place); an adapter wrapped in,
        weights loaded by assignment or a move to another device do, and the graphs are recaptured."""
        quarter = self.model.quarter()
        return tuple(id(m) for m in quarter.modules()) + tuple(p.data_ptr() for p in quarter.parameters())

    # --- when it runs -------------------------------------------------------------------------

    def choose(self, run: Run, device: torch.device, outer_grad: bool, stats: bool, length: int):
        """This fast path if it applies to the call, else None (the plain path)."""
        mode = self.model.config.fast_path
        if mode == "off" or (mode == "auto" and device.type != "cuda"):
            return None
        if self.failed:
            self._say(f"it failed earlier ({self.failed})")
            return None
        return self

    def scan_reason(self, run: Run, outer_grad: bool, stats: bool) -> str | None:
        if run.window is None:
            return "full attention in the TTT blocks (the fixed-shape scan needs a sliding window)"
        if stats:
            return "return_ttt_stats (the per-chunk statistics come from the plain scan)"
        if run.recompute and outer_grad:
            return "recompute (activation checkpointing runs on the plain scan)"
        return None

    def sequence_block(self, block, h, rot, run: Run, attention_only: bool = False):
        """`block` over a whole sequence h [B, T, H] (the lower blocks; `attention_only`: the first
        TTT block's attention sublayer, `hoist`) -> (h, k, v). On a GPU one compiled graph per
        block (norms, RoPE and the attention kernel fused around it): SDPA's causal flash kernel
        when the sequence fits in the window (the window then hides nothing) or attention is full,
        else FlexAttention with the sliding-window block mask (built once per length). Elsewhere,
        or after a failure, the plain attention."""
        T, device = h.shape[1], h.device
        kind = "causal" if run.window is None or T <= run.window else "flex" if flex_available(device) else None
        if device.type == "cuda" and kind and not self.failed:
            mask = sequence_block_mask(T, run.window, device) if kind == "flex" else None
            try:
                return self.fn("sequence", device)(block, h, rot, mask, kind, attention_only)
            except Exception as error:
                if isinstance(error, (torch.OutOfMemoryError, KeyboardInterrupt)):
                    raise
                self._fail(error, " (a block over the sequence)")
        pos = torch.arange(T, device=device)[None]
        attend = attend_past(pos, None, run.window, run.chunk_size)
        return block.attention_sublayer(h, rot, attend) if attention_only else block(h, rot, attend, None)

    def hoist(self, h, run: Run, outer_grad: bool):
        """The first TTT block's attention sublayer over the whole sequence -> (h, k, v). Its input
        is the lower blocks' output, which no fast weight reaches, so it need not run chunk by
        chunk: each chunk step starts at that block's MLP' (one attention fewer per chunk, and its
        window is never held). Exact: the same function, through the sequence's kernel."""
        T = h.shape[1]
        rot = self.model.rope_tables(torch.arange(T, device=h.device)[None])
        with torch.set_grad_enabled(outer_grad):
            return self.sequence_block(self.model.ttt_blocks[0], h, rot, run, attention_only=True)

    # --- the chunk scan -----------------------------------------------------------------------

    def scan(self, model, h, next_ids, lengths, max_len: int, run: Run, outer_grad: bool,
             keep_from: int | None, stats: bool, keep: tuple[int, int]):
        """`scan_chunks` at fixed shapes (same arguments and results)."""
        args = (model, h, next_ids, lengths, max_len, run, outer_grad, keep_from, stats, keep)
        reason = self.scan_reason(run, outer_grad, stats)
        if reason:
            self._say(reason)
            return scan_chunks(*args)
        try:
            if outer_grad:
                return self._scan_train(h, next_ids, lengths, max_len, run, keep)
            with torch.enable_grad():  # the inner gradient, whatever the caller turned off
                return self._scan_prefill(h, next_ids, lengths, run, keep_from, keep)
        except Exception as error:  # a compiler or kernel failure: the plain path, from now on
            if isinstance(error, (torch.OutOfMemoryError, KeyboardInterrupt)):
                raise
            self._fail(error, "")
            return scan_chunks(*args)

    def _layout(self, h):
        """(heads, head_dim, dtype of keys and values, attention kernel, RoPE settings) of a call."""
        c = self.model.config
        heads, device = c.num_attention_heads, h.device
        kv_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else h.dtype
        attn = "flex" if flex_available(device) else "sdpa"
        rope = (c.hidden_size // heads, c.rope_theta,
                torch.promote_types(self.model.model.embed_tokens.weight.dtype, torch.float32))
        return heads, c.hidden_size // heads, kv_dtype, attn, rope

    def _chunks(self, h, next_ids, lengths, run: Run):
        """Per chunk: (start, end, x [B, b, H], targets [B, b], apply [B]); the last chunk padded."""
        B, T, H = h.shape
        b = run.chunk_size
        for s in range(0, T, b):
            e = min(s + b, T)
            x, targets = h[:, s:e], next_ids[:, s:e]
            if e - s < b:
                x = torch.cat([x, x.new_zeros(B, b - (e - s), H)], 1)
                targets = torch.cat([targets, targets.new_full((B, b - (e - s)), -100)], 1)
            yield s, e, x, targets, (e < lengths).to(h.dtype)

    def _scan_prefill(self, h, next_ids, lengths, run: Run, keep_from, keep):
        h, k0, v0 = self.hoist(h, run, outer_grad=False)
        stepper = self.stepper(h.shape[0], run, h, hoisted=True)
        stepper.reset(run.lr)
        logits, kept = [], [[] for _ in stepper.windows[1:]]
        for s, e, x, targets, apply in self._chunks(h, next_ids, lengths, run):
            out_logits, kvs = stepper.step(s, x, targets, apply)
            if s < keep[1] and e > keep[0]:
                logits.append(out_logits[:, max(keep[0] - s, 0):min(keep[1], e) - s].clone())
            if keep_from is not None and e > keep_from:
                lo = max(0, keep_from - s)
                for store, (k, v) in zip(kept, kvs[1:]):
                    store.append((k[:, :, lo:e - s].clone(), v[:, :, lo:e - s].clone()))
        ttt_kv = [] if keep_from is None else [(k0[:, :, keep_from:], v0[:, :, keep_from:])] + [
            (torch.cat([k for k, _ in store], 2), torch.cat([v for _, v in store], 2)) for store in kept]
        fast = [tuple(w.detach().clone() for w in layer) for layer in stepper.fast]
        return torch.cat(logits, 1), fast, ttt_kv, {}

    def _scan_train(self, h, next_ids, lengths, max_len: int, run: Run, keep):
        """With the outer graph: the first TTT block's attention over the sequence (`hoist`: one
        fused kernel's backward, no double backward through it), then every chunk through
        `meta_step` (its inner gradient by `torch.func.grad` inside one compiled graph, detached
        for first order), so the outer backward runs each chunk's compiled backward once; the
        windows roll in the outer graph."""
        model = self.model
        B, device = h.shape[0], h.device
        b, W = run.chunk_size, run.window
        heads, head_dim, kv_dtype, _, rope = self._layout(h)
        h = self.hoist(h, run, outer_grad=True)[0]
        quarter = model.quarter()
        params = dict(quarter.named_parameters())
        fast = model.initial_fast_weights(B, outer_grad=True)
        per_layer = len(fast[0])
        windows = [None] + [(h.new_zeros(B, heads, W, head_dim, dtype=kv_dtype),) * 2 for _ in fast[1:]]
        lr = torch.tensor(run.lr, device=device)
        forward, meta = self.fn("forward", device), self.fn("meta", device)
        logits = []
        for s, e, x, targets, apply in self._chunks(h, next_ids, lengths, run):
            pos = torch.arange(s, s + b, device=device)[None]
            first_valid = torch.full((B,), W - s, device=device) if s < W else None  # one tensor per chunk
            flat = [w for layer in fast for w in layer]
            new = None
            if e >= max_len:  # the last chunk: nothing after it needs its update
                chunk_out, kvs = forward(quarter, params, x, pos, windows, first_valid, fast, targets, "math", None,
                                         rope)[1:]
            else:
                _, chunk_out, kvs, new = meta(quarter, params, x, pos, windows, first_valid, flat, targets, apply, lr,
                                              run.clip, run.steps, per_layer, rope, run.first_order)
            if s < keep[1] and e > keep[0]:
                logits.append(chunk_out[:, max(keep[0] - s, 0):min(keep[1], e) - s])
            windows = [None if w is None else (_roll(w[0], k), _roll(w[1], v)) for w, (k, v) in zip(windows, kvs)]
            if new is not None:
                fast = unflatten(new, per_layer)
        return torch.cat(logits, 1), fast, [], {}

    # --- decoding -----------------------------------------------------------------------------

    def decode_reason(self, cache, run: Run) -> str | None:
        if cache.window is None:
            return "full attention (the cache grows: no fixed shapes)"
        if cache.capacity != cache.window + cache.chunk_size:
            return f"a cache of capacity {cache.capacity}, not window + chunk ({cache.window + cache.chunk_size})"
        return None

    def decode(self, cache, input_ids, run: Run) -> torch.Tensor:
        """`testtime.ttt.generate.decode` on the fast path: per token, the chunk update where one
        is due (the `Stepper`), then one replay of the cache's decode graph."""
        from testtime.ttt.generate import decode as plain_decode

        key = ("decode", run.ttt, torch.is_autocast_enabled(input_ids.device.type), self.fingerprint())
        if key not in cache.graphs:
            try:
                cache.graphs[key] = self._capture_decode(cache, run)
            except Exception as error:
                if isinstance(error, (torch.OutOfMemoryError, KeyboardInterrupt)):
                    raise
                self._fail(error, " decoding")
                return plain_decode(self.model, cache, input_ids, run)
        graph, token, logits = cache.graphs[key]
        out = []
        for j in range(input_ids.shape[1]):
            if run.ttt and cache.fast:
                due = [p % cache.chunk_size == 0 and p > 0 for p in cache.pos_host]
                if any(due):
                    self._update(cache, due, input_ids[:, j], run)
            token.copy_(input_ids[:, j:j + 1])
            if graph is None:
                logits = decode_token(*_decode_args(self.model, cache, token, run.ttt))
            else:
                graph.replay()
            out.append(logits.clone())
            cache.pos_host = [p + 1 for p in cache.pos_host]
            cache.max_len += 1
        return torch.cat(out, 1)

    def _capture_decode(self, cache, run: Run):
        """(graph, static token [B, 1], static logits): one token's step through every layer on
        this cache's tensors. Compiled and warmed up on a copy of the cache (a warm-up writes it),
        captured on the cache itself (a capture runs nothing). On a CPU: no graph, no compile."""
        token = torch.zeros(cache.pos.shape[0], 1, dtype=torch.long, device=cache.pos.device)
        if token.device.type != "cuda":
            return None, token, None
        step = self.fn("decode", token.device)
        scratch = cache.copy()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*_decode_args(self.model, scratch, token, run.ttt))
        torch.cuda.current_stream().wait_stream(side)
        del scratch
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = step(*_decode_args(self.model, cache, token, run.ttt))
        return graph, token, logits

    def _update(self, cache, due: list[bool], token, run: Run) -> None:
        """The chunk update of the samples `due` (their chunk [pos - b, pos) just got its last
        target), through the `Stepper` at the batch's shapes; the others keep their weights."""
        model = self.model
        B, b, W, C = len(due), cache.chunk_size, cache.window, cache.capacity
        device = cache.pos.device
        start = cache.pos - b  # the chunk of a due sample (others: any finite stand-in, not applied)
        apply = torch.tensor(due, dtype=cache.pending_h.dtype, device=device)
        slots = (start[:, None] - W + torch.arange(W, device=device)) % C
        windows = []
        for i in range(model.num_lower, len(model.model.layers)):
            keys, values = cache.keys[i], cache.values[i]
            index = slots[:, None, :, None].expand(B, keys.shape[1], W, keys.shape[3])
            windows.append((keys.gather(2, index), values.gather(2, index)))
        stepper = self.stepper(B, run, cache.pending_h, hoisted=False)  # the cache holds the lower blocks' output
        stepper.load(windows, cache.fast)
        stepper.lr.fill_(run.lr)
        targets = torch.cat([cache.pending_ids[:, 1:], token[:, None]], 1)
        with torch.inference_mode(False), torch.enable_grad():
            stepper.step(start.clamp(min=0), cache.pending_h, targets, apply)
        with torch.no_grad():
            for layer, new in zip(cache.fast, stepper.fast):
                for w, w_new in zip(layer, new):
                    w.copy_(w_new)

    def stepper(self, batch: int, run: Run, h: torch.Tensor, hoisted: bool) -> "Stepper":
        """The `Stepper` of these shapes and settings (made once, kept with its CUDA graphs);
        `hoisted`: the chunks come with the first TTT block's attention applied (`hoist`)."""
        heads, head_dim, kv_dtype, attn, rope = self._layout(h)
        autocast = torch.is_autocast_enabled(h.device.type)
        key = (batch, run.chunk_size, run.window, run.steps, run.clip, h.dtype, kv_dtype, h.device, autocast,
               self.skip_window_key_grads, str(self.chunk_kernel_options), hoisted, self.fingerprint())
        if key not in self._steppers:
            self._steppers = {k: v for k, v in self._steppers.items() if k[-1] == key[-1]}  # stale graphs out
            self._steppers[key] = Stepper(self, batch, run, h.dtype, kv_dtype, h.device, heads, head_dim, attn, rope,
                                          hoisted)
        return self._steppers[key]


class Stepper:
    """One chunk of the TTT quarter without an outer graph, at fixed shapes (batch B, chunk b,
    window W): forward, inner gradient, clipped SGD step, and the roll of every TTT block's
    window; the state lives in static tensors. On a GPU each step replays a CUDA graph (one for
    chunks before position W, whose windows are not full yet, one for the rest). `hoisted`: the
    chunks come with the first TTT block's attention sublayer applied (`FastPath.hoist`), so that
    block holds no window (its entry in `windows` is None)."""

    def __init__(self, fast: FastPath, batch: int, run: Run, dtype, kv_dtype, device, heads: int, head_dim: int,
                 attn: str, rope: tuple, hoisted: bool):
        model = fast.model
        b, W = run.chunk_size, run.window
        self.fast_path, self.run, self.attn, self.rope, self.device = fast, run, attn, rope, device
        self.x = torch.zeros(batch, b, model.config.hidden_size, dtype=dtype, device=device)
        self.targets = torch.full((batch, b), -100, dtype=torch.long, device=device)
        self.apply = torch.zeros(batch, dtype=dtype, device=device)
        self.pos = torch.zeros(batch, b, dtype=torch.long, device=device)
        self.first_valid = torch.zeros(batch, dtype=torch.long, device=device)
        self.lr = torch.zeros((), dtype=torch.float32, device=device)
        self.windows = [None if hoisted and i == 0 else
                        tuple(torch.zeros(batch, heads, W, head_dim, dtype=kv_dtype, device=device) for _ in "kv")
                        for i in range(len(model.ttt_blocks))]
        initial = model.initial_fast_weights(batch, outer_grad=False)
        self.fast = [tuple(w.detach().clone().requires_grad_() for w in layer) for layer in initial]
        self.block_mask = window_block_mask(b, W, device, not fast.skip_window_key_grads) if attn == "flex" \
            else None
        self.graphs: dict[bool, tuple] = {}
        self.pool = None

    def reset(self, lr: float) -> None:
        """A new document: W_0 in every sample's fast weights, empty windows, this call's lr."""
        with torch.no_grad():
            for layer, initial in zip(self.fast, self.fast_path.model.initial_fast_weights(1, outer_grad=False)):
                for w, w0 in zip(layer, initial):
                    w.copy_(w0.expand_as(w))
            for k, v in self.held():
                k.zero_()
                v.zero_()
            self.lr.fill_(lr)

    def held(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (k, v) windows this stepper holds (every TTT block's but a hoisted one's)."""
        return [w for w in self.windows if w is not None]

    def load(self, windows, fast) -> None:
        """Set the state: per TTT block its (k, v) windows [B, heads, W, d] and fast weights."""
        with torch.no_grad():
            for (k, v), (k_new, v_new) in zip(self.windows, windows):  # never hoisted: decoding's updates
                k.copy_(k_new)
                v.copy_(v_new)
            for layer, new in zip(self.fast, fast):
                for w, w_new in zip(layer, new):
                    w.copy_(w_new)

    def step(self, start: int | torch.Tensor, x, targets, apply):
        """The chunk at positions [start, start + b) (`start` an int, or a tensor [B]: one per
        sample) -> (its logits [B, b, V], its (k, v) per TTT block); the returned tensors are
        overwritten by the next step (clone what you keep)."""
        b, W = self.run.chunk_size, self.run.window
        offsets = torch.arange(b, device=self.device)
        with torch.no_grad():
            self.x.copy_(x)
            self.targets.copy_(targets)
            self.apply.copy_(apply)
            if isinstance(start, int):
                self.pos.copy_((start + offsets).expand_as(self.pos))
                self.first_valid.fill_(max(W - start, 0))
            else:
                self.pos.copy_(start[:, None] + offsets)
                self.first_valid.copy_((W - start).clamp(min=0))
        early = not isinstance(start, int) or start < W
        if self.device.type != "cuda":
            return self._body(early)
        if early not in self.graphs:
            self.graphs[early] = self._capture(early)
        graph, outputs = self.graphs[early]
        graph.replay()
        return outputs

    def _body(self, early: bool):
        fp, run = self.fast_path, self.run
        quarter = fp.model.quarter()
        params = {n: p.detach() for n, p in quarter.named_parameters()}
        forward, update = fp.fn("forward", self.device), fp.fn("update", self.device)
        first_valid = self.first_valid if early else None
        per_layer = len(self.fast[0])
        weights = [w for layer in self.fast for w in layer]
        for step in range(run.steps):
            loss, logits_, kvs_ = forward(quarter, params, self.x, self.pos, self.windows, first_valid,
                                          unflatten(weights, per_layer), self.targets, self.attn, self.block_mask,
                                          self.rope, fp.chunk_kernel_options)
            if step == 0:
                logits, kvs = logits_, kvs_
            grads = torch.autograd.grad(loss.sum(), weights)
            with torch.no_grad():
                new, _ = update([w.detach() for w in weights], grads, self.lr, run.clip, self.apply)
            weights = [w.requires_grad_() for w in new]
        with torch.no_grad():
            for w, w_new in zip((w for layer in self.fast for w in layer), weights):
                w.copy_(w_new)
            for window, (k, v) in zip(self.windows, kvs):
                if window is not None:
                    window[0].copy_(_roll(window[0], k))
                    window[1].copy_(_roll(window[1], v))
        return logits.detach(), [(None, None) if k is None else (k.detach(), v.detach()) for k, v in kvs]

    def _capture(self, early: bool):
        """Warm up (compiles), capture one CUDA graph, and restore the state the warm-up changed."""
        state = [t for layer in self.fast for t in layer] + [t for kv in self.held() for t in kv]
        saved = [t.detach().clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(early)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._body(early)
        self.pool = graph.pool()
        with torch.no_grad():
            for t, value in zip(state, saved):
                t.copy_(value)
        return graph, outputs

"""TTTForCausalLM: the TTT-E2E transformer as a Hugging Face causal LM.

Paper: "End-to-End Test-Time Training for Long Context" (Tandon et al. 2025); official JAX code:
github.com/test-time-training/e2e. A transformer with RMSNorm, RoPE, QK-norm, SwiGLU and
sliding-window causal attention (window k). Its last quarter of blocks are TTT blocks with an
extra SwiGLU MLP' run before the block's MLP; every sublayer has a pre-norm and (config
`post_norm`, the official layout) a post-norm:

    h += post(attn(pre h));  h += post'(MLP'(pre' h));  h += post(MLP(pre h))

Only MLP' changes at test time (the fast weights); the MLP is the static "safe storage".

Read top to bottom:
1. the layers: `RMSNorm`, `rotary` / `apply_rotary` (RoPE tables computed once per forward,
   interleaved pairs as the official code or Llama's halves), `Attention` (which attends through
   a function it is given: `testtime.ttt.attention`), `MLP`, `FastMLP`, `Block`;
2. `TTTForCausalLM.forward`: padding handled by moving each row's real tokens to the front
   (so every sample's chunk grid starts at its first real token), the lower blocks once over the
   whole sequence, then the TTT blocks (`TTTQuarter`) chunk by chunk with the inner loop
   (`testtime.ttt.inner`, or its fixed-shape twin `testtime.ttt.fast`), and a cache for decoding
   when asked (`testtime.ttt.generate`).

The static Linear layers have Llama's names (`q_proj k_proj v_proj o_proj gate_proj up_proj
down_proj`), so PEFT adapters target them; the fast weights are plain Parameters
(`fast_mlp.w_gate / w_up / w_down`) used functionally, which PEFT never wraps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from testtime.lm import IGNORE_INDEX, next_token_loss
from testtime.ttt.config import TTTConfig
from testtime.ttt.generate import TTTCache, decode
from testtime.ttt.attention import attend_past
from testtime.ttt.inner import Run, scan_chunks

# ---------------------------------------------------------------------------------------------
# 1. Layers
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (or float64)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary(pos: torch.Tensor, head_dim: int, theta: float, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B or 1, 1, t, head_dim / 2] of RoPE's angles pos * theta^(-2i / head_dim) at
    positions pos [B or 1, t], in `dtype` (float32 at least). Computed once per forward (per chunk,
    per decoded token) and shared by every layer."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=dtype) / head_dim)
    angle = pos.to(dtype)[:, None, :, None] * inv_freq
    return angle.cos(), angle.sin()


def apply_rotary(x: torch.Tensor, rot: tuple[torch.Tensor, torch.Tensor], interleaved: bool) -> torch.Tensor:
    """RoPE on x [B, heads, t, d] with the tables of `rotary`: each pair turned by its angle, in
    float32 (at least) and returned in x's dtype. `interleaved`: the pairs (x_2i, x_2i+1), as the
    official code; else Llama's (x_i, x_i+d/2)."""
    cos, sin = rot
    dtype = torch.promote_types(x.dtype, cos.dtype)
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else x.chunk(2, dim=-1)
    x1, x2 = x1.to(dtype), x2.to(dtype)
    r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    out = torch.stack([r1, r2], dim=-1).flatten(-2) if interleaved else torch.cat([r1, r2], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with QK-norm (RMSNorm over each head's q and k) and RoPE."""

    def __init__(self, config: TTTConfig):
        super().__init__()
        h, self.heads = config.hidden_size, config.num_attention_heads
        self.head_dim = h // self.heads
        self.interleaved = config.rope_interleaved
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, rot, attend):
        """x [B, t, H] -> (output [B, t, H], k, v of these t positions). `rot`: the RoPE tables of
        their positions (`rotary`); `attend(q, k, v)`: the attention against whatever keys come
        before them (`testtime.ttt.attention`). q and k go in v's dtype (under autocast: bf16, as
        SDPA would cast them), so caches hold one dtype."""
        B, t, _ = x.shape
        split = lambda y: y.view(B, t, self.heads, self.head_dim).transpose(1, 2)
        v = split(self.v_proj(x))
        q = apply_rotary(self.q_norm(split(self.q_proj(x))), rot, self.interleaved).to(v.dtype)
        k = apply_rotary(self.k_norm(split(self.k_proj(x))), rot, self.interleaved).to(v.dtype)
        out = attend(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(B, t, -1)), k, v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, config: TTTConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FastMLP(nn.Module):
    """MLP': a SwiGLU whose weights are the initial fast weights W_0, trained by the outer loop.

    `forward(x, fast)` applies per-sample weights fast = (w_gate [B, I, H], w_up [B, I, H],
    w_down [B, H, I]) with batched matmuls in x's dtype (the fast weights themselves stay float32,
    as the official code keeps them: see `TTTForCausalLM.initial_fast_weights`); `fast=None`
    applies W_0 itself (TTT off).
    """

    def __init__(self, config: TTTConfig):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.w_gate = nn.Parameter(torch.empty(i, h))
        self.w_up = nn.Parameter(torch.empty(i, h))
        self.w_down = nn.Parameter(torch.empty(h, i))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w_gate, self.w_up, self.w_down

    def forward(self, x, fast=None):
        if fast is None:
            return F.linear(F.silu(F.linear(x, self.w_gate)) * F.linear(x, self.w_up), self.w_down)
        w_gate, w_up, w_down = (w.to(x.dtype).transpose(1, 2) for w in fast)
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _norm(config: TTTConfig, on: bool = True) -> RMSNorm | None:
    return RMSNorm(config.hidden_size, config.rms_norm_eps) if on else None


class Block(nn.Module):
    """h += post(attn(pre h)); [TTT blocks: h += post'(MLP'(pre' h))]; h += post(MLP(pre h)).

    The pre-norms are `input_layernorm`, `fast_norm` and `post_attention_layernorm` (Llama's name
    for the MLP's pre-norm); the post-norms (config `post_norm`, the official layout) are
    `post_attn_norm`, `post_fast_norm` and `post_mlp_norm`.
    """

    def __init__(self, config: TTTConfig, is_ttt: bool):
        super().__init__()
        post = config.post_norm
        self.input_layernorm = _norm(config)
        self.self_attn = Attention(config)
        self.post_attn_norm = _norm(config, post)
        self.fast_norm = _norm(config, is_ttt)
        self.fast_mlp = FastMLP(config) if is_ttt else None
        self.post_fast_norm = _norm(config, is_ttt and post)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)
        self.post_mlp_norm = _norm(config, post)

    @staticmethod
    def _out(norm: RMSNorm | None, y: torch.Tensor) -> torch.Tensor:
        return y if norm is None else norm(y)

    def attention_sublayer(self, h, rot, attend):
        """h + post(attn(pre h)) -> (h, k, v): the part of the block the fast weights never reach."""
        a, k, v = self.self_attn(self.input_layernorm(h), rot, attend)
        return h + self._out(self.post_attn_norm, a), k, v

    def forward(self, h, rot, attend, fast):
        """-> (h, k, v of these positions); `rot`: their RoPE tables, `attend`: the attention
        against the keys before them (None: the attention sublayer was already applied to h, by
        `attention_sublayer` over the whole sequence; k and v are then None), `fast`: this block's
        per-sample MLP' weights or None."""
        k = v = None
        if attend is not None:
            h, k, v = self.attention_sublayer(h, rot, attend)
        if self.fast_mlp is not None:
            h = h + self._out(self.post_fast_norm, self.fast_mlp(self.fast_norm(h), fast))
        h = h + self._out(self.post_mlp_norm, self.mlp(self.post_attention_layernorm(h)))
        return h, k, v


# ---------------------------------------------------------------------------------------------
# 2. The causal LM
# ---------------------------------------------------------------------------------------------


@dataclass
class TTTCausalLMOutput(ModelOutput):
    """`loss`: mean next-token CE over every labelled token (labels -100 and padding ignored).
    `logits` [B, T, V] in the caller's layout. `cache`: the decoding state (use_cache=True).
    With `return_ttt_stats=True` (and TTT on), per sample and chunk [B, n_chunks] (chunk i = positions
    [i*b, (i+1)*b) counted from the sample's first real token): `ttt_loss_before` (the chunk's
    inner loss with the weights before its update), `ttt_loss_after` (the same chunk recomputed
    with the weights after it), `ttt_grad_norm` (the inner gradient's global norm before
    clipping); NaN where the chunk has no target."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: TTTCache | None = None
    ttt_loss_before: torch.Tensor | None = None
    ttt_loss_after: torch.Tensor | None = None
    ttt_grad_norm: torch.Tensor | None = None


class TTTPreTrainedModel(PreTrainedModel):
    config_class = TTTConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FastMLP):
            for w in module.weights():
                init.normal_(w, mean=0.0, std=self.config.initializer_range)


class TTTForCausalLM(TTTPreTrainedModel, GenerationMixin):
    """TTT-E2E causal LM; `model(input_ids, labels=...)` runs the inner loop (train and eval).

    Call-time overrides (None = the config's): `ttt` (False: plain transformer, MLP' frozen),
    `inner_lr` (replaces the warmed-up lr), `chunk_size`, `inner_steps`;
    `return_ttt_stats=True` adds the per-chunk statistics of `TTTCausalLMOutput`.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _is_stateful = True  # fast weights cannot roll back: no assisted decoding

    def __init__(self, config: TTTConfig):
        super().__init__(config)
        n_lower = config.num_hidden_layers - config.num_ttt_layers
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList([Block(config, is_ttt=i >= n_lower) for i in range(config.num_hidden_layers)]),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.num_lower = n_lower
        self.inner_lr_step: int | None = None
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the forward builds its own TTTCache

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def ttt_blocks(self) -> list[Block]:
        return list(self.model.layers)[self.num_lower:]

    # --- inner learning rate -----------------------------------------------------------------

    def set_inner_lr_step(self, step: int | None) -> None:
        """Tell the model the outer (optimizer) step, for the inner-lr warm-up; None = warm-up over."""
        self.inner_lr_step = step

    def inner_lr_at(self, step: int | None) -> float:
        """inner_lr x (0.1 + 0.9 min(step, W) / W) with W = inner_lr_warmup_steps: linear from
        0.1 x inner_lr at step 0 to inner_lr at step W and after; inner_lr when W = 0 or step is None."""
        lr, warmup = self.config.inner_lr, self.config.inner_lr_warmup_steps
        if not warmup or step is None:
            return lr
        return lr * (0.1 + 0.9 * min(step, warmup) / warmup)

    def run_settings(self, ttt=None, inner_lr=None, chunk_size=None, inner_steps=None) -> Run:
        """The config, the warm-up and the call-time overrides resolved into one `Run`."""
        c = self.config
        chunk = c.chunk_size if chunk_size is None else int(chunk_size)
        if not 1 <= chunk <= c.window_size:
            raise ValueError(f"chunk_size ({chunk}) must be in [1, window_size ({c.window_size})]")
        steps = c.inner_steps if inner_steps is None else int(inner_steps)
        if steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {steps}")
        return Run(ttt=(c.ttt if ttt is None else bool(ttt)) and c.num_ttt_layers > 0,
                   lr=self.inner_lr_at(self.inner_lr_step) if inner_lr is None else float(inner_lr),
                   chunk_size=chunk, steps=steps,
                   window=c.window_size if c.attention == "sliding" else None,
                   clip=c.inner_grad_clip or None, first_order=c.first_order, recompute=c.recompute)

    def initial_fast_weights(self, batch_size: int, outer_grad: bool) -> list[tuple[torch.Tensor, ...]]:
        """W_0 of every TTT block, one copy per sample ([B, ...] views), in float32 at least: under
        bf16 (autocast, or a model cast to bf16) the fast weights, their gradients and their SGD
        update stay float32, as the official code keeps them; only the matmuls run in bf16. Leaves
        that require grad where the outer graph is not kept (or MLP' is frozen): the inner loop
        needs their gradient."""
        fast = []
        for block in self.ttt_blocks:
            ws = []
            for w in block.fast_mlp.weights():
                w_b = w.to(torch.promote_types(w.dtype, torch.float32)).expand(batch_size, *w.shape)
                ws.append(w_b if outer_grad and w.requires_grad else w_b.detach().requires_grad_())
            fast.append(tuple(ws))
        return fast

    def rope_tables(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's cos and sin at positions pos [B or 1, t], once for every layer (float32, or the
        parameters' dtype if wider)."""
        c = self.config
        dtype = torch.promote_types(self.model.embed_tokens.weight.dtype, torch.float32)
        return rotary(pos, c.hidden_size // c.num_attention_heads, c.rope_theta, dtype)

    def quarter(self) -> "TTTQuarter":
        """The TTT blocks, the final norm and the LM head as one module (not registered: it holds
        the model's own layers), what a chunk of the inner loop runs."""
        parts = (*self.ttt_blocks, self.model.norm, self.lm_head)
        held = self.__dict__.get("_quarter")
        if held is None or held.parts != parts:
            held = self.__dict__["_quarter"] = TTTQuarter(self.ttt_blocks, self.model.norm, self.lm_head)
        return held

    @property
    def fast(self):
        """The fast path (`testtime.ttt.fast.FastPath`) of this model, made on first use."""
        if "_fast" not in self.__dict__:
            from testtime.ttt.fast import FastPath

            self.__dict__["_fast"] = FastPath(self)
        return self.__dict__["_fast"]

    # --- forward -------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache: TTTCache | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, ttt: bool | None = None,
                inner_lr: float | None = None, chunk_size: int | None = None, inner_steps: int | None = None,
                return_ttt_stats: bool = False, logits_to_keep: int = 0, **unused):
        """Logits (and the loss against `labels`) with the inner loop run over the sequence.

        With a `cache` (from a previous call with use_cache=True) the tokens continue that state
        one at a time (decoding); `attention_mask` is then ignored. The inner loop needs gradients
        even when the caller turned them off (generate's no_grad, Lightning's inference_mode): it
        runs with them on, and keeps no outer graph unless the caller had grad enabled.
        `logits_to_keep` (as Hugging Face models): 0 returns the logits of every position, N > 0
        those of the last N columns only (what `generate` asks for: a long prefill then holds no
        [T, vocabulary] tensor); the loss always covers every labelled position.
        """
        if any(v for v in unused.values()):
            raise TypeError(f"TTTForCausalLM.forward does not support {sorted(k for k, v in unused.items() if v)}")
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position), got {logits_to_keep!r}")
        run = self.run_settings(ttt, inner_lr, chunk_size, inner_steps)
        outer_grad = torch.is_grad_enabled()
        with torch.inference_mode(False):
            usable = lambda t: t.clone() if t is not None and t.is_inference() else t
            input_ids, attention_mask, labels = usable(input_ids), usable(attention_mask), usable(labels)
            if cache is not None:
                if labels is not None:
                    raise ValueError("labels are not supported together with a cache (decoding)")
                out = TTTCausalLMOutput(logits=decode(self, cache, input_ids, run), cache=cache)
            else:
                out = self._forward_sequence(input_ids, attention_mask, labels, run, outer_grad,
                                             bool(use_cache), return_ttt_stats, logits_to_keep)
        return out if return_dict is not False else out.to_tuple()

    def _forward_sequence(self, input_ids, attention_mask, labels, run: Run, outer_grad: bool,
                          use_cache: bool, stats: bool, logits_to_keep: int) -> TTTCausalLMOutput:
        B, T = input_ids.shape
        device = input_ids.device
        cols = torch.arange(T, device=device)
        # 1. Real tokens first: every sample's positions and chunk grid start at its first real
        #    token, so padding never changes a sample's result. Padding (left or right) must be
        #    one contiguous run of ones per row.
        shift = None
        lengths = torch.full((B,), T, device=device)
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()
            lengths = mask.sum(1)
            shift = mask.int().argmax(1)
            run_of_ones = (cols >= shift[:, None]) & (cols < (shift + lengths)[:, None])
            if not torch.equal(mask, run_of_ones):
                rows = (mask != run_of_ones).any(1).nonzero().flatten().tolist()
                raise ValueError(f"attention_mask must be one contiguous run of ones per row (left or right "
                                 f"padding); rows {rows} are not")
            gather = (cols + shift[:, None]) % T
            input_ids = input_ids.gather(1, gather)
            labels = None if labels is None else labels.gather(1, gather)
        max_len = int(lengths.max()) if shift is not None else T
        valid = cols < lengths[:, None]
        # inner targets: the next token of the sequence itself (what decoding sees), padding excluded
        next_ids = torch.cat([input_ids[:, 1:], input_ids.new_full((B, 1), IGNORE_INDEX)], 1)
        next_ids = next_ids.masked_fill(~torch.cat([valid[:, 1:], valid.new_zeros(B, 1)], 1), IGNORE_INDEX)
        keep = _kept(logits_to_keep if labels is None else 0, shift, T)
        keep_from = None
        if use_cache:
            if int(lengths.min()) == 0:
                raise ValueError("use_cache needs at least one real token per row; some attention_mask rows are all 0")
            keep_from = TTTCache.first_kept_position(int(lengths.min()), T, run)
        fast_path = self.fast.choose(run, device, outer_grad, stats, T)

        # 2. The lower blocks never change: once over the whole sequence.
        pos = cols[None]
        layer_kv = []
        with torch.set_grad_enabled(outer_grad):
            h = self.model.embed_tokens(input_ids)
            rot = self.rope_tables(pos)
            attend = attend_past(pos, None, run.window, run.chunk_size)
            recompute = run.recompute and outer_grad

            def layer(block, h):
                if recompute:
                    return checkpoint(block, h, rot, attend, None, use_reentrant=False)
                return fast_path.sequence_block(block, h, rot, run) if fast_path else block(h, rot, attend, None)

            for block in self.model.layers[: self.num_lower]:
                h, k, v = layer(block, h)
                if use_cache:
                    layer_kv.append((k[:, :, keep_from:], v[:, :, keep_from:]))
        h_ttt = h

        # 3. The TTT blocks: chunk by chunk with the inner loop, or once like the others (TTT off).
        out = {}
        if run.ttt:
            scan = fast_path.scan if fast_path else scan_chunks
            logits, fast, ttt_kv, out = scan(self, h, next_ids, lengths, max_len, run, outer_grad, keep_from,
                                             stats, keep[:2])
            layer_kv += ttt_kv
        else:
            with torch.set_grad_enabled(outer_grad):
                for block in self.ttt_blocks:
                    h, k, v = layer(block, h)
                    if use_cache:
                        layer_kv.append((k[:, :, keep_from:], v[:, :, keep_from:]))
                logits = self.lm_head(self.model.norm(h[:, keep[0]:keep[1]]))
            fast = self.initial_fast_weights(B, outer_grad=False)

        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels.masked_fill(~valid, IGNORE_INDEX))
        cache = None
        if use_cache:
            cache = TTTCache.from_prefill(layer_kv, keep_from, h_ttt.detach(), input_ids, lengths, fast, run,
                                          has_ttt_blocks=self.config.num_ttt_layers > 0)
        logits = _to_caller_layout(logits, keep, shift, T, logits_to_keep)
        return TTTCausalLMOutput(loss=loss, logits=logits, cache=cache, **out)


class TTTQuarter(nn.Module):
    """What the inner loop runs on a chunk: the TTT blocks, the final norm and the LM head."""

    def __init__(self, blocks: list[Block], norm: RMSNorm, lm_head: nn.Linear):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = lm_head
        self.parts = (*blocks, norm, lm_head)

    def forward(self, x, rot, attends, fast):
        """x [B, t, H]: the chunk's output of the lower blocks; `attends`: per TTT block the
        attention against its keys before the chunk; `fast`: per TTT block its (w_gate, w_up,
        w_down). -> (logits [B, t, V], [(k, v)] per TTT block)."""
        h, kvs = x, []
        for block, attend, f in zip(self.blocks, attends, fast):
            h, k, v = block(h, rot, attend, f)
            kvs.append((k, v))
        return self.lm_head(self.norm(h)), kvs


def _kept(logits_to_keep: int, shift: torch.Tensor | None, T: int) -> tuple[int, int, torch.Tensor | None]:
    """(lo, hi, index): the internal (real-tokens-first) positions [lo, hi) whose logits are needed
    for the last `logits_to_keep` columns of the caller's layout (0: all), and per row the index
    into them (None: the last hi - lo as they are)."""
    if not logits_to_keep or logits_to_keep >= T:
        return 0, T, None
    if shift is None:
        return T - logits_to_keep, T, None
    columns = torch.arange(T - logits_to_keep, T, device=shift.device)
    index = (columns[None] - shift[:, None]) % T
    lo, hi = int(index.min()), int(index.max()) + 1
    return lo, hi, index - lo


def _to_caller_layout(logits, keep, shift, T: int, logits_to_keep: int) -> torch.Tensor:
    """The kept logits [B, hi - lo, V] back in the caller's layout: every column (logits_to_keep
    0) or its last logits_to_keep."""
    lo, hi, index = keep
    V = logits.shape[-1]
    if index is not None:
        return logits.gather(1, index[..., None].expand(-1, -1, V))
    if shift is not None:  # every position, rows moved back
        cols = torch.arange(T, device=logits.device)
        logits = logits.gather(1, ((cols[None] - shift[:, None]) % T)[..., None].expand(-1, -1, V))
    return logits[:, -logits_to_keep:] if logits_to_keep else logits

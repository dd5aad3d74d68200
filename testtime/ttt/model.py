"""TTTForCausalLM: the TTT-E2E transformer as a Hugging Face causal LM.

Paper: "End-to-End Test-Time Training for Long Context" (Tandon et al. 2025); official JAX code:
github.com/test-time-training/e2e. A transformer with RMSNorm, RoPE, QK-norm, SwiGLU and
sliding-window causal attention (window k). Its last quarter of blocks are TTT blocks with an
extra SwiGLU MLP' run before the block's MLP:

    h += attn(norm h);  h += MLP'(norm' h);  h += MLP(norm h)

Only MLP' changes at test time (the fast weights); the MLP is the static "safe storage".

Read top to bottom:
1. the layers: `RMSNorm`, `rope`, `attention` (by positions, so one function serves the
   one-pass forward, the chunk scan and the KV cache), `Attention`, `MLP`, `FastMLP`, `Block`;
2. `TTTForCausalLM.forward`: padding handled by moving each row's real tokens to the front
   (so every sample's chunk grid starts at its first real token), the lower blocks once over the
   whole sequence, then the TTT blocks chunk by chunk with the inner loop (`testtime.ttt.inner`),
   and a cache for decoding when asked (`testtime.ttt.generate`).

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
from testtime.ttt.inner import KV, Run, scan_chunks

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


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x [B, heads, t, d] at positions pos [B or 1, t], Llama's layout: the
    pair (x_i, x_{i + d/2}) is rotated by the angle pos * theta^(-2i/d)."""
    d = x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=dtype) / d)
    angle = pos.to(dtype)[:, None, :, None] * inv_freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [B or 1, 1, tq, tk]: the query at position p sees the key at position j iff
    0 <= p - j < window (every j <= p when window is None) and the key slot is not empty."""
    dist = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (dist >= 0) & (k_pos >= 0)[:, None, :]
    if window is not None:
        ok = ok & (dist < window)
    return ok[:, None]


def attention(q, k, v, q_pos, k_pos, window: int | None, block: int) -> torch.Tensor:
    """Causal (sliding-window) softmax attention by positions, through SDPA.

    Up to `block` queries take one SDPA call with the [tq, tk] mask of `visible` (a chunk against
    its window: [b, k - 1 + b]; a decoded token against its cache). A longer sequence attending to
    itself (the one-pass forward of the lower blocks) is cut into blocks of `block` queries, each
    against the keys it can see, so the mask is never [T, T]; full attention uses SDPA's is_causal.
    """
    tq = q.shape[2]
    if tq <= block:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(q_pos, k_pos, window))
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = []
    for s in range(0, tq, block):
        e, lo = min(s + block, tq), max(0, s - window + 1)
        mask = visible(q_pos[:, s:e], k_pos[:, lo:e], window)
        out.append(F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e], attn_mask=mask))
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    """Multi-head attention with QK-norm (RMSNorm over each head's q and k) and RoPE."""

    def __init__(self, config: TTTConfig):
        super().__init__()
        h, self.heads = config.hidden_size, config.num_attention_heads
        self.head_dim = h // self.heads
        self.theta = config.rope_theta
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x, pos, past: KV | None, window: int | None, block: int):
        """x [B, t, H] at positions pos -> (output [B, t, H], k, v of these t positions).
        `past`: the keys before them (a previous chunk's window, or a decoding cache)."""
        B, t, _ = x.shape
        split = lambda y: y.view(B, t, self.heads, self.head_dim).transpose(1, 2)
        q = rope(self.q_norm(split(self.q_proj(x))), pos, self.theta)
        k = rope(self.k_norm(split(self.k_proj(x))), pos, self.theta)
        v = split(self.v_proj(x))
        keys, values, k_pos = k, v, pos
        if past is not None:
            keys, values = torch.cat([past.k, k], 2), torch.cat([past.v, v], 2)
            k_pos = torch.cat([past.pos.expand(pos.shape[0], -1), pos.expand(past.pos.shape[0], -1)], 1)
        out = attention(q, keys, values, pos, k_pos, window, block)
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
    w_down [B, H, I]) with batched matmuls; `fast=None` applies W_0 itself (TTT off).
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
        w_gate, w_up, w_down = fast
        return (F.silu(x @ w_gate.transpose(1, 2)) * (x @ w_up.transpose(1, 2))) @ w_down.transpose(1, 2)


class Block(nn.Module):
    """h += attn(norm h); [TTT blocks: h += MLP'(norm' h)]; h += MLP(norm h)."""

    def __init__(self, config: TTTConfig, is_ttt: bool):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = Attention(config)
        self.fast_norm = RMSNorm(config.hidden_size, eps) if is_ttt else None
        self.fast_mlp = FastMLP(config) if is_ttt else None
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = MLP(config)

    def forward(self, h, pos, past: KV | None, fast, window: int | None, block: int):
        """-> (h, k, v of these positions); `fast`: this block's per-sample MLP' weights or None."""
        a, k, v = self.self_attn(self.input_layernorm(h), pos, past, window, block)
        h = h + a
        if self.fast_mlp is not None:
            h = h + self.fast_mlp(self.fast_norm(h), fast)
        h = h + self.mlp(self.post_attention_layernorm(h))
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
        """W_0 of every TTT block, one copy per sample ([B, ...] views). Leaves that require grad
        where the outer graph is not kept (or MLP' is frozen): the inner loop needs their gradient."""
        fast = []
        for block in self.ttt_blocks:
            ws = []
            for w in block.fast_mlp.weights():
                w_b = w.expand(batch_size, *w.shape)
                ws.append(w_b if outer_grad and w.requires_grad else w_b.detach().requires_grad_())
            fast.append(tuple(ws))
        return fast

    # --- forward -------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, cache: TTTCache | None = None,
                use_cache: bool | None = None, return_dict: bool | None = None, ttt: bool | None = None,
                inner_lr: float | None = None, chunk_size: int | None = None, inner_steps: int | None = None,
                return_ttt_stats: bool = False, **unused):
        """Logits (and the loss against `labels`) with the inner loop run over the sequence.

        With a `cache` (from a previous call with use_cache=True) the tokens continue that state
        one at a time (decoding); `attention_mask` is then ignored. The inner loop needs gradients
        even when the caller turned them off (generate's no_grad, Lightning's inference_mode): it
        runs with them on, and keeps no outer graph unless the caller had grad enabled.
        """
        if any(v for v in unused.values()):
            raise TypeError(f"TTTForCausalLM.forward does not support {sorted(k for k, v in unused.items() if v)}")
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
                                             bool(use_cache), return_ttt_stats)
        return out if return_dict is not False else out.to_tuple()

    def _forward_sequence(self, input_ids, attention_mask, labels, run: Run, outer_grad: bool,
                          use_cache: bool, stats: bool) -> TTTCausalLMOutput:
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
        pos = cols[None]
        keep_from = None
        if use_cache:
            if int(lengths.min()) == 0:
                raise ValueError("use_cache needs at least one real token per row; some attention_mask rows are all 0")
            keep_from = TTTCache.first_kept_position(int(lengths.min()), T, run)

        # 2. The lower blocks never change: once over the whole sequence.
        layer_kv = []
        with torch.set_grad_enabled(outer_grad):
            h = self.model.embed_tokens(input_ids)
            recompute = run.recompute and outer_grad
            for block in self.model.layers[: self.num_lower]:
                args = (h, pos, None, None, run.window, run.chunk_size)
                h, k, v = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
                if use_cache:
                    layer_kv.append((k[:, :, keep_from:], v[:, :, keep_from:]))
        h_ttt = h

        # 3. The TTT blocks: chunk by chunk with the inner loop, or once like the others (TTT off).
        out = {}
        if run.ttt:
            logits, fast, ttt_kv, out = scan_chunks(self, h, next_ids, lengths, max_len, run, outer_grad,
                                                    keep_from, stats)
            layer_kv += ttt_kv
        else:
            with torch.set_grad_enabled(outer_grad):
                for block in self.ttt_blocks:
                    h, k, v = block(h, pos, None, None, run.window, run.chunk_size)
                    if use_cache:
                        layer_kv.append((k[:, :, keep_from:], v[:, :, keep_from:]))
                logits = self.lm_head(self.model.norm(h))
            fast = self.initial_fast_weights(B, outer_grad=False)

        loss = None
        if labels is not None:
            loss = next_token_loss(logits, labels.masked_fill(~valid, IGNORE_INDEX))
        cache = None
        if use_cache:
            cache = TTTCache.from_prefill(layer_kv, keep_from, h_ttt.detach(), input_ids, lengths, fast, run,
                                          has_ttt_blocks=self.config.num_ttt_layers > 0)
        if shift is not None:  # back to the caller's layout
            back = (cols[None] - shift[:, None]) % T
            logits = logits.gather(1, back[..., None].expand(-1, -1, logits.shape[-1]))
        return TTTCausalLMOutput(loss=loss, logits=logits, cache=cache, **out)

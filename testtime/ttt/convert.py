"""Weights in the official layout (github.com/test-time-training/e2e) to and from `TTTForCausalLM`.

The official model is an Equinox tree; its parameters, flattened to names joined by "." (or "/",
as an Orbax checkpoint's tree paths are), are:

    language_model.model.wte.weight                                  [V, H]
    language_model.model.ln_f.weight                                 [H]
    language_model.lm_head.weight                                    [H, V]   (untied only)
    language_model.model.h.blocks.<norm>.weight                      [L, H]   seq_norm, seq_post_norm,
                                                                              ffn_norm, ffn_post_norm
    language_model.model.h.blocks.seq_modeling_block.<w>.weight      [L, H, H]  wq wk wv wo, [in, out]
    language_model.model.h.blocks.seq_modeling_block.<n>.weight      [L, d]   q_norm, k_norm
    language_model.model.h.blocks.feed_forward.<w>.weight            [L, ...]  w1 (gate) and w3 (up)
                                                                              [H, I], w2 (down) [I, H]
    language_model.model.h.prime_storage.feed_forward_prime.<w>.weight  [S, ...]  MLP' of the last S
    language_model.model.h.prime_storage.<norm>.weight               [S, H]   ffn_prime_norm,
                                                                              ffn_prime_post_norm

Layers are stacked on the first axis (the official code vmaps over them); matrices are [in, out]
where PyTorch's Linear holds [out, in]. Heads split the projections as (head, head_dim) in both,
and RoPE rotates the interleaved pairs in both (`rope_interleaved=True`), so converting is
renaming, unstacking and transposing; it needs `post_norm=True` (the official blocks have them).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from testtime.ttt.config import TTTConfig

_BLOCKS = "language_model.model.h.blocks."
_PRIME = "language_model.model.h.prime_storage."
# ours (per layer, after "model.layers.<i>.") -> the official block parameter, transposed or not
_BLOCK_MAP = {
    "input_layernorm.weight": ("seq_norm.weight", False),
    "post_attn_norm.weight": ("seq_post_norm.weight", False),
    "post_attention_layernorm.weight": ("ffn_norm.weight", False),
    "post_mlp_norm.weight": ("ffn_post_norm.weight", False),
    "self_attn.q_proj.weight": ("seq_modeling_block.wq.weight", True),
    "self_attn.k_proj.weight": ("seq_modeling_block.wk.weight", True),
    "self_attn.v_proj.weight": ("seq_modeling_block.wv.weight", True),
    "self_attn.o_proj.weight": ("seq_modeling_block.wo.weight", True),
    "self_attn.q_norm.weight": ("seq_modeling_block.q_norm.weight", False),
    "self_attn.k_norm.weight": ("seq_modeling_block.k_norm.weight", False),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", True),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", True),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", True),
}
_PRIME_MAP = {
    "fast_norm.weight": ("ffn_prime_norm.weight", False),
    "post_fast_norm.weight": ("ffn_prime_post_norm.weight", False),
    "fast_mlp.w_gate": ("feed_forward_prime.w1.weight", True),
    "fast_mlp.w_up": ("feed_forward_prime.w3.weight", True),
    "fast_mlp.w_down": ("feed_forward_prime.w2.weight", True),
}


def _check(config: TTTConfig) -> None:
    if not (config.post_norm and config.rope_interleaved):
        raise ValueError("the official layout has post-norms and interleaved RoPE: the config needs post_norm=True "
                         f"and rope_interleaved=True (got {config.post_norm} and {config.rope_interleaved})")


def from_official(params: Mapping[str, object], config: TTTConfig) -> dict[str, torch.Tensor]:
    """The state dict of `TTTForCausalLM(config)` from official parameters (arrays or tensors,
    names as in this module's docstring); missing or misshapen parameters raise naming them."""
    _check(config)
    flat = {name.replace("/", "."): torch.as_tensor(np.asarray(value, dtype=np.float32)) for name, value in
            params.items()}
    missing = []

    def get(name: str, index: int | None, transpose: bool) -> torch.Tensor | None:
        if name not in flat:
            missing.append(name)
            return None
        value = flat[name] if index is None else flat[name][index]
        return value.T.contiguous() if transpose else value

    L, S = config.num_hidden_layers, config.num_ttt_layers
    state = {"model.embed_tokens.weight": get("language_model.model.wte.weight", None, False),
             "model.norm.weight": get("language_model.model.ln_f.weight", None, False)}
    state["lm_head.weight"] = state["model.embed_tokens.weight"] if config.tie_word_embeddings else \
        get("language_model.lm_head.weight", None, True)
    for i in range(L):
        for ours, (theirs, transpose) in _BLOCK_MAP.items():
            state[f"model.layers.{i}.{ours}"] = get(_BLOCKS + theirs, i, transpose)
    for j in range(S):
        for ours, (theirs, transpose) in _PRIME_MAP.items():
            state[f"model.layers.{L - S + j}.{ours}"] = get(_PRIME + theirs, j, transpose)
    if missing:
        raise KeyError(f"official parameters missing: {', '.join(missing)}")
    return state


def to_official(model) -> dict[str, np.ndarray]:
    """A `TTTForCausalLM`'s parameters in the official layout (float32 arrays), e.g. to run the
    official code on them."""
    config = model.config
    _check(config)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    L, S = config.num_hidden_layers, config.num_ttt_layers
    out = {"language_model.model.wte.weight": state["model.embed_tokens.weight"],
           "language_model.model.ln_f.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["language_model.lm_head.weight"] = state["lm_head.weight"].T
    for ours, (theirs, transpose) in _BLOCK_MAP.items():
        layers = [state[f"model.layers.{i}.{ours}"] for i in range(L)]
        out[_BLOCKS + theirs] = torch.stack([w.T if transpose else w for w in layers])
    for ours, (theirs, transpose) in _PRIME_MAP.items() if S else ():
        layers = [state[f"model.layers.{L - S + j}.{ours}"] for j in range(S)]
        out[_PRIME + theirs] = torch.stack([w.T if transpose else w for w in layers])
    return {k: v.contiguous().numpy() for k, v in out.items()}

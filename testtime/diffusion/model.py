"""A small masked diffusion LM as a Hugging Face model, its tokenizer, and its training losses.

The model is what LLaDA (Nie et al. 2025, "Large Language Diffusion Models",
github.com/ML-GSAI/LLaDA) calls a mask predictor: a transformer *encoder* (no causal mask) that
reads a sequence in which some tokens are the MASK token and predicts every position. It is an
ordinary Hugging Face model: `MaskedDiffusionConfig` (model_type "masked_diffusion_lm") and
`MaskedDiffusionLM` are registered with AutoConfig, AutoModel and AutoModelForMaskedLM when this
module is imported, so `save_pretrained` / `AutoModel.from_pretrained(folder)` work as usual.
`forward(input_ids, attention_mask=None)` returns a `MaskedLMOutput` whose `.logits` are
[batch, length, vocab]; padded keys are never attended to and positions count real tokens only,
so a left-padded row sees exactly what it would see alone.

Presets (`PRESETS`, `build_model(preset)`): `tiny` (2 layers, 32 wide: tests, seconds on a CPU)
and `small` (6 layers, 256 wide, ~5M parameters: the size meant for difficulty-1 arithmetic,
trained in minutes on a GPU). Dropout (`hidden_dropout`, `attention_dropout`) lives in `nn.Dropout` modules, so
test-time augmentation by dropout (`tta_use_dropout`) can switch exactly those on.

Training losses (MDLM: Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language
Models"; LLaDA's guidelines), pure functions of aligned tensors:

- `forward_process`: t ~ U(0, 1) per row, each token masked with p = (1 - eps) t + eps.
- `pretraining_loss`: sum over masked tokens of CE / p, divided by batch x length.
- `sft_loss`: the prompt is never masked; each row's sum is divided by its answer length,
  then averaged over rows.
- `diffusion_loss(model, input_ids, mask_id, labels=None, ...)`: both in one call.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import MaskedLMOutput

from testtime.lm import IGNORE_INDEX
from testtime.tiny import build_tokenizer

MODEL_TYPE = "masked_diffusion_lm"
MASK_TOKEN = "<|mask|>"


class MaskedDiffusionConfig(PreTrainedConfig):
    """Configuration of `MaskedDiffusionLM`; `mask_token_id` is the id the model is trained to fill."""

    model_type = MODEL_TYPE

    vocab_size: int = 128
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask_token_id={self.mask_token_id} is outside the vocabulary "
                             f"(vocab_size={self.vocab_size})")


PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=256, hidden_dropout=0.1),
    "small": dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, intermediate_size=1024,
                  max_position_embeddings=512, hidden_dropout=0.1),
}


class _Block(nn.Module):
    """Pre-norm transformer block with bidirectional attention (a key-padding mask only)."""

    def __init__(self, config: MaskedDiffusionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_dropout = nn.Dropout(config.attention_dropout)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.intermediate_size), nn.GELU(),
                                 nn.Linear(config.intermediate_size, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, h: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = self.qkv(self.attn_norm(h)).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # The dropout module's own training flag decides, so switching nn.Dropout modules on
        # (test-time augmentation) also switches attention dropout on.
        p = self.attn_dropout.p if self.attn_dropout.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p)
        h = h + self.dropout(self.out_proj(a.transpose(1, 2).reshape(batch, length, width)))
        return h + self.dropout(self.mlp(self.mlp_norm(h)))


class MaskedDiffusionLM(PreTrainedModel):
    """Bidirectional transformer mask predictor: token ids (some = MASK) -> logits at every position."""

    config_class = MaskedDiffusionConfig
    base_model_prefix = "diffusion"
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}
    _no_split_modules = ["_Block"]

    def __init__(self, config: MaskedDiffusionConfig):
        super().__init__(config)
        if config.mask_token_id is None:
            raise ValueError("MaskedDiffusionConfig.mask_token_id is None; a masked diffusion LM needs the id "
                             "of its MASK token (see build_diffusion_tokenizer)")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(_Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs) -> MaskedLMOutput:
        """Logits [B, L, V]. `attention_mask` (1 = token, 0 = padding) hides padded keys; positions
        count real tokens only (0 at each row's first token), so padding on either side is invisible."""
        batch, length = input_ids.shape
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
            else:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if int(position_ids.max()) >= self.config.max_position_embeddings:
            raise ValueError(f"sequence needs position {int(position_ids.max())} but max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            key_mask = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, L]: True = may be attended to
        h = self.embed_dropout(self.embed_tokens(input_ids) + self.embed_positions(position_ids))
        for layer in self.layers:
            h = layer(h, key_mask)
        return MaskedLMOutput(logits=self.lm_head(self.norm(h)))


AutoConfig.register(MODEL_TYPE, MaskedDiffusionConfig, exist_ok=True)
AutoModel.register(MaskedDiffusionConfig, MaskedDiffusionLM, exist_ok=True)
AutoModelForMaskedLM.register(MaskedDiffusionConfig, MaskedDiffusionLM, exist_ok=True)


def build_diffusion_tokenizer(tokenizer: PreTrainedTokenizerFast | None = None) -> PreTrainedTokenizerFast:
    """The project's character tokenizer (`testtime.tiny.build_tokenizer`) with a MASK token.

    A tokenizer that already has a mask token is returned unchanged; otherwise a copy of it (the
    caller's tokenizer is left alone) gets `<|mask|>` as a special token with the next id, so
    decoding with `skip_special_tokens=True` drops it.
    """
    if tokenizer is None:
        tokenizer = build_tokenizer()
    elif tokenizer.mask_token_id is None:
        tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer


def build_config(preset: str = "tiny", tokenizer: PreTrainedTokenizerFast | None = None,
                 **overrides) -> MaskedDiffusionConfig:
    """A preset's config sized to `tokenizer` (vocabulary, MASK, pad and EOS ids); `overrides` win."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    tokenizer = build_diffusion_tokenizer(tokenizer)
    fields = dict(PRESETS[preset], vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return MaskedDiffusionConfig(**{**fields, **overrides})


def build_model(preset: str = "tiny", tokenizer: PreTrainedTokenizerFast | None = None, seed: int = 0,
                **overrides) -> tuple[MaskedDiffusionLM, PreTrainedTokenizerFast]:
    """A randomly initialised model of `preset` (deterministic in `seed`, eval mode) and its tokenizer."""
    tokenizer = build_diffusion_tokenizer(tokenizer)
    config = build_config(preset, tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedDiffusionLM(config)
    return model.eval(), tokenizer


# --- training losses ----------------------------------------------------------------------------

def forward_process(input_ids: torch.Tensor, mask_id: int, eps: float = 1e-3,
                    maskable: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corrupt a batch: `(noisy_ids, masked, p_mask)`, each [B, L].

    Per row t ~ U(0, 1) and p = (1 - eps) t + eps (eps keeps p > 0, so the 1 / p weight of the
    loss stays finite); each token with `maskable` True (default: all) becomes `mask_id` with
    probability p, independently. `generator` makes the draw reproducible.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    batch, length = input_ids.shape
    t = torch.rand(batch, device=input_ids.device, generator=generator)
    p_mask = ((1 - eps) * t + eps)[:, None].expand(batch, length)
    masked = torch.rand(batch, length, device=input_ids.device, generator=generator) < p_mask
    if maskable is not None:
        masked &= maskable.bool()
    return torch.where(masked, mask_id, input_ids), masked, p_mask


def _masked_ce(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor):
    """CE / p at each masked position, [B, L] (0 elsewhere); float32 whatever the logits dtype."""
    weighted = torch.zeros(masked.shape, dtype=torch.float32, device=logits.device)
    if masked.any():
        ce = F.cross_entropy(logits[masked].float(), targets[masked], reduction="none")
        weighted = weighted.masked_scatter(masked, ce / p_mask[masked].float())
    return weighted + logits.sum() * 0.0  # keeps a gradient path when nothing is masked


def pretraining_loss(logits: torch.Tensor, input_ids: torch.Tensor, masked: torch.Tensor,
                     p_mask: torch.Tensor) -> torch.Tensor:
    """LLaDA / MDLM pretraining loss: `sum_{masked i} CE(logits_i, x_i) / p_i / (B * L)`.

    The 1 / p weight makes it an upper bound on the negative log-likelihood (MDLM's ELBO with a
    linear schedule); dividing by B * L (not by the number of masked tokens) keeps that weight.
    L is the padded length: LLaDA packs its pretraining data, so it has no padding to discount.
    """
    batch, length = input_ids.shape
    return _masked_ce(logits, input_ids, masked, p_mask).sum() / (batch * length)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """LLaDA's SFT loss: `mean_b [ sum_{masked i in row b} CE_i / p_i / answer_length_b ]`.

    `labels` are the clean ids with IGNORE_INDEX (-100) on positions that carry no loss (the
    prompt, padding); answer_length_b counts row b's other positions. `masked` must lie inside the
    answer (build it with `forward_process(..., maskable=labels != IGNORE_INDEX)`): the prompt is
    never masked. LLaDA pads answers with EOS and keeps those EOS in the answer, which teaches
    the model to fill the unused generation length with EOS; label them to do the same.
    """
    answer = labels != IGNORE_INDEX
    if bool((masked & ~answer).any()):
        raise ValueError("sft_loss: some masked positions have label IGNORE_INDEX (prompt or padding); "
                         "mask only answer positions (forward_process(..., maskable=labels != IGNORE_INDEX))")
    answer_length = answer.sum(-1, keepdim=True).clamp_min(1)
    per_token = _masked_ce(logits, labels.clamp_min(0), masked, p_mask) / answer_length
    return per_token.sum() / labels.shape[0]


def diffusion_loss(model, input_ids: torch.Tensor, mask_id: int, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, eps: float = 1e-3,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """Corrupt, predict and score a batch in one call: `(loss, info)`.

    Without `labels`: pretraining (every real token maskable, `pretraining_loss`). With `labels`
    (IGNORE_INDEX on prompt / padding): SFT (`sft_loss`). `info` holds `masked_fraction`, the share
    of loss-carrying tokens that were masked (a detached float tensor), for logging.
    """
    if labels is None:
        maskable = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    else:
        maskable = labels != IGNORE_INDEX
    noisy, masked, p_mask = forward_process(input_ids, mask_id, eps, maskable, generator)
    logits = model(input_ids=noisy, attention_mask=attention_mask).logits
    if labels is None:
        loss = pretraining_loss(logits, input_ids, masked, p_mask)
    else:
        loss = sft_loss(logits, labels, masked, p_mask)
    fraction = masked.sum() / maskable.sum().clamp_min(1)
    return loss, {"masked_fraction": fraction.detach().float()}


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["MODEL_TYPE", "MASK_TOKEN", "MaskedDiffusionConfig", "MaskedDiffusionLM", "PRESETS",
           "build_diffusion_tokenizer", "build_config", "build_model", "forward_process", "pretraining_loss",
           "sft_loss", "diffusion_loss", "parameter_count"]

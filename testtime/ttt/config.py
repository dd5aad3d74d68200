"""TTTConfig: the settings of a TTT-E2E model, and its size presets.

TTT-E2E ("End-to-End Test-Time Training for Long Context", Tandon et al. 2025; official JAX code
at github.com/test-time-training/e2e) is a sliding-window transformer whose last quarter of
blocks carry an extra SwiGLU MLP' that keeps training on the context while the model reads it.

Width rule of the presets. A TTT model holds L + n' SwiGLU MLPs (n' = ceil(L x
`ttt_layer_fraction`) TTT blocks carry MLP' beside their MLP, every MLP' as wide as the MLPs) where
the same-size model without TTT holds L. To keep the parameter count of that model, every MLP of
the TTT model is narrowed to

    intermediate_size = round(base_width x L / (L + n') / multiple) x multiple

(`matched_intermediate_size`). The official 125M model: 2048 x 12 / 15 = 1638.4 -> 1664. A preset
names the width of the model WITHOUT TTT; `from_preset` narrows it when the model has TTT blocks
and leaves it when `ttt_layer_fraction=0` (the parameter-matched baseline, no MLP' at all).
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

ATTENTION = ("sliding", "full")
FAST_PATH = ("auto", "on", "off")

# name -> (architecture, width of the model without TTT, rounding multiple of the TTT width)
PRESETS = {
    # tests and smoke runs: ~10K parameters, milliseconds on a CPU
    "tiny": (dict(vocab_size=128, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  window_size=8, chunk_size=4, inner_lr_warmup_steps=0), 48, 8),
    # minutes of meta-training on one GPU
    "small": (dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                   window_size=512, chunk_size=128, inner_lr_warmup_steps=100), 1024, 128),
    # the paper's 125M model (official config: 12 layers, 768 wide, 12 heads, MLP 1664 with TTT
    # and 2048 without, window 8192, chunk 1024, inner lr warm-up over 480 of 4800 outer steps)
    "125m": (dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  window_size=8192, chunk_size=1024, inner_lr_warmup_steps=480), 2048, 128),
}


def num_ttt_layers(num_hidden_layers: int, ttt_layer_fraction: float) -> int:
    """How many of the last blocks are TTT blocks: ceil(L x fraction) (12 x 0.25 -> 3)."""
    return math.ceil(num_hidden_layers * ttt_layer_fraction - 1e-9)


def matched_intermediate_size(base_width: int, num_hidden_layers: int, num_ttt: int, multiple: int = 128) -> int:
    """MLP width of a TTT model with as many MLP weights as the model of width `base_width` without TTT."""
    width = base_width * num_hidden_layers / (num_hidden_layers + num_ttt)
    return max(multiple, round(width / multiple) * multiple)


class TTTConfig(PretrainedConfig):
    """Configuration of `TTTForCausalLM`. The defaults are the paper's 125M model.

    Architecture: `vocab_size`, `hidden_size`, `intermediate_size` (every SwiGLU MLP, MLP'
    included), `num_hidden_layers`, `num_attention_heads` (head dim = hidden / heads, even),
    `rope_theta`, `rms_norm_eps`, `tie_word_embeddings`, `initializer_range`. As the official code:
    `post_norm` adds an RMSNorm on the output of every sublayer (attention, MLP', MLP) besides its
    pre-norm, and `rope_interleaved` rotates the pairs (2i, 2i + 1) of each head; false gives
    pre-norms only and Llama's pairs (i, i + d/2), the layout of models saved before these fields
    existed (a saved config without them loads that way).
    Attention: `attention` "sliding" (window of `window_size` = k positions, the query's own
    included) or "full" (the long-context baseline).
    TTT: the last `ttt_layer_fraction` of the blocks carry MLP' (0 = none: a plain transformer).
    `ttt` false runs the same network with MLP' frozen at its initial weights. The inner loop
    takes `inner_steps` SGD steps per chunk of `chunk_size` = b tokens (b <= k, so a chunk's tokens
    see each other) with lr `inner_lr` (warmed up from 0.1 x inner_lr over
    `inner_lr_warmup_steps` outer steps, 0 = none) and per-sample global gradient norm clip
    `inner_grad_clip` (None = no clip). `first_order` drops the second-order terms of the
    meta-gradient; `recompute` recomputes activations per chunk (and per lower block) in the
    backward pass to bound memory.
    Speed: `fast_path` "auto" runs the fixed-shape compiled path of `testtime.ttt.fast` on a GPU
    and the plain path elsewhere, "on" the fixed-shape path on any device, "off" the plain path
    only; both compute the same function.
    """

    model_type = "ttt_e2e"

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 1664
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    window_size: int = 8192
    chunk_size: int = 1024
    attention: str = "sliding"
    ttt: bool = True
    ttt_layer_fraction: float = 0.25
    inner_lr: float = 1.0
    inner_lr_warmup_steps: int = 480
    inner_grad_clip: float | None = 1.0
    inner_steps: int = 1
    first_order: bool = False
    recompute: bool = False
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    post_norm: bool = True
    rope_interleaved: bool = True
    fast_path: str = "auto"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.chunk_size > self.window_size:
            raise ValueError(f"chunk_size ({self.chunk_size}) must not exceed window_size ({self.window_size}): "
                             "the tokens of a chunk must see each other through attention")
        if self.hidden_size % self.num_attention_heads or (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) / num_attention_heads ({self.num_attention_heads}) "
                             "must be an even integer (the RoPE head dimension)")
        if not 0.0 <= self.ttt_layer_fraction <= 1.0:
            raise ValueError(f"ttt_layer_fraction must be in [0, 1], got {self.ttt_layer_fraction}")
        if self.inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")
        if self.fast_path not in FAST_PATH:
            raise ValueError(f"fast_path must be one of {FAST_PATH}, got {self.fast_path!r}")
        if self.inner_lr_warmup_steps < 0:
            raise ValueError(f"inner_lr_warmup_steps must be >= 0, got {self.inner_lr_warmup_steps}")

    # what a config.json written before a field existed meant by its absence
    LEGACY_DEFAULTS = {"post_norm": False, "rope_interleaved": False}

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "TTTConfig":
        """As `PretrainedConfig.from_dict`; a saved config without `post_norm` / `rope_interleaved`
        (written before they existed) describes the pre-norm, half-split-RoPE model it was saved as."""
        return super().from_dict({**cls.LEGACY_DEFAULTS, **config_dict}, **kwargs)

    @property
    def num_ttt_layers(self) -> int:
        return num_ttt_layers(self.num_hidden_layers, self.ttt_layer_fraction)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TTTConfig":
        """A preset ("tiny", "small", "125m") with `overrides` on top.

        Unless `intermediate_size` is overridden, the MLP width follows the width rule of this
        module: the preset's width narrowed for the TTT blocks, or kept with
        `ttt_layer_fraction=0`. `vocab_size` must match your tokenizer (presets other than
        "tiny" leave the default).
        """
        if name not in PRESETS:
            raise ValueError(f"unknown TTT preset {name!r}; choose one of {', '.join(PRESETS)}")
        arch, base_width, multiple = PRESETS[name]
        values = {**arch, **overrides}
        if "intermediate_size" not in overrides:
            layers = values["num_hidden_layers"]
            n_ttt = num_ttt_layers(layers, values.get("ttt_layer_fraction", cls.ttt_layer_fraction))
            values["intermediate_size"] = (matched_intermediate_size(base_width, layers, n_ttt, multiple)
                                           if n_ttt else base_width)
        return cls(**values)

"""Tiny random causal LMs and a character-level chat tokenizer, built offline in seconds.

They stand in for real checkpoints wherever speed matters more than quality: the tests, the
`configs/*/tiny.yaml` recipes (through the loader's `tiny-random-<family>` alias) and smoke runs.
The tokenizer is built with the `tokenizers` library, so nothing comes from a model hub.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, the template SmolLM2 and Qwen2 use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

FAMILIES = ("llama", "qwen2", "gpt2", "opt", "bloom", "gpt_neox")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII with ChatML special tokens."""
    chars = sorted(set(string.printable))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token=None,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: str, vocab_size: int, pad_id: int, eos_id: int) -> PretrainedConfig:
    """A 2-layer, 32-wide config of the given architecture family."""
    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id)
    if family == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=1024, **common)
    if family == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=32, max_position_embeddings=1024, **common)
    if family == "bloom":
        return BloomConfig(hidden_size=32, n_layer=2, n_head=4, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=1024, **common)
    raise ValueError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")


def build_tiny_model(family: str = "llama", seed: int = 0, tokenizer: PreTrainedTokenizerFast | None = None):
    """A tiny randomly initialised causal LM (deterministic in `seed`) and its tokenizer."""
    tokenizer = tokenizer or build_tokenizer()
    config = tiny_config(family, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def save_tiny_model(family: str, path, seed: int = 0) -> None:
    """Write a tiny model and its tokenizer as an ordinary Hugging Face folder."""
    model, tokenizer = build_tiny_model(family, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)

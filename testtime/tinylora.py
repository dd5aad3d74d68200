"""Few-parameter adapters through PEFT: TinyLoRA, with LoRA and VeRA one field away.

TinyLoRA (Morris et al. 2026, "Learning to Reason in 13 Parameters", arXiv:2602.04118) adapts a
frozen weight W through its rank-r truncated SVD and a tiny trainable vector v in R^u:

    W' = W + U S (sum_i v_i P_i) V^T        P in R^{u x r x r} fixed random, U, S, V frozen

and lets modules share (tie) v, so the whole model trains u parameters when every module shares
one vector. PEFT's `TinyLoraConfig` implements it (with S split as sqrt(S) on each side, and v = 0
at the start, so a new adapter changes nothing); this module only builds the configs, counts what
trains, and exports. Baselines: LoRA (Hu et al. 2021: W' = W + (alpha / r) B A, A and B trained)
and VeRA (Kopiczko et al. 2024: W' = W + diag(b) B diag(d) A, frozen random A, B shared by all
modules, the vectors b and d trained).

Trainable parameters, for the N adapted modules with input / output sizes (in_k, out_k):

    tinylora:  u * max(1, round(N * (1 - weight_tying)))     (PEFT splits the N modules, in
               model order, into that many groups of consecutive modules; each group shares one v)
    lora:      sum_k r * (in_k + out_k)
    vera:      sum_k (out_k + r)

`expected_trainable_parameters` evaluates the formula; the tests check it against what PEFT builds.

The defaults are the paper's 13-parameter configuration: r = 2 (the paper's best rank), u = 13,
`weight_tying = 1.0` (every adapted module shares one v) over every linear layer of every block
(`"all-linear"`, PEFT's keyword for all linear layers but the output head). PEFT's own defaults
(u = 64, no tying) train 64 parameters per module.

Checkpoints and exports: the trainable tensors alone define a trained TinyLoRA adapter on a
given base, because U, S, V come from the base weights and P from `projection_seed`; the SVD is
computed on the base weights' device (CPU when loaded by `testtime.loading`) in float32.
`frozen_factor_signature` summarizes those frozen factors in a few numbers, so a checkpoint can
tell when the base (or the SVD) it is loaded onto differs from the one it was trained on.
`save_adapter` writes PEFT's own layout (frozen factors included), which `PeftModel.from_pretrained`
loads anywhere; `save_merged` writes a plain Hugging Face model with the update added to W.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Literal

import torch
from peft import LoraConfig, PeftConfig, PeftModel, TinyLoraConfig, VeraConfig, get_peft_model
from peft.tuners.tinylora import TinyLoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.pytorch_utils import Conv1D

from testtime.lm import cut_at_eos, encode_prompt, eos_token_ids, left_pad

PeftMethod = Literal["tinylora", "lora", "vera"]
PEFT_METHODS = ("tinylora", "lora", "vera")
ALL_LINEAR = "all-linear"
ADAPTER = "default"  # PEFT's adapter name


def adapter_config(peft_method: PeftMethod = "tinylora", r: int = 2, u: int = 13, weight_tying: float = 1.0,
                   projection_seed: int = 42, target_modules: str | list[str] = ALL_LINEAR,
                   lora_alpha: int = 8) -> PeftConfig:
    """The PEFT config of one method; every adapter starts as the identity (no change to the model).

    `r`: TinyLoRA's SVD rank, LoRA's rank, VeRA's rank. `u`, `weight_tying`: TinyLoRA only.
    `projection_seed`: TinyLoRA's P and VeRA's shared random A, B. `lora_alpha`: LoRA's scale
    alpha / r (PEFT's default 8). `target_modules`: module names, a regex, or "all-linear".
    """
    if peft_method == "tinylora":
        return TinyLoraConfig(r=r, u=u, weight_tying=weight_tying, projection_seed=projection_seed,
                              target_modules=target_modules, task_type="CAUSAL_LM")
    if peft_method == "lora":
        return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, task_type="CAUSAL_LM")
    if peft_method == "vera":
        return VeraConfig(r=r, projection_prng_key=projection_seed, target_modules=target_modules,
                          task_type="CAUSAL_LM")
    raise ValueError(f"peft_method must be one of {', '.join(PEFT_METHODS)}, got {peft_method!r}")


def apply_adapter(model, config: PeftConfig) -> PeftModel:
    """`model` wrapped by PEFT with `config` (the base frozen, only the adapter trainable).

    The adapter is built on the device of the base weights, whatever torch's default device is
    (Lightning's `configure_model` runs under the accelerator's device context), so TinyLoRA's SVD
    runs where the weights are. `config.fan_in_fan_out` is set for models whose layers are Conv1D.
    """
    device = next(model.parameters()).device
    # GPT-2's layers are Conv1D, which store W transposed: say so, instead of PEFT correcting it with a warning.
    config.fan_in_fan_out = any(isinstance(module, Conv1D) for module in model.modules())
    with torch.device(device), warnings.catch_warnings():
        # PEFT reads `model.is_gradient_checkpointing`, which transformers 5 deprecated; nothing to act on.
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated")
        return get_peft_model(model, config)


def adapter_layers(model) -> list[tuple[str, BaseTunerLayer]]:
    """(name, layer) of every module PEFT adapted, in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def trainable_parameters(model) -> int:
    """The number of trainable scalars (shared tensors counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_trainable_parameters(model: PeftModel) -> int:
    """The module docstring's formula for the adapter of `model` (its config and adapted layers)."""
    config = model.peft_config[ADAPTER]
    layers = [layer for _, layer in adapter_layers(model)]
    if isinstance(config, TinyLoraConfig):
        return config.u * max(1, round(len(layers) * (1.0 - config.weight_tying)))
    if isinstance(config, LoraConfig):
        return sum(config.r * (layer.in_features + layer.out_features) for layer in layers)
    if isinstance(config, VeraConfig):
        return sum(layer.out_features + config.r for layer in layers)
    raise ValueError(f"no parameter-count formula for {type(config).__name__}")


def describe_adapter(model: PeftModel) -> str:
    """One line: method, its settings, adapted modules, trainable parameters and the formula's count."""
    config = model.peft_config[ADAPTER]
    n_layers = len(adapter_layers(model))
    if isinstance(config, TinyLoraConfig):
        groups = expected_trainable_parameters(model) // config.u
        what = f"TinyLoRA r={config.r}, u={config.u}, weight_tying={config.weight_tying:g}: {groups} shared vector(s)"
    elif isinstance(config, LoraConfig):
        what = f"LoRA r={config.r}, alpha={config.lora_alpha}"
    else:
        what = f"VeRA r={config.r}"
    return (f"{what} over {n_layers} modules: {trainable_parameters(model):,} trainable parameters "
            f"(formula: {expected_trainable_parameters(model):,})")


@torch.no_grad()
def frozen_factor_signature(model) -> torch.Tensor:
    """One float64 number per TinyLoRA module, `(1^T B) (sum_i P_i) (A 1)`, empty for other methods.

    B = U sqrt(S) and A = sqrt(S) V^T are the module's frozen SVD factors. The number changes with
    the base weight, the projections, and the signs SVD gives its singular vectors (flipping the
    j-th pair leaves B A but not B P A unchanged), which is what makes a trained v mean something
    else on another base.
    """
    values = []
    for _, layer in adapter_layers(model):
        if isinstance(layer, TinyLoraLayer) and ADAPTER in layer.tinylora_A:
            a, b = layer.tinylora_A[ADAPTER].double(), layer.tinylora_B[ADAPTER].double()
            p = layer.tinylora_P[ADAPTER].double().sum(0).to(a.device)
            values.append(b.sum(0) @ p @ a.sum(1))
    return torch.stack(values).cpu() if values else torch.zeros(0, dtype=torch.float64)


# -- export --------------------------------------------------------------------------------------

def save_adapter(model: PeftModel, output_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """PEFT's layout: `adapter_config.json` + `adapter_model.safetensors` (frozen factors included),
    loadable with `PeftModel.from_pretrained(base, output_dir)`."""
    config = model.peft_config[ADAPTER]
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    model.save_pretrained(output_dir)


def save_merged(model: PeftModel, output_dir: str | os.PathLike) -> None:
    """A plain Hugging Face model with the adapter's update added to the weights (a copy is merged,
    `model` keeps its adapter); it loads with `AutoModelForCausalLM.from_pretrained`."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(output_dir)


# -- chat ----------------------------------------------------------------------------------------

@torch.no_grad()
def chat(model, tokenizer, conversations: list[dict], history_turns: int = 5, max_new_tokens: int = 64,
         **generate_kwargs) -> list[list[str]]:
    """Reply to each user turn of each conversation in order, as a chat would: [conversation][turn].

    A conversation is `{"user_turns": [str, ...], "system": str | None}`. Before turn t the prompt
    holds the system message (if any) and the last `history_turns` messages of the conversation so
    far, the user's turn t included; the model's own replies enter the history (the seed's
    `ttt_infer_adapter.py` keeps the last 5). Conversations are batched per turn (left-padded).
    `generate_kwargs` go to `model.generate` (e.g. `do_sample=True, temperature=0.7`; greedy
    without); seeding is the caller's.
    """
    if history_turns < 1:
        raise ValueError(f"history_turns must be >= 1, got {history_turns}")
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    histories: list[list[dict]] = [[] for _ in conversations]
    replies: list[list[str]] = [[] for _ in conversations]
    for turn in range(max((len(c["user_turns"]) for c in conversations), default=0)):
        active = [i for i, c in enumerate(conversations) if turn < len(c["user_turns"])]
        prompts = []
        for i in active:
            histories[i].append({"role": "user", "content": conversations[i]["user_turns"][turn]})
            system = conversations[i].get("system")
            window = ([{"role": "system", "content": system}] if system else []) + histories[i][-history_turns:]
            prompts.append(encode_prompt(tokenizer, window))
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        for i, row in zip(active, out[:, ids.shape[1]:].tolist()):
            text = tokenizer.decode(cut_at_eos(row, eos), skip_special_tokens=True).strip()
            histories[i].append({"role": "assistant", "content": text})
            replies[i].append(text)
    return replies

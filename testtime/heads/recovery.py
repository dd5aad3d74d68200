"""LoRA recovery of a pruned model (PEFT), the same for `HeadGateModule` and `benchmarks/head_gates.py`.

`attach_lora(model, heads_zeroed)` puts LoRA on every Linear / Conv1D of the decoder layers, except
the attention output projections when pruned heads remain in the weights as zeros (a LoRA branch
there reads those heads' outputs and would bring them back).
"""

from __future__ import annotations

import warnings

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from testtime.heads.gates import decoder_layers, family_of, output_projections


def lora_target_names(model: nn.Module, heads_zeroed: int) -> list[str]:
    """Full names of every Linear / Conv1D inside the decoder layers, except the attention output
    projections when pruned heads remain in the weights as zeros (`heads_zeroed` > 0): a LoRA
    branch on the projection reads its whole input, those heads' outputs included, and would
    bring them back."""
    skip = {id(p) for p in output_projections(model)} if heads_zeroed else set()
    prefix = family_of(model)[1].layers
    return [f"{prefix}.{i}.{name}" for i, layer in enumerate(decoder_layers(model))
            for name, module in layer.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and id(module) not in skip]


def attach_lora(model: nn.Module, heads_zeroed: int, r: int = 8, alpha: float = 16.0,
                target_modules: list[str] | None = None) -> PeftModel:
    """LoRA adapters (PEFT) on a pruned model, base frozen, in eval mode (no dropout).

    target_modules: PEFT's names (suffixes such as "q_proj"); None: `lora_target_names`. Targets
    that reach an output projection while `heads_zeroed` > 0 are refused (see `lora_target_names`).
    """
    targets = lora_target_names(model, heads_zeroed) if target_modules is None else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                        fan_in_fan_out=family_of(model)[0] == "gpt2",  # GPT-2's Conv1D stores [in, out]
                        task_type="CAUSAL_LM")
    projections = output_projections(model)
    with warnings.catch_warnings():
        # PEFT 0.21 calls transformers 5's deprecated `is_gradient_checkpointing`: nothing to act on.
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    if heads_zeroed:
        hit = [i for i, p in enumerate(output_projections(model)) if p is not projections[i]]
        if hit:
            raise ValueError(f"lora_target_modules {targets} put LoRA on the attention output projection of layer(s) "
                             f"{hit}, where {heads_zeroed} pruned head(s) remain as zeros: LoRA would bring them "
                             "back; leave the output projection out")
    return peft_model.eval()

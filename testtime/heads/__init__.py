"""Attention-head gating, importance and pruning for Hugging Face causal LMs (plain PyTorch).

    gates = attach_head_gates(model)                  # [L, H] gates, all 1: the model unchanged
    scores = head_importance(model, batches, "gradient")   # Michel et al. 2019
    keep = plan_pruning(scores, 0.3, scope="global")  # or iterative_pruning_plan(...)
    gates.detach(); report = prune_heads(model, keep) # exact; report says removed or folded

Modules: gates (hooks, hard-concrete gates), importance, prune (plans, physical pruning),
recovery (LoRA on a pruned model), compat (the seed's load_baseline_model / load_adaptive_model
face), extras (skip connections, head agency, the entropy gate schedule).
"""

from testtime.heads.gates import (ARCHITECTURES, HardConcreteGates, HeadGates, HeadLayout, attach_head_gates,
                                  attached_gates, decoder_layers, family_of, head_layout, head_rows,
                                  output_projections)
from testtime.heads.importance import (attention_entropy, gradient_importance, head_importance,
                                       magnitude_importance, random_importance)
from testtime.heads.prune import allowed_shapes, iterative_pruning_plan, keep_from_gates, plan_pruning, prune_heads
from testtime.heads.recovery import attach_lora, lora_target_names

__all__ = [
    "ARCHITECTURES", "HardConcreteGates", "HeadGates", "HeadLayout", "attach_head_gates", "attached_gates",
    "decoder_layers", "family_of", "head_layout", "head_rows", "output_projections",
    "attention_entropy", "gradient_importance", "head_importance", "magnitude_importance", "random_importance",
    "allowed_shapes", "iterative_pruning_plan", "keep_from_gates", "plan_pruning", "prune_heads",
    "attach_lora", "lora_target_names",
]

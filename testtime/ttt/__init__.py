"""TTT-E2E: a sliding-window transformer whose last quarter keeps training on its context.

"End-to-End Test-Time Training for Long Context" (Tandon et al. 2025), official JAX code at
github.com/test-time-training/e2e. Importing this package registers the model with
`AutoConfig` / `AutoModelForCausalLM` (model_type "ttt_e2e"), so a saved folder reloads with
`AutoModelForCausalLM.from_pretrained(folder)` like any Hugging Face model.

    config = TTTConfig.from_preset("small", vocab_size=len(tokenizer))
    model = TTTForCausalLM(config)
    loss = model(input_ids, labels=input_ids).loss           # inner loop inside, meta-gradient out
    model.set_inner_lr_step(global_step)                      # inner-lr warm-up
    model(input_ids, ttt=False)                               # the same weights without TTT
    model.generate(input_ids, attention_mask=mask, max_new_tokens=64)
"""

from transformers import AutoConfig, AutoModelForCausalLM

from testtime.ttt.config import PRESETS, TTTConfig, matched_intermediate_size, num_ttt_layers
from testtime.ttt.generate import TTTCache
from testtime.ttt.model import TTTCausalLMOutput, TTTForCausalLM

AutoConfig.register(TTTConfig.model_type, TTTConfig, exist_ok=True)
AutoModelForCausalLM.register(TTTConfig, TTTForCausalLM, exist_ok=True)

__all__ = ["PRESETS", "TTTCache", "TTTCausalLMOutput", "TTTConfig", "TTTForCausalLM",
           "matched_intermediate_size", "num_ttt_layers"]

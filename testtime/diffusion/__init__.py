"""Masked diffusion language models: LLaDA-style samplers, TTA uncertainty remasking, a small model.

- `sampling`: `generate` (LLaDA), `generate_random_remasking`, `generate_fast_dllm`, `generate_remdm`.
- `tta`: `generate_with_tta_uncertainty` (the seed's test-time-augmentation remasking sampler).
- `constraints`: constraint functions for it (`no_repeat_ngrams`, `json_format_constraint`, ...).
- `model`: `MaskedDiffusionConfig` / `MaskedDiffusionLM` (registered with the Auto classes on
  import), presets, a tokenizer with a MASK token, and the training losses.
- `data`: arithmetic SFT examples in LLaDA's layout (`encode_example`, `collate_examples`).
- `experiments`: `plot_uncertainty`, `run_academic_benchmark`, `analyze_icml_results`.

Plain PyTorch + transformers; nothing here imports Lightning.
"""

from testtime.diffusion.constraints import (
    bracket_violations,
    json_format_constraint,
    math_constraint,
    no_repeat_ngrams,
)
from testtime.diffusion.experiments import analyze_icml_results, plot_uncertainty, run_academic_benchmark
from testtime.diffusion.model import (
    MaskedDiffusionConfig,
    MaskedDiffusionLM,
    build_config,
    build_diffusion_tokenizer,
    build_model,
    diffusion_loss,
    forward_process,
    parameter_count,
    pretraining_loss,
    sft_loss,
)
from testtime.diffusion.sampling import (
    SAMPLERS,
    as_generate_fn,
    generate,
    generate_fast_dllm,
    generate_random_remasking,
    generate_remdm,
)
from testtime.diffusion.tta import generate_with_tta_uncertainty

__all__ = [
    "MaskedDiffusionConfig", "MaskedDiffusionLM", "SAMPLERS", "analyze_icml_results", "as_generate_fn",
    "bracket_violations", "build_config", "build_diffusion_tokenizer", "build_model", "diffusion_loss",
    "forward_process", "generate", "generate_fast_dllm", "generate_random_remasking", "generate_remdm",
    "generate_with_tta_uncertainty", "json_format_constraint", "math_constraint", "no_repeat_ngrams",
    "parameter_count", "plot_uncertainty", "pretraining_loss", "run_academic_benchmark", "sft_loss",
]

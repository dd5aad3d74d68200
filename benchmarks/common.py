"""What the GPU benchmarks share: random-weight Llama configs, timing with device sync, paired ratios.

Speed does not depend on the weights, so models are built from configs with random weights.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from testtime.io import atomic_write_text

LLAMA_CONFIGS = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    # TinyLlama/TinyLlama-1.1B (Llama 2 architecture, GQA 32/4)
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
                           max_position_embeddings=2048, rms_norm_eps=1e-5),
    # meta-llama/Llama-3.2-1B (GQA 32/8, tied embeddings; its llama3 RoPE scaling left out: it only
    # rescales the RoPE frequencies once at init and costs nothing per token)
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                        max_position_embeddings=131072, rms_norm_eps=1e-5),
    # the shape of TTT-E2E's 125M model without TTT blocks (12 layers, 768 wide, MLP 2048, vocabulary
    # 32,000, RoPE theta 5e5): the plain transformer its decoding is compared with
    "ttt-125m-twin": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                          num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=True, rope_theta=500000.0,
                          max_position_embeddings=262144, rms_norm_eps=1e-6),
    # CPU smoke tests
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0,
                 max_position_embeddings=1024, rms_norm_eps=1e-5),
}


def log(*args):
    print(*args, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, fn()) with the device synchronized on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def paired_ratio(a, b):
    """Median over rounds of a[i] / b[i]: runs of one round are adjacent, so slow drifts cancel."""
    return statistics.median(x / y for x, y in zip(a, b))


def random_llama(name: str, device, dtype, **overrides) -> LlamaForCausalLM:
    """`LLAMA_CONFIGS[name]` (plus `overrides`) with seeded random weights, in eval mode, generating
    exactly max_new_tokens tokens (no EOS) with pad id 0."""
    cfg = LlamaConfig(**{**LLAMA_CONFIGS[name], **overrides}, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def default_dtype(device, name: str | None):
    """`torch.<name>`, else bf16 on a GPU and float32 on a CPU."""
    return getattr(torch, name) if name else (torch.bfloat16 if device.type == "cuda" else torch.float32)


def raise_recompile_limits(limit: int = 256) -> None:
    """Room for every decode graph x cache shape x model in one process's compiled `__call__`."""
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), limit))


def environment(args, device, dtype) -> dict:
    """Date, command, machine, versions and arguments: the head of every results JSON."""
    import transformers

    return {"date": time.strftime("%Y-%m-%d"), "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": str(dtype), "args": dict(vars(args))}


def compile_counters() -> dict:
    """torch.compile's counters so far (graphs, graph breaks, inductor)."""
    from torch._dynamo.utils import counters

    return {k: dict(v) for k, v in counters.items() if k in ("inductor", "stats", "graph_break")}


def dump(results: dict, out: str | None) -> None:
    """Write `results` as JSON to `out` (rewritten after every measurement: a killed run keeps its figures)."""
    if out:
        atomic_write_text(out, json.dumps(results, indent=2) + "\n")


def finish(results: dict, out: str | None, table: str, plot=None) -> None:
    """Print the markdown `table`; with `out`, write the JSON there, the table beside it (.md) and
    `plot(results, path)`'s figure (.png)."""
    print(table)
    if out:
        dump(results, out)
        atomic_write_text(Path(out).with_suffix(".md"), table + "\n")
        if plot is not None:
            plot(results, Path(out).with_suffix(".png"))

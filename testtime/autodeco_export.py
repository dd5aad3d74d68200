"""AutoDeco's checkpoint format, compatible with the original code, so published heads load here
and heads trained here load there.

A heads-only folder holds `config.json` (`model_type: "autodeco"`, `base_model_name_or_path`,
`base_model_type`, `enable_temperature_head`, `enable_top_p_head`, `use_enhanced_features`, and the
base model's own config fields at the top level) and `model.safetensors` with the keys
`temp_head.mlp.0.{weight,bias}`, `temp_head.mlp.2.*`, `top_p_head.mlp.0.*`, `top_p_head.mlp.2.*`.
A merged folder adds the base weights under `llm.` (sharded with an index when large), so one
folder serves on its own.

- `save_autodeco` / `load_autodeco`: write and read a heads-only or merged folder;
- `merge_autodeco` / `split_autodeco`: convert between the two.

Paper: "The End of Manual Decoding: Towards Truly End-to-End Language Models" (arXiv:2510.26697);
the format is that of its official implementation (`script/merge_autodeco.py`) and published heads.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from testtime.autodeco import CONFIG_FILE, AutoDecoConfig, AutoDecoModel, base_config_dict, head_input_size
from testtime.errors import CheckpointError

HEADS_FILE = "model.safetensors"

_HEAD_PREFIXES = ("temp_head.", "top_p_head.")


def save_autodeco(output_dir, temp_head, top_p_head, config: AutoDecoConfig) -> None:
    """Write `config.json` and a heads-only `model.safetensors` (keys `temp_head.mlp.0.weight`...)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for prefix, head in (("temp_head.", temp_head), ("top_p_head.", top_p_head)):
        if head is not None:
            tensors.update({prefix + k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    config = copy.copy(config)
    config.enable_temperature_head = temp_head is not None
    config.enable_top_p_head = top_p_head is not None
    if temp_head is not None:
        config.hidden_size = temp_head.mlp[0].in_features
    elif top_p_head is not None:
        config.hidden_size = top_p_head.hidden_size
    save_file(tensors, str(out / HEADS_FILE), metadata={"format": "pt"})
    config.save(out)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / f"{HEADS_FILE}.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / HEADS_FILE).is_file():
        return [folder / HEADS_FILE]
    raise FileNotFoundError(f"no {HEADS_FILE} (or its index) in {folder}")


def _read_tensors(folder: Path, prefixes: tuple[str, ...]) -> dict:
    """Tensors whose key starts with one of `prefixes`, read lazily from (sharded) safetensors."""
    tensors = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    tensors[key] = f.get_tensor(key)
    return tensors


def _has_base_weights(folder: Path) -> bool:
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            if any(k.startswith("llm.") for k in f.keys()):
                return True
    return False


def _check_hidden_size(heads: dict, config: AutoDecoConfig, llm: nn.Module, where) -> None:
    """Refuse heads whose input width differs from the base model's final hidden state, saying
    which setting disagrees: the hidden size, or the top-p head's enhanced features."""
    size = head_input_size(llm)
    name = getattr(llm, "name_or_path", "") or type(llm).__name__
    if "temp_head.mlp.0.weight" in heads and heads["temp_head.mlp.0.weight"].shape[1] != size:
        raise CheckpointError(f"AutoDeco heads in {where} were trained for hidden size "
                              f"{heads['temp_head.mlp.0.weight'].shape[1]}, but the base model {name} has hidden size "
                              f"{size}")
    key = "top_p_head.mlp.0.weight"
    if key in heads:
        inputs = heads[key].shape[1]
        expected = size + (5 if config.use_enhanced_features else 1)
        if inputs == expected:
            return
        other = size + (1 if config.use_enhanced_features else 5)
        if inputs == other:
            said = "true" if config.use_enhanced_features else "false"
            raise CheckpointError(
                f"{where}: {key} has {inputs} inputs = hidden size {size} + {inputs - size}, i.e. the top-p head was "
                f"trained {'without' if config.use_enhanced_features else 'with'} the enhanced features, but "
                f"config.json says use_enhanced_features: {said}; set it to "
                f"{'false' if config.use_enhanced_features else 'true'}")
        raise CheckpointError(f"AutoDeco heads in {where} were trained for hidden size "
                              f"{inputs - (expected - size)}, but the base model {name} has hidden size {size}")


def _build_base_from_merged(folder: Path, config: AutoDecoConfig):
    """The base model of a merged folder, built from the base config stored in config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(config.base_config)
    model_type = base.pop("model_type", config.base_model_type)
    base.pop("transformers_version", None)
    weights = {k[len("llm."):]: v for k, v in _read_tensors(folder, ("llm.",)).items()}
    dtype = next((v.dtype for v in weights.values() if v.is_floating_point()), torch.float32)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **base), dtype=dtype)
    llm.load_state_dict(weights, strict=True)
    return llm.eval()


def load_autodeco(path, model=None, dtype=torch.float32, device="cpu", return_tokenizer: bool = False):
    """An `AutoDecoModel` from a heads-only or merged AutoDeco folder.

    model: an HF causal LM to put the heads on, a name/path for `testtime.loading`, or None:
    then a merged folder supplies its own base weights and a heads-only folder loads
    `config.base_model_name_or_path`. Raises ValueError when the heads' hidden size does not
    match the base model's.
    """
    from testtime.loading import load_model_and_tokenizer, load_tokenizer

    folder = Path(path)
    config = AutoDecoConfig.load(folder)
    heads = _read_tensors(folder, _HEAD_PREFIXES)
    tokenizer = None
    if model is None and _has_base_weights(folder):
        model = _build_base_from_merged(folder, config).to(device)
        if return_tokenizer:
            tokenizer = load_tokenizer(folder)
    elif model is None or isinstance(model, (str, os.PathLike)):
        name = model or config.base_model_name_or_path
        if not name:
            raise CheckpointError(f"{folder}/{CONFIG_FILE} names no base_model_name_or_path; pass model=")
        model, tokenizer = load_model_and_tokenizer(name, dtype=dtype, device=device)
    _check_hidden_size(heads, config, model, folder / HEADS_FILE)
    width = next((v.shape[0] for k, v in heads.items() if k.endswith("mlp.0.weight")), config.head_width)
    wrapper = AutoDecoModel(model, config.enable_temperature_head, config.enable_top_p_head,
                            config.use_enhanced_features, width, config.base_model_name_or_path)
    wrapper.config.base_config = config.base_config or wrapper.config.base_config
    wanted = wrapper.heads_state_dict().keys()
    missing = [k for k in wanted if k not in heads]
    if missing:
        raise CheckpointError(f"{folder / HEADS_FILE} lacks head weights {missing}")
    # Published files hold both heads even when one is disabled: load only the enabled ones.
    wrapper.load_state_dict({k: heads[k] for k in wanted}, strict=False)
    wrapper.to(device)
    return (wrapper, tokenizer) if return_tokenizer else wrapper


def _unshared(state: dict) -> dict:
    """Clone tensors that share storage (tied embeddings): safetensors refuses shared tensors, and
    `save_torch_state_dict` would drop one of the names, which a strict reload then misses."""
    seen, out = set(), {}
    for key, value in state.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone() if ptr in seen else value
        seen.add(ptr)
    return out


def merge_autodeco(heads_dir, output_dir, model=None, dtype="auto", max_shard_size="5GB") -> None:
    """One serving checkpoint: base weights prefixed `llm.` plus the heads, config and tokenizer.

    The base comes from `model` (module or name) or the config's `base_model_name_or_path`,
    loaded in its checkpoint dtype by default.
    """
    from testtime.loading import load_model_and_tokenizer

    heads_dir, out = Path(heads_dir), Path(output_dir)
    config = AutoDecoConfig.load(heads_dir)
    heads = _read_tensors(heads_dir, _HEAD_PREFIXES)
    tokenizer = None
    if model is None or isinstance(model, (str, os.PathLike)):
        name = model or config.base_model_name_or_path
        if not name:
            raise CheckpointError(f"{heads_dir}/{CONFIG_FILE} names no base_model_name_or_path; pass model=")
        model, tokenizer = load_model_and_tokenizer(name, dtype=dtype)
    _check_hidden_size(heads, config, model, heads_dir / HEADS_FILE)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"llm." + k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = _unshared(tensors)
    tensors.update(heads)
    save_torch_state_dict(tensors, out, max_shard_size=max_shard_size, metadata={"format": "pt"})
    config = copy.copy(config)
    config.base_config = base_config_dict(model.config)
    config.base_model_type = model.config.model_type
    config.save(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)


def split_autodeco(merged_dir, output_dir) -> None:
    """Back from a merged checkpoint to a heads-only folder (config, heads, tokenizer files)."""
    merged, out = Path(merged_dir), Path(output_dir)
    config = AutoDecoConfig.load(merged)
    heads = _read_tensors(merged, _HEAD_PREFIXES)  # lazily: the base weights are never loaded
    out.mkdir(parents=True, exist_ok=True)
    save_file(heads, str(out / HEADS_FILE), metadata={"format": "pt"})
    config.save(out)
    for file in merged.iterdir():
        if file.is_file() and not (file.name.endswith(".safetensors") or file.name.endswith(".index.json")
                                   or file.name == CONFIG_FILE):
            shutil.copy2(file, out / file.name)




__all__ = ["HEADS_FILE", "load_autodeco", "merge_autodeco", "save_autodeco", "split_autodeco"]

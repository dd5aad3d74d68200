"""Shared fixtures: tiny random models of every promised family and a tokenizer built here.

Nothing in the tests touches a model hub. Tests that load the embedded SmolLM2-135M are marked
`slow`; they still run in CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from testtime.tiny import FAMILIES, build_tiny_model, build_tokenizer, save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    """The character-level chat tokenizer every tiny model uses."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, str]:
    """family -> a saved Hugging Face folder of a tiny random model of that family."""
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for family in FAMILIES:
        save_tiny_model(family, root / family)
        dirs[family] = str(root / family)
    return dirs


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> str:
    """The tiny Llama folder: the default model of most tests."""
    return tiny_model_dirs["llama"]


@pytest.fixture
def tiny_llama(tokenizer):
    """A fresh tiny Llama model (eval mode, float32) and its tokenizer."""
    return build_tiny_model("llama", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct (converted once into the cache)."""
    from testtime.loading import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m")


@pytest.fixture
def run_cli(tmp_path):
    """Run `python cli.py ARGS...` from the project root as a user would; returns the finished process."""

    def run(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run

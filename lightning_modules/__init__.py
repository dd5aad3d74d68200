"""LightningModules: one per method, thin wrappers around the algorithms in `testtime/`."""

from lightning_modules.autodeco import AutoDecoModule
from lightning_modules.base import TesttimeModule
from lightning_modules.causal_lm import CausalLMModule

__all__ = ["AutoDecoModule", "CausalLMModule", "TesttimeModule"]

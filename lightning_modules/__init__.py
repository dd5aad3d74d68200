"""LightningModules: one per method, thin wrappers around the algorithms in `testtime/`.

Importing the package registers the classes, so configs and `--model` may use their short names
(`--model TNOTModule`) as well as their full paths.
"""

from lightning_modules.autodeco import AutoDecoModule
from lightning_modules.base import TesttimeModule
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.head_gates import HeadGateModule
from lightning_modules.masked_diffusion import MaskedDiffusionModule
from lightning_modules.tinylora import TinyLoRAModule
from lightning_modules.tnot import TNOTModule
from lightning_modules.ttt import TTTModule

__all__ = ["AutoDecoModule", "CausalLMModule", "HeadGateModule", "MaskedDiffusionModule", "TNOTModule", "TTTModule", "TesttimeModule",
           "TinyLoRAModule"]

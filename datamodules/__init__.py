"""LightningDataModules: SFT records, LM text blocks and generated verifiable tasks."""

from datamodules.lm_text import LMTextDataModule
from datamodules.sft import SFTDataModule
from datamodules.tasks import TaskDataModule

__all__ = ["LMTextDataModule", "SFTDataModule", "TaskDataModule"]

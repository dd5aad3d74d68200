"""LightningDataModules: SFT records, LM text blocks, generated verifiable tasks, rejection-sampled solutions."""

from datamodules.lm_text import LMTextDataModule
from datamodules.prompts import PromptDataModule
from datamodules.rejection import RejectionSampledTaskDataModule
from datamodules.sft import SFTDataModule
from datamodules.tasks import TaskDataModule

__all__ = ["LMTextDataModule", "PromptDataModule", "RejectionSampledTaskDataModule", "SFTDataModule", "TaskDataModule"]

"""LightningDataModules: SFT records, LM text blocks, generated verifiable tasks, rejection-sampled solutions,
prompt files, memory-test documents, dialogs, arithmetic laid out for a masked diffusion LM."""

from datamodules.dialog import DialogDataModule, TaskDialogDataModule
from datamodules.diffusion import DiffusionTaskDataModule
from datamodules.lm_text import LMTextDataModule
from datamodules.memory import MemoryTestDataModule
from datamodules.prompts import PromptDataModule
from datamodules.rejection import RejectionSampledTaskDataModule
from datamodules.sft import SFTDataModule
from datamodules.tasks import TaskDataModule

__all__ = ["DialogDataModule", "DiffusionTaskDataModule", "LMTextDataModule", "MemoryTestDataModule", "PromptDataModule",
           "RejectionSampledTaskDataModule", "SFTDataModule", "TaskDataModule", "TaskDialogDataModule"]

"""Arithmetic SFT data laid out for a masked diffusion LM: `[left-padded prompt | answer + EOS ... EOS]`.

Why not `TaskDataModule`'s training batches as they are: they are causal-LM examples, prompt and
worked solution right-padded to the longest row of the batch with unlabelled padding. A masked
diffusion LM fills exactly `gen_length` positions after the prompt, so (LLaDA's SFT recipe) each
answer is padded with labelled EOS to `gen_length` and the prompt is left-padded: the layout of
`testtime.diffusion.data` (its docstring says why each piece is so). Every split uses it and also
carries what generation needs, so `val/loss` and `val/acc_*` come from the same batches.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from datamodules.tasks import TaskDataModule
from testtime.diffusion.data import collate_examples, encode_example
from testtime.errors import DataError


class DiffusionCollator:
    """`testtime.diffusion.data.collate_examples` as a DataLoader collate function."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_examples(examples, self.pad_token_id)


class DiffusionTaskDataModule(TaskDataModule):
    """`TaskDataModule`'s arithmetic problems as SFT data for a masked diffusion LM (see the module docstring).

    Args:
        model_name_or_path: the tokenizer's source (the CLI links it from the model).
        gen_length: the generation length the model learns to fill: each answer is padded with
            EOS to exactly this many tokens. Must equal the model's `gen_length` (checked at fit).
        n_train, n_val, n_test, difficulty, kinds, seed, batch_size, eval_batch_size, num_workers:
            as in `TaskDataModule` (difficulty 1 has only 155 distinct questions in all).
    """

    def __init__(
        self,
        model_name_or_path: str,
        gen_length: int = 32,
        n_train: int = 95,
        n_val: int = 30,
        n_test: int = 30,
        difficulty: int = 1,
        kinds: list[str] | None = None,
        seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 0,
    ):
        super().__init__(model_name_or_path, n_train=n_train, n_val=n_val, n_test=n_test, difficulty=difficulty,
                         kinds=kinds, seed=seed, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers)
        self.save_hyperparameters()
        if not isinstance(gen_length, int) or gen_length < 1:
            raise DataError(f"gen_length must be a positive integer, got {gen_length!r}")
        self.gen_length = gen_length

    def dataset(self, split: str) -> list[dict]:
        """Encoded examples of a split ("train", "validation" or "test"), built once."""
        if split not in self._datasets:
            self._datasets[split] = [encode_example(self.tokenizer, p, self.gen_length)
                                     for p in self.problems[split]]
        return self._datasets[split]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, True, DiffusionCollator(self.tokenizer.pad_token_id))

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, False, DiffusionCollator(self.tokenizer.pad_token_id))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False, DiffusionCollator(self.tokenizer.pad_token_id))

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False, DiffusionCollator(self.tokenizer.pad_token_id))

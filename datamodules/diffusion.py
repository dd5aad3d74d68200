"""Arithmetic SFT data laid out for a masked diffusion LM: `[prompt | answer + EOS ... EOS]`.

Why not `TaskDataModule`'s training batches as they are: they are causal-LM examples, prompt and
worked solution right-padded to the longest row of the batch with unlabelled padding. A masked
diffusion LM does not stop: its sampler fills exactly `gen_length` positions after the prompt,
so the model has to learn what to write after the answer. LLaDA (Nie et al. 2025, "Large Language
Diffusion Models", SFT section) pads every answer with EOS to the generation length and keeps
those EOS in the loss; the model then learns to fill the unused length with EOS, and the
evaluation cuts the decoded text at the first one. Here:

- each answer is the worked solution, its EOS, then EOS up to exactly `gen_length` tokens, all
  labelled (an answer longer than `gen_length` is an error naming the problem, never cut: a cut
  answer would teach the model to stop before the result);
- prompts are LEFT-padded, so the answer always takes the last `gen_length` columns: the same
  layout the samplers decode (`[left-padded prompt | gen_length x MASK]`), and the model hides
  the padding (it sees a row as it would alone);
- `labels` are IGNORE_INDEX on the prompt and its padding, so `sft_loss` never masks the prompt
  and divides each row by its answer length (= `gen_length`).

Every split uses the same layout and also carries what generation needs (`prompt_ids` /
`prompt_mask`: the first columns of `input_ids`, `answers`, `questions`), so `val/loss` and
`val/acc_*` come from the same batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from datamodules.tasks import TaskDataModule
from testtime.errors import DataError
from testtime.lm import IGNORE_INDEX, encode_prompt, left_pad
from testtime.tasks import Problem, prompt_messages


def encode_diffusion_example(tokenizer, problem: Problem, gen_length: int) -> dict[str, Any]:
    """`prompt_ids` (the chat prompt with the assistant header, as the evaluation encodes it) and
    `answer_ids`: the worked solution, then EOS up to exactly `gen_length` tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token; a diffusion LM's answers are padded with EOS")
    answer = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [eos]
    if len(answer) > gen_length:
        raise DataError(f"gen_length={gen_length} is too short for the answer of {problem.question!r} "
                        f"({len(answer)} tokens with its EOS: {problem.solution!r}); raise gen_length")
    return {"prompt_ids": encode_prompt(tokenizer, prompt_messages(problem)),
            "answer_ids": answer + [eos] * (gen_length - len(answer)),
            "answer": problem.answer, "question": problem.question}


class DiffusionCollator:
    """`input_ids` = [left-padded prompt | answer], `attention_mask`, `labels` (the answer only),
    `prompt_ids` / `prompt_mask` (the prompt columns), `answers`, `questions`."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompt_ids, prompt_mask = left_pad([e["prompt_ids"] for e in examples], self.pad_token_id)
        answer = torch.tensor([e["answer_ids"] for e in examples], dtype=torch.long)
        return {
            "input_ids": torch.cat([prompt_ids, answer], dim=1),
            "attention_mask": torch.cat([prompt_mask, torch.ones_like(answer)], dim=1),
            "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer], dim=1),
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "answers": [e["answer"] for e in examples],
            "questions": [e["question"] for e in examples],
        }


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
            self._datasets[split] = [encode_diffusion_example(self.tokenizer, p, self.gen_length)
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

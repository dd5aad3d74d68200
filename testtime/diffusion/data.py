"""Arithmetic SFT examples laid out for a masked diffusion LM: `[left-padded prompt | answer + EOS ... EOS]`.

A masked diffusion LM does not stop: its sampler fills exactly `gen_length` positions after the
prompt, so the model has to learn what to write after the answer. LLaDA (Nie et al. 2025, "Large
Language Diffusion Models", SFT section) pads every answer with EOS to the generation length and
keeps those EOS in the loss; the model then learns to fill the unused length with EOS, and the
evaluation cuts the decoded text at the first one. Here:

- `encode_example`: the prompt (the chat template with the assistant header, as the evaluation
  encodes it) and the worked solution, its EOS, then EOS up to exactly `gen_length` tokens (an
  answer longer than that is an error naming the problem, never cut: a cut answer would teach
  the model to stop before the result);
- `collate_examples`: prompts LEFT-padded, so the answer always takes the last `gen_length`
  columns, the layout the samplers decode (`[left-padded prompt | gen_length x MASK]`); `labels`
  are IGNORE_INDEX on the prompt and its padding, so `sft_loss` never masks the prompt and divides
  each row by its answer length (= `gen_length`). The batch also carries what generation needs
  (`prompt_ids` / `prompt_mask`: the first columns of `input_ids`, `answers`, `questions`).

`datamodules.diffusion.DiffusionTaskDataModule` serves these batches to Lightning;
`benchmarks/diffusion.py` trains on them without it.
"""

from __future__ import annotations

from typing import Any

import torch

from testtime.errors import DataError
from testtime.lm import IGNORE_INDEX, encode_prompt, left_pad
from testtime.tasks import Problem, prompt_messages


def encode_example(tokenizer, problem: Problem, gen_length: int) -> dict[str, Any]:
    """`prompt_ids`, `answer_ids` (the worked solution, then EOS up to exactly `gen_length`), `answer`, `question`."""
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


def collate_examples(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """`input_ids` = [left-padded prompt | answer], `attention_mask`, `labels` (the answer only),
    `prompt_ids` / `prompt_mask` (the prompt columns), `answers`, `questions`."""
    prompt_ids, prompt_mask = left_pad([e["prompt_ids"] for e in examples], pad_token_id)
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

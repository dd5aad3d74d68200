"""A datamodule over the procedurally generated arithmetic problems of `testtime.tasks`.

Train batches are SFT examples (the prompt, then the worked solution as the assistant's answer):
`input_ids`, `attention_mask`, `labels` (-100 on the prompt), right-padded, plus the generation
fields below (methods that sample while training, like GRPO, use them).

Validation and test batches carry the same SFT fields (for a loss) plus what generation needs:
`prompt_ids` / `prompt_mask` (the prompt alone, LEFT-padded, ending with the assistant header),
`answers` and `questions` (lists of strings, aligned with the rows). Predict batches carry only
the generation fields, over the test problems.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from datamodules.common import PadCollator, TokenizerDataModule, tokenize_records
from testtime.lm import encode_prompt
from testtime.tasks import Problem, make_splits, sft_example

class SFTCollator:
    """Right-padded `input_ids`, `attention_mask`, `labels`; the generation fields are dropped."""

    def __init__(self, pad_token_id: int):
        self.pad = PadCollator(pad_token_id, side="right")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return self.pad([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])


class GenerationCollator:
    """Right-padded SFT fields (optional) plus left-padded prompts, answers and questions."""

    def __init__(self, pad_token_id: int, with_sft: bool = True):
        self.sft = SFTCollator(pad_token_id)
        self.prompts = PadCollator(pad_token_id, side="left")
        self.with_sft = with_sft

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        if self.with_sft:
            batch.update(self.sft(examples))
        prompts = self.prompts([{"input_ids": e["prompt_ids"]} for e in examples])
        batch["prompt_ids"] = prompts["input_ids"]
        batch["prompt_mask"] = prompts["attention_mask"]
        batch["answers"] = [e["answer"] for e in examples]
        batch["questions"] = [e["question"] for e in examples]
        return batch


class TaskDataModule(TokenizerDataModule):
    """Verifiable arithmetic problems for SFT and for accuracy under different decodings.

    Args:
        model_name_or_path: the model whose tokenizer (and chat template) encodes the data; the CLI
            links it to the model's own `model_name_or_path`.
        n_train: training problems (SFT examples).
        n_val: validation problems (loss and generation accuracy; pick decoding settings here).
        n_test: test problems (also the predict set).
        difficulty: 1 = single-digit +/-; 2 adds single-digit * and two-digit +/-; 3 adds
            three-digit +/- and two-digit *; 4 adds 2-3 step word problems (see `testtime.tasks`).
        kinds: restrict to some problem kinds of the level, e.g. `[add_1digit]`; None = all.
        seed: problem generation seed; the splits are disjoint and depend only on the sizes and this.
        batch_size: training batch size.
        eval_batch_size: validation / test / predict batch size.
        max_length: SFT sequences longer than this are truncated (arithmetic examples are far shorter).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        model_name_or_path: str,
        n_train: int = 2000,
        n_val: int = 100,
        n_test: int = 200,
        difficulty: int = 2,
        kinds: list[str] | None = None,
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        max_length: int = 256,
        num_workers: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model_name_or_path = model_name_or_path
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_length = max_length
        self.num_workers = num_workers
        # Built here (cheap, deterministic) so sizes are checked at config time and modules can read them early.
        self.problems: dict[str, list[Problem]] = make_splits(n_train, n_val, n_test, seed=seed,
                                                              difficulty=difficulty, kinds=kinds)
        self._datasets: dict[str, list[dict]] = {}

    def dataset(self, split: str) -> list[dict]:
        """Encoded examples of a split ("train", "validation" or "test"), built once.

        Truncation to `max_length` goes through `tokenize_records`, which counts and logs what it
        cut (arithmetic examples are far shorter than the default).
        """
        if split not in self._datasets:
            problems = self.problems[split]
            records = [{**sft_example(p), "index": i} for i, p in enumerate(problems)]
            examples, _ = tokenize_records(
                self.tokenizer, records, self.max_length, split,
                extra=lambda r: {"prompt_ids": encode_prompt(self.tokenizer, r["prompt"]),
                                 "answer": problems[r["index"]].answer, "question": problems[r["index"]].question},
                drop_unlabelled=split == "train")
            self._datasets[split] = examples
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"],
                  "predict": ["test"]}.get(stage, ["train", "validation", "test"])
        for split in splits:
            self.dataset(split)

    def _loader(self, split: str, batch_size: int, shuffle: bool, collate) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        # the generation fields too: methods that sample during training (GRPO) need the prompt and answer
        return self._loader("train", self.batch_size, True, GenerationCollator(self.tokenizer.pad_token_id))

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, False, GenerationCollator(self.tokenizer.pad_token_id))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False, GenerationCollator(self.tokenizer.pad_token_id))

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, False,
                            GenerationCollator(self.tokenizer.pad_token_id, with_sft=False))

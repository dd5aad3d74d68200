"""Prompts from a local file, for `validate` / `test` / `predict` of a generation method.

One record per JSONL line (or a JSON array of records): a `"prompt"` string or a `"messages"` list
(the whole list is the prompt; its last message must not be the assistant's), an optional
`"answer"` string (needed for validate/test accuracy) and an optional `"id"` (string or integer):

    {"id": "q1", "prompt": "What is 2 + 3?", "answer": "5"}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}

A string prompt is wrapped as one user message so the model's chat template applies (with the
generation prompt); `chat_template=False` tokenizes it as is. `"answer": null` counts as no answer;
other keys are ignored. Batches carry `prompt_ids` / `prompt_mask` (LEFT-padded, like
`datamodules.tasks.TaskDataModule`'s), `prompts` (as given in the file), `ids` (the record's `id`,
else its index) and `answers` (only when every record has one). Nothing is truncated or dropped: a
bad record or an over-long prompt is a ValueError naming the file and the record index.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from datamodules.common import PadCollator, TokenizerDataModule, read_json_array, read_jsonl
from testtime.errors import DataError
from testtime.evaluation import extract_answer
from testtime.lm import encode_prompt

log = logging.getLogger(__name__)


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' must be a list of {{role, content}} objects, "
                         f"got {type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: empty prompt ('messages' is an empty list)")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{turn}] needs string 'role' and 'content', got {message!r}")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the last message is the assistant's; a prompt must end before the "
                         f"answer (drop it, or put it under 'answer')")
    if not any(m["content"].strip() for m in messages):
        raise DataError(f"{where}: empty prompt (every message's content is blank)")
    return messages


def check_prompt_record(record: Any, where: str) -> dict:
    """`{"prompt", "answer", "id"}` of one record (prompt: a string or a message list; answer and
    id may be None); anything malformed raises ValueError starting with `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    has_prompt, has_messages = record.get("prompt") is not None, record.get("messages") is not None
    if has_prompt and has_messages:
        raise DataError(f"{where}: has both 'prompt' and 'messages'; give one")
    if has_messages:
        prompt = _check_messages(record["messages"], where)
    elif has_prompt:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise DataError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__} "
                             f"(use 'messages' for a list of chat messages)")
        if not prompt.strip():
            raise DataError(f"{where}: empty prompt")
    else:
        present = sorted(k for k, v in record.items() if v is not None)
        raise DataError(f"{where}: missing prompt: needs 'prompt' (a string) or 'messages' (a list of "
                         f"{{role, content}}); found keys {present}")
    answer = record.get("answer")
    if answer is not None:
        if not isinstance(answer, str):
            raise DataError(f"{where}: 'answer' must be a string, got {type(answer).__name__} {answer!r} "
                             f"(quote it: \"{answer}\")")
        if not answer.strip():
            raise DataError(f"{where}: empty 'answer' (leave the key out, or null, for no answer)")
    rid = record.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {type(rid).__name__}")
    return {"prompt": prompt, "answer": answer, "id": rid}


def read_prompt_records(path: str | os.PathLike) -> list[dict]:
    """Checked records of a .jsonl or .json file (see the module docstring), in file order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = [(f"{path}: record {i} (line {lineno})", obj) for i, (lineno, obj) in enumerate(read_jsonl(path))]
    elif suffix == ".json":
        rows = [(f"{path}: record {i}", obj) for i, obj in enumerate(read_json_array(path))]
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .json")
    if not rows:
        raise DataError(f"{path}: no records")
    records = [check_prompt_record(obj, where) for where, obj in rows]
    for i, record in enumerate(records):
        record["index"] = i
        record["where"] = rows[i][0]
    return records


class PromptCollator:
    """Left-padded `prompt_ids` / `prompt_mask`, plus `prompts`, `ids` and (optionally) `answers`."""

    def __init__(self, pad_token_id: int, with_answers: bool):
        self.pad = PadCollator(pad_token_id, side="left")
        self.with_answers = with_answers

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        padded = self.pad([{"input_ids": e["prompt_ids"]} for e in examples])
        batch = {"prompt_ids": padded["input_ids"], "prompt_mask": padded["attention_mask"],
                 "prompts": [e["prompt"] for e in examples], "ids": [e["id"] for e in examples]}
        if self.with_answers:
            batch["answers"] = [e["answer"] for e in examples]
        return batch


class PromptDataModule(TokenizerDataModule):
    """Prompts (and optional answers) from one local file, for validate, test and predict.

    Validate and test score accuracy, so they need an `answer` on every record; predict works
    without. There is no training split: for training use `datamodules.sft.SFTDataModule`.

    Args:
        model_name_or_path: the tokenizer's source (the CLI links it from the model).
        path: a .jsonl or .json file of records (see the module docstring).
        batch_size: prompts per batch.
        max_prompt_tokens: longest prompt in tokens (chat template included); a longer one is a
            ValueError naming the record, never truncated. None = no limit.
        chat_template: wrap string prompts as a user message and apply the chat template (with the
            generation prompt); False tokenizes them as plain text. Message lists always use it.
        system_prompt: a system message put before every chat prompt (records that already
            start with a system message are an error).
        max_history_turns: keep only the last N messages of each conversation (a system message
            at its start stays), as a chat keeps a short history (the TTT-E2E seed's default is 5);
            how many records were shortened is logged. None keeps every message.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        model_name_or_path: str,
        path: str,
        batch_size: int = 16,
        max_prompt_tokens: int | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        max_history_turns: int | None = None,
        num_workers: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be positive, got {batch_size}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise DataError(f"max_prompt_tokens must be positive (or None for no limit), got {max_prompt_tokens}")
        if max_history_turns is not None and max_history_turns < 1:
            raise DataError(f"max_history_turns must be positive (or None for the whole history), got {max_history_turns}")
        if system_prompt is not None and not chat_template:
            raise DataError("system_prompt needs chat_template=True (a plain-text prompt has no system message)")
        self.save_hyperparameters()
        self.model_name_or_path = model_name_or_path
        self.path = path
        self.dataset: list[dict] | None = None

    # -- loading -----------------------------------------------------------------------------
    def _chat(self, prompt: str | list[dict], where: str) -> str | list[dict]:
        """What `encode_prompt` gets: messages (system prompt first, if any) or a plain string."""
        if isinstance(prompt, str):
            if not self.hparams.chat_template:
                return prompt
            prompt = [{"role": "user", "content": prompt}]
        if self.hparams.system_prompt is not None:
            if prompt[0]["role"] == "system":
                raise DataError(f"{where}: already starts with a system message, and system_prompt is set; "
                                 f"drop one of them")
            prompt = [{"role": "system", "content": self.hparams.system_prompt}] + prompt
        return prompt

    def _history(self, prompt: str | list[dict]) -> str | list[dict]:
        """The last `max_history_turns` messages (a leading system message kept)."""
        keep = self.hparams.max_history_turns
        if keep is None or isinstance(prompt, str):
            return prompt
        system = prompt[:1] if prompt[0]["role"] == "system" else []
        turns = prompt[len(system):]
        return system + turns[-keep:]

    def _load(self) -> list[dict]:
        records = read_prompt_records(self.path)
        tokenizer = self.tokenizer
        histories = [self._history(r["prompt"]) for r in records]
        inputs = [self._chat(h, r["where"]) for h, r in zip(histories, records)]
        shortened = sum(len(h) < len(r["prompt"]) for h, r in zip(histories, records) if isinstance(h, list))
        if shortened:
            log.info("%s: kept the last %d messages of %d conversation(s) (max_history_turns)", self.path,
                     self.hparams.max_history_turns, shortened)
        if any(isinstance(x, list) for x in inputs) and not tokenizer.chat_template:
            raise DataError(f"{self.path}: the tokenizer of {self.model_name_or_path} has no chat template; "
                             f"use chat_template=False with string prompts")
        examples = [{"prompt_ids": encode_prompt(tokenizer, x), "prompt": r["prompt"], "answer": r["answer"],
                     "id": r["id"] if r["id"] is not None else r["index"]} for x, r in zip(inputs, records)]
        limit = self.hparams.max_prompt_tokens
        if limit is not None:
            too_long = [(r, len(e["prompt_ids"])) for r, e in zip(records, examples) if len(e["prompt_ids"]) > limit]
            if too_long:
                (first, n), others = too_long[0], len(too_long) - 1
                raise DataError(f"{first['where']}: the prompt has {n} tokens, more than max_prompt_tokens={limit}"
                                 f" (prompts are never truncated; {others} more record(s) are too long too)")
        missing = [r["index"] for r in records if r["answer"] is None]
        self.first_without_answer = missing[0] if missing else None
        unscorable = [r["index"] for r in records if r["answer"] is not None and extract_answer(r["answer"]) is None]
        if unscorable:  # accuracy compares the last number of completion and answer
            log.warning("%s: %d answer(s) contain no number and can never be scored correct (first: record %d)",
                        self.path, len(unscorable), unscorable[0])
        log.info("%s: %d prompts (%d with answers), longest %d tokens", self.path, len(examples),
                 len(examples) - len(missing), max(len(e["prompt_ids"]) for e in examples))
        return examples

    def setup(self, stage: str | None = None) -> None:
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn (a str enum)
        if stage == "fit":
            self._no_training()
        if self.dataset is None:  # Lightning calls setup once per stage: read and tokenize once
            self.dataset = self._load()
        if stage in ("validate", "test"):
            self._require_answers(stage)

    # -- loaders -----------------------------------------------------------------------------
    @property
    def has_answers(self) -> bool:
        return self.first_without_answer is None

    def _no_training(self):
        raise DataError("PromptDataModule holds prompts for validate / test / predict and has no training "
                         "data; to train on prompt/completion records use datamodules.sft.SFTDataModule")

    def _require_answers(self, stage: str) -> None:
        if not self.has_answers:
            raise DataError(f"{self.path}: record {self.first_without_answer} has no 'answer'; {stage} scores "
                             f"accuracy and needs an answer on every record (predict works without answers)")

    def _loader(self) -> DataLoader:
        if self.dataset is None:
            self.setup()
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, shuffle=False,
                          collate_fn=PromptCollator(self.tokenizer.pad_token_id, self.has_answers),
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self):
        self._no_training()

    def val_dataloader(self) -> DataLoader:
        loader = self._loader()
        self._require_answers("validate")
        return loader

    def test_dataloader(self) -> DataLoader:
        loader = self._loader()
        self._require_answers("test")
        return loader

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

"""Pieces every datamodule shares: reading JSON files, record checks, prompt/completion
tokenization with counted truncation, padding, and the lazily loaded tokenizer."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning.pytorch as pl
from trl.data_utils import apply_chat_template, is_conversational

from testtime.errors import DataError
from testtime.lm import IGNORE_INDEX, pad
from testtime.loading import load_tokenizer

log = logging.getLogger(__name__)


# -- reading JSON files --------------------------------------------------------------------------

def _decode_line(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: line {lineno} is not valid UTF-8 (byte {err.start} of the line: "
                         f"{raw[err.start:err.start + 4]!r})") from None


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for each non-blank line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, lineno).strip()
            if not line:
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {lineno}: invalid JSON ({err.msg} at column {err.colno})") from None


def read_json_array(path: Path) -> list[Any]:
    """A JSON array of records; a .json file that is really JSON Lines is accepted too."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}: line {lineno} is not valid UTF-8 (byte offset {err.start})") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return [obj for _, obj in read_jsonl(path)]
        raise DataError(f"{path}: line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(parsed, dict):  # a single record
        parsed = [parsed]
    if not isinstance(parsed, list):
        raise DataError(f"{path}: expected a JSON array of records, got {type(parsed).__name__}")
    return parsed



def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def load_dataset_split(name: str, config: str | None, split: str):
    """One split of a `datasets` source: a folder written by `save_to_disk` or a hub id / data folder
    for `datasets.load_dataset`; a missing split names those there are."""
    import datasets

    path = Path(name).expanduser()
    if is_saved_dataset(path):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{name}: no split {split!r}; it has {sorted(loaded)}")
            loaded = loaded[split]
        return loaded
    return datasets.load_dataset(name, config, split=split)


# -- records ---------------------------------------------------------------------------------------

def normalize_record(record: dict, source: str, index: int) -> dict:
    """A record as `{"prompt", "completion"}` (strings, or message lists for chat data).

    Accepts prompt/completion records and conversational `{"messages": [...]}` records whose last
    message is the assistant's answer (that answer is the completion, the rest the prompt).
    Anything else raises ValueError naming `source` (a file or dataset) and the record index.
    """
    where = f"{source}: record {index}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if "messages" in record and record["messages"] is not None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise DataError(f"{where}: messages[{turn}] needs 'role' and 'content' keys, got {message!r}")
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer, got role "
                             f"{messages[-1]['role']!r}")
        prompt, completion = messages[:-1], messages[-1:]
        if not prompt:
            raise DataError(f"{where}: 'messages' holds only the assistant's answer, no prompt")
    elif record.get("prompt") is not None and record.get("completion") is not None:
        prompt, completion = record["prompt"], record["completion"]
    else:
        present = sorted(k for k, v in record.items() if v is not None)
        raise DataError(f"{where}: needs 'prompt' and 'completion' keys, or 'messages'; found keys {present}")
    text = completion[-1]["content"] if isinstance(completion, list) and completion else completion
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: the completion is empty")
    return {"prompt": prompt, "completion": completion}


def tokenize_prompt_completion(tokenizer, example: dict) -> dict:
    """`input_ids` and `labels` (-100 on prompt tokens: completion-only loss).

    Chat records go through TRL's `apply_chat_template` (the model's own template, its special
    tokens kept); plain text records get EOS appended to the completion, as TRL's SFT does.
    Prompt and completion are tokenized separately so the boundary is exact.
    """
    conversational = is_conversational(example)
    if conversational:
        text = apply_chat_template(example, tokenizer)
        prompt_text, completion_text = text["prompt"], text["completion"]
    else:
        prompt_text, completion_text = example["prompt"], example["completion"]
        if tokenizer.eos_token and not completion_text.endswith(tokenizer.eos_token):
            completion_text = completion_text + tokenizer.eos_token
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not conversational)["input_ids"]
    completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


class PadCollator:
    """Pads `input_ids` (pad id), `labels` (-100) and `position_ids` (0), builds `attention_mask`.

    Other keys pass through as lists (e.g. answers for evaluation). `side="left"` is for
    prompts that will be continued by `generate`.
    """

    def __init__(self, pad_token_id: int, side: str = "right"):
        self.pad_token_id = pad_token_id
        self.side = side

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        ids = [e["input_ids"] for e in examples]
        batch["input_ids"] = pad(ids, self.pad_token_id, self.side)
        batch["attention_mask"] = pad([[1] * len(s) for s in ids], 0, self.side)
        if "labels" in examples[0]:
            batch["labels"] = pad([e["labels"] for e in examples], IGNORE_INDEX, self.side)
        if "position_ids" in examples[0]:
            batch["position_ids"] = pad([e["position_ids"] for e in examples], 0, self.side)
        for key in examples[0]:
            if key not in batch:
                batch[key] = [e[key] for e in examples]
        return batch


def tokenize_records(tokenizer, records: list[dict], max_length: int, split: str,
                     extra: Callable[[dict], dict] | None = None,
                     drop_unlabelled: bool = True, tokenize: Callable[[dict], dict] | None = None,
                     kind: str = "records") -> tuple[list[dict], dict]:
    """Tokenize records and cut them to `max_length`, counting what truncation cost.

    A record whose completion is cut off entirely has no label left: it is dropped (and counted),
    since it would only add compute; `drop_unlabelled=False` keeps it (an evaluation split, whose
    prompt is still scored). Truncated and dropped counts are logged, never silent.
    `extra(record)` adds fields to each kept example (e.g. the prompt alone, for generation);
    `tokenize(record)` gives `input_ids` and `labels` (default: prompt + completion records);
    `kind` names the records in the log line.
    """
    examples, truncated, dropped = [], 0, 0
    for record in records:
        example = tokenize(record) if tokenize else tokenize_prompt_completion(tokenizer, record)
        if len(example["input_ids"]) > max_length:
            truncated += 1
            example = {key: value[:max_length] for key, value in example.items()}
            if drop_unlabelled and all(label == IGNORE_INDEX for label in example["labels"]):
                dropped += 1
                continue
        examples.append({**example, **extra(record)} if extra else example)
    stats = {"records": len(records), "truncated": truncated, "dropped": dropped}
    if truncated:
        log.warning("truncated %d of %d %s in %s to max_length=%d; %d of them lost their whole "
                    "completion and were dropped", truncated, len(records), kind, split, max_length, dropped)
    return examples, stats


class TokenizerDataModule(pl.LightningDataModule):
    """A datamodule that tokenizes with the tokenizer of `hparams.model_name_or_path`, loaded once."""

    _tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name_or_path)
        return self._tokenizer

    def prepare_data(self) -> None:
        load_tokenizer(self.hparams.model_name_or_path)  # converts / caches an alias once, on rank 0

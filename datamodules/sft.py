"""Supervised fine-tuning data: prompt/completion or chat records, completion-only labels.

Records come from local files (.jsonl, .json, .parquet, .arrow) or a `datasets` source and are
checked one by one with `normalize_record`, so a bad record is reported with its file and index
instead of surfacing later as a shape error. JSON files are read here rather than through
`datasets` so that encoding and syntax errors name the file and line.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.common import (
    PadCollator,
    TokenizerDataModule,
    load_dataset_split,
    normalize_record,
    read_json_array,
    read_jsonl,
    tokenize_records,
)
from testtime.errors import DataError
from testtime.lm import IGNORE_INDEX

log = logging.getLogger(__name__)

JSON_SUFFIXES = (".jsonl", ".json")
DATASETS_SUFFIXES = (".parquet", ".arrow")


# -- reading records ---------------------------------------------------------------------------

def read_records(path: str | os.PathLike) -> list[dict]:
    """Normalized `{"prompt", "completion"}` records of one local file, checked one by one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterable[Any] = (obj for _, obj in read_jsonl(path))
    elif suffix == ".json":
        rows = read_json_array(path)
    elif suffix == ".parquet":
        from datasets import Dataset

        rows = Dataset.from_parquet(str(path))
    elif suffix == ".arrow":
        from datasets import Dataset

        rows = Dataset.from_file(str(path))
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of "
                         f"{', '.join(JSON_SUFFIXES + DATASETS_SUFFIXES)}")
    return [normalize_record(row, source=str(path), index=i) for i, row in enumerate(rows)]


def load_dataset_records(name: str, config: str | None, split: str) -> list[dict]:
    """Normalized records of one split of a `datasets` source (hub id, local folder or saved dataset)."""
    loaded = load_dataset_split(name, config, split)
    source = f"{name}[{split}]"
    return [normalize_record(row, source=source, index=i) for i, row in enumerate(loaded)]


# -- tokenizing, truncating, packing -----------------------------------------------------------

def pack_examples(examples: list[dict], max_length: int) -> list[dict]:
    """Pack tokenized records into rows of at most `max_length` tokens with TRL's best-fit-decreasing.

    Records are kept whole (they were truncated before). `position_ids` restart at 0 for each
    record, and the first label of each record is masked: it would otherwise be predicted from
    the previous record's last token (TRL's padding-free collator does the same).
    """
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    if not examples:
        return []
    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples],
                                 "labels": [e["labels"] for e in examples]})
    packed = pack_dataset(dataset, seq_length=max_length, strategy="bfd")
    rows = []
    for row in packed:
        position_ids = [p for length in row["seq_lengths"] for p in range(length)]
        labels = [IGNORE_INDEX if p == 0 else label for p, label in zip(position_ids, row["labels"])]
        rows.append({"input_ids": row["input_ids"], "labels": labels, "position_ids": position_ids})
    return rows


def split_off_validation(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random `fraction` of the records (at least one) becomes validation."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    n_val = min(len(records) - 1, max(1, round(len(records) * fraction)))
    chosen = set(np.random.default_rng(seed).permutation(len(records))[:n_val].tolist())
    train = [r for i, r in enumerate(records) if i not in chosen]
    val = [r for i, r in enumerate(records) if i in chosen]
    return train, val


class SFTDataModule(TokenizerDataModule):
    """Prompt/completion or chat records for supervised fine-tuning with completion-only loss.

    Records are `{"prompt", "completion"}` (strings, or message lists) or `{"messages": [...]}`
    whose last message is the assistant's answer. Chat records are rendered with the model's chat
    template (TRL's `apply_chat_template`); labels are -100 on every prompt token.

    Batches are dicts of `input_ids`, `attention_mask`, `labels` (right-padded), plus
    `position_ids` when packing.

    Packing (`packing=True`) fills rows of `max_length` tokens with several records (TRL's
    `pack_dataset`, best-fit decreasing); `position_ids` restart at 0 for each record. To keep
    packed records from attending to each other, call the model with these `position_ids`,
    `attention_mask=None` and `use_cache=False`: transformers then builds one causal block per
    record, for SDPA and eager attention too (`CausalLMModule` does this; tested).

    Args:
        model_name_or_path: the tokenizer's source (a local Hugging Face folder or an alias of
            `testtime.loading`); LightningCLI links it from the model.
        train_files: local training files (.jsonl, .json, .parquet, .arrow).
        val_files: local validation files; without them (and without `val_split_name`)
            `val_fraction` of the training records are held out.
        dataset_name: a `datasets` source instead of (or besides) `train_files`: a hub id, a local
            folder of data files, or a folder written by `save_to_disk`.
        dataset_config: the `datasets` configuration name, if the source has several.
        train_split: the split of `dataset_name` to train on.
        val_split_name: the split of `dataset_name` to validate on.
        val_fraction: the share of training records held out for validation when no validation
            source is given (a seeded, deterministic choice); 0 for no validation.
        max_length: longest sequence in tokens (and the packed row length); longer records are
            truncated and counted, and those that lose their whole completion are dropped.
        packing: pack several records into each row of `max_length` tokens.
        batch_size: rows per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the validation hold-out and of the training shuffle.
    """

    def __init__(
        self,
        model_name_or_path: str,
        train_files: list[str] | None = None,
        val_files: list[str] | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        train_split: str = "train",
        val_split_name: str | None = None,
        val_fraction: float = 0.05,
        max_length: int = 1024,
        packing: bool = False,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if not train_files and not dataset_name:
            raise DataError("SFTDataModule needs train_files or dataset_name")
        if max_length < 1:
            raise DataError(f"max_length must be positive, got {max_length}")
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.train_dataset: list[dict] | None = None
        self.val_dataset: list[dict] | None = None
        self.stats: dict[str, dict[str, int]] = {}

    def _load_records(self) -> tuple[list[dict], list[dict]]:
        hp = self.hparams
        train: list[dict] = []
        for path in hp.train_files or []:
            train += read_records(path)
        if hp.dataset_name:
            train += load_dataset_records(hp.dataset_name, hp.dataset_config, hp.train_split)
        val: list[dict] = []
        for path in hp.val_files or []:
            val += read_records(path)
        if hp.dataset_name and hp.val_split_name:
            val += load_dataset_records(hp.dataset_name, hp.dataset_config, hp.val_split_name)
        if not hp.val_files and not hp.val_split_name:
            train, val = split_off_validation(train, hp.val_fraction, hp.seed)
        if not train:
            raise DataError("no training records: the training sources are empty")
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:  # Lightning calls setup once per stage
            return
        train, val = self._load_records()
        max_length = self.hparams.max_length
        splits = {}
        for split, records in (("train", train), ("val", val)):
            examples, self.stats[split] = tokenize_records(self.tokenizer, records, max_length, split)
            if self.hparams.packing:
                examples = pack_examples(examples, max_length)
            self.stats[split]["sequences"] = len(examples)
            splits[split] = examples
        if not splits["train"]:
            raise DataError(f"every training record lost its completion to max_length={max_length}")
        self.train_dataset, self.val_dataset = splits["train"], splits["val"]
        log.info("SFT data: %s", self.stats)

    def _loader(self, dataset: list[dict], shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=PadCollator(self.tokenizer.pad_token_id),
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning there is no validation.
        return self._loader(self.val_dataset, shuffle=False) if self.val_dataset else []

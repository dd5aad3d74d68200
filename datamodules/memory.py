"""Memory-test documents for TTT-E2E, from the same text sources as `LMTextDataModule`.

Two kinds of documents, both from the held-out `split` of the source (the standard library by
default), for `python cli.py validate` with `TTTModule`:

- "repeat": a passage, a gap of other text longer than the model's window, the passage again
  (`testtime.ttt.evaluation.repeated_passage_documents`); labels on the second copy only. Sliding
  attention cannot see the first copy from the second, so the drop of its loss from TTT off to TTT
  on is what the fast weights remembered.
- "control" (`control_documents`): each "repeat" document with its first copy replaced by an
  unrelated passage of the same length: the same gap and final passage, so TTT's drop on the
  repeat beyond its drop on the control is what the fast weights remembered.
- "long": `long_tokens` consecutive tokens of real text; the module scores the positions beyond
  its window.

Batches (one loader): `input_ids`, `labels` [B, L] and `memory_kind` (one kind per batch).
"""

from __future__ import annotations

import logging

import torch
from torch.utils.data import DataLoader

from datamodules.common import TokenizerDataModule
from datamodules.lm_text import STDLIB, LMTextDataModule
from testtime.errors import DataError
from testtime.ttt.evaluation import repeated_passage_documents

log = logging.getLogger(__name__)


def _collate(examples: list[dict]) -> dict:
    return {"input_ids": torch.stack([e["input_ids"] for e in examples]),
            "labels": torch.stack([e["labels"] for e in examples]),
            "memory_kind": examples[0]["memory_kind"]}


class MemoryTestDataModule(TokenizerDataModule):
    """Documents that test what TTT remembers beyond the attention window (validate / test only).

    Args:
        model_name_or_path: the tokenizer's source (the CLI links it from the model).
        source, patterns, max_files, cache: as `LMTextDataModule` (where the text comes from; a
            fifth of the documents are held out for each of "val" and "test").
        split: the held-out split the documents are cut from ("val" or "test").
        num_documents: "repeat" documents.
        control_documents: also the "control" of each (the same count).
        passage_tokens: tokens of the repeated passage.
        gap_tokens: tokens between the two copies; must exceed the model's window (the module checks).
        long_documents: "long" documents of real text (0: none).
        long_tokens: tokens of each long document.
        batch_size: documents per batch.
        seed: where passages and gaps are cut.
    """

    def __init__(
        self,
        model_name_or_path: str,
        source: str = STDLIB,
        patterns: list[str] = ["*.txt", "*.md", "*.py"],  # noqa: B006 (never mutated)
        max_files: int | None = None,
        cache: bool = True,
        split: str = "val",
        num_documents: int = 32,
        control_documents: bool = True,
        passage_tokens: int = 64,
        gap_tokens: int = 640,
        long_documents: int = 0,
        long_tokens: int = 2048,
        batch_size: int = 4,
        seed: int = 0,
        num_workers: int = 0,
    ):
        if split not in ("val", "test"):
            raise DataError(f"split must be 'val' or 'test' (held-out text), got {split!r}")
        if num_documents < 0 or long_documents < 0 or num_documents + long_documents == 0:
            raise DataError(f"num_documents ({num_documents}) and long_documents ({long_documents}) must be >= 0 "
                            "and not both 0")
        super().__init__()
        self.save_hyperparameters()
        self._text: LMTextDataModule | None = None
        self.documents: list[dict] = []

    @property
    def text(self) -> LMTextDataModule:
        """The text and its held-out splits exactly as LMTextDataModule makes them (cached the same
        way). Built on first use: Lightning's save_hyperparameters must not see it inside __init__."""
        if self._text is None:
            hp = self.hparams
            self._text = LMTextDataModule(hp.model_name_or_path, source=hp.source, patterns=hp.patterns, block_size=1,
                                          max_files=hp.max_files, val_fraction=0.2, test_fraction=0.2, cache=hp.cache)
        return self._text

    def prepare_data(self) -> None:
        self.text.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.documents:
            return
        self.text.setup(stage)
        hp = self.hparams
        tokens = self.text.datasets[hp.split].tokens
        documents = repeated_passage_documents(tokens, hp.num_documents, hp.passage_tokens, hp.gap_tokens, hp.seed)
        docs = [{**d, "memory_kind": "repeat"} for d in documents]
        if hp.control_documents:
            controls = repeated_passage_documents(tokens, hp.num_documents, hp.passage_tokens, hp.gap_tokens, hp.seed,
                                                  control=True)
            docs += [{**d, "memory_kind": "control"} for d in controls]
        if hp.long_documents:
            usable = len(tokens) // hp.long_tokens
            if usable < hp.long_documents:
                raise DataError(f"the {hp.split} split of {hp.source} holds {len(tokens)} tokens: {usable} long "
                                f"documents of {hp.long_tokens} tokens, fewer than long_documents={hp.long_documents}")
            for i in range(hp.long_documents):
                ids = torch.tensor(tokens[i * hp.long_tokens:(i + 1) * hp.long_tokens], dtype=torch.long)
                docs.append({"input_ids": ids, "labels": ids.clone(), "memory_kind": "long"})
        self.documents = docs
        log.info("memory test: %d repeat documents (%d + %d + %d tokens)%s and %d long documents of %d tokens from "
                 "the %s split", hp.num_documents, hp.passage_tokens, hp.gap_tokens, hp.passage_tokens,
                 " with their controls" if hp.control_documents else "", hp.long_documents, hp.long_tokens, hp.split)

    def _memory_loader(self) -> DataLoader:
        """One loader; a batch holds documents of one kind (their lengths differ)."""
        if not self.documents:
            self.setup()
        batches = []
        for kind in ("repeat", "control", "long"):
            docs = [d for d in self.documents if d["memory_kind"] == kind]
            size = self.hparams.batch_size
            batches += [_collate(docs[i:i + size]) for i in range(0, len(docs), size)]
        return DataLoader(batches, batch_size=None, shuffle=False)

    def train_dataloader(self):
        raise DataError("MemoryTestDataModule holds evaluation documents for validate / test only; train on "
                        "datamodules.lm_text.LMTextDataModule")

    def val_dataloader(self):
        return self._memory_loader()

    def test_dataloader(self):
        return self._memory_loader()

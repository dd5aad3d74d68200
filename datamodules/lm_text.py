"""Plain-text language modelling: documents tokenized, concatenated and cut into fixed-length blocks.

Sources: a text file, a folder (files matching glob patterns, recursively), a `datasets` source
(one document per row), or `"stdlib"`: the source of the running Python's standard library,
tens of megabytes of real code that needs no download.

Splits are decided per document (a file never straddles splits) from a hash of its relative
path, so they depend neither on file order nor on `max_files`. Token ids are cached per split
under `testtime.loading.cache_dir() / "lm_text"`, keyed by everything that determines them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.common import TokenizerDataModule, is_saved_dataset, load_dataset_split
from testtime.errors import DataError
from testtime.io import atomic_write
from testtime.loading import cache_dir

log = logging.getLogger(__name__)

STDLIB = "stdlib"
SPLITS = ("train", "val", "test")
CACHE_FORMAT = 1  # bump when the cached arrays change meaning
ENCODE_BATCH = 64  # documents per call of the fast tokenizer
SKIPPED_DIRS = {"__pycache__"}
STDLIB_SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".parquet", ".arrow"}  # a path, not a dataset id


@dataclass(frozen=True)
class Document:
    """One document: a file (read lazily) or a dataset row (text given)."""

    key: str  # relative path (or row id): decides the split
    path: Path | None = None
    text: str | None = None
    stamp: tuple = ()  # (size, mtime_ns) of a file: part of the cache key


def _hash_unit(text: str) -> float:
    """A uniform number in [0, 1) fixed by `text`."""
    return int(hashlib.md5(text.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def split_of(key: str, val_fraction: float, test_fraction: float) -> str:
    """The split of a document, from the hash of its key alone."""
    u = _hash_unit(key)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def list_files(root: Path, patterns: list[str], skipped_dirs: set[str] = SKIPPED_DIRS) -> list[Path]:
    """Files under `root` matching any pattern, skipping hidden folders and `skipped_dirs`; sorted."""
    found = set()
    for pattern in patterns:
        for path in root.rglob(pattern):
            parts = path.relative_to(root).parts
            if path.is_file() and not any(p in skipped_dirs or p.startswith(".") for p in parts[:-1]):
                found.add(path)
    return sorted(found)


def read_text(path: Path) -> str:
    """The UTF-8 text of a file; ValueError naming the file and byte offset otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 (byte offset {err.start}: "
                         f"{data[err.start:err.start + 4]!r})") from None


def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens), one batched call of the fast tokenizer."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the full tokenizer definition (vocabulary, merges, normalizer...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.md5(definition.encode("utf-8")).hexdigest()


class BlockDataset(Dataset):
    """Consecutive, non-overlapping blocks of `block_size` tokens; labels are the inputs (the model shifts)."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens = tokens
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.tokens) // self.block_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.block_size
        ids = torch.from_numpy(np.array(self.tokens[start:start + self.block_size], dtype=np.int64))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class LMTextDataModule(TokenizerDataModule):
    """Fixed-length language-modelling blocks from text files, a folder, a dataset or the stdlib.

    Every document is tokenized without special tokens and followed by EOS; each split's
    documents (in order of their relative paths) are concatenated and cut into blocks of
    `block_size` tokens. The trailing remainder shorter than a block is dropped (and logged).

    Splits: each file goes wholly to train, val or test by the md5 of its relative path (dataset
    rows: of their text, which also orders them), so splits are disjoint, stable when files are added or reordered, and
    unaffected by `max_files`. A single-file source cannot be split by file: its token stream is
    split instead, the last `test_fraction` tokens for test and the `val_fraction` before for val.

    Args:
        model_name_or_path: the tokenizer's source (a local Hugging Face folder or an alias of
            `testtime.loading`); LightningCLI links it from the model.
        source: a text file, a folder (searched recursively with `patterns`), a `datasets`
            source (hub id, local data folder, or a folder written by `save_to_disk`), or
            "stdlib": every `*.py` of the running Python's standard library (site-packages and
            __pycache__ excluded; the few files that are deliberately not UTF-8 are skipped).
        patterns: glob patterns of the files taken from a folder source.
        text_column: the column holding the text, for a `datasets` source.
        dataset_config: the `datasets` configuration name, for a `datasets` source.
        dataset_split: the split of a `datasets` source to read (it is then split again by hash).
        block_size: tokens per block.
        val_fraction: expected share of documents in the validation split.
        test_fraction: expected share of documents in the test split.
        max_files: read at most this many documents (a deterministic choice, shared among the
            splits in proportion to their fractions with at least one each); None reads all.
        batch_size: blocks per batch (per device).
        num_workers: DataLoader worker processes.
        cache: keep token ids on disk so that a later setup skips tokenization.
    """

    def __init__(
        self,
        model_name_or_path: str,
        source: str = STDLIB,
        patterns: list[str] = ["*.txt", "*.md", "*.py"],  # noqa: B006 (never mutated; shown by --help)
        text_column: str = "text",
        dataset_config: str | None = None,
        dataset_split: str = "train",
        block_size: int = 256,
        val_fraction: float = 0.02,
        test_fraction: float = 0.02,
        max_files: int | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        cache: bool = True,
    ):
        super().__init__()
        if block_size < 1:
            raise DataError(f"block_size must be positive, got {block_size}")
        if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
            raise DataError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be "
                             "non-negative and leave room for training data")
        if max_files is not None and max_files < 1:
            raise DataError(f"max_files must be positive or None, got {max_files}")
        self.save_hyperparameters()
        self.datasets: dict[str, BlockDataset] = {}
        self.split_documents: dict[str, list[str]] = {}  # split -> document keys (relative paths)
        self.stats: dict[str, dict] = {}

    # -- documents -----------------------------------------------------------------------------
    def _documents(self) -> tuple[list[Document], str, bool]:
        """(documents, a description of the source for the cache key, whether it is a single file)."""
        hp = self.hparams
        if hp.source == STDLIB:
            root = Path(sysconfig.get_paths()["stdlib"])
            files = list_files(root, ["*.py"], STDLIB_SKIPPED_DIRS)
            return self._file_documents(root, files, "stdlib *.py"), f"stdlib:{root}", False
        path = Path(hp.source).expanduser()
        if path.is_file():
            return self._file_documents(path.parent, [path], hp.source), f"file:{path.resolve()}", True
        if path.is_dir() and not is_saved_dataset(path):
            files = list_files(path, list(hp.patterns))
            if not files:
                raise DataError(f"source {hp.source}: no files match {list(hp.patterns)}")
            return self._file_documents(path, files, hp.source), f"folder:{path.resolve()}", False
        if not path.exists() and (hp.source.startswith((".", "/", "~")) or hp.source.count("/") > 1
                                  or path.suffix in TEXT_SUFFIXES):
            raise FileNotFoundError(f"source {hp.source} does not exist")
        return self._dataset_documents()

    @staticmethod
    def _file_documents(root: Path, files: list[Path], what: str) -> list[Document]:
        if not files:
            raise DataError(f"source {what}: no files found")
        docs = []
        for path in files:
            stat = path.stat()
            docs.append(Document(key=path.relative_to(root).as_posix(), path=path,
                                 stamp=(stat.st_size, stat.st_mtime_ns)))
        return docs

    def _dataset_documents(self) -> tuple[list[Document], str, bool]:
        hp = self.hparams
        loaded = load_dataset_split(hp.source, hp.dataset_config, hp.dataset_split)
        if hp.text_column not in loaded.column_names:
            raise DataError(f"{hp.source}: no column {hp.text_column!r}; it has {loaded.column_names}")
        texts = [t for t in loaded[hp.text_column] if t]
        if len(texts) < len(loaded):
            log.warning("%s: skipped %d rows whose %r is empty", hp.source, len(loaded) - len(texts), hp.text_column)
        if not texts:
            raise DataError(f"{hp.source}[{hp.dataset_split}] holds no text in column {hp.text_column!r}")
        # Rows are split (and ordered) by the hash of their text: duplicates land in the same split.
        docs = [Document(key=f"{hashlib.md5(t.encode('utf-8')).hexdigest()}", text=t) for t in texts]
        return docs, f"dataset:{hp.source}:{hp.dataset_config}:{hp.dataset_split}:{loaded._fingerprint}", False

    def _assign(self, docs: list[Document], single_file: bool) -> dict[str, list[Document]]:
        """Documents per split, capped by `max_files`, each split in order of its keys."""
        hp = self.hparams
        if single_file:
            return {"train": docs, "val": [], "test": []}
        splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for doc in docs:
            splits[split_of(doc.key, hp.val_fraction, hp.test_fraction)].append(doc)
        if hp.max_files is not None and len(docs) > hp.max_files:
            quota = {}
            for split, fraction in (("val", hp.val_fraction), ("test", hp.test_fraction)):
                quota[split] = min(len(splits[split]), max(1, round(hp.max_files * fraction))) if fraction else 0
            quota["train"] = max(1, hp.max_files - quota["val"] - quota["test"])
            for split in ("test", "val"):  # a cap below three documents starves test first, then val
                quota[split] -= max(0, min(quota[split], sum(quota.values()) - hp.max_files))
            for split in SPLITS:  # a deterministic, order-independent choice: the lowest hashes of another salt
                splits[split] = sorted(splits[split], key=lambda d: _hash_unit("pick:" + d.key))[:quota[split]]
        return {split: sorted(chosen, key=lambda d: d.key) for split, chosen in splits.items()}

    # -- tokenizing and caching ----------------------------------------------------------------
    def _encode(self, docs: list[Document], split: str) -> np.ndarray:
        """All documents' token ids, each followed by EOS, as one int32 array."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise DataError(f"tokenizer of {self.hparams.model_name_or_path} has no EOS token to separate documents")
        stdlib = self.hparams.source == STDLIB
        pieces, skipped = [], []
        with tqdm(total=len(docs), desc=f"tokenizing {split}", unit="doc", disable=len(docs) < 100) as bar:
            for start in range(0, len(docs), ENCODE_BATCH):
                texts = []
                for doc in docs[start:start + ENCODE_BATCH]:
                    if doc.text is not None:
                        texts.append(doc.text)
                        continue
                    try:
                        texts.append(read_text(doc.path))
                    except ValueError:
                        if not stdlib:
                            raise
                        skipped.append(doc.key)  # the stdlib ships a few deliberately mis-encoded test files
                for ids in encode_documents(self.tokenizer, texts):
                    pieces.append(np.asarray(ids + [eos], dtype=np.int32))
                bar.update(len(docs[start:start + ENCODE_BATCH]))
        if skipped:
            log.warning("%s: skipped %d stdlib files that are not UTF-8: %s", split, len(skipped), ", ".join(skipped))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    def _cache_key(self, description: str, splits: dict[str, list[Document]], single_file: bool) -> str:
        hp = self.hparams
        tok = self.tokenizer
        identity = {
            "format": CACHE_FORMAT,
            "source": description,
            "documents": {s: [[d.key, *d.stamp] for d in docs] for s, docs in splits.items()},
            "stream_split": [hp.val_fraction, hp.test_fraction] if single_file else None,
            "tokenizer": [type(tok).__name__, tok.name_or_path, len(tok), tok.eos_token_id, tokenizer_fingerprint(tok)],
        }
        return hashlib.md5(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:20]

    @staticmethod
    def _save(path: Path, tokens: np.ndarray) -> None:
        """Write atomically: a crash never leaves a truncated file that a later run would trust."""
        atomic_write(path, lambda f: np.save(f, tokens), mode="wb")

    def _token_splits(self) -> tuple[dict[str, np.ndarray], dict[str, list[Document]], bool]:
        """(token ids per split, documents per split, whether the ids came from the cache)."""
        docs, description, single_file = self._documents()
        splits = self._assign(docs, single_file)
        paths = None
        if self.hparams.cache:
            key = self._cache_key(description, splits, single_file)
            paths = {s: cache_dir() / "lm_text" / f"{key}-{s}.npy" for s in SPLITS}
            if all(p.is_file() for p in paths.values()):
                return {s: np.load(p, mmap_mode="r") for s, p in paths.items()}, splits, True
        tokens = {s: self._encode(d, s) for s, d in splits.items()}
        if single_file:  # carve val and test off the end of the one token stream
            stream = tokens["train"]
            n_test = int(len(stream) * self.hparams.test_fraction)
            n_val = int(len(stream) * self.hparams.val_fraction)
            cut = len(stream) - n_val - n_test
            tokens = {"train": stream[:cut], "val": stream[cut:cut + n_val], "test": stream[cut + n_val:]}
        if paths is not None:
            for split, path in paths.items():
                self._save(path, tokens[split])
        return tokens, splits, False

    # -- Lightning hooks -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Tokenize once on the first process of each node and fill the cache the others read."""
        if self.hparams.cache:
            self._token_splits()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:  # Lightning calls setup once per stage
            return
        tokens, documents, cached = self._token_splits()
        self.split_documents = {split: [doc.key for doc in docs] for split, docs in documents.items()}
        n_docs = {split: len(docs) for split, docs in documents.items()}
        block_size = self.hparams.block_size
        for split in SPLITS:
            dataset = BlockDataset(tokens[split], block_size)
            dropped = len(tokens[split]) - len(dataset) * block_size
            self.datasets[split] = dataset
            self.stats[split] = {"documents": n_docs[split], "tokens": len(tokens[split]), "blocks": len(dataset),
                                 "dropped_tokens": dropped, "cached": cached}
            log.info("%s: %d documents, %d tokens -> %d blocks of %d; dropped the last %d tokens (less than a block)",
                     split, n_docs[split], len(tokens[split]), len(dataset), block_size, dropped)
            fraction = {"train": 1.0, "val": self.hparams.val_fraction, "test": self.hparams.test_fraction}[split]
            if fraction > 0 and len(dataset) == 0:
                log.warning("the %s split of %s holds no full block of %d tokens", split, self.hparams.source,
                            block_size)
        if not len(self.datasets["train"]):
            raise DataError(f"source {self.hparams.source}: the training split holds fewer than block_size="
                             f"{block_size} tokens")

    def _loader(self, split: str, shuffle: bool) -> DataLoader | list:
        dataset = self.datasets[split]
        if not len(dataset):
            return []  # Lightning skips a stage whose loaders are an empty list
        return DataLoader(dataset, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", shuffle=False)

"""Arithmetic tasks whose training set is the base model's own rejection-sampled correct solutions.

This is the training data of AutoDeco ("the base model's own rejection-sampled correct
solutions"): for every training problem, `samples_per_problem` completions are sampled from the
base model (`model_name_or_path`) at `sample_temperature` / `sample_top_p`; those whose last
number is the answer are kept (identical texts once per problem) and become prompt/completion
records with completion-only labels. Validation and test batches are those of `TaskDataModule`
(the generated problems, with left-padded prompts and answers for generation).

Sampling is expensive, so `prepare_data` (Lightning runs it once per node, on local rank 0) writes
the records to `cache_dir()/rejection/<key>.jsonl` (atomically: a temporary file renamed into
place) with a `<key>.stats.json` sidecar, and every rank's `setup` reads that file. The key hashes
what the samples are drawn from: the model (its name; for a local folder also its config.json and
weight files' size and mtime; for a .gguf file its size and mtime), the training problems (seed,
sizes, difficulty, kinds and the questions themselves) and the sampling settings (k, T, top_p,
max_new_tokens). The generation batch size and device only change which random draws are made,
not what is drawn from, so they are not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from datamodules.common import tokenize_records
from datamodules.tasks import TaskDataModule
from testtime.errors import DataError
from testtime.evaluation import rejection_sample
from testtime.io import atomic_write_text
from testtime.lm import encode_prompt
from testtime.loading import cache_dir, load_model_and_tokenizer
from testtime.tasks import DEFAULT_INSTRUCTION

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the cached records change meaning
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_identity(name_or_path: str) -> dict[str, Any]:
    """What identifies a model's weights for the cache key, computed without loading it.

    A local folder: its absolute path, the content of its config.json and the size and mtime of
    config.json and the weight files (so a re-saved fine-tune gets a new key). A file (.gguf): its
    path, size and mtime. Anything else (an alias, a hub id): the name.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        files = [p for p in sorted(path.iterdir()) if p.is_file() and (p.name == "config.json"
                                                                       or p.name.endswith(_WEIGHT_SUFFIXES))]
        return {
            "name": name,
            "path": str(path.resolve()),
            "config_sha1": hashlib.sha1(config.read_bytes()).hexdigest() if config.is_file() else None,
            "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    if path.is_file():
        stat = path.stat()
        return {"name": name, "path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {"name": name}


def describe_stats(stats: dict[str, int]) -> str:
    """'kept 412 of 1200 samples (34%) from 300 problems; 40 problems had no correct sample'."""
    samples, kept = stats["samples"], stats["kept"]
    share = f"{100 * kept / samples:.0f}%" if samples else "n/a"
    text = f"kept {kept} of {samples} samples ({share}) from {stats['problems']} problems"
    if "correct" in stats and stats["correct"] != kept:
        text += f" ({stats['correct'] - kept} duplicate correct samples collapsed)"
    none = stats["problems_with_none"]
    text += f"; {none} problem{'s' if none != 1 else ''} had no correct sample"
    if stats.get("kept_unfinished"):
        text += f"; {stats['kept_unfinished']} kept samples were cut off by max_new_tokens before EOS"
    return text


class RejectionSampledTaskDataModule(TaskDataModule):
    """`TaskDataModule` whose training set is the base model's own correct solutions (AutoDeco's data).

    Args (those of `TaskDataModule`, plus):
        samples_per_problem: completions sampled per training problem (k).
        sample_temperature: sampling temperature.
        sample_top_p: nucleus sampling threshold (1 = off; no top-k either way).
        sample_max_new_tokens: the most tokens a sampled completion may have.
        generation_batch_size: problems per generation batch (each repeated k times).
        keep_unfinished: also train on correct samples cut off by `sample_max_new_tokens` before
            EOS (by default they are left out, with a logged count: training on them would teach
            the model to stop mid-answer without EOS).
        cache: reuse the records cached for the same model, problems and sampling settings;
            False samples afresh on every `prepare_data` (still written atomically).

    The train set holds one example per kept record (prompt + completion, labels -100 on the
    prompt); `stats` holds the sampling counts. With no record kept, `setup` raises ValueError
    instead of training on nothing. `seed` seeds the problems and the sampling.
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
        samples_per_problem: int = 4,
        sample_temperature: float = 1.0,
        sample_top_p: float = 1.0,
        sample_max_new_tokens: int = 64,
        generation_batch_size: int = 32,
        keep_unfinished: bool = False,
        cache: bool = True,
    ):
        super().__init__(model_name_or_path, n_train=n_train, n_val=n_val, n_test=n_test, difficulty=difficulty,
                         kinds=kinds, seed=seed, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         max_length=max_length, num_workers=num_workers)
        self.save_hyperparameters()
        for name, value in (("samples_per_problem", samples_per_problem), ("sample_max_new_tokens",
                                                                           sample_max_new_tokens),
                            ("generation_batch_size", generation_batch_size)):
            if value < 1:
                raise DataError(f"{name} must be >= 1, got {value}")
        if not sample_temperature > 0:
            raise DataError(f"sample_temperature must be > 0, got {sample_temperature}")
        if not 0 < sample_top_p <= 1:
            raise DataError(f"sample_top_p must be in (0, 1], got {sample_top_p}")
        self.stats: dict[str, Any] = {}
        self._sampled_here = False  # whether this process has (re)sampled since it was built

    # -- the cache ------------------------------------------------------------------------------
    def sampling_settings(self) -> dict[str, Any]:
        hp = self.hparams
        return {"k": hp.samples_per_problem, "temperature": hp.sample_temperature, "top_p": hp.sample_top_p,
                "max_new_tokens": hp.sample_max_new_tokens}

    def _settings_text(self) -> str:
        hp = self.hparams
        s = self.sampling_settings()
        return (f"k={s['k']}, temperature={s['temperature']}, top_p={s['top_p']}, "
                f"max_new_tokens={s['max_new_tokens']}, n_train={hp.n_train}, difficulty={hp.difficulty}, "
                f"kinds={hp.kinds}, seed={hp.seed}")

    def cache_key(self) -> str:
        hp = self.hparams
        questions = "\n".join(f"{p.question}\t{p.answer}" for p in self.problems["train"])
        identity = {
            "format": CACHE_FORMAT,
            "model": model_identity(self.model_name_or_path),
            "problems": {"seed": hp.seed, "n_train": hp.n_train, "n_val": hp.n_val, "n_test": hp.n_test,
                         "difficulty": hp.difficulty, "kinds": sorted(hp.kinds) if hp.kinds else None,
                         "instruction": DEFAULT_INSTRUCTION,
                         "questions_sha1": hashlib.sha1(questions.encode("utf-8")).hexdigest()},
            "sampling": self.sampling_settings(),
        }
        return hashlib.sha1(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:20]

    @property
    def cache_path(self) -> Path:
        """`cache_dir()/rejection/<key>.jsonl`: the kept records, one JSON object a line."""
        return cache_dir() / "rejection" / f"{self.cache_key()}.jsonl"

    @property
    def stats_path(self) -> Path:
        return self.cache_path.with_suffix(".stats.json")

    def _generation_device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        try:
            return torch.device(trainer.strategy.root_device) if trainer is not None else torch.device("cpu")
        except Exception:  # a trainer whose strategy has no device yet
            return torch.device("cpu")

    @property
    def partial_path(self) -> Path:
        """Records of an unfinished build (`<key>.partial.jsonl`), with its progress beside it."""
        return self.cache_path.with_suffix(".partial.jsonl")

    def _resume(self) -> tuple[list[dict], dict[str, int], int]:
        """(records, stats, problems done) of an interrupted build of these records, or an empty start.

        The progress file is written after the records it counts, so records beyond its count (a
        crash between the two writes) are dropped and sampled again: no duplicates.
        """
        progress = self.partial_path.with_suffix(".progress.json")
        if not (self.partial_path.is_file() and progress.is_file()):
            return [], {}, 0
        state = json.loads(progress.read_text(encoding="utf-8"))
        lines = self.partial_path.read_text(encoding="utf-8").splitlines()[: state["records"]]
        return [json.loads(line) for line in lines], state["stats"], state["problems_done"]

    def _sample(self) -> None:
        """Sample from the base model and write records + stats to the cache.

        Problems are sampled in chunks of 8 generation batches; after each chunk its records are
        appended to `partial_path` and the progress recorded, so an interrupted build resumes where
        it stopped (with the same random draws: batch i is sampled with seed + i either way). The
        finished records move into `cache_path` atomically.
        """
        hp = self.hparams
        path, problems = self.cache_path, self.problems["train"]
        device = self._generation_device()
        records, stats, done = self._resume() if hp.cache else ([], {}, 0)
        if done:
            log.info("resuming the rejection sampling of %s at problem %d of %d (%d records so far)", path, done,
                     len(problems), len(records))
        log.info("rejection sampling %d training problems with %s (%s) on %s; writing %s",
                 len(problems), self.model_name_or_path, self._settings_text(), device, path)
        start = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(self.model_name_or_path, device=device)
        progress_path = self.partial_path.with_suffix(".progress.json")
        self.partial_path.parent.mkdir(parents=True, exist_ok=True)
        chunk = hp.generation_batch_size * 8
        bar = tqdm(total=len(problems), initial=done, desc=f"rejection sampling (k={hp.samples_per_problem})",
                   unit="problem")
        try:
            with open(self.partial_path, "w", encoding="utf-8") as partial:
                # what the progress file counts (records past it, from a crash, are sampled again)
                partial.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                for first in range(done, len(problems), chunk):
                    new, counts = rejection_sample(
                        model, tokenizer, problems[first:first + chunk], k=hp.samples_per_problem,
                        temperature=hp.sample_temperature, top_p=hp.sample_top_p,
                        max_new_tokens=hp.sample_max_new_tokens, batch_size=hp.generation_batch_size,
                        seed=hp.seed + first // hp.generation_batch_size, progress=False)
                    records += new
                    stats = {key: stats.get(key, 0) + value for key, value in counts.items()}
                    partial.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in new))
                    partial.flush()
                    atomic_write_text(progress_path, json.dumps({"problems_done": min(first + chunk, len(problems)),
                                                                 "records": len(records), "stats": stats}))
                    bar.update(min(chunk, len(problems) - first))
                    bar.set_postfix(kept=len(records))
        finally:
            bar.close()
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        stats["kept"] = len(records)
        seconds = time.perf_counter() - start
        sidecar = {**stats, "model": self.model_name_or_path, "settings": self.sampling_settings(),
                   "problems_settings": {"n_train": hp.n_train, "difficulty": hp.difficulty, "kinds": hp.kinds,
                                         "seed": hp.seed},
                   "seconds": round(seconds, 2), "device": str(device), "records_file": path.name}
        atomic_write_text(self.stats_path, json.dumps(sidecar, indent=2) + "\n")
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.partial_path.unlink(missing_ok=True)
        progress_path.unlink(missing_ok=True)
        message = describe_stats(stats)
        if stats["kept"] == 0:
            log.warning("rejection sampling with %s: %s (%.1f s)", self.model_name_or_path, message, seconds)
        else:
            log.info("rejection sampling with %s: %s (%.1f s)", self.model_name_or_path, message, seconds)
        self._sampled_here = True

    def _read_records(self) -> list[dict]:
        path = self.cache_path
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not a JSON record ({err}); delete the file to sample "
                                     "again") from err
                if not isinstance(record, dict) or "prompt" not in record or "completion" not in record:
                    raise DataError(f"{path}:{number}: expected a prompt/completion record; delete the file to "
                                     "sample again")
                records.append(record)
        return records

    # -- Lightning hooks ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Sample once (local rank 0 of each node) unless the cache already holds these records.

        Under a Trainer that validates, tests or predicts, the train set is never used: nothing is sampled.
        """
        super().prepare_data()
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        if fn is not None and str(getattr(fn, "value", fn)) != "fit":
            return
        if self.hparams.cache and self.cache_path.is_file():
            log.info("using the cached rejection-sampled records %s", self.cache_path)
            return
        self._sample()

    def _ensure_records(self) -> None:
        """Called from setup: outside a multi-process run, sample here if prepare_data did not."""
        trainer = getattr(self, "trainer", None)
        single = trainer is None or trainer.world_size == 1
        missing = not self.cache_path.is_file()
        if single and (missing or (not self.hparams.cache and not self._sampled_here)):
            self._sample()
        elif missing:
            raise FileNotFoundError(
                f"{self.cache_path} does not exist: prepare_data should have written it on local rank 0. With "
                "several nodes, each node needs its own prepare_data (prepare_data_per_node=True) or a shared "
                "TESTTIME_CACHE")

    def _train_examples(self) -> list[dict]:
        self._ensure_records()
        records = self._read_records()
        if not self.hparams.keep_unfinished:
            finished = [r for r in records if r.get("finished", True)]
            if len(finished) < len(records):
                log.warning("left out %d of %d kept samples that were cut off before EOS (keep_unfinished: false; "
                            "raise sample_max_new_tokens to keep them)", len(records) - len(finished), len(records))
            records = finished
        if self.stats_path.is_file():
            self.stats = json.loads(self.stats_path.read_text(encoding="utf-8"))
        if not records:
            sampled = (f" ({describe_stats(self.stats)})" if {"samples", "kept", "problems", "problems_with_none"}
                       <= set(self.stats) else "")
            raise DataError(
                f"rejection sampling kept no correct solution{sampled}: model {self.model_name_or_path!r} with "
                f"{self._settings_text()} answered none of the training problems correctly, so there is nothing "
                "to train on. Sample more (raise samples_per_problem or n_train), make the problems easier (lower "
                "difficulty), sample more diversely (raise sample_temperature / sample_top_p) or allow longer "
                f"answers (raise sample_max_new_tokens). Records file: {self.cache_path}")
        max_length = self.max_length
        records = [{"prompt": r["prompt"], "completion": r["completion"], "answer": r.get("answer"),
                    "question": r.get("question")} for r in records]
        examples, counts = tokenize_records(
            self.tokenizer, records, max_length, "rejection-sampled train",
            extra=lambda r: {"prompt_ids": encode_prompt(self.tokenizer, r["prompt"]), "answer": r["answer"],
                             "question": r["question"]})
        truncated, dropped = counts["truncated"], counts["dropped"]
        if not examples:
            raise DataError(f"all {len(records)} rejection-sampled records lost their completion to "
                             f"max_length={max_length}; raise max_length")
        self.stats.update(records=len(records), truncated=truncated, dropped=dropped, examples=len(examples))
        log.info("train: %d examples from %d rejection-sampled records (%s)", len(examples), len(records),
                 self.cache_path)
        return examples

    def dataset(self, split: str) -> list[dict]:
        """As `TaskDataModule.dataset`, except that "train" is the rejection-sampled records."""
        if split == "train" and split not in self._datasets:
            self._datasets[split] = self._train_examples()
        return super().dataset(split)

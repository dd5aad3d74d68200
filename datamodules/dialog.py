"""Multi-turn dialogs for chat SFT (loss on every assistant turn) and conversations to chat on.

Records, from .jsonl / .json / .parquet / .arrow files or a `datasets` source:

    {"dialog": ["Hi, Jim.", "Hello! How are you?", "Fine, thanks."]}        DailyDialog style
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "5"}]}                    conversational

A `dialog` alternates speakers, the user first (DailyDialog's first speaker opens the
conversation), so its 2nd, 4th, ... utterances are the assistant's. A record may carry an
`"answer"`: validation then also generates the last assistant turn from the turns before it and
scores its last number (`val/acc_*`).

Every assistant turn is trained on, not just the last: the model's chat template renders the
conversation prefix by prefix, and the tokens each assistant message adds (its content and the
template's end of turn) carry labels; everything else is -100. A record without an assistant
turn, with an empty utterance, or opening with the assistant is a `DataError` naming the file
and record, unless `skip_bad_records` skips it (the count is logged). Conversations longer than
`max_length` are cut at the end (counted; those left without a labelled token are dropped).

`TaskDialogDataModule` makes dialogs offline from `testtime.tasks`: a question, the worked
answer, then follow-ups about the previous answer ("Now add 7 to that."), each answered exactly,
so dialog SFT runs without a model hub.

Predict batches are conversations to chat on, `{"conversations": [{"user_turns": [...], "system":
...}], "ids": [...]}`: the user's turns of each record, in order (its own assistant turns are left
out: the model replies instead; see `testtime.tinylora.chat`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from datamodules.common import TokenizerDataModule, load_dataset_split, read_json_array, read_jsonl, tokenize_records
from datamodules.sft import split_off_validation
from datamodules.tasks import GenerationCollator, SFTCollator
from testtime.errors import DataError, UsageError
from testtime.lm import IGNORE_INDEX, encode_prompt
from testtime.tasks import DEFAULT_INSTRUCTION, Problem, make_splits, prompt_messages

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


# -- records -------------------------------------------------------------------------------------

def _content(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError(f"{where} is empty")
    return text.strip()


def dialog_messages(record: Any, where: str, require_assistant: bool = True) -> list[dict]:
    """The chat messages of one record (see the module docstring); DataError naming `where` if bad."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if record.get("messages") is not None:
        raw = record["messages"]
        if not isinstance(raw, list) or not raw:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        messages = []
        for turn, message in enumerate(raw):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise DataError(f"{where}: messages[{turn}] needs a role among {ROLES} and a content, got {message!r}")
            if message["role"] == "system" and turn:
                raise DataError(f"{where}: messages[{turn}] is a system message; only the first may be one")
            messages.append({"role": message["role"],
                             "content": _content(message.get("content"), f"{where}: messages[{turn}]")})
    elif record.get("dialog") is not None:
        utterances = record["dialog"]
        if not isinstance(utterances, list) or not utterances:
            raise DataError(f"{where}: 'dialog' must be a non-empty list of utterances")
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": _content(u, f"{where}: utterance {i}")}
                    for i, u in enumerate(utterances)]
    else:
        present = sorted(k for k, v in record.items() if v is not None)
        raise DataError(f"{where}: needs 'dialog' (a list of utterances) or 'messages'; found keys {present}")
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] != "user":
        raise DataError(f"{where}: a conversation opens with a user turn (after an optional system message)")
    if require_assistant and not any(m["role"] == "assistant" for m in turns):
        raise DataError(f"{where}: no assistant turn, nothing to train on (a dialog needs at least two utterances)")
    return messages


def read_dialog_rows(path: str) -> list[tuple[str, Any]]:
    """(where, raw record) of every record of a local file, `where` naming the file and record."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"dialog file {file} does not exist")
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return [(f"{file}: record {i} (line {lineno})", row) for i, (lineno, row) in enumerate(read_jsonl(file))]
    if suffix == ".json":
        return [(f"{file}: record {i}", row) for i, row in enumerate(read_json_array(file))]
    if suffix in (".parquet", ".arrow"):
        from datasets import Dataset

        rows = Dataset.from_parquet(str(file)) if suffix == ".parquet" else Dataset.from_file(str(file))
        return [(f"{file}: record {i}", row) for i, row in enumerate(rows)]
    raise DataError(f"{file}: unsupported file type {suffix!r}; use .jsonl, .json, .parquet or .arrow")


def load_dialog_dataset(name: str, config: str | None, split: str) -> list[tuple[str, Any]]:
    """(where, raw record) of one split of a `datasets` source (hub id, folder or saved dataset)."""
    loaded = load_dataset_split(name, config, split)
    return [(f"{name}[{split}]: record {i}", row) for i, row in enumerate(loaded)]


def check_records(rows: list[tuple[str, Any]], skip_bad_records: bool, source: str,
                  require_assistant: bool = True) -> list[dict]:
    """`{"messages", "answer", "where"}` of each good record; a bad one raises, or is skipped and counted."""
    records, bad = [], []
    for where, row in rows:
        try:
            messages = dialog_messages(row, where, require_assistant)
        except DataError as err:
            if not skip_bad_records:
                raise
            bad.append(str(err))
            continue
        answer = row.get("answer")
        records.append({"messages": messages, "answer": None if answer is None else str(answer), "where": where})
    if bad:
        log.warning("skipped %d bad record(s) of %s (skip_bad_records: true); the first: %s", len(bad), source, bad[0])
    return records


# -- tokenization ----------------------------------------------------------------------------------

def tokenize_dialog(tokenizer, messages: list[dict], where: str = "conversation") -> dict[str, list[int]]:
    """`input_ids` and `labels` of a conversation: labels on every assistant turn's tokens only.

    For each assistant message k the template renders the turns before it with the generation
    prompt (`head`) and the turns through it (`full`); the tokens between `head` and `full` are
    the assistant's. Each new piece is tokenized on its own (as `tokenize_prompt_completion`
    tokenizes prompt and completion), so the boundaries are exact. A template that does not
    render a conversation prefix by prefix cannot be split this way: UsageError.
    """
    def render(turns: list[dict], generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)

    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head, full = render(messages[:k], True), render(messages[:k + 1], False)
        if not head.startswith(done) or not full.startswith(head):
            raise UsageError(f"{where}: the chat template of {tokenizer.name_or_path!r} does not render this "
                             f"conversation prefix by prefix (at message {k}), so its assistant turns cannot be "
                             f"told apart; dialog SFT needs a template that does (e.g. ChatML)")
        prompt = tokenizer(head[len(done):], add_special_tokens=False)["input_ids"]
        answer = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
        done = full
    return {"input_ids": ids, "labels": labels}


def tokenize_dialogs(tokenizer, records: list[dict], max_length: int, split: str) -> list[dict]:
    """Tokenized records, cut to `max_length` (`datamodules.common.tokenize_records`: counted, those
    left without labels dropped and counted).

    A record with an answer also gets `prompt_ids` (the turns before its last assistant turn, with
    the generation prompt), `answer` and `question` (its last user turn), for generation.
    """
    def generation_fields(record: dict) -> dict:
        if record["answer"] is None:
            return {}
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {"prompt_ids": encode_prompt(tokenizer, messages[:last]), "answer": record["answer"],
                "question": next(m["content"] for m in reversed(messages[:last]) if m["role"] == "user")}

    examples, _ = tokenize_records(tokenizer, records, max_length, split, extra=generation_fields,
                                   tokenize=lambda r: tokenize_dialog(tokenizer, r["messages"], r["where"]),
                                   kind="dialogs")
    return examples


def conversation(record: dict) -> dict:
    """What `testtime.tinylora.chat` replays: the user's turns in order and the system message."""
    messages = record["messages"]
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    return {"user_turns": [m["content"] for m in messages if m["role"] == "user"], "system": system}


class ConversationCollator:
    """Predict batches: `conversations` and `ids` (lists, no tensors: the chat tokenizes turn by turn)."""

    def __call__(self, examples: list[dict]) -> dict:
        return {"conversations": [e["conversation"] for e in examples], "ids": [e["id"] for e in examples]}


# -- generated dialogs ---------------------------------------------------------------------------

def _follow_up(value: int, rng: random.Random) -> tuple[str, int, str]:
    """A question about the previous answer `value`, the new value, and the worked answer."""
    op = rng.choice(["+", "*"] + (["-"] if value > 0 else []))
    n = rng.randint(1, value) if op == "-" else rng.randint(2, 5) if op == "*" else rng.randint(1, 20)
    question = {"+": f"Now add {n} to that.", "-": f"Now subtract {n} from that.",
                "*": f"Now multiply that by {n}."}[op]
    new = {"+": value + n, "-": value - n, "*": value * n}[op]
    return f"{question} {DEFAULT_INSTRUCTION}", new, f"{value} {op} {n} = {new}. The answer is {new}."


def task_dialog(problem: Problem, follow_ups: int, rng: random.Random) -> dict:
    """A conversation about one problem: the question and its worked solution, then `follow_ups`
    questions each about the previous answer; `answer` is the last one."""
    messages = [*prompt_messages(problem), {"role": "assistant", "content": problem.solution}]
    value = int(problem.answer)
    for _ in range(follow_ups):
        question, value, solution = _follow_up(value, rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": solution}]
    return {"messages": messages, "answer": str(value)}


# -- datamodules ---------------------------------------------------------------------------------

class _DialogData(TokenizerDataModule):
    """Tokenized splits and loaders; subclasses provide `_records(split)` ("train", "val", "predict", ...)."""

    def _records(self, split: str) -> list[dict]:
        raise NotImplementedError

    def _examples(self, split: str) -> list[dict]:
        if split not in self._cache:
            if split == "predict":
                self._cache[split] = [{"conversation": conversation(r), "id": i}
                                      for i, r in enumerate(self._records(split))]
            else:
                self._cache[split] = tokenize_dialogs(self.tokenizer, self._records(split), self.hparams.max_length,
                                                      split)
        return self._cache[split]

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        examples = self._examples(split)
        if split == "predict":
            collate: Callable = ConversationCollator()
        elif split != "train" and examples and all("answer" in e for e in examples):
            collate = GenerationCollator(self.tokenizer.pad_token_id)  # SFT fields + prompts and answers
        else:
            collate = SFTCollator(self.tokenizer.pad_token_id)
        generator = torch.Generator().manual_seed(self.hparams.seed) if shuffle else None
        return DataLoader(examples, batch_size=self.hparams.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=collate, num_workers=self.hparams.num_workers,
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if not self._examples("train"):
            raise DataError("no training dialogs left: max_length dropped every one")
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self._examples("val") else []  # an empty list: no validation

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class DialogDataModule(_DialogData):
    """Dialog SFT on local files or a `datasets` source (e.g. DailyDialog), chat on conversation files.

    Args:
        model_name_or_path: the tokenizer and chat template (the CLI links it from the model).
        train_files: local training files (.jsonl, .json, .parquet, .arrow).
        val_files: local validation files; without them (and without `val_split_name`)
            `val_fraction` of the training dialogs are held out.
        dataset_name: a `datasets` source instead of (or besides) train_files: a hub id such as
            "OpenRL/daily_dialog", a local folder of data files, or a folder from `save_to_disk`.
        dataset_config: its configuration name, if it has several.
        train_split: the split of `dataset_name` to train on.
        val_split_name: the split of `dataset_name` to validate on.
        val_fraction: share of training dialogs held out when no validation source is given.
        predict_files: conversation files for `predict` (records as above, assistant turns optional).
        skip_bad_records: skip malformed records (logged with a count) instead of stopping.
        max_length: longest tokenized dialog; longer ones are cut at the end.
        batch_size: dialogs per batch.
        num_workers: DataLoader workers.
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
        predict_files: list[str] | None = None,
        skip_bad_records: bool = False,
        max_length: int = 1024,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_length < 1:
            raise DataError(f"max_length must be positive, got {max_length}")
        self.save_hyperparameters()
        self._cache: dict[str, list[dict]] = {}
        self._splits: dict[str, list[dict]] | None = None

    def _source(self, files: list[str] | None, split: str | None, require_assistant: bool = True) -> list[dict]:
        hp = self.hparams
        records = []
        for path in files or []:
            records += check_records(read_dialog_rows(path), hp.skip_bad_records, path, require_assistant)
        if hp.dataset_name and split:
            source = f"{hp.dataset_name}[{split}]"
            records += check_records(load_dialog_dataset(hp.dataset_name, hp.dataset_config, split),
                                     hp.skip_bad_records, source, require_assistant)
        return records

    def _records(self, split: str) -> list[dict]:
        hp = self.hparams
        if split == "predict":
            if not hp.predict_files:
                raise DataError("predict needs predict_files: conversation files to chat on")
            return self._source(hp.predict_files, None, require_assistant=False)
        if self._splits is None:
            if not hp.train_files and not hp.dataset_name:
                raise DataError("DialogDataModule needs train_files or dataset_name to train or validate")
            train = self._source(hp.train_files, hp.train_split)
            val = self._source(hp.val_files, hp.val_split_name)
            if not hp.val_files and not hp.val_split_name:
                train, val = split_off_validation(train, hp.val_fraction, hp.seed)
            if not train:
                raise DataError("no training dialogs: the training sources are empty")
            self._splits = {"train": train, "val": val}
        return self._splits[split]


class TaskDialogDataModule(_DialogData):
    """Dialogs generated from `testtime.tasks` (offline): a question, its worked answer, then
    `follow_ups` questions about the previous answer. Validation and test also score the last answer
    given the conversation before it (`val/acc_*`); predict chats on the test dialogs' user turns.

    Args:
        model_name_or_path: the tokenizer and chat template (the CLI links it from the model).
        n_train: training dialogs.
        n_val: validation dialogs.
        n_test: test dialogs (also the predict set).
        difficulty: of the opening problem (see `testtime.tasks`).
        follow_ups: questions about the previous answer after the first one.
        seed: problems and follow-ups; the splits' problems are disjoint.
        max_length: longest tokenized dialog; longer ones are cut at the end.
        batch_size: dialogs per batch.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        model_name_or_path: str,
        n_train: int = 2000,
        n_val: int = 100,
        n_test: int = 200,
        difficulty: int = 2,
        follow_ups: int = 1,
        seed: int = 0,
        max_length: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
    ):
        super().__init__()
        if follow_ups < 0:
            raise DataError(f"follow_ups must be >= 0, got {follow_ups}")
        self.save_hyperparameters()
        self._cache: dict[str, list[dict]] = {}
        problems = make_splits(n_train, n_val, n_test, seed=seed, difficulty=difficulty)
        self.dialogs: dict[str, list[dict]] = {}
        for index, (split, name) in enumerate((("train", "train"), ("val", "validation"), ("test", "test"))):
            rng = random.Random(seed * 1000 + index)  # each split its own stream: growing one leaves the others
            self.dialogs[split] = [{**task_dialog(p, follow_ups, rng), "where": f"generated {split} dialog {i}"}
                                   for i, p in enumerate(problems[name])]

    def _records(self, split: str) -> list[dict]:
        return self.dialogs["test" if split == "predict" else split]

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

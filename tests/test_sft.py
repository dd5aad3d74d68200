"""SFTDataModule: record sources, completion-only labels, truncation accounting, packing, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from testtime.lm import IGNORE_INDEX
from datamodules.sft import SFTDataModule

PC_RECORDS = [{"prompt": f"Question {i}: what is {i} + {i}?", "completion": f" It is {2 * i}."} for i in range(12)]
CHAT_RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": f"Name colour {i}."},
                  {"role": "assistant", "content": f"Colour number {i} is blue."}]}
    for i in range(12)
]


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def make(tiny_model_dir, **kwargs) -> SFTDataModule:
    dm = SFTDataModule(tiny_model_dir, **{"val_fraction": 0.0, **kwargs})
    dm.setup("fit")
    return dm


def completion_part(example: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of an example, split where the labels stop being -100."""
    labels = example["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:start])
    assert labels[start:] == example["input_ids"][start:]  # every completion token is a target
    return example["input_ids"][:start], labels[start:]


def test_prompt_completion_labels_mask_exactly_the_prompt(tmp_path, tiny_model_dir, tokenizer):
    dm = make(tiny_model_dir, train_files=[write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS)])
    assert len(dm.train_dataset) == len(PC_RECORDS)
    for record, example in zip(PC_RECORDS, dm.train_dataset):
        prompt_ids, completion_ids = completion_part(example)
        assert prompt_ids == tokenizer(record["prompt"])["input_ids"]
        assert tokenizer.decode(completion_ids) == record["completion"] + tokenizer.eos_token


def test_chat_records_use_the_template_and_mask_the_prompt(tmp_path, tiny_model_dir, tokenizer):
    dm = make(tiny_model_dir, train_files=[write_jsonl(tmp_path / "chat.jsonl", CHAT_RECORDS)])
    for record, example in zip(CHAT_RECORDS, dm.train_dataset):
        prompt_ids, completion_ids = completion_part(example)
        messages = record["messages"]
        assert tokenizer.decode(prompt_ids) == tokenizer.apply_chat_template(
            messages[:-1], add_generation_prompt=True, tokenize=False)
        assert tokenizer.decode(completion_ids) == messages[-1]["content"] + "<|im_end|>\n"
        assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_json_parquet_and_arrow_files_give_the_same_examples(tmp_path, tiny_model_dir):
    records = PC_RECORDS[:6] + CHAT_RECORDS[:6]
    reference = make(tiny_model_dir, train_files=[
        write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS[:6]), write_jsonl(tmp_path / "chat.jsonl", CHAT_RECORDS[:6])
    ]).train_dataset

    (tmp_path / "all.json").write_text(json.dumps(records), encoding="utf-8")
    Dataset.from_list(PC_RECORDS[:6]).to_parquet(str(tmp_path / "pc.parquet"))
    Dataset.from_list(CHAT_RECORDS[:6]).to_parquet(str(tmp_path / "chat.parquet"))
    Dataset.from_list(CHAT_RECORDS[:6]).save_to_disk(str(tmp_path / "saved"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))

    assert make(tiny_model_dir, train_files=[str(tmp_path / "all.json")]).train_dataset == reference
    parquet = make(tiny_model_dir, train_files=[str(tmp_path / "pc.parquet"), str(tmp_path / "chat.parquet")])
    assert parquet.train_dataset == reference
    mixed = make(tiny_model_dir, train_files=[str(tmp_path / "pc.parquet"), str(arrow)])
    assert mixed.train_dataset == reference


def test_saved_datasets_source_with_its_own_validation_split(tmp_path, tiny_model_dir):
    DatasetDict({"train": Dataset.from_list(PC_RECORDS[:10]),
                 "validation": Dataset.from_list(PC_RECORDS[10:])}).save_to_disk(str(tmp_path / "dsd"))
    dm = make(tiny_model_dir, dataset_name=str(tmp_path / "dsd"), val_split_name="validation", val_fraction=0.5)
    # The explicit validation split wins over val_fraction: nothing is held out of train.
    assert dm.stats["train"]["records"] == 10 and dm.stats["val"]["records"] == 2
    reference = make(tiny_model_dir, train_files=[write_jsonl(tmp_path / "v.jsonl", PC_RECORDS[10:])])
    assert dm.val_dataset == reference.train_dataset


def test_val_fraction_split_is_seeded_and_disjoint(tmp_path, tiny_model_dir, tokenizer):
    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "r.jsonl", records)

    def split(seed):
        dm = make(tiny_model_dir, train_files=[path], val_fraction=0.1, seed=seed)
        decode = lambda data: {tokenizer.decode(e["input_ids"]) for e in data}  # noqa: E731
        return decode(dm.train_dataset), decode(dm.val_dataset)

    train, val = split(0)
    assert len(val) == 4 and len(train) == 36 and not train & val
    assert split(0) == (train, val)
    assert split(1)[1] != val


def test_truncation_is_counted_logged_and_cut_to_max_length(tmp_path, tiny_model_dir, tokenizer, caplog):
    records = [{"prompt": "Q:", "completion": "x" * n} for n in (5, 30, 10, 50, 3)]
    with caplog.at_level(logging.WARNING, logger="datamodules.sft"):
        dm = make(tiny_model_dir, train_files=[write_jsonl(tmp_path / "t.jsonl", records)], max_length=20)
    # "Q:" is 2 tokens, each completion gets EOS: lengths 8, 33, 13, 53, 6 -> two exceed 20.
    assert dm.stats["train"] == {"records": 5, "truncated": 2, "dropped": 0, "sequences": 5}
    assert "truncated 2 of 5 records in train to max_length=20" in caplog.text
    assert sorted(len(e["input_ids"]) for e in dm.train_dataset) == [6, 8, 13, 20, 20]
    longest = [e for e in dm.train_dataset if len(e["input_ids"]) == 20]
    assert all(tokenizer.decode(completion_part(e)[1]) == "x" * 18 for e in longest)  # no EOS left


def test_record_whose_completion_is_cut_off_is_dropped_and_counted(tmp_path, tiny_model_dir, caplog):
    records = [{"prompt": "short", "completion": "ok"}, {"prompt": "p" * 40, "completion": "lost"}]
    with caplog.at_level(logging.WARNING, logger="datamodules.sft"):
        dm = make(tiny_model_dir, train_files=[write_jsonl(tmp_path / "d.jsonl", records)], max_length=16)
    assert dm.stats["train"] == {"records": 2, "truncated": 1, "dropped": 1, "sequences": 1}
    assert len(dm.train_dataset) == 1
    assert "1 of them lost their whole completion and were dropped" in caplog.text


def test_packing_keeps_records_whole_with_restarting_positions(tmp_path, tiny_model_dir):
    # A record without prompt: its first token is a target unpacked, but not once packed after another record.
    path = write_jsonl(tmp_path / "mix.jsonl", PC_RECORDS + CHAT_RECORDS + [{"prompt": "", "completion": "solo"}])
    plain = make(tiny_model_dir, train_files=[path], max_length=128).train_dataset
    dm = make(tiny_model_dir, train_files=[path], max_length=128, packing=True, batch_size=4)
    packed = dm.train_dataset
    assert len(packed) < len(plain)  # records were actually combined
    assert dm.stats["train"]["sequences"] == len(packed)

    pieces = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 128
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        for a, b in zip(starts, starts[1:]):
            assert row["position_ids"][a:b] == list(range(b - a))
            pieces.append((row["input_ids"][a:b], row["labels"][a:b]))
    # Every original record appears exactly once, its labels aligned with its tokens.
    key = lambda pair: tuple(pair[0])  # noqa: E731
    expected = sorted(((e["input_ids"], [IGNORE_INDEX] + e["labels"][1:]) for e in plain), key=key)
    assert sorted(pieces, key=key) == expected

    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    assert batch["input_ids"].shape == batch["position_ids"].shape and batch["input_ids"].shape[1] <= 128


def test_batches_are_right_padded_and_the_train_order_is_seeded(tmp_path, tiny_model_dir, tokenizer):
    path = write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS)
    dm = make(tiny_model_dir, train_files=[path], batch_size=5, val_fraction=0.25)
    batch = next(iter(dm.val_dataloader()))
    lengths = batch["attention_mask"].sum(1)
    for row, n in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert batch["input_ids"].tolist()[0][: lengths[0]] == dm.val_dataset[0]["input_ids"]  # val is not shuffled

    again = make(tiny_model_dir, train_files=[path], batch_size=5, val_fraction=0.25)
    first = [b["input_ids"] for b in dm.train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(first, (b["input_ids"] for b in again.train_dataloader())))


def test_no_validation_gives_an_empty_loader_list(tmp_path, tiny_model_dir):
    dm = make(tiny_model_dir, train_files=[write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS)], val_fraction=0.0)
    assert dm.val_dataloader() == []


# -- bad input -------------------------------------------------------------------------------

def test_missing_file_is_named(tmp_path, tiny_model_dir):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        make(tiny_model_dir, train_files=[str(missing)])


def test_missing_keys_name_the_file_and_record(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [PC_RECORDS[0], {"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: record 1: needs 'prompt' and 'completion'"):
        make(tiny_model_dir, train_files=[path])


def test_missing_keys_in_parquet_name_the_file(tmp_path, tiny_model_dir):
    Dataset.from_list([{"question": "q", "answer": "a"}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(ValueError, match=r"bad\.parquet: record 0"):
        make(tiny_model_dir, train_files=[str(tmp_path / "bad.parquet")])


def test_empty_completion_is_rejected(tmp_path, tiny_model_dir):
    path = write_jsonl(tmp_path / "empty.jsonl", [PC_RECORDS[0], PC_RECORDS[1], {"prompt": "p", "completion": "  "}])
    with pytest.raises(ValueError, match=r"empty\.jsonl: record 2: the completion is empty"):
        make(tiny_model_dir, train_files=[path])


def test_non_utf8_line_names_file_and_line(tmp_path, tiny_model_dir):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(PC_RECORDS[0]).encode() + b"\n" + '{"prompt": "caf\xe9", "completion": "x"}\n'
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.jsonl: line 2 is not valid UTF-8"):
        make(tiny_model_dir, train_files=[str(path)])


def test_invalid_json_names_file_and_line(tmp_path, tiny_model_dir):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(PC_RECORDS[0]) + "\n\n" + '{"prompt": "p", "completion": }\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl: line 3: invalid JSON"):
        make(tiny_model_dir, train_files=[str(path)])


def test_signature_parses_with_jsonargparse(tmp_path, tiny_model_dir):
    from jsonargparse import ArgumentParser

    path = write_jsonl(tmp_path / "pc.jsonl", PC_RECORDS)
    parser = ArgumentParser()
    parser.add_class_arguments(SFTDataModule, "data")
    cfg = parser.parse_args([f"--data.model_name_or_path={tiny_model_dir}", f"--data.train_files=[{path}]",
                             "--data.packing=true", "--data.max_length=64"])
    dm = parser.instantiate_classes(cfg).data
    assert dm.hparams.train_files == [path] and dm.hparams.packing is True and dm.hparams.max_length == 64

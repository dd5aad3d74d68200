"""datamodules.dialog: labels on every assistant turn, bad records named (or skipped and counted),
`datasets` sources, generated task dialogs, validation prompts and predict conversations."""

import json
import logging
import random

import pytest

from datamodules.dialog import DialogDataModule, TaskDialogDataModule, dialog_messages, task_dialog, tokenize_dialog
from testtime.errors import DataError
from testtime.evaluation import is_correct
from testtime.lm import IGNORE_INDEX, encode_prompt
from testtime.tasks import make_problems


def _labelled(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_every_assistant_turn_carries_labels_and_nothing_else(tokenizer):
    messages = dialog_messages({"dialog": ["Hi, Jim. ", "Hello!", "How are you?", "Fine.", "Bye"]}, "r")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == "Hi, Jim."  # DailyDialog's trailing spaces stripped
    example = tokenize_dialog(tokenizer, messages)
    # the whole conversation up to the last assistant turn, as the template renders it (ChatML)
    rendered = tokenizer.apply_chat_template(messages[:4], tokenize=True, return_dict=True)["input_ids"]
    assert example["input_ids"] == rendered
    assert _labelled(tokenizer, example) == "Hello!<|im_end|>\nFine.<|im_end|>\n"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))


def test_messages_records_with_a_system_prompt(tokenizer):
    record = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"},
                           {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
                           {"role": "assistant", "content": "6"}]}
    example = tokenize_dialog(tokenizer, dialog_messages(record, "r"))
    assert _labelled(tokenizer, example) == "4<|im_end|>\n6<|im_end|>\n"
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.mark.parametrize("record, message", [
    ({"dialog": ["Only one utterance"]}, "no assistant turn"),
    ({"dialog": ["Hi", "  ", "Bye"]}, "utterance 1 is empty"),
    ({"messages": [{"role": "assistant", "content": "I start"}, {"role": "user", "content": "Hi"}]},
     "a conversation opens with a user turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hey"}]},
     r"messages\[1\] needs a role"),
    ({"text": "no dialog here"}, r"needs 'dialog'.*found keys \['text'\]"),
])
def test_bad_record_is_an_error_naming_file_and_record(tmp_path, record, message):
    path = _write(tmp_path / "dialogs.jsonl", [{"dialog": ["Hi", "Hello"]}, record])
    dm = DialogDataModule("tiny-random-llama", train_files=[path], val_fraction=0)
    with pytest.raises(DataError, match=rf"{path}: record 1 \(line 2\): {message}"):
        dm.train_dataloader()


def test_skip_bad_records_skips_and_counts(tmp_path, caplog):
    path = _write(tmp_path / "dialogs.jsonl", [{"dialog": ["Hi", "Hello"]}, {"dialog": ["alone"]},
                                              {"dialog": ["Hi", ""]}, {"dialog": ["Yo", "Hey", "Bye", "Ciao"]}])
    dm = DialogDataModule("tiny-random-llama", train_files=[path], val_fraction=0, skip_bad_records=True,
                          batch_size=8)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    assert "skipped 2 bad record(s)" in caplog.text and "record 1 (line 2): no assistant turn" in caplog.text


def test_datasets_source_and_truncation(tokenizer, tmp_path, caplog):
    from datasets import Dataset

    rows = [{"dialog": ["Hi there", "Hello!" * 30, "Bye"]}, {"dialog": ["Hey", "Yo"]}]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    dm = DialogDataModule("tiny-random-llama", dataset_name=str(tmp_path / "saved"), val_fraction=0, max_length=40,
                          batch_size=8)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (2, 40)
    assert "truncated 1 of 2 dialogs in train to max_length=40; 0 of them lost their whole completion" in caplog.text


def test_task_dialogs_follow_up_on_the_previous_answer():
    problems = make_problems(20, seed=0)
    for problem in problems:
        record = task_dialog(problem, follow_ups=3, rng=random.Random(problem.question))
        messages = record["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"] * 4
        value = int(problem.answer)
        assert is_correct(messages[1]["content"], problem.answer)
        for question, answer in zip(messages[2::2], messages[3::2]):
            words = question["content"].split()
            n = int(words[2] if words[1] in ("add", "subtract") else words[4].rstrip("."))
            value = {"add": value + n, "subtract": value - n, "multiply": value * n}[words[1]]
            assert value >= 0 and is_correct(answer["content"], str(value)), (question, answer)
        assert record["answer"] == str(value)


def test_task_dialog_batches_train_validate_and_chat(tokenizer):
    dm = TaskDialogDataModule("tiny-random-llama", n_train=8, n_val=4, n_test=3, follow_ups=1, batch_size=4)
    train = next(iter(dm.train_dataloader()))
    assert set(train) == {"input_ids", "attention_mask", "labels"}
    val = next(iter(dm.val_dataloader()))
    record = dm.dialogs["val"][0]
    # validation generates the last answer from the conversation before it
    prompt = val["prompt_ids"][0][val["prompt_mask"][0].bool()].tolist()
    assert prompt == encode_prompt(tokenizer, record["messages"][:3])
    assert val["answers"][0] == record["answer"] and (val["labels"] != IGNORE_INDEX).any()
    predict = next(iter(dm.predict_dataloader()))
    assert predict["conversations"][0] == {"user_turns": [m["content"] for m in dm.dialogs["test"][0]["messages"][::2]],
                                           "system": None}
    assert predict["ids"] == [0, 1, 2]
    again = TaskDialogDataModule("tiny-random-llama", n_train=20, n_val=4, n_test=3, follow_ups=1)
    assert again.dialogs["val"] == dm.dialogs["val"]  # more training dialogs leave the evaluation sets alone


def test_predict_conversations_need_no_assistant_turn(tmp_path):
    path = _write(tmp_path / "chat.jsonl", [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]},
        {"dialog": ["Just one question?"]}])
    dm = DialogDataModule("tiny-random-llama", predict_files=[path])
    batch = next(iter(dm.predict_dataloader()))
    assert batch["conversations"] == [{"user_turns": ["Hi", "Bye"], "system": "Be kind."},
                                      {"user_turns": ["Just one question?"], "system": None}]
    with pytest.raises(DataError, match="needs train_files or dataset_name"):
        dm.train_dataloader()

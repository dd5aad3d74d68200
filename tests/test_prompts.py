"""PromptDataModule: prompts from a local file for validate / test / predict."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from datamodules.prompts import PromptDataModule
from testtime.lm import encode_prompt

PROMPTS = ["What is 2 + 3?", "Hi", "Add 10 and 32, then tell me the result please."]  # different lengths
ANSWERS = ["5", "0", "42"]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def qa_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ANSWERS)])


def batches_of(dm: PromptDataModule, stage: str) -> list[dict]:
    dm.setup(stage)
    loader = {"validate": dm.val_dataloader, "test": dm.test_dataloader, "predict": dm.predict_dataloader}[stage]
    return list(loader())


def rows(batches: list[dict]) -> list[list[int]]:
    """Each row's non-pad ids, checking the padding is on the left."""
    out = []
    for batch in batches:
        assert batch["prompt_mask"][:, -1].all()  # every prompt ends at the last column
        for ids, mask in zip(batch["prompt_ids"], batch["prompt_mask"]):
            n = int(mask.sum())
            assert not mask[:-n].any() and mask[-n:].all()
            out.append(ids[-n:].tolist())
    return out


def test_string_prompts_are_chat_templated_and_left_padded(tiny_model_dir, tokenizer, qa_file):
    dm = PromptDataModule(tiny_model_dir, str(qa_file), batch_size=2)
    batches = batches_of(dm, "test")
    assert [len(b["answers"]) for b in batches] == [2, 1]
    assert set(batches[0]) == {"prompt_ids", "prompt_mask", "prompts", "ids", "answers"}
    assert batches[0]["prompt_ids"][1, 0] == tokenizer.pad_token_id  # "Hi" is padded, on the left
    expected = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    assert rows(batches) == expected
    for ids, p in zip(rows(batches), PROMPTS):
        assert tokenizer.decode(ids) == f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
    assert [a for b in batches for a in b["answers"]] == ANSWERS
    assert [p for b in batches for p in b["prompts"]] == PROMPTS
    assert [i for b in batches for i in b["ids"]] == [0, 1, 2]
    # validate and predict see the same prompts
    for stage in ("validate", "predict"):
        assert rows(batches_of(dm, stage)) == expected


def test_chat_template_false_tokenizes_raw(tiny_model_dir, tokenizer, qa_file):
    dm = PromptDataModule(tiny_model_dir, str(qa_file), batch_size=8, chat_template=False)
    assert rows(batches_of(dm, "predict")) == [tokenizer(p)["input_ids"] for p in PROMPTS]
    with pytest.raises(ValueError, match="system_prompt needs chat_template=True"):
        PromptDataModule(tiny_model_dir, str(qa_file), chat_template=False, system_prompt="Be brief.")


def test_message_prompts_from_a_json_array(tiny_model_dir, tokenizer, tmp_path):
    conversations = [
        [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 7 * 6?"}],
        [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"},
         {"role": "user", "content": "And 2 + 2?"}],
    ]
    path = tmp_path / "chats.json"
    path.write_text(json.dumps([{"id": "a", "messages": conversations[0], "answer": "42"},
                                {"id": 7, "messages": conversations[1], "answer": "4", "source": "ignored"}]))
    dm = PromptDataModule(tiny_model_dir, str(path), batch_size=4)
    (batch,) = batches_of(dm, "validate")
    assert rows([batch]) == [encode_prompt(tokenizer, c) for c in conversations]
    assert tokenizer.decode(rows([batch])[1]).endswith("And 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert batch["prompts"] == conversations and batch["ids"] == ["a", 7] and batch["answers"] == ["42", "4"]


def test_max_history_turns_keeps_the_last_messages_and_the_system_message(tiny_model_dir, tokenizer, tmp_path,
                                                                           caplog):
    turns = [{"role": r, "content": f"turn {i}"} for i, r in enumerate(["user", "assistant"] * 3 + ["user"])]
    system = [{"role": "system", "content": "Be brief."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": system + turns}, {"messages": turns[-2:]}])
    dm = PromptDataModule(tiny_model_dir, str(path), max_history_turns=5)
    with caplog.at_level(logging.INFO):
        (batch,) = batches_of(dm, "predict")
    assert rows([batch]) == [encode_prompt(tokenizer, system + turns[-5:]), encode_prompt(tokenizer, turns[-2:])]
    assert "kept the last 5 messages of 1 conversation(s)" in caplog.text
    assert batch["prompts"][0] == system + turns  # as given in the file
    with pytest.raises(ValueError, match="max_history_turns must be positive"):
        PromptDataModule(tiny_model_dir, str(path), max_history_turns=0)


def test_system_prompt_is_prepended(tiny_model_dir, tokenizer, qa_file, tmp_path):
    dm = PromptDataModule(tiny_model_dir, str(qa_file), system_prompt="Be brief.")
    (batch,) = batches_of(dm, "predict")
    assert rows([batch])[1] == encode_prompt(tokenizer, [{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "Hi"}])
    assert batch["prompts"] == PROMPTS  # as given in the file
    both = write_jsonl(tmp_path / "sys.jsonl", [{"prompt": "x"}, {"messages": [
        {"role": "system", "content": "Mine."}, {"role": "user", "content": "y"}]}])
    with pytest.raises(ValueError, match=r"sys\.jsonl: record 1 .*system message"):
        PromptDataModule(tiny_model_dir, str(both), system_prompt="Be brief.").setup("predict")


def test_without_answers_predict_works_and_test_names_the_record(tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "open.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"},
                                                 {"prompt": "c", "answer": None}])
    dm = PromptDataModule(tiny_model_dir, str(path), batch_size=2)
    batches = batches_of(dm, "predict")
    assert [b["ids"] for b in batches] == [[0, 1], [2]]
    assert all("answers" not in b for b in batches)  # no partial answers: predict_step then yields None
    for stage, loader in (("test", dm.test_dataloader), ("validate", dm.val_dataloader)):
        with pytest.raises(ValueError, match=r"open\.jsonl: record 1 has no 'answer'.*predict works"):
            dm.setup(stage)
        with pytest.raises(ValueError, match="record 1 has no 'answer'"):
            loader()
    with pytest.raises(ValueError, match="SFTDataModule"):
        dm.train_dataloader()
    # through a Trainer (which passes the stage as a TrainerFn enum): the message names the stage
    import lightning as L

    from lightning_modules.causal_lm import CausalLMModule

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(ValueError, match="record 1 has no 'answer'; test scores accuracy"):
        trainer.test(CausalLMModule(tiny_model_dir), datamodule=PromptDataModule(tiny_model_dir, str(path)))
    with pytest.raises(ValueError, match="SFTDataModule"):
        PromptDataModule(tiny_model_dir, str(path)).setup("fit")


@pytest.mark.parametrize("record, named", [
    ({"question": "no prompt key", "answer": "1"}, r"missing prompt.*found keys \['answer', 'question'\]"),
    ({"prompt": "   "}, "empty prompt"),
    ({"prompt": ["a", "b"]}, "'prompt' must be a string"),
    ({"prompt": "ok", "answer": 4}, "'answer' must be a string, got int"),
    ({"messages": []}, "empty prompt"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "the last message is the assistant's"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] needs string 'role' and 'content'"),
    ({"prompt": "p", "messages": [{"role": "user", "content": "q"}]}, "has both 'prompt' and 'messages'"),
    ("just a string", "expected an object, got str"),
])
def test_bad_record_names_file_and_index(tiny_model_dir, tmp_path, record, named):
    # a blank line first: the index counts records, the line number is given too
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"bad\.jsonl: record 1 \(line 3\): {named}"):
        PromptDataModule(tiny_model_dir, str(path)).setup("predict")


def test_bad_file(tiny_model_dir, tmp_path):
    (tmp_path / "broken.json").write_text('[{"prompt": "a"},\n {"prompt": }]')
    with pytest.raises(ValueError, match=r"broken\.json: line 2: invalid JSON"):
        PromptDataModule(tiny_model_dir, str(tmp_path / "broken.json")).setup("predict")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: no records"):
        PromptDataModule(tiny_model_dir, str(tmp_path / "empty.jsonl")).setup("predict")
    with pytest.raises(FileNotFoundError, match="nothing.jsonl"):
        PromptDataModule(tiny_model_dir, str(tmp_path / "nothing.jsonl")).setup("predict")


def test_over_long_prompt_is_an_error_not_a_truncation(tiny_model_dir, tokenizer, qa_file):
    lengths = [len(encode_prompt(tokenizer, [{"role": "user", "content": p}])) for p in PROMPTS]
    limit = sorted(lengths)[1]  # only the longest prompt (record 2) is over
    with pytest.raises(ValueError, match=rf"qa\.jsonl: record 2 \(line 3\): the prompt has {lengths[2]} tokens, "
                                         rf"more than max_prompt_tokens={limit}"):
        PromptDataModule(tiny_model_dir, str(qa_file), max_prompt_tokens=limit).setup("test")
    dm = PromptDataModule(tiny_model_dir, str(qa_file), max_prompt_tokens=max(lengths))
    assert sum(len(b["ids"]) for b in batches_of(dm, "test")) == 3


def test_validate_scores_accuracy_on_the_file(tiny_model_dir, qa_file, monkeypatch):
    """The batches feed `TesttimeModule.evaluate_batch` as TaskDataModule's do, answers aligned with rows."""
    import lightning as L

    import lightning_modules.base
    from lightning_modules.causal_lm import CausalLMModule

    seen = []

    def every_completion_says_5(model, tokenizer, prompt_ids, prompt_mask, setting, **kwargs):
        seen.append(prompt_ids.shape[0])
        return [["The answer is 5."]] * prompt_ids.shape[0]

    monkeypatch.setattr(lightning_modules.base, "generate_completions", every_completion_says_5)
    model = CausalLMModule(tiny_model_dir, eval_max_new_tokens=2, eval_num_samples=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    (metrics,) = trainer.validate(model, datamodule=PromptDataModule(tiny_model_dir, str(qa_file), batch_size=2))
    assert metrics["val/acc_greedy"] == pytest.approx(1 / 3)  # only record 0's answer is 5
    assert seen == [2, 2, 1, 1]  # two settings per batch


def test_cli_predict_on_a_prompt_file(run_cli, tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "prompt": f"What is {i} + 1?"} for i in range(5)])
    output = tmp_path / "predictions.jsonl"
    callback = {"class_path": "callbacks.PredictionWriter", "init_args": {"output_path": str(output)}}
    out = run_cli("predict", "--model", "lightning_modules.causal_lm.CausalLMModule",
                  "--model.model_name_or_path", tiny_model_dir, "--model.eval_max_new_tokens", "3",
                  "--data", "datamodules.prompts.PromptDataModule", "--data.path", str(path),
                  "--data.batch_size", "2", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
                  f"--trainer.callbacks={json.dumps([callback])}", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    predictions = [json.loads(line) for line in output.read_text().splitlines()]
    assert [p["id"] for p in predictions] == [f"p{i}" for i in range(5)]
    assert all(isinstance(p["completion"], str) and p["answer"] is None for p in predictions)

"""Rejection sampling (AutoDeco's training data) and the datamodule that caches it."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import time

import pytest
import torch

from datamodules.common import tokenize_prompt_completion
from testtime.lm import IGNORE_INDEX
from testtime.evaluation import extract_answer, is_correct, rejection_sample
from testtime.tasks import Problem, make_problems, prompt_messages

QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def right(a, op, b, value):
    return f"The answer is {value}."


def worked(a, op, b, value):
    return f"{a} {op} {b} = {value}."


def wrong(a, op, b, value):
    return f"The answer is {value + 1}."


def right_then_wrong(a, op, b, value):  # the right number, but not last: wrong
    return f"The answer is {value}, or maybe {value + 1}."


def scripted(index: int, row: int) -> callable:
    """Problems 0, 3, 6, ... get only wrong answers; the others two identical right ones, one worked
    solution (right, different text) and one whose last number is wrong."""
    if index % 3 == 0:
        return [wrong, right_then_wrong, wrong, wrong][row % 4]
    return [right, right, worked, right_then_wrong][row % 4]


class ScriptedSolver:
    """A generate_fn (the contract of testtime.evaluation) that reads each question back from its prompt
    and appends the text `policy(problem index, row within the k samples)` makes, then EOS and junk."""

    def __init__(self, tokenizer, problems: list[Problem], k: int, policy=scripted, unfinished=()):
        self.tokenizer, self.k, self.policy, self.unfinished = tokenizer, k, policy, set(unfinished)
        self.index = {p.question: i for i, p in enumerate(problems)}
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, model, input_ids, attention_mask, **kwargs):
        self.calls.append((tuple(input_ids.shape), kwargs))
        tok = self.tokenizer
        rows = []
        for r, ids in enumerate(input_ids.tolist()):
            prompt = tok.decode(ids)
            a, op, b = QUESTION.search(prompt).groups()
            value = eval(f"{a} {op} {b}")
            index = self.index[QUESTION.search(prompt).group(0)]
            text = self.policy(index, r % self.k)(a, op, b, value)
            continuation = tok(text, add_special_tokens=False)["input_ids"]
            if r % self.k not in self.unfinished:  # EOS, then junk that must be ignored
                continuation += [tok.eos_token_id] + tok("42", add_special_tokens=False)["input_ids"]
            rows.append(ids + continuation)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])


def expected_texts(problems: list[Problem], k: int, policy=scripted) -> dict[str, list[str]]:
    """question -> the completions rejection sampling must keep, in order, duplicates once."""
    out = {}
    for i, p in enumerate(problems):
        a, op, b = QUESTION.search(p.question).groups()
        texts = []
        for row in range(k):
            text = policy(i, row)(a, op, b, int(p.answer))
            if extract_answer(text) == p.answer and text not in texts:
                texts.append(text)
        out[p.question] = texts
    return out


# -- rejection_sample ---------------------------------------------------------------------------

def test_rejection_sample_keeps_exactly_the_correct_samples_once(tiny_llama):
    model, tokenizer = tiny_llama
    problems = make_problems(9, seed=0, difficulty=1)
    solver = ScriptedSolver(tokenizer, problems, k=4)
    model.train()
    records, stats = rejection_sample(model, tokenizer, problems, k=4, temperature=0.7, top_p=0.9,
                                      max_new_tokens=20, batch_size=4, generate_fn=solver, progress=False)
    assert model.training  # restored
    assert stats == {"problems": 9, "samples": 36, "correct": 18, "kept": 12, "kept_unfinished": 0,
                     "problems_with_none": 3}
    assert len(records) == 12
    expected = expected_texts(problems, 4)
    kept = {}
    for record in records:
        kept.setdefault(record["question"], []).append(record["completion"][0]["content"])
    assert kept == {q: texts for q, texts in expected.items() if texts}
    assert all(len(texts) == 2 for texts in kept.values())  # the duplicate right answer collapsed
    by_question = {p.question: p for p in problems}
    for record in records:
        problem = by_question[record["question"]]
        assert record["prompt"] == prompt_messages(problem)
        assert record["completion"][0]["role"] == "assistant" and len(record["completion"]) == 1
        assert record["answer"] == problem.answer
        assert extract_answer(record["completion"][0]["content"]) == problem.answer
        assert record["finished"]
        assert "42" not in record["completion"][0]["content"]  # cut at EOS
    # prompts were batched 4 at a time, each repeated k times, with the sampling settings passed on
    assert [shape[0] for shape, _ in solver.calls] == [16, 16, 4]
    kwargs = solver.calls[0][1]
    assert kwargs["do_sample"] and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    assert kwargs["max_new_tokens"] == 20 and kwargs["top_k"] == 0


def test_rejection_records_tokenize_with_labels_only_on_the_completion(tiny_llama):
    model, tokenizer = tiny_llama
    problems = make_problems(4, seed=1, difficulty=1)
    records, _ = rejection_sample(model, tokenizer, problems, k=4, generate_fn=ScriptedSolver(tokenizer, problems, 4),
                                  progress=False)
    assert records
    for record in records:
        example = tokenize_prompt_completion(tokenizer, record)
        labels = example["labels"]
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert all(label != IGNORE_INDEX for label in labels[first:])
        prompt = tokenizer.decode(example["input_ids"][:first])
        assert record["question"] in prompt and prompt.endswith("<|im_start|>assistant\n")
        assert tokenizer.decode(labels[first:]) == record["completion"][0]["content"] + "<|im_end|>\n"


def test_samples_cut_off_by_max_new_tokens_are_flagged(tiny_llama):
    """A right last number without EOS is kept (it is correct) but flagged and counted as unfinished."""
    model, tokenizer = tiny_llama
    problems = make_problems(6, seed=0, difficulty=1)
    solver = ScriptedSolver(tokenizer, problems, k=4, unfinished={2})  # the worked solutions never end
    records, stats = rejection_sample(model, tokenizer, problems, k=4, batch_size=4, generate_fn=solver,
                                      progress=False)
    assert stats["kept"] == 8 and stats["kept_unfinished"] == 4
    for record in records:
        assert record["finished"] == record["completion"][0]["content"].startswith("The answer is")


def test_rejection_sample_is_deterministic_given_the_seed(tiny_llama):
    """Randomness comes from torch's global RNG, seeded per batch: same seed, same records."""
    model, tokenizer = tiny_llama
    problems = make_problems(10, seed=2, difficulty=1)

    def coin(index, row):  # right or wrong at random, with a random tag so texts differ
        tag = int(torch.randint(0, 1000, ()))
        fn = right if torch.rand(()) < 0.5 else wrong
        return lambda a, op, b, value: f"({tag}) " + fn(a, op, b, value)

    def run(seed):
        before = torch.random.get_rng_state()
        out = rejection_sample(model, tokenizer, problems, k=3, batch_size=4, seed=seed, progress=False,
                               generate_fn=ScriptedSolver(tokenizer, problems, 3, policy=coin))
        assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
        return out

    (a, stats_a), (b, _), (c, _) = run(0), run(0), run(1)
    assert a == b
    assert a != c
    assert 0 < stats_a["kept"] < stats_a["samples"] == 30


def test_rejection_sample_validates_settings(tiny_llama):
    model, tokenizer = tiny_llama
    problems = make_problems(2, seed=0, difficulty=1)
    with pytest.raises(ValueError, match="num_samples"):
        rejection_sample(model, tokenizer, problems, k=0, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        rejection_sample(model, tokenizer, problems, temperature=0, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        rejection_sample(model, tokenizer, problems, batch_size=0, progress=False)


def test_rejection_sample_with_the_real_generate(tiny_llama):
    """model.generate end to end: the random model rarely answers right, but the counts add up."""
    model, tokenizer = tiny_llama
    problems = make_problems(3, seed=0, difficulty=1)
    records, stats = rejection_sample(model, tokenizer, problems, k=2, max_new_tokens=4, progress=False)
    assert stats["problems"] == 3 and stats["samples"] == 6
    assert stats["kept"] == len(records) <= stats["correct"] <= 6
    assert stats["problems_with_none"] == 3 - len({r["question"] for r in records})


# -- the datamodule -----------------------------------------------------------------------------

ARGS = dict(n_train=9, n_val=4, n_test=5, difficulty=1, seed=5, batch_size=4, eval_batch_size=3,
            samples_per_problem=4, sample_max_new_tokens=20, generation_batch_size=4)


@pytest.fixture
def sampler(monkeypatch, tmp_path):
    """A private cache, and `rejection_sample` replaced by the real one driven by a ScriptedSolver.

    `sampler.calls` counts sampling runs; `sampler.policy` picks the answers.
    """
    import datamodules.rejection as module

    monkeypatch.setenv("TESTTIME_CACHE", str(tmp_path / "cache"))

    class Sampler:
        calls = 0
        policy = staticmethod(scripted)
        unfinished: set[int] = set()
        problems: list[Problem] = []

        def __call__(self, model, tokenizer, problems, **kwargs):
            type(self).calls += 1
            self.problems = problems
            solver = ScriptedSolver(tokenizer, problems, kwargs["k"], policy=self.policy, unfinished=self.unfinished)
            return rejection_sample(model, tokenizer, problems, **{**kwargs, "progress": False}, generate_fn=solver)

    fake = Sampler()
    monkeypatch.setattr(module, "rejection_sample", fake)
    return fake


def make_dm(model_dir, **overrides):
    from datamodules.rejection import RejectionSampledTaskDataModule

    return RejectionSampledTaskDataModule(model_dir, **{**ARGS, **overrides})


def test_prepare_data_writes_the_cache_once(tiny_model_dir, sampler, caplog):
    dm = make_dm(tiny_model_dir)
    assert not dm.cache_path.exists()
    with caplog.at_level(logging.INFO, logger="datamodules.rejection"):
        dm.prepare_data()
    assert sampler.calls == 1
    assert sampler.problems == dm.problems["train"]
    path = dm.cache_path
    assert path.is_file() and path.parent.name == "rejection"
    assert path.parent.parent == dm.cache_path.parent.parent  # under TESTTIME_CACHE
    records = [json.loads(line) for line in path.read_text().splitlines()]
    expected = expected_texts(dm.problems["train"], 4)
    assert len(records) == sum(len(t) for t in expected.values()) == 12
    stats = json.loads(dm.stats_path.read_text())
    assert {k: stats[k] for k in ("problems", "samples", "kept", "problems_with_none")} == {
        "problems": 9, "samples": 36, "kept": 12, "problems_with_none": 3}
    assert stats["model"] == tiny_model_dir and stats["settings"]["k"] == 4
    assert "kept 12 of 36 samples (33%) from 9 problems" in caplog.text
    assert "3 problems had no correct sample" in caplog.text
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left

    again = make_dm(tiny_model_dir)
    again.prepare_data()
    again.setup("fit")
    assert sampler.calls == 1  # read from the cache, not sampled again
    assert len(again.dataset("train")) == 12


def test_cache_key_follows_what_the_samples_come_from(tiny_model_dir, tiny_model_dirs, tmp_path, sampler):
    key = make_dm(tiny_model_dir).cache_key()
    assert make_dm(tiny_model_dir).cache_key() == key
    assert make_dm(tiny_model_dir, generation_batch_size=7, batch_size=2, max_length=99).cache_key() == key
    changed = [make_dm(tiny_model_dir, samples_per_problem=3), make_dm(tiny_model_dir, sample_temperature=0.7),
               make_dm(tiny_model_dir, sample_top_p=0.9), make_dm(tiny_model_dir, sample_max_new_tokens=21),
               make_dm(tiny_model_dir, seed=6), make_dm(tiny_model_dir, n_train=8),
               make_dm(tiny_model_dir, kinds=["add_1digit"]), make_dm(tiny_model_dirs["qwen2"])]
    keys = [dm.cache_key() for dm in changed]
    assert len(set(keys + [key])) == len(keys) + 1
    # a local folder re-saved (same name, new config.json) is a different model
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    before = make_dm(str(copy)).cache_key()
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert make_dm(str(copy)).cache_key() != before
    st = (copy / "config.json").stat()
    os.utime(copy / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: re-saved
    assert make_dm(str(copy)).cache_key() != before


def test_train_batches_are_prompt_plus_a_kept_completion(tiny_model_dir, sampler):
    dm = make_dm(tiny_model_dir)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    expected = expected_texts(dm.problems["train"], 4)
    seen = []
    for batch in dm.train_dataloader():
        # the SFT fields, plus the prompt alone (left-padded), answers and questions, as TaskDataModule's
        assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask", "answers",
                              "questions"}
        rows = zip(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["prompt_ids"],
                   batch["prompt_mask"], batch["questions"], strict=True)
        for ids, mask, labels, prompt_ids, prompt_mask, question_text in rows:
            n = int(mask.sum())
            assert mask[:n].all() and not mask[n:].any()
            first = int((labels != IGNORE_INDEX).nonzero()[0])
            assert (labels[:first] == IGNORE_INDEX).all() and (labels[first:n] != IGNORE_INDEX).all()
            assert (labels[n:] == IGNORE_INDEX).all()
            prompt = tok.decode(ids[:first])
            assert prompt.endswith("<|im_start|>assistant\n")
            question = QUESTION.search(prompt).group(0)
            assert prompt_ids[prompt_mask.bool()].tolist() == ids[:first].tolist()  # the same prompt, left-padded
            assert not prompt_mask[:int((~prompt_mask.bool()).sum())].any()
            assert question_text in prompt
            completion = tok.decode(labels[first:n], skip_special_tokens=True).strip()
            assert completion in expected[question]
            seen.append((question, completion))
    assert sorted(seen) == sorted((q, t) for q, texts in expected.items() for t in texts)  # each record once


def test_val_and_test_batches_are_unchanged(tiny_model_dir, sampler):
    from datamodules.tasks import TaskDataModule

    dm = make_dm(tiny_model_dir)
    dm.setup("fit")  # single process without prepare_data: setup samples itself
    assert sampler.calls == 1
    plain_args = {k: v for k, v in ARGS.items() if k in inspect.signature(TaskDataModule).parameters}
    plain = TaskDataModule(tiny_model_dir, **plain_args)
    plain.setup("fit")
    for mine, theirs in zip(dm.val_dataloader(), plain.val_dataloader(), strict=True):
        assert {"prompt_ids", "prompt_mask", "answers", "questions", "labels"} <= set(mine)
        assert mine["answers"] == theirs["answers"] and mine["questions"] == theirs["questions"]
        assert torch.equal(mine["prompt_ids"], theirs["prompt_ids"])
        assert torch.equal(mine["input_ids"], theirs["input_ids"])
    dm.setup("test")
    assert [b["answers"] for b in dm.test_dataloader()] == [b["answers"] for b in plain.test_dataloader()]
    assert sampler.calls == 1


def test_nothing_kept_raises_instead_of_training_on_nothing(tiny_model_dir, sampler, caplog):
    sampler.policy = staticmethod(lambda index, row: wrong)
    dm = make_dm(tiny_model_dir, sample_temperature=0.5)
    with caplog.at_level(logging.WARNING, logger="datamodules.rejection"):
        dm.prepare_data()
    assert "kept 0 of 36 samples (0%) from 9 problems; 9 problems had no correct sample" in caplog.text
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "kept no correct solution" in message and tiny_model_dir in message
    assert "k=4" in message and "temperature=0.5" in message and "difficulty=1" in message
    for advice in ("samples_per_problem", "lower difficulty", "sample_temperature"):
        assert advice in message
    assert sampler.calls == 1  # the empty result is cached too: the same settings give the same nothing


def test_cut_off_samples_are_reported(tiny_model_dir, sampler, caplog):
    sampler.unfinished = {2}
    dm = make_dm(tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="datamodules.rejection"):
        dm.prepare_data()
    assert "6 kept samples were cut off by max_new_tokens" in caplog.text
    records = [json.loads(line) for line in dm.cache_path.read_text().splitlines()]
    assert sum(not r["finished"] for r in records) == 6
    assert json.loads(dm.stats_path.read_text())["kept_unfinished"] == 6
    with caplog.at_level(logging.WARNING, logger="datamodules.rejection"):
        dm.setup("fit")
    assert len(dm.dataset("train")) == len(records) - 6  # cut-off samples are not trained on
    assert f"left out 6 of {len(records)} kept samples" in caplog.text
    assert caplog.text.count("left out") == 1  # said once, where it happens
    keep = make_dm(tiny_model_dir, keep_unfinished=True)
    keep.setup("fit")
    assert len(keep.dataset("train")) == len(records)


def test_cache_false_samples_every_time(tiny_model_dir, sampler):
    dm = make_dm(tiny_model_dir, cache=False)
    dm.prepare_data()
    dm.prepare_data()
    assert sampler.calls == 2
    dm.setup("fit")  # prepare_data ran in this process: no third run
    assert sampler.calls == 2
    fresh = make_dm(tiny_model_dir, cache=False)
    fresh.setup("fit")  # a single process that skipped prepare_data samples afresh
    assert sampler.calls == 3
    assert len(fresh.dataset("train")) == 12
    assert [p.name for p in dm.cache_path.parent.iterdir() if p.name.startswith(".")] == []


def test_long_records_are_truncated_and_counted(tiny_model_dir, sampler, caplog):
    dm = make_dm(tiny_model_dir)
    dm.prepare_data()
    prompt_len = min(len(e["prompt_ids"]) for e in make_dm(tiny_model_dir).dataset("validation"))
    short = make_dm(tiny_model_dir, max_length=prompt_len + 3)
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        short.setup("fit")
    assert all(len(e["input_ids"]) <= prompt_len + 3 for e in short.dataset("train"))
    assert short.stats["truncated"] > 0
    assert short.stats["examples"] == 12 - short.stats["dropped"]
    assert "records in rejection-sampled train to max_length" in caplog.text
    assert sampler.calls == 1


def test_a_corrupt_cache_names_the_file(tiny_model_dir, sampler):
    dm = make_dm(tiny_model_dir)
    dm.prepare_data()
    dm.cache_path.write_text('{"prompt": [], "completion": []}\nnot json\n')
    with pytest.raises(ValueError, match=re.escape(f"{dm.cache_path}:2")):
        make_dm(tiny_model_dir).setup("fit")


def test_a_trainer_prepares_the_data_and_fits_on_it(tiny_model_dir, sampler, tmp_path):
    """Lightning itself runs prepare_data (rank 0) then setup; the model trains on the sampled records."""
    import lightning as L

    from lightning_modules.causal_lm import CausalLMModule

    dm = make_dm(tiny_model_dir)
    module = CausalLMModule(tiny_model_dir, eval_max_new_tokens=4, eval_num_samples=1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, limit_val_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert sampler.calls == 1 and dm.cache_path.is_file()
    assert trainer.global_step == 2
    assert dm.stats["kept"] == len(dm.dataset("train")) == 12

    fresh = make_dm(tiny_model_dir, samples_per_problem=2)  # not cached
    trainer.validate(module, datamodule=fresh, verbose=False)
    assert sampler.calls == 1  # validate needs no train set: nothing sampled


def test_defaults_match_the_task_datamodule(tiny_model_dir):
    """The shared arguments keep TaskDataModule's defaults (the subclass spells them out for the CLI)."""
    from datamodules.rejection import RejectionSampledTaskDataModule
    from datamodules.tasks import TaskDataModule

    parent = inspect.signature(TaskDataModule).parameters
    child = inspect.signature(RejectionSampledTaskDataModule).parameters
    assert list(child)[:len(parent)] == list(parent)
    assert all(child[name].default == p.default for name, p in parent.items())
    with pytest.raises(ValueError, match="samples_per_problem"):
        RejectionSampledTaskDataModule(tiny_model_dir, n_train=4, n_val=2, n_test=2, difficulty=1,
                                       samples_per_problem=0)


def test_datamodule_from_config(tiny_model_dir):
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser()
    parser.add_argument("--data", type=LightningDataModule)
    cfg = parser.parse_object({"data": {"class_path": "datamodules.rejection.RejectionSampledTaskDataModule",
                                        "init_args": {"model_name_or_path": tiny_model_dir, "n_train": 6, "n_val": 2,
                                                      "n_test": 2, "difficulty": 1, "samples_per_problem": 2,
                                                      "sample_temperature": 0.8}}})
    dm = parser.instantiate_classes(cfg).data
    assert dm.hparams.samples_per_problem == 2 and dm.hparams.sample_temperature == 0.8
    assert len(dm.problems["train"]) == 6


# -- the real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_rejection_samples_its_own_correct_solutions(smollm2):
    model, tokenizer = smollm2
    problems = make_problems(6, seed=0, difficulty=1)
    start = time.perf_counter()
    records, stats = rejection_sample(model, tokenizer, problems, k=2, temperature=0.7, max_new_tokens=24,
                                      batch_size=6, progress=False)
    seconds = time.perf_counter() - start
    print(f"smollm2 rejection sampling: {stats}, {seconds:.1f} s")
    assert stats["samples"] == 12 and stats["kept"] == len(records) >= 1
    answers = {p.question: p.answer for p in problems}
    for record in records:
        assert extract_answer(record["completion"][0]["content"]) == answers[record["question"]]


def test_the_size_knob_samples_exactly_the_problems_asked_and_keeps_only_correct_solutions(tiny_model_dir, sampler):
    dm = make_dm(tiny_model_dir, n_train=21, samples_per_problem=3, generation_batch_size=2)
    dm.prepare_data()
    stats = json.loads(dm.stats_path.read_text())
    assert stats["problems"] == 21 and stats["samples"] == 63
    records = [json.loads(line) for line in dm.cache_path.read_text().splitlines()]
    assert {r["question"] for r in records} <= {p.question for p in dm.problems["train"]}
    assert all(is_correct(r["completion"][0]["content"], r["answer"]) for r in records)
    assert len(records) == stats["kept"] and len({(r["question"], r["completion"][0]["content"]) for r in records}) \
        == len(records)


def test_an_interrupted_build_resumes_from_its_cache_without_duplicates(tiny_model_dir, sampler, tmp_path,
                                                                      monkeypatch):
    sampler.policy = staticmethod(lambda index, row: [right, worked, wrong][row % 3])  # the same for every problem
    args = dict(n_train=20, samples_per_problem=3, generation_batch_size=1)  # chunks of 8 problems
    full = make_dm(tiny_model_dir, **args)
    full.prepare_data()
    expected = full.cache_path.read_text().splitlines()
    for path in (full.cache_path, full.stats_path):
        path.unlink()

    calls, stop_at = [], [2]
    inner = type(sampler).__call__

    def recording(self, model, tokenizer, problems, **kwargs):
        calls.append(([p.question for p in problems], kwargs["seed"]))
        if len(calls) in stop_at:
            raise KeyboardInterrupt  # the user stops the build during its second chunk
        return inner(self, model, tokenizer, problems, **kwargs)

    monkeypatch.setattr(type(sampler), "__call__", recording)
    dm = make_dm(tiny_model_dir, **args)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert not dm.cache_path.exists() and dm.partial_path.is_file()
    with open(dm.partial_path, "a") as f:  # a crash between the records and the progress file
        f.write(json.dumps({"prompt": "x", "completion": "y"}) + "\n")

    calls.clear()
    stop_at.clear()
    resumed = make_dm(tiny_model_dir, **args)
    resumed.prepare_data()
    train = [p.question for p in resumed.problems["train"]]
    assert calls == [(train[8:16], 5 + 8), (train[16:], 5 + 16)]  # only what was left, with the same seeds
    assert resumed.cache_path.read_text().splitlines() == expected  # no duplicate, nothing lost
    assert not resumed.partial_path.exists()

"""The arithmetic problem generator and the datamodule built on it."""

from __future__ import annotations

import operator
import re

import pytest
import torch

from testtime.lm import IGNORE_INDEX
from testtime.tasks import KINDS, Problem, kinds_for, make_problems, make_splits, prompt_messages, space_size

ARITHMETIC = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def operands(problem: Problem) -> tuple[int, int]:
    a, _, b = ARITHMETIC.match(problem.question).groups()
    return int(a), int(b)


def check_problem(problem: Problem) -> None:
    """The answer is what the question asks, and the worked solution is right step by step."""
    assert problem.answer == str(int(problem.answer)), problem
    assert problem.solution.endswith(f"The answer is {problem.answer}."), problem
    if problem.kind == "word":
        assert not ARITHMETIC.match(problem.question)
        assert problem.question.endswith("?")
        steps = STEP.findall(problem.solution)
        assert 2 <= len(steps) <= 3, problem
        # every number of the question appears in the solution's steps; the steps chain to the answer
        for a, op, b, result in steps:
            assert OPS[op](int(a), int(b)) == int(result), problem
        assert steps[-1][3] == problem.answer
        numbers_in_question = set(re.findall(r"\d+", problem.question))
        assert numbers_in_question <= {x for step in steps for x in (step[0], step[2])}, problem
    else:
        match = ARITHMETIC.match(problem.question)
        assert match, problem
        a, op, b = match.groups()
        assert OPS[op](int(a), int(b)) == int(problem.answer), problem
        assert int(problem.answer) >= 0
    assert problem.difficulty == KINDS[problem.kind][0]


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_every_answer_is_right(difficulty):
    problems = make_problems(300 if difficulty > 1 else 155, seed=difficulty, difficulty=difficulty)
    for problem in problems:
        check_problem(problem)
    assert len({p.question for p in problems}) == len(problems)


def test_word_problems_cover_every_template():
    problems = make_problems(400, seed=0, difficulty=4, kinds=["word"])
    for problem in problems:
        check_problem(problem)
    for phrase in ("bags of", "to a friend", "A box holds", "dollars a day", "splits"):
        assert any(phrase in p.question for p in problems), phrase
    assert any("/" in p.solution for p in problems)  # the division template
    assert any(len(STEP.findall(p.solution)) == 3 for p in problems)  # a three-step one


def test_deterministic_in_seed_and_different_across_seeds():
    assert make_problems(50, seed=3, difficulty=4) == make_problems(50, seed=3, difficulty=4)
    assert make_problems(50, seed=3, difficulty=4) != make_problems(50, seed=4, difficulty=4)
    # the global RNG plays no part
    import random
    random.seed(1)
    a = make_problems(20, seed=7, difficulty=2)
    random.seed(2)
    assert make_problems(20, seed=7, difficulty=2) == a


def test_prefix_is_stable():
    assert make_problems(100, seed=5, difficulty=2)[:30] == make_problems(30, seed=5, difficulty=2)


def test_whole_space_can_be_drawn_and_no_more():
    problems = make_problems(155, seed=0, difficulty=1)
    assert len({p.question for p in problems}) == 155 == space_size(1)
    with pytest.raises(ValueError, match=r"156.*155"):
        make_problems(156, seed=0, difficulty=1)
    assert space_size(1, ["sub_1digit"]) == 55
    assert len(make_problems(55, seed=0, kinds=["sub_1digit"])) == 55


def test_splits_are_disjoint_and_deterministic():
    splits = make_splits(100, 20, 30, seed=1, difficulty=1)
    assert {k: len(v) for k, v in splits.items()} == {"train": 100, "validation": 20, "test": 30}
    questions = {k: {p.question for p in v} for k, v in splits.items()}
    assert sum(len(q) for q in questions.values()) == 150  # distinct within and across splits
    assert not questions["test"] & (questions["train"] | questions["validation"])
    assert not questions["train"] & questions["validation"]
    assert make_splits(100, 20, 30, seed=1) == splits
    assert make_splits(100, 20, 30, seed=2) != splits
    # evaluation splits do not move when the training set grows
    bigger = make_splits(105, 20, 30, seed=1)
    assert bigger["test"] == splits["test"] and bigger["validation"] == splits["validation"]


def test_too_small_space_raises_with_the_sizes():
    with pytest.raises(ValueError, match=r"n_train=150.*n_val=10.*n_test=10.*170.*155"):
        make_splits(150, 10, 10, seed=0, difficulty=1)
    with pytest.raises(ValueError, match="55"):
        make_splits(50, 5, 5, kinds=["sub_1digit"])
    make_splits(145, 5, 5, difficulty=1)  # exactly the whole space is fine


def test_difficulty_changes_kinds_and_operand_ranges():
    def largest_operand(problems):
        return max(max(operands(p)) for p in problems if p.kind != "word")

    level = {d: make_problems(150 if d == 1 else 300, seed=0, difficulty=d) for d in (1, 2, 3, 4)}
    assert {p.kind for p in level[1]} == {"add_1digit", "sub_1digit"}
    assert {p.kind for p in level[2]} == {"add_1digit", "sub_1digit", "mul_1digit", "add_2digit", "sub_2digit"}
    assert {"add_3digit", "sub_3digit", "mul_2digit"} <= {p.kind for p in level[3]}
    assert "word" not in {p.kind for p in level[3]} and "word" in {p.kind for p in level[4]}
    assert largest_operand(level[1]) <= 9
    assert 9 < largest_operand(level[2]) <= 99
    assert largest_operand(level[3]) > 99
    assert all("*" not in p.question for p in level[1])
    assert any("*" in p.question for p in level[2])


def test_kinds_filter():
    problems = make_problems(40, seed=0, difficulty=3, kinds=["mul_2digit"])
    assert {p.kind for p in problems} == {"mul_2digit"}
    assert all(min(operands(p)) >= 10 for p in problems)
    assert kinds_for(2, ["sub_2digit", "add_1digit"]) == ["add_1digit", "sub_2digit"]
    with pytest.raises(ValueError, match="needs difficulty >= 4"):
        make_problems(5, seed=0, difficulty=1, kinds=["word"])
    with pytest.raises(ValueError, match="unknown problem kind"):
        make_problems(5, seed=0, kinds=["division"])
    with pytest.raises(ValueError, match="difficulty"):
        make_problems(5, seed=0, difficulty=5)


def test_prompt_messages():
    problem = make_problems(1, seed=0)[0]
    messages = prompt_messages(problem)
    assert len(messages) == 1 and messages[0]["role"] == "user"
    assert messages[0]["content"].startswith(problem.question)
    assert "number" in messages[0]["content"]
    assert prompt_messages(problem, instruction="Be brief.")[0]["content"] == f"{problem.question} Be brief."


# --- the datamodule ---------------------------------------------------------------------------


@pytest.fixture
def datamodule(tiny_model_dir):
    from datamodules.tasks import TaskDataModule

    dm = TaskDataModule(tiny_model_dir, n_train=24, n_val=10, n_test=12, difficulty=2, seed=3, batch_size=4,
                        eval_batch_size=5)
    dm.setup("fit")
    return dm


def test_datamodule_problems_are_the_splits(datamodule):
    assert datamodule.problems == make_splits(24, 10, 12, seed=3, difficulty=2)


def test_train_batches(datamodule):
    tok = datamodule.tokenizer
    solutions = {p.solution for p in datamodule.problems["train"]}
    batch = next(iter(datamodule.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask", "answers", "questions"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, batch["input_ids"].shape[1])
    # each row's generation prompt is its SFT row's prompt part, left-padded; its answer is the problem's
    by_question = {p.question: p for p in datamodule.problems["train"]}
    for ids, labels, prompt, prompt_mask, question, answer in zip(
            batch["input_ids"], batch["labels"], batch["prompt_ids"], batch["prompt_mask"], batch["questions"],
            batch["answers"]):
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        assert prompt[prompt_mask.bool()].tolist() == ids[:first].tolist()
        assert by_question[question].answer == answer
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padded
        assert (labels[n:] == IGNORE_INDEX).all()
        target = labels[labels != IGNORE_INDEX]
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        assert (labels[:first] == IGNORE_INDEX).all()
        assert tok.decode(ids[:first]).endswith("<|im_start|>assistant\n")  # the prompt is masked
        assert tok.decode(target, skip_special_tokens=True).strip() in solutions
        assert target[-2:].tolist() == tok.convert_tokens_to_ids(["<|im_end|>", "\n"])


def test_eval_batches(datamodule):
    tok = datamodule.tokenizer
    problems = datamodule.problems["validation"]
    batches = list(datamodule.val_dataloader())
    assert [len(b["answers"]) for b in batches] == [5, 5]
    assert [a for b in batches for a in b["answers"]] == [p.answer for p in problems]
    assert [q for b in batches for q in b["questions"]] == [p.question for p in problems]
    lengths = set()
    for batch in batches:
        assert {"input_ids", "attention_mask", "labels", "prompt_ids", "prompt_mask"} <= set(batch)
        assert batch["prompt_mask"][:, -1].all()  # left padded: every prompt ends at the last column
        for ids, mask, full, question in zip(batch["prompt_ids"], batch["prompt_mask"], batch["input_ids"],
                                             batch["questions"]):
            n = int(mask.sum())
            lengths.add(n)
            assert not mask[:-n].any() and (ids[:-n] == tok.pad_token_id).all()
            prompt = tok.decode(ids[-n:])
            assert question in prompt and prompt.endswith("<|im_start|>assistant\n")
            # the generation prompt is exactly the SFT example's prompt
            assert full[:n].tolist() == ids[-n:].tolist()
    assert len(lengths) > 1  # the padding was exercised


def test_predict_batches_are_test_prompts(datamodule):
    datamodule.setup("predict")
    batch = next(iter(datamodule.predict_dataloader()))
    assert set(batch) == {"prompt_ids", "prompt_mask", "answers", "questions"}
    assert batch["questions"] == [p.question for p in datamodule.problems["test"][:5]]
    test_batch = next(iter(datamodule.test_dataloader()))
    assert torch.equal(test_batch["prompt_ids"], batch["prompt_ids"])


def test_datamodule_from_config(tiny_model_dir):
    """LightningCLI builds it from YAML: class_path + init_args through jsonargparse."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    parser = ArgumentParser()
    parser.add_argument("--data", type=LightningDataModule)
    cfg = parser.parse_object({"data": {"class_path": "datamodules.tasks.TaskDataModule", "init_args": {
        "model_name_or_path": tiny_model_dir, "n_train": 10, "n_val": 4, "n_test": 4, "difficulty": 4,
        "kinds": ["word", "add_1digit"]}}})
    dm = parser.instantiate_classes(cfg).data
    assert {p.kind for split in dm.problems.values() for p in split} <= {"word", "add_1digit"}
    assert len(dm.problems["train"]) == 10


def test_datamodule_rejects_too_many_problems(tiny_model_dir):
    from datamodules.tasks import TaskDataModule

    with pytest.raises(ValueError, match="155"):
        TaskDataModule(tiny_model_dir, n_train=2000, difficulty=1)

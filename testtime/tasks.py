"""Procedurally generated arithmetic problems with exact integer answers.

Every problem is verifiable: its answer is computed when it is generated, so accuracy needs no
judge and no dataset download. Problems come in *kinds*; the `difficulty` knob picks which kinds
are in play, and each level includes everything below it:

==========  ==============  ======================================================  ============
difficulty  kind            what                                                    space size
==========  ==============  ======================================================  ============
1           ``add_1digit``  ``a + b``, a, b in 0..9                                 100
1           ``sub_1digit``  ``a - b``, a, b in 0..9, a >= b (never negative)        55
2           ``mul_1digit``  ``a * b``, a, b in 0..9                                 100
2           ``add_2digit``  ``a + b``, a, b in 10..99                               8,100
2           ``sub_2digit``  ``a - b``, a, b in 10..99, a >= b                       4,095
3           ``add_3digit``  ``a + b``, a, b in 100..999                             810,000
3           ``sub_3digit``  ``a - b``, a, b in 100..999, a >= b                     405,450
3           ``mul_2digit``  ``a * b``, a, b in 10..99                               8,100
4           ``word``        2-3 step word problems (+, -, *, exact /)                339,600
==========  ==============  ======================================================  ============

So difficulty 1 has 155 distinct questions, 2 has 12,450, 3 has 1,236,000 and 4 has 1,575,600
(`space_size` computes these). A problem's `difficulty` is the lowest level that includes its
kind. `kinds=[...]` narrows a level to some of its kinds (asking for a kind above the level is an
error, not a silent drop).

Generation draws a kind uniformly, then the kind's numbers uniformly, and skips questions it has
already produced, so `make_problems` returns distinct questions, and its first m problems are the
same for any n >= m. `make_splits` builds on that: test first, then validation, then train, so
growing the training set never changes the evaluation sets.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

DEFAULT_INSTRUCTION = "Give the final answer as a number."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # canonical integer string, e.g. "42"
    solution: str  # short worked solution ending with "The answer is <answer>."
    kind: str
    difficulty: int


# --- plain arithmetic -------------------------------------------------------------------------

_OPS: dict[str, Callable[[int, int], int]] = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
                                              "*": lambda a, b: a * b}


@dataclass(frozen=True)
class _Arithmetic:
    """`a op b` with a, b drawn from [lo, hi]; subtraction keeps a >= b."""

    op: str
    lo: int
    hi: int

    @property
    def space(self) -> int:
        n = self.hi - self.lo + 1
        return n * (n + 1) // 2 if self.op == "-" else n * n

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        a, b = rng.randint(self.lo, self.hi), rng.randint(self.lo, self.hi)
        if self.op == "-" and a < b:
            a, b = b, a
        result = _OPS[self.op](a, b)
        return f"What is {a} {self.op} {b}?", str(result), f"{a} {self.op} {b} = {result}. The answer is {result}."


# --- word problems ----------------------------------------------------------------------------

NAMES = ("Tom", "Anna", "Maya", "Leo", "Sam", "Nina", "Ben", "Zoe")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books")


def _word_buy_bags_give(a: int, b: int, c: int, d: int, name: str, item: str) -> tuple[str, int, str]:
    bought, total = b * c, a + b * c
    answer = total - d
    return (f"{name} has {a} {item}, buys {b} bags of {c} {item} and gives away {d}. "
            f"How many {item} does {name} have now?",
            answer, f"{b} * {c} = {bought}. {a} + {bought} = {total}. {total} - {d} = {answer}.")


def _word_eat_buy(a: int, b: int, c: int, name: str, item: str) -> tuple[str, int, str]:
    left = a - b
    answer = left + c
    return (f"{name} has {a} {item} and gives {b} to a friend. Then {name} gets {c} more. "
            f"How many {item} does {name} have now?",
            answer, f"{a} - {b} = {left}. {left} + {c} = {answer}.")


def _word_boxes(a: int, b: int, c: int, name: str, item: str) -> tuple[str, int, str]:
    boxed = a * b
    answer = boxed + c
    return (f"A box holds {a} {item}. {name} fills {b} boxes and finds {c} more {item}. "
            f"How many {item} does {name} have in total?",
            answer, f"{a} * {b} = {boxed}. {boxed} + {c} = {answer}.")


def _word_wages(a: int, b: int, c: int, name: str) -> tuple[str, int, str]:
    earned = a * b
    answer = earned - c
    return (f"{name} earns {a} dollars a day for {b} days and then spends {c} dollars. "
            f"How many dollars does {name} have left?",
            answer, f"{a} * {b} = {earned}. {earned} - {c} = {answer}.")


def _word_share(b: int, q: int, c: int, name: str, item: str) -> tuple[str, int, str]:
    a = b * q  # exact division by construction
    answer = q + c
    return (f"{name} splits {a} {item} equally into {b} bags and then adds {c} {item} to one bag. "
            f"How many {item} are in that bag?",
            answer, f"{a} / {b} = {q}. {q} + {c} = {answer}.")


# (builder, number ranges in argument order, whether it takes an item). Ranges are independent and
# every constraint (no negative result, exact division) holds by construction, so the number of
# distinct questions is exactly the product of the range sizes times the names (and items).
_WORD_TEMPLATES: tuple[tuple[Callable, tuple[tuple[int, int], ...], bool], ...] = (
    (_word_buy_bags_give, ((5, 20), (2, 5), (2, 9), (1, 5)), True),
    (_word_eat_buy, ((10, 30), (1, 9), (2, 15)), True),
    (_word_boxes, ((2, 12), (2, 9), (1, 15)), True),
    (_word_wages, ((5, 20), (2, 7), (1, 9)), False),
    (_word_share, ((2, 6), (2, 10), (1, 9)), True),
)


def _template_space(ranges, uses_item: bool) -> int:
    size = math.prod(hi - lo + 1 for lo, hi in ranges) * len(NAMES)
    return size * len(ITEMS) if uses_item else size


class _Word:
    """A word problem: a template drawn with probability proportional to its size, then its numbers."""

    space = sum(_template_space(ranges, uses_item) for _, ranges, uses_item in _WORD_TEMPLATES)

    def sample(self, rng: random.Random) -> tuple[str, str, str]:
        weights = [_template_space(ranges, uses_item) for _, ranges, uses_item in _WORD_TEMPLATES]
        build, ranges, uses_item = rng.choices(_WORD_TEMPLATES, weights=weights)[0]
        numbers = [rng.randint(lo, hi) for lo, hi in ranges]
        names = [rng.choice(NAMES)] + ([rng.choice(ITEMS)] if uses_item else [])
        question, answer, steps = build(*numbers, *names)
        return question, str(answer), f"{steps} The answer is {answer}."


# --- kinds and difficulty ---------------------------------------------------------------------

KINDS: dict[str, tuple[int, _Arithmetic | _Word]] = {  # kind -> (lowest difficulty, generator)
    "add_1digit": (1, _Arithmetic("+", 0, 9)),
    "sub_1digit": (1, _Arithmetic("-", 0, 9)),
    "mul_1digit": (2, _Arithmetic("*", 0, 9)),
    "add_2digit": (2, _Arithmetic("+", 10, 99)),
    "sub_2digit": (2, _Arithmetic("-", 10, 99)),
    "add_3digit": (3, _Arithmetic("+", 100, 999)),
    "sub_3digit": (3, _Arithmetic("-", 100, 999)),
    "mul_2digit": (3, _Arithmetic("*", 10, 99)),
    "word": (4, _Word()),
}
MAX_DIFFICULTY = 4


def kinds_for(difficulty: int, kinds: list[str] | None = None) -> list[str]:
    """The kinds in play at `difficulty`, narrowed to `kinds` if given (validated)."""
    if not isinstance(difficulty, int) or not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"difficulty must be an integer in 1..{MAX_DIFFICULTY}, got {difficulty!r}")
    allowed = [kind for kind, (level, _) in KINDS.items() if level <= difficulty]
    if kinds is None:
        return allowed
    if not kinds:
        raise ValueError("kinds is empty; pass None for every kind of the difficulty level")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; choose from {', '.join(KINDS)}")
        if kind not in allowed:
            raise ValueError(f"kind {kind!r} needs difficulty >= {KINDS[kind][0]}, got difficulty={difficulty}")
    return [kind for kind in allowed if kind in kinds]  # canonical order: results don't depend on list order


def space_size(difficulty: int = 1, kinds: list[str] | None = None) -> int:
    """How many distinct questions exist for this difficulty / kinds selection."""
    return sum(KINDS[kind][1].space for kind in kinds_for(difficulty, kinds))


def make_problems(n: int, seed: int, difficulty: int = 1, kinds: list[str] | None = None) -> list[Problem]:
    """`n` distinct problems, deterministic in `seed` (a private `random.Random`, never global state).

    Raises ValueError if fewer than `n` distinct questions exist.
    """
    selected = kinds_for(difficulty, kinds)
    space = space_size(difficulty, kinds)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > space:
        raise ValueError(f"asked for {n} distinct problems but difficulty={difficulty} with kinds={selected} "
                         f"has only {space} distinct questions")
    rng = random.Random(seed)
    seen: set[str] = set()
    used = {kind: 0 for kind in selected}
    live = list(selected)  # kinds that still have unused questions
    problems: list[Problem] = []
    while len(problems) < n:
        kind = rng.choice(live)
        level, generator = KINDS[kind]
        question, answer, solution = generator.sample(rng)
        if question in seen:
            continue
        seen.add(question)
        problems.append(Problem(question, answer, solution, kind, level))
        used[kind] += 1
        if used[kind] == generator.space:
            live.remove(kind)
    return problems


def make_splits(n_train: int, n_val: int, n_test: int, seed: int = 0, difficulty: int = 1,
                kinds: list[str] | None = None) -> dict[str, list[Problem]]:
    """Disjoint train / validation / test splits (no question appears in two splits).

    The test split is drawn first and validation second, so changing `n_train` leaves them as they
    are. Raises ValueError when the problem space cannot hold all three splits.
    """
    sizes = {"train": n_train, "validation": n_val, "test": n_test}
    for split, size in sizes.items():
        if size < 0:
            raise ValueError(f"{split} size must be >= 0, got {size}")
    total = n_train + n_val + n_test
    space = space_size(difficulty, kinds)
    if total > space:
        raise ValueError(f"n_train={n_train} + n_val={n_val} + n_test={n_test} = {total} distinct problems "
                         f"requested, but difficulty={difficulty} with kinds={kinds_for(difficulty, kinds)} "
                         f"has only {space} distinct questions")
    problems = make_problems(total, seed, difficulty, kinds)
    return {
        "train": problems[n_test + n_val:],
        "validation": problems[n_test:n_test + n_val],
        "test": problems[:n_test],
    }


def prompt_messages(problem: Problem | str, instruction: str = DEFAULT_INSTRUCTION) -> list[dict]:
    """The chat prompt for a problem: one user turn, the question then the instruction."""
    question = problem.question if isinstance(problem, Problem) else problem
    content = f"{question} {instruction}".strip()
    return [{"role": "user", "content": content}]


def sft_example(problem: Problem, instruction: str = DEFAULT_INSTRUCTION) -> dict:
    """A conversational prompt/completion record: the worked solution is the assistant's answer."""
    return {"prompt": prompt_messages(problem, instruction),
            "completion": [{"role": "assistant", "content": problem.solution}]}

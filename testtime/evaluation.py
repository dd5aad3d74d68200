"""Answer checking, an accuracy metric and pluggable decoding for the arithmetic tasks.

Scoring: `extract_answer` takes the *last* number in a completion (so "3 + 4 = 7. The answer is
7." and "7" both read as 7) and `is_correct` compares it with the reference numerically.
`AnswerAccuracy` is a torchmetrics metric with sum-reduced states, so it aggregates correctly
across DDP ranks.

Decoding is described by a `DecodingSetting`: greedy, sampling with a temperature / top-p, k
samples per problem, and optionally a custom **generate function**. The contract:

    generate_fn(model, input_ids, attention_mask, **generate_kwargs) -> LongTensor [N, L]

* `input_ids` / `attention_mask` are LEFT-padded prompts, [N, P], on the model's device. With k
  samples per problem each prompt is already repeated k times (rows i*k .. i*k+k-1 belong to
  prompt i), so a generate function never has to know about k.
* `generate_kwargs` are what `model.generate` would get: `max_new_tokens`, `pad_token_id`,
  `do_sample`, and when sampling `temperature`, `top_p`, `top_k=0`, plus `setting.extra`. A method
  may ignore the ones it does not use (a learned temperature head ignores `temperature`) but must
  respect `max_new_tokens`.
* It returns the full sequences, prompt first: `out[:, :P]` must be `input_ids` and the
  continuation follows (as `model.generate` returns for decoder-only models). Rows may be
  right-padded with `pad_token_id`; everything after the first EOS is ignored.
* It owns its gradient mode: `generate_completions` does not wrap it in `torch.no_grad()`
  (`model.generate` does that itself), so test-time optimization may use autograd inside.
* Randomness should come from torch's global RNG (as `model.generate` does): the caller seeds it
  inside a `fork_rng`, which makes runs reproducible without disturbing anyone else's RNG.

The default generate function is `model.generate`. Anything else - learned per-token temperature,
test-time optimization of a prefix or of weights - plugs in by passing `generate_fn`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Sequence

import torch
from torchmetrics import Metric
from tqdm.auto import tqdm

from testtime.lm import cut_at_eos, encode_prompt, eos_token_ids, left_pad, seeded_rng
from testtime.tasks import Problem, prompt_messages

GenerateFn = Callable[..., torch.Tensor]

# A number not glued to a preceding digit or dot: an optional minus (only when it is not a binary
# minus, i.e. not right after a word character), then digits with optional thousands separators
# ("1,234" but not "1,2345"), then an optional decimal part ("3.0"; a trailing "." is punctuation).
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _canonical(number: str) -> str:
    value = Decimal(number.replace(",", ""))
    if value == value.to_integral_value():
        return str(int(value))  # "3.0" -> "3", "-0" -> "0"
    return format(value.normalize(), "f")  # "3.50" -> "3.5"


def extract_answer(text: str) -> str | None:
    """The last number in `text` as a canonical string ("1,234.0" -> "1234"), or None if there is none."""
    matches = _NUMBER.findall(text or "")
    return _canonical(matches[-1]) if matches else None


def is_correct(completion: str, answer: str) -> bool:
    """Whether the last number of `completion` equals `answer` numerically."""
    predicted, reference = extract_answer(completion), extract_answer(str(answer))
    if predicted is None or reference is None:
        return False
    try:
        return Decimal(predicted) == Decimal(reference)
    except InvalidOperation:
        return False


class AnswerAccuracy(Metric):
    """Mean correctness over problems, each problem scored as the mean over its k completions.

    With k samples per problem this is pass@1 estimated from k samples. States are sums, so
    DDP reduction (and `merge_state`) is exact. With nothing seen it computes to 0, not NaN.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, completions: Sequence[Sequence[str]], answers: Sequence[str]) -> None:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completion lists for {len(answers)} answers")
        score = 0.0
        for samples, answer in zip(completions, answers):
            if isinstance(samples, str) or not samples:
                raise ValueError("each problem needs a non-empty list of completions")
            score += sum(is_correct(s, answer) for s in samples) / len(samples)
        self.correct += score
        self.total += len(answers)

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.zeros((), device=self.correct.device)
        return self.correct / self.total


@dataclass
class DecodingSetting:
    """One way of decoding: its name (a results key), sampling parameters, k and an optional generate_fn."""

    name: str
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    num_samples: int = 1
    generate_fn: GenerateFn | None = None  # None: model.generate (see the module docstring)
    extra: dict[str, Any] = field(default_factory=dict)  # more generate kwargs

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"{self.name}: num_samples must be >= 1, got {self.num_samples}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"{self.name}: temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{self.name}: top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Sampling kwargs for `generate`; top_k=0 so T=1, top_p=1 is plain ancestral sampling."""
        kwargs: dict[str, Any] = {"do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=0)
        kwargs.update(self.extra)
        return kwargs


def greedy(generate_fn: GenerateFn | None = None, name: str = "greedy") -> DecodingSetting:
    return DecodingSetting(name, do_sample=False, generate_fn=generate_fn)


def sampling(temperature: float = 1.0, top_p: float = 1.0, k: int = 1, generate_fn: GenerateFn | None = None,
             name: str | None = None) -> DecodingSetting:
    """A sampling setting named like `sample_T0.6_p0.95` (with `_k4` when k > 1)."""
    name = name or f"sample_T{temperature:g}_p{top_p:g}" + (f"_k{k}" if k > 1 else "")
    return DecodingSetting(name, do_sample=True, temperature=temperature, top_p=top_p, num_samples=k,
                           generate_fn=generate_fn)


def default_sampling(k: int = 1, generate_fn: GenerateFn | None = None) -> DecodingSetting:
    """Plain sampling from the model's distribution (T=1, top_p=1, no top-k)."""
    return sampling(1.0, 1.0, k, generate_fn)


def sweep_settings(temperatures: Sequence[float] = (0.3, 0.6, 1.0), top_ps: Sequence[float] = (0.8, 0.95, 1.0),
                   k: int = 1, generate_fn: GenerateFn | None = None) -> list[DecodingSetting]:
    """The static (T, top_p) grid a baseline is tuned over: evaluate on validation, then `pick_best`."""
    return [sampling(t, p, k, generate_fn) for t in temperatures for p in top_ps]


def pick_best(results: dict[str, float], settings: Sequence[DecodingSetting]) -> DecodingSetting:
    """The setting with the highest accuracy in `results` (the first one on ties)."""
    scored = [s for s in settings if s.name in results]
    if not scored:
        raise ValueError("none of the settings has a result")
    return max(scored, key=lambda s: results[s.name])  # max keeps the first of equal keys


def generate_completions(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         setting: DecodingSetting, max_new_tokens: int, seed: int | None = None) -> list[list[str]]:
    """`setting.num_samples` decoded continuations for each LEFT-padded prompt: [B][k] strings.

    Only the continuation is decoded (special tokens skipped, cut at the first EOS, stripped).
    With `seed`, sampling is reproducible and the global RNG is left as it was.
    """
    k = setting.num_samples
    batch, prompt_len = input_ids.shape
    if k > 1:
        input_ids = input_ids.repeat_interleave(k, dim=0)
        attention_mask = attention_mask.repeat_interleave(k, dim=0)
    kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id, **setting.generate_kwargs()}
    generate_fn = setting.generate_fn or (lambda m, ids, mask, **kw: m.generate(input_ids=ids, attention_mask=mask, **kw))
    with seeded_rng(seed, input_ids.device):
        sequences = generate_fn(model, input_ids, attention_mask, **kwargs)
    if sequences.shape[0] != batch * k or sequences.shape[1] < prompt_len:
        raise ValueError(f"{setting.name}: generate_fn returned shape {tuple(sequences.shape)} for "
                         f"{batch * k} prompts of length {prompt_len}; it must return prompt + continuation")
    eos = eos_token_ids(model, tokenizer)
    texts = [tokenizer.decode(cut_at_eos(row, eos), skip_special_tokens=True).strip()
             for row in sequences[:, prompt_len:].tolist()]
    return [texts[i * k:(i + 1) * k] for i in range(batch)]


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def evaluate(model, tokenizer, problems: Sequence[Problem], settings: DecodingSetting | Sequence[DecodingSetting],
             batch_size: int = 16, max_new_tokens: int = 32, seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Accuracy of every setting on the same problems: {setting.name: accuracy}.

    Batch i is generated with seed `seed + i` under every setting, so settings see the same random
    numbers (less noisy comparisons) and reruns reproduce.
    """
    settings = [settings] if isinstance(settings, DecodingSetting) else list(settings)
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"setting names must be unique, got {names}")
    device = _model_device(model)
    batches = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start:start + batch_size]
        ids, mask = left_pad([encode_prompt(tokenizer, prompt_messages(p)) for p in chunk], tokenizer.pad_token_id,
                             device)
        batches.append((ids, mask, [p.answer for p in chunk]))

    results: dict[str, float] = {}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(settings) * len(batches), desc="evaluate", disable=not progress)
    try:
        for setting in settings:
            metric = AnswerAccuracy()
            bar.set_postfix_str(setting.name)
            for i, (ids, mask, answers) in enumerate(batches):
                metric.update(generate_completions(model, tokenizer, ids, mask, setting, max_new_tokens, seed + i), answers)
                bar.update()
            results[setting.name] = metric.compute().item()
    finally:
        bar.close()
        model.train(was_training)
    return results


def rejection_sample(model, tokenizer, problems: Sequence[Problem], k: int = 4, temperature: float = 1.0,
                     top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 16, seed: int = 0,
                     generate_fn: GenerateFn | None = None,
                     progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The model's own correct solutions: k samples per problem, only those with the right answer kept.

    This is how AutoDeco's training data is made ("the base model's own rejection-sampled correct
    solutions"). Prompts are batched and left-padded as in `evaluate`; batch i is sampled with seed
    `seed + i` through `generate_completions` (so the result is deterministic given `seed` and
    `batch_size`, and the global RNG is left alone). `generate_fn` follows the module's contract.

    A sample is kept when `is_correct` says its last number is the answer; identical texts of one
    problem are kept once. Each record is a conversational prompt/completion record,
    `{"prompt": prompt_messages(problem), "completion": [{"role": "assistant", "content": text}],
    "answer": ..., "question": ...}`, ready for `tokenize_prompt_completion`.

    Each record also says whether its sample `finished` (ended with EOS) or was cut off by
    `max_new_tokens`: a cut-off sample whose last number happens to be the answer is kept, but
    training on it teaches the model to stop there; `kept_unfinished` counts them.

    Returns `(records, stats)`; stats counts `problems`, `samples` (drawn), `correct` (correct
    samples, duplicates included), `kept` (records), `kept_unfinished` and `problems_with_none`
    (no correct sample).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inner = generate_fn or (lambda m, ids, mask, **kw: m.generate(input_ids=ids, attention_mask=mask, **kw))
    captured: list[torch.Tensor] = []

    def capturing(m, ids, mask, **kw):  # keeps the token ids, to tell finished samples from cut-off ones
        captured[:] = [inner(m, ids, mask, **kw)]
        return captured[0]

    setting = sampling(temperature, top_p, k, capturing)  # validates k, temperature and top_p
    device = _model_device(model)
    eos = eos_token_ids(model, tokenizer)
    records: list[dict[str, Any]] = []
    stats = {"problems": len(problems), "samples": 0, "correct": 0, "kept": 0, "kept_unfinished": 0,
             "problems_with_none": 0}
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(problems), desc=f"rejection sampling (k={k})", unit="problem", disable=not progress)
    try:
        for i, start in enumerate(range(0, len(problems), batch_size)):
            chunk = problems[start:start + batch_size]
            ids, mask = left_pad([encode_prompt(tokenizer, prompt_messages(p)) for p in chunk],
                                 tokenizer.pad_token_id, device)
            completions = generate_completions(model, tokenizer, ids, mask, setting, max_new_tokens, seed + i)
            finished = [any(t in eos for t in row) for row in captured[0][:, ids.shape[1]:].tolist()]
            for j, (problem, samples) in enumerate(zip(chunk, completions)):
                stats["samples"] += len(samples)
                kept: set[str] = set()
                for text, done in zip(samples, finished[j * k:(j + 1) * k]):
                    if not is_correct(text, problem.answer):
                        continue
                    stats["correct"] += 1
                    if text in kept:
                        continue
                    kept.add(text)
                    stats["kept_unfinished"] += not done
                    records.append({"prompt": prompt_messages(problem),
                                    "completion": [{"role": "assistant", "content": text}],
                                    "answer": problem.answer, "question": problem.question, "finished": done})
                stats["problems_with_none"] += not kept
            stats["kept"] = len(records)
            bar.update(len(chunk))
            bar.set_postfix(kept=len(records), samples=stats["samples"])
    finally:
        bar.close()
        model.train(was_training)
    return records, stats

"""The seed's analysis helpers: the uncertainty plot, the baseline-vs-TTA benchmark and its table.

- `plot_uncertainty(logs, path)`: average entropy and disagreement per step of one
  `generate_with_tta_uncertainty` run, side by side, as a PNG (`uncertainty_figure(logs)`: the figure).
- `run_academic_benchmark(model, tokenizer, ...)`: the baseline sampler and the TTA sampler at
  several `tta_k` ("thresholds", the seed's name) on the same prompts, batch by batch in turn (so
  slow drifts of the machine hit every method alike), each batch with the same seed for every
  method. Records per method: which answers were right, NFE and wall time. Default prompts:
  `samples` arithmetic problems of `testtime.tasks` (difficulty 1), in the tokenizer's chat
  template, scored by `testtime.evaluation.is_correct` (last number of the completion).
- `analyze_icml_results(results)`: a markdown table with binomial standard errors and paired
  differences against the baseline; printed and returned.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from testtime.diffusion.sampling import generate
from testtime.diffusion.tta import generate_with_tta_uncertainty
from testtime.evaluation import is_correct
from testtime.io import new_figure, save_figure, standard_error
from testtime.lm import cut_at_eos, encode_prompt, eos_token_ids, left_pad
from testtime.tasks import make_problems, prompt_messages


def plot_uncertainty(logs: dict, path: str | os.PathLike) -> Path:
    """The seed's figure: average entropy (left) and disagreement (right) per step, saved as PNG."""
    return save_figure(uncertainty_figure(logs), path)


def uncertainty_figure(logs: dict):
    """`plot_uncertainty`'s figure of one `generate_with_tta_uncertainty` run, not yet saved."""
    stats = logs["tta_stats"]
    fig, (left, right) = new_figure(ncols=2, panel_size=(6.0, 4.0))
    left.plot(stats["avg_entropy_per_step"])
    left.set(title="Average Entropy per Step", xlabel="Step", ylabel="Entropy (/ log V)")
    right.plot(stats["avg_disagreement_per_step"])
    right.set(title="Average Disagreement per Step", xlabel="Step", ylabel="Disagreement Rate")
    fig.tight_layout()
    return fig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tokens_and_nfe(out, name: str) -> tuple[torch.Tensor, float]:
    """A sampler's `(tokens, nfe)` or `(tokens, logs)` as (tokens, nfe)."""
    if not (isinstance(out, tuple) and len(out) == 2 and torch.is_tensor(out[0])):
        raise ValueError(f"{name} must return (tokens, nfe) or (tokens, logs with 'nfe'); got {type(out).__name__}")
    tokens, extra = out
    return tokens, float(extra["nfe"] if isinstance(extra, dict) else extra)


def run_academic_benchmark(model, tokenizer, baseline_fn: Callable | None = None,
                           experimental_fn: Callable = generate_with_tta_uncertainty,
                           thresholds: Sequence[int] = (3, 5, 7), samples: int = 20,
                           prompts: Sequence | None = None, answers: Sequence[str] | None = None,
                           steps: int = 32, gen_length: int = 32, block_length: int = 32, batch_size: int = 10,
                           seed: int = 0, difficulty: int = 1, baseline_kwargs: dict | None = None,
                           experimental_kwargs: dict | None = None) -> dict:
    """Baseline vs TTA uncertainty sampling at each `tta_k` in `thresholds`: accuracy, NFE, wall time.

    `baseline_fn` (None: LLaDA's `generate`) is called as
    `fn(model, ids, steps=, gen_length=, block_length=, attention_mask=, seed=, return_nfe=True,
    **baseline_kwargs)` and returns `(tokens, nfe)`; `experimental_fn` as
    `fn(model, ids, steps=, gen_length=, tta_k=k, seed=, block_length=, attention_mask=,
    **experimental_kwargs)` and returns `(tokens, logs)` with `logs["nfe"]`. Batch i (left-padded
    prompts) gets seed `seed + i` under every method.

    `prompts` (strings or chat message lists, each through `testtime.lm.encode_prompt`) with their
    `answers`, all of them; else `samples` problems of `testtime.tasks.make_problems(samples, seed,
    difficulty)` in the chat template.
    Returns `{"settings": {...}, "methods": {name: {"tta_k", "correct" (list of bool), "accuracy",
    "nfe_per_sample", "seconds", "seconds_per_sample", "completions"}}}`, names "baseline" and
    "tta_k<k>"; JSON-ready.
    """
    baseline_fn = baseline_fn or generate
    if prompts is None:
        problems = make_problems(samples, seed=seed, difficulty=difficulty)
        prompts, answers = [prompt_messages(p) for p in problems], [p.answer for p in problems]
    elif answers is None or len(answers) != len(prompts):
        raise ValueError(f"prompts need one answer each: {len(prompts)} prompts, "
                         f"{'no' if answers is None else len(answers)} answers")
    prompts, answers = list(prompts), list(answers)
    if not prompts:
        raise ValueError("no prompts to benchmark")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.device if isinstance(getattr(model, "device", None), torch.device) else next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    methods: dict[str, dict] = {"baseline": {"tta_k": None}, **{f"tta_k{k}": {"tta_k": int(k)} for k in thresholds}}
    for record in methods.values():
        record.update(correct=[], completions=[], nfe_total=0.0, seconds=0.0)

    def run(name: str, ids: torch.Tensor, mask: torch.Tensor, batch_seed: int) -> tuple[torch.Tensor, float]:
        common = dict(steps=steps, gen_length=gen_length, block_length=block_length, attention_mask=mask,
                      seed=batch_seed)
        if name == "baseline":
            out = baseline_fn(model, ids, return_nfe=True, **common, **(baseline_kwargs or {}))
            return _tokens_and_nfe(out, "baseline_fn")
        out = experimental_fn(model, ids, tta_k=methods[name]["tta_k"], **common, **(experimental_kwargs or {}))
        return _tokens_and_nfe(out, "experimental_fn")

    for i, begin in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[begin:begin + batch_size]
        ids, mask = left_pad([encode_prompt(tokenizer, p) for p in chunk], tokenizer.pad_token_id, device)
        for name, record in methods.items():
            _sync(device)
            started = time.perf_counter()
            tokens, nfe = run(name, ids, mask, seed + i)
            _sync(device)
            record["seconds"] += time.perf_counter() - started
            record["nfe_total"] += nfe * len(chunk)
            for row, answer in zip(tokens[:, ids.shape[1]:].tolist(), answers[begin:begin + batch_size]):
                text = tokenizer.decode(cut_at_eos(row, eos), skip_special_tokens=True).strip()
                record["completions"].append(text)
                record["correct"].append(bool(is_correct(text, answer)))

    n = len(prompts)
    for record in methods.values():
        record["accuracy"] = sum(record["correct"]) / n
        record["nfe_per_sample"] = record.pop("nfe_total") / n
        record["seconds_per_sample"] = record["seconds"] / n
    settings = dict(samples=n, steps=steps, gen_length=gen_length, block_length=block_length, batch_size=batch_size,
                    seed=seed, thresholds=[int(k) for k in thresholds],
                    baseline=getattr(baseline_fn, "__name__", str(baseline_fn)),
                    experimental=getattr(experimental_fn, "__name__", str(experimental_fn)),
                    baseline_kwargs=baseline_kwargs or {}, experimental_kwargs=experimental_kwargs or {})
    return {"settings": settings, "methods": methods}


def _paired_difference(correct: Sequence[bool], reference: Sequence[bool]) -> tuple[float, float]:
    """Mean and standard error of the per-problem difference in correctness (NaN s.e. for n < 2)."""
    d = [float(a) - float(b) for a, b in zip(correct, reference)]
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, float("nan")
    return mean, math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n)


def analyze_icml_results(results: dict) -> str:
    """Markdown summary of `run_academic_benchmark`: accuracy ± binomial s.e., the paired difference to
    the baseline ± its s.e., NFE and seconds per sample and the time ratio to the baseline. Printed too."""
    methods = results["methods"]
    base = methods["baseline"]
    n = len(base["correct"])
    settings = results.get("settings", {})
    lines = [f"n = {n} problems; steps={settings.get('steps')}, gen_length={settings.get('gen_length')}, "
             f"block_length={settings.get('block_length')}; baseline = {settings.get('baseline', 'baseline')}",
             "",
             "| method | tta_k | accuracy ± s.e. | Δ vs baseline ± s.e. | NFE / sample | s / sample | time × baseline |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, record in methods.items():
        accuracy = record["accuracy"]
        diff, diff_se = _paired_difference(record["correct"], base["correct"])
        ratio = record["seconds"] / base["seconds"] if base["seconds"] > 0 else float("nan")
        k = "-" if record["tta_k"] is None else str(record["tta_k"])
        delta = "-" if name == "baseline" else f"{diff:+.3f} ± {diff_se:.3f}"
        lines.append(f"| {name} | {k} | {accuracy:.3f} ± {standard_error(accuracy, n):.3f} | {delta} | "
                     f"{record['nfe_per_sample']:.1f} | {record['seconds_per_sample']:.4f} | {ratio:.2f} |")
    table = "\n".join(lines)
    print(table)
    return table

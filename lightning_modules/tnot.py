"""TNOT / SLOT: evaluate prompt-stage delta optimization beside the plain model, over a sweep.

The algorithm lives in `testtime/tnot.py`. This module has nothing to train: `validate`, `test`
and `predict` run on a task datamodule (answers scored) or any prompt datamodule. Every batch is
decoded by the plain model and by TNOT at each (mode, times, lr) of the sweep, with the same
problems, temperature and seeds, so the table shows where the method helps and where it hurts
(users report it is sensitive to both `times` and `lr`).

`test` prints the table and writes `test_results.md` / `test_results.json` plus
`test_sweep.png` (accuracy over times for each mode and lr, the plain model as a line) into the
log directory. With the `EntropyDiagnostics` callback (it sets `collect_diagnostics`), every
TNOT-decoded sample also yields a trace: per-token entropy (with and without the delta),
thresholds, forced stop positions and retries, returned from `validation_step` / `test_step`
as `{"traces": [...]}` for the callback to write and plot.
"""

from __future__ import annotations

import json
import math
import os
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.base import TesttimeModule
from testtime.evaluation import DecodingSetting, format_table, generate_completions
from testtime.tnot import TNOTConfig, enable_tnot_model, sample_traces


class TNOTModule(TesttimeModule):
    """The plain model against TNOT (srgen) and SLOT at every point of a (times, lr) sweep.

    Defaults are the published recommended settings (REFERENCE.md section 2).

    Args:
        model_name_or_path: the model (see `testtime.loading`).
        modes: the variants scored: "slot" (delta applied at every generated token) and/or
            "srgen" (entropy-controlled stops and reflection retries).
        times: optimization steps per prefill (used when `sweep_times` is empty).
        lr: AdamW learning rate of the delta (used when `sweep_lrs` is empty).
        sweep_times: the times values of the sweep; empty: [times].
        sweep_lrs: the lr values of the sweep; empty: [lr].
        entropy_weight: w in (1 - w) * CE + w * entropy when fitting delta_high (srgen).
        entropy_threshold: static entropy threshold (nats, at the sampling temperature).
        adaptive_entropy: use the adaptive threshold max(mean + K * max(std, 0.5), 1.8) over the
            sample's last N entropies once it has more than N.
        adaptive_entropy_N: N of the adaptive threshold.
        adaptive_entropy_K: K of the adaptive threshold.
        max_retries: reflection retries per sample (srgen).
        mask_special_tokens: leave chat-template special tokens out of the prompt CE.
        ce_chunk: prompt positions per CE chunk.
        temperature: sampling temperature of every setting, plain and TNOT; 0 decodes greedily.
        eval_max_new_tokens: tokens generated per answer.
        eval_num_samples: k samples per problem when sampling (pass@1 over k); 1 when greedy.
        eval_seed: seed of the sampling (the same for every setting on a batch).
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m",
        modes: list[Literal["slot", "srgen"]] = ["slot", "srgen"],  # noqa: B006 (never mutated)
        times: int = 3,
        lr: float = 0.01,
        sweep_times: list[int] = [],  # noqa: B006
        sweep_lrs: list[float] = [],  # noqa: B006
        entropy_weight: float = 0.05,
        entropy_threshold: float = 3.0,
        adaptive_entropy: bool = True,
        adaptive_entropy_N: int = 25,
        adaptive_entropy_K: float = 4.0,
        max_retries: int = 20,
        mask_special_tokens: bool = False,
        ce_chunk: int = 1024,
        temperature: float = 0.6,
        eval_max_new_tokens: int = 32,
        eval_num_samples: int = 4,
        eval_seed: int = 0,
    ):
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not modes:
            raise ValueError("modes is empty: name at least one of 'slot', 'srgen'")
        super().__init__(model_name_or_path, eval_max_new_tokens, eval_num_samples if temperature > 0 else 1,
                         eval_seed)
        self.save_hyperparameters()
        self.collect_diagnostics = False  # set by callbacks.EntropyDiagnostics
        self._traces: list[dict] = []
        self._batch_offset = 0

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.load_base_model()
        model.requires_grad_(False)  # nothing of the model trains; only the per-sample delta does
        self.model = enable_tnot_model(model, self.tnot_config(self.hparams.modes[0]), tokenizer=self.tokenizer)

    def tnot_config(self, mode: str, times: int | None = None, lr: float | None = None) -> TNOTConfig:
        """The settings of one point of the sweep ("plain": no optimization, no entropy control)."""
        hp = self.hparams
        return TNOTConfig(
            prompt_only=mode != "plain", times=hp.times if times is None else times, lr=hp.lr if lr is None else lr,
            entropy_weight=hp.entropy_weight, entropy_control=mode == "srgen",
            entropy_threshold=hp.entropy_threshold, adaptive_entropy=hp.adaptive_entropy,
            adaptive_entropy_N=hp.adaptive_entropy_N, adaptive_entropy_K=hp.adaptive_entropy_K,
            max_retries=hp.max_retries, mode="slot" if mode == "plain" else mode,
            mask_special_tokens=hp.mask_special_tokens, ce_chunk=hp.ce_chunk,
            # records stay in memory (model.entropy_records) for the diagnostics; no files written here
            record_entropy=self.collect_diagnostics, entropy_output_file="", response_entropy_file="")

    def sweep(self) -> list[tuple[str, int, float]]:
        hp = self.hparams
        return [(mode, t, lr) for mode in hp.modes for t in (hp.sweep_times or [hp.times])
                for lr in (hp.sweep_lrs or [hp.lr])]

    # -- decoding settings -------------------------------------------------------------------
    def _generate_fn(self, name: str, mode: str, times: int | None = None, lr: float | None = None):
        def generate(model, input_ids, attention_mask, **kwargs):
            model.tnot_config = self.tnot_config(mode, times, lr)
            if mode == "plain" and not self.collect_diagnostics:
                return model.generate_without_tnot(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if self.collect_diagnostics:
                k = self.eval_num_samples
                for trace in sample_traces(model):
                    row = trace.pop("sample")
                    self._traces.append({"setting": name, "problem": self._batch_offset + row // k,
                                         "draw": row % k, **trace})
            return out

        return generate

    def _setting(self, name: str, mode: str, times: int | None = None, lr: float | None = None) -> DecodingSetting:
        t = self.hparams.temperature
        return DecodingSetting(name, do_sample=t > 0, temperature=t if t > 0 else 1.0,
                               num_samples=self.eval_num_samples, generate_fn=self._generate_fn(name, mode, times, lr))

    def decoding_settings(self) -> list[DecodingSetting]:
        settings = [self._setting("plain", "plain")]
        settings += [self._setting(f"{mode}_t{t}_lr{lr:g}", mode, t, lr) for mode, t, lr in self.sweep()]
        return settings

    # -- evaluation --------------------------------------------------------------------------
    def _step(self, batch: dict, batch_idx: int, stage: str):
        self._traces = []
        self.evaluate_batch(batch, batch_idx, stage)
        self._batch_offset += batch["prompt_ids"].shape[0]
        if self.collect_diagnostics:
            return {"traces": self._traces}
        return None

    def validation_step(self, batch: dict, batch_idx: int):
        return self._step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int):
        return self._step(batch, batch_idx, "test")

    def on_validation_epoch_start(self) -> None:
        self._batch_offset = 0

    def on_test_epoch_start(self) -> None:
        self._batch_offset = 0

    def on_test_epoch_end(self) -> None:
        results = self.log_accuracies("test")
        # prompts scored on all ranks (every rank takes part in the reduction)
        n = int(self.trainer.strategy.reduce(torch.tensor(float(self._batch_offset), device=self.device),
                                             reduce_op="sum"))
        if not results or not self.trainer.is_global_zero:
            return
        results = {k.removeprefix("test/acc_"): v for k, v in results.items()}
        hp = self.hparams
        how = f"T={hp.temperature}, k={self.eval_num_samples}" if hp.temperature > 0 else "greedy"
        table = format_table(results, n)
        rank_zero_info(f"\nTNOT evaluation, {n} test problems, {how}:\n{table}")
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, "test_results.json"), "w") as f:
            json.dump({"n_problems": n, "temperature": hp.temperature, "k": self.eval_num_samples,
                       "results": results}, f, indent=2)
        with open(os.path.join(log_dir, "test_results.md"), "w") as f:
            f.write(table + "\n")
        written = ["test_results.md", "test_results.json"]
        if plot_sweep(results, self.sweep(), n, os.path.join(log_dir, "test_sweep.png")):
            written.append("test_sweep.png")
        rank_zero_info(f"results written to {log_dir}: {', '.join(written)}")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Completions with TNOT at the first point of the sweep, with their retries and stop positions."""
        mode, times, lr = self.sweep()[0]
        setting = self._setting(f"{mode}_t{times}_lr{lr:g}", mode, times, lr)
        setting.num_samples = 1
        completions = generate_completions(self.model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"],
                                           setting, max_new_tokens=self.eval_max_new_tokens,
                                           seed=self.eval_seed + batch_idx)
        answers = batch.get("answers", [None] * len(completions))
        return [{"completion": c[0], "answer": a, "retries": r, "stop_positions": list(p)}
                for c, a, r, p in zip(completions, answers, self.model.retries, self.model.stop_positions)]

    # `fit` is refused with a message saying why, instead of Lightning's "no training_step()"
    _NO_FIT = ("TNOTModule has nothing to train: the delta is fitted per prompt inside generate. "
               "Use `validate`, `test` or `predict`.")

    def training_step(self, batch, batch_idx):
        raise RuntimeError(self._NO_FIT)

    def configure_optimizers(self):
        raise RuntimeError(self._NO_FIT)


def plot_sweep(results: dict[str, float], sweep: list[tuple[str, int, float]], n: int, path: str) -> bool:
    """Accuracy over times, one line per (mode, lr), the plain model as a band (± 1 s.e.). False if nothing to draw."""
    if "plain" not in results or not sweep:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    base = results["plain"]
    se = math.sqrt(base * (1 - base) / n) if n else 0.0
    ax.axhline(base, color="black", lw=1.5, label=f"plain {base:.3f}")
    ax.axhspan(base - se, base + se, color="gray", alpha=0.2, label="plain ± 1 s.e.")
    for mode, lr in sorted({(m, lr) for m, _, lr in sweep}):
        points = sorted((t, results[f"{m}_t{t}_lr{lr:g}"]) for m, t, r in sweep if (m, r) == (mode, lr)
                        and f"{m}_t{t}_lr{lr:g}" in results)
        if points:
            ax.plot(*zip(*points), "o-" if mode == "srgen" else "s--", label=f"{mode} lr={lr:g}")
    ax.set_xlabel("optimization steps (times)")
    ax.set_ylabel(f"accuracy (n={n})")
    ax.set_title("TNOT / SLOT against the plain model")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return True

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
as `{"traces": [...]}`; the callback writes them, and this module's `diagnostics_summary` and
`diagnostics_figures` (`testtime.tnot_plots`) summarize and draw them.
"""

from __future__ import annotations

from typing import Literal

from lightning_modules.base import TesttimeModule
from testtime.errors import UsageError
from testtime.evaluation import DecodingSetting
from testtime.tnot import TNOTConfig, enable_tnot_model, sample_traces
from testtime.tnot_plots import entropy_over_positions, sweep_figure, trace_summary


class TNOTModule(TesttimeModule):
    """The plain model against TNOT (srgen) and SLOT at every point of a (times, lr) sweep.

    Defaults are the published recommended settings (SRGen, "Self-Reflective Generation at Test
    Time": times=3, lr=0.01, entropy_weight=0.05, N=25, K=4, T=0.6).

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
        max_retries: reflection retries per sample (srgen), run inside generate; 0: a forced EOS ends
            the sample (entropy control as early stopping).
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
        for mode, t, lr in [("plain", None, None), *self.sweep()]:  # a setting out of range fails here, naming it
            self.tnot_config(mode, t, lr)
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
            model.reset_model_parameters()  # a new batch of problems: never a retry of the previous one
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

    def test_report(self, accuracies: dict[str, float], n: int, collected: dict) -> dict:
        hp = self.hparams
        how = f"T={hp.temperature}, k={self.eval_num_samples}" if hp.temperature > 0 else "greedy"
        return {"results": accuracies, "n_problems": n, "title": f"TNOT evaluation, {n} test problems, {how}:",
                "payload": {"temperature": hp.temperature, "k": self.eval_num_samples},
                "figures": {"test_sweep.png": sweep_figure(accuracies, self.sweep(), n)}}

    def primary_setting(self) -> DecodingSetting:
        """TNOT at the first point of the sweep."""
        mode, times, lr = self.sweep()[0]
        return self._setting(f"{mode}_t{times}_lr{lr:g}", mode, times, lr)

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Completions with the primary setting, with their retries and stop positions."""
        rows = super().predict_step(batch, batch_idx)
        return [{**row, "retries": r, "stop_positions": list(p)}
                for row, r, p in zip(rows, self.model.retries, self.model.stop_positions)]

    # -- diagnostics (callbacks.EntropyDiagnostics) ------------------------------------------
    def diagnostics_summary(self, stage: str, traces: list[dict]) -> dict:
        return trace_summary(traces)

    def diagnostics_figures(self, stage: str, traces: list[dict] | None = None, **_) -> dict:
        if not traces:
            return {}
        return {f"{stage}_entropy_over_positions.png": entropy_over_positions(traces)}

    # `fit` is refused with a message saying why, instead of Lightning's "no training_step()"
    _NO_FIT = ("TNOTModule has nothing to train: the delta is fitted per prompt inside generate. "
               "Use `validate`, `test` or `predict`.")

    def training_step(self, batch, batch_idx):
        raise UsageError(self._NO_FIT)

    def configure_optimizers(self):
        raise UsageError(self._NO_FIT)


"""AutoDeco: train per-token temperature / top-p heads on a frozen LM, evaluate them honestly, export.

The algorithm lives in `testtime/autodeco.py`; this module adds optimization, logging and the
evaluation table the paper's critics ask for: greedy, default sampling (T=1, P=1), the best static
(T, P) of a small grid chosen on the validation split, the static setting equal to the heads' own
mean prediction, and AutoDeco itself, all on the same problems and seeds.

Hooks for callbacks (see `callbacks/`): `token_filter` (set by `GoldilocksFilter`) picks the tokens
that enter the loss; with `collect_diagnostics` (set by `EntropyDiagnostics`) `training_step`
returns per-token T, P, required T, entropy and whether min-p keeps the label, and
`diagnostics_figures` draws them (`testtime.autodeco_plots`).

Checkpoints hold only the heads (the frozen base is reloaded from `model_name_or_path`); loading
one that lacks them (another method's checkpoint) is an error naming the missing keys.
"""

from __future__ import annotations

import glob
import os
import tempfile
from typing import Literal

import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.base import TesttimeModule
from testtime.autodeco import AutoDecoModel, autodeco_generate, required_temperature, training_losses
from testtime.autodeco_export import load_autodeco, merge_autodeco
from testtime.autodeco_plots import temperature_by_token, token_types, training_figures
from testtime.evaluation import DecodingSetting, evaluate, pick_best, sampling, sweep_settings
from testtime.lm import IGNORE_INDEX, before_eos_mask, entropy, eos_token_ids

_HEAD_PREFIXES = ("model.temp_head.", "model.top_p_head.")


class AutoDecoModule(TesttimeModule):
    """Heads on a frozen causal LM that predict the next token's temperature and top-p.

    Args:
        model_name_or_path: the frozen base model (see `testtime.loading`).
        objective: temperature-head loss: "legacy_ce" (the paper's label-probability-weighted CE
            with easy-token drop) or "analytic_min_p_hinge" (hinge toward the minimum temperature
            at which min-p keeps the label).
        train_temp: train the temperature head.
        train_top_p: train the top-p head (soft top-p loss).
        use_enhanced_features: the top-p head also reads 4 statistics of the tempered distribution.
        init_heads_from: an exported AutoDeco folder to start from; its heads that are not trained
            here stay frozen, a trained head it lacks starts fresh (e.g. train the top-p head on
            top of a trained temperature head).
        head_width: hidden width of each head's MLP.
        learning_rate: AdamW learning rate of the heads (paper: 5e-6 on 7B models, 1 epoch).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        easy_token_drop: legacy CE: probability of dropping a token the base already predicts.
        top_p_steepness: alpha of the soft top-p mask exp(-alpha * relu(cumsum - P)).
        min_p_ratio: r of min-p; T_req = (max z - z_label) / -ln r.
        under_weight: hinge weight for T below T_req.
        over_weight: weight of the squared excess of T over T_req.
        temp_cap: the highest T_req trained toward (the head's range is (0, 2)); -1 disables.
        generation_min_p: min-p applied after the heads' T and P when generating; None = use
            `min_p_ratio` for the hinge objective (its heads are trained for it), off for legacy_ce.
        diagnostics_min_p_ratio: with `EntropyDiagnostics`, report required temperatures and whether
            min-p keeps the label at this ratio instead of `min_p_ratio`.
        static_temperatures: the static grid's temperatures (the baseline AutoDeco must beat).
        static_top_ps: the static grid's top-p values.
        eval_max_new_tokens: tokens generated per answer in validate/test.
        eval_num_samples: k samples per problem for every sampled setting (pass@1 over k).
        eval_seed: seed of evaluation sampling.
        compile_losses: run the per-token computations over the vocabulary (the top-p head's
            features, also at generation, the legacy temperature CE and the soft top-p loss; not the
            hinge objective) through torch.compile: on a GPU they are most of a step's cost over
            the frozen forward (`benchmarks/RESULTS.md`); the first steps compile.
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m",
        objective: Literal["legacy_ce", "analytic_min_p_hinge"] = "legacy_ce",
        train_temp: bool = True,
        train_top_p: bool = True,
        use_enhanced_features: bool = True,
        init_heads_from: str | None = None,
        head_width: int = 256,
        learning_rate: float = 5e-6,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        easy_token_drop: float = 0.6,
        top_p_steepness: float = 30.0,
        min_p_ratio: float = 0.1,
        under_weight: float = 1.0,
        over_weight: float = 1.0,
        temp_cap: float = 2.0,
        generation_min_p: float | None = None,
        diagnostics_min_p_ratio: float | None = None,
        static_temperatures: list[float] = [0.3, 0.6, 1.0],  # noqa: B006 (never mutated)
        static_top_ps: list[float] = [0.8, 0.95, 1.0],  # noqa: B006
        eval_max_new_tokens: int = 32,
        eval_num_samples: int = 4,
        eval_seed: int = 0,
        compile_losses: bool = False,
    ):
        super().__init__(model_name_or_path, eval_max_new_tokens, eval_num_samples, eval_seed)
        if not (train_temp or train_top_p):
            raise ValueError("train_temp and train_top_p are both false: nothing to train")
        if diagnostics_min_p_ratio is not None and not 0.0 < diagnostics_min_p_ratio < 1.0:
            raise ValueError(f"diagnostics_min_p_ratio must be in (0, 1), got {diagnostics_min_p_ratio}")
        self.save_hyperparameters()
        self.token_filter = None  # set by callbacks.GoldilocksFilter
        self.collect_diagnostics = False  # set by callbacks.EntropyDiagnostics
        self.best_static: DecodingSetting | None = None
        self.mean_prediction: tuple[float, float] | None = None
        self._generator: torch.Generator | None = None
        self._with_grid = False
        self._prediction_sums = torch.zeros(3, dtype=torch.float64)  # sum T, sum P, tokens
        self._test_tokens: list | None = None  # (token ids, used, T, P) of each test generation

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        base = self.load_base_model()
        init = load_autodeco(hp.init_heads_from, model=base) if hp.init_heads_from else None
        self.model = AutoDecoModel(
            base,
            enable_temperature_head=hp.train_temp or (init is not None and init.temp_head is not None),
            enable_top_p_head=hp.train_top_p or (init is not None and init.top_p_head is not None),
            use_enhanced_features=init.config.use_enhanced_features if init else hp.use_enhanced_features,
            width=init.config.head_width if init else hp.head_width,
            base_model_name_or_path=self.model_name_or_path,
        )
        if init is not None:  # its heads; a head it lacks starts fresh
            self.model.load_state_dict(init.heads_state_dict(), strict=False)
        for head, train in ((self.model.temp_head, hp.train_temp), (self.model.top_p_head, hp.train_top_p)):
            if head is not None:
                head.requires_grad_(train)
        if self.model.top_p_head is not None:
            self.model.top_p_head.compiled = hp.compile_losses

    def generation_model(self):
        return self.model.llm

    def checkpoint_key(self, key: str) -> bool:
        """Only the heads: the frozen base is reloaded from `model_name_or_path`."""
        return key.startswith(_HEAD_PREFIXES)

    # -- training ----------------------------------------------------------------------------
    def _losses(self, batch: dict) -> tuple[dict, dict | None]:
        hp = self.hparams
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if not hp.train_temp:  # a frozen temperature head only feeds the top-p head
            out.temperature = out.temperature.detach() if out.temperature is not None else None
        labels = batch["labels"]
        logits, shifted = out.logits[:, :-1], labels[:, 1:]
        mask = self.token_filter(logits, shifted) if self.token_filter is not None else None
        if self._generator is None or self._generator.device != logits.device:
            self._generator = torch.Generator(device=logits.device).manual_seed(1000 + self.global_rank)
        losses = training_losses(  # the token filter (Goldilocks) restricts the temperature head only
            out, labels, objective=hp.objective, temp_mask=mask, generator=self._generator,
            easy_token_drop=hp.easy_token_drop, steepness=hp.top_p_steepness, min_p_ratio=hp.min_p_ratio,
            under_weight=hp.under_weight, over_weight=hp.over_weight,
            temp_cap=None if hp.temp_cap < 0 else hp.temp_cap, compiled=hp.compile_losses,
        )
        if not hp.train_temp:
            losses["loss"] = losses["top_p_loss"]
        if not hp.train_top_p:
            losses["loss"] = losses["temp_loss"]
        diagnostics = None
        if self.collect_diagnostics:
            diagnostics = self._diagnostics(out, logits, shifted, mask)
        return losses, diagnostics

    @torch.no_grad()
    def _diagnostics(self, out, logits, labels, mask) -> dict:
        """Per selected token: required temperature, entropy of the base distribution, the heads' T
        and P, and `min_p_ok` (T >= T_req: min-p at the ratio keeps the label)."""
        selected = labels != IGNORE_INDEX
        if mask is not None:
            selected &= mask.bool()
        ratio = self.hparams.diagnostics_min_p_ratio or self.hparams.min_p_ratio
        d = {"required_temperature": required_temperature(logits, labels, ratio)[selected].float(),
             "entropy": entropy(logits[selected])}
        if out.temperature is not None:
            d["temperature"] = out.temperature[:, :-1][selected].detach().float()
            d["min_p_ok"] = d["temperature"] >= d["required_temperature"]
        if out.top_p is not None:
            d["top_p"] = out.top_p[:, :-1][selected].detach().float()
        return d

    def diagnostics_figures(self, stage: str, points=None, records=None, **_) -> dict:
        """The training figures of `testtime.autodeco_plots` (for callbacks.EntropyDiagnostics)."""
        if stage != "fit" or points is None:
            return {}
        return training_figures(points, records or [], self.hparams.diagnostics_min_p_ratio or self.hparams.min_p_ratio)

    def training_step(self, batch: dict, batch_idx: int):
        losses, diagnostics = self._losses(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=size)
        for name in ("temp_loss", "top_p_loss"):
            if losses[name] is not None:
                self.log(f"train/{name}", losses[name], batch_size=size)
        if diagnostics is None:
            return losses["loss"]
        return {"loss": losses["loss"], "diagnostics": diagnostics}

    # -- decoding settings -------------------------------------------------------------------
    def _min_p(self) -> float | None:
        hp = self.hparams
        if hp.generation_min_p is not None:
            return hp.generation_min_p or None
        return hp.min_p_ratio if hp.objective == "analytic_min_p_hinge" else None

    def autodeco_generate_fn(self, record: bool = False):
        """A `generate_fn` (see testtime.evaluation) sampling with the heads' T and P.

        With `record`, the T and P used for tokens up to each row's EOS are summed, for the
        "static setting = mean prediction" baseline, and during test kept per token.
        """

        def generate(model, input_ids, attention_mask, **kwargs):
            kwargs.pop("do_sample", None)
            kwargs.pop("temperature", None)
            kwargs.pop("top_p", None)
            kwargs.pop("top_k", None)
            out = autodeco_generate(model, self.model, input_ids, attention_mask, min_p=self._min_p(), **kwargs)
            if record and out.temperature.numel():
                new = out.sequences[:, input_ids.shape[1]:]
                used = before_eos_mask(new, eos_token_ids(model, self.tokenizer), keep_eos=True).float()
                self._prediction_sums += torch.tensor([
                    float((out.temperature * used).sum()), float((out.top_p * used).sum()), float(used.sum())],
                    dtype=torch.float64)
                if self._test_tokens is not None and self.trainer.testing:  # per token, for temperature_by_token.png
                    self._test_tokens.append((new.cpu(), used.bool().cpu(), out.temperature.float().cpu(),
                                              out.top_p.float().cpu()))
            return out.sequences

        return generate

    def autodeco_setting(self, num_samples: int | None = None) -> DecodingSetting:
        return DecodingSetting("autodeco", do_sample=True, num_samples=num_samples or self.eval_num_samples,
                               generate_fn=self.autodeco_generate_fn(record=True))

    def primary_setting(self) -> DecodingSetting:
        """Sampling with the heads' per-token T and P: what `predict` uses."""
        return self.autodeco_setting(1)

    def static_grid(self) -> list[DecodingSetting]:
        hp = self.hparams
        return sweep_settings(hp.static_temperatures, hp.static_top_ps, k=self.eval_num_samples)

    def decoding_settings(self) -> list[DecodingSetting]:
        k = self.eval_num_samples
        settings = super().decoding_settings()
        if self._with_grid:
            settings += self.static_grid()
        if self.best_static is not None:
            best = self.best_static
            settings.append(sampling(best.temperature, best.top_p, k, name="best_static"))
        if self.mean_prediction is not None:
            t, p = self.mean_prediction
            settings.append(sampling(t, p, k, name="mean_static"))
        settings.append(self.autodeco_setting())
        return settings

    # -- evaluation --------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "labels" in batch:
            losses, _ = self._losses(batch)
            self.log("val/loss", losses["loss"], prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        self.evaluate_batch(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluate_batch(batch, batch_idx, "test")

    def on_validation_epoch_start(self) -> None:
        # `validate` scores the whole static grid too; validation inside `fit` keeps to the cheap settings.
        self._with_grid = self.trainer.state.fn == TrainerFn.VALIDATING
        self._prediction_sums.zero_()

    def on_validation_epoch_end(self) -> None:
        results = self.log_accuracies("val")
        self._val_problems = self.problems_scored("val")
        self._update_mean_prediction()
        if self._with_grid and results:
            grid = self.static_grid()
            self.best_static = pick_best({k.removeprefix("val/acc_"): v for k, v in results.items()}, grid)
            rank_zero_info(f"best static setting on validation: {self.best_static.name}")
        self._with_grid = False

    def _update_mean_prediction(self) -> None:
        sums = self._prediction_sums.to(self.device)
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        if sums[2] > 0:
            self.mean_prediction = (float(sums[0] / sums[2]), float(sums[1] / sums[2]))
            self.log("val/mean_temperature", self.mean_prediction[0])
            self.log("val/mean_top_p", self.mean_prediction[1])

    def on_test_start(self) -> None:
        """Choose the static baselines on the validation split, never on the test problems."""
        self._test_tokens = None  # a failed earlier test may have left its recording behind
        datamodule = self.trainer.datamodule
        problems = getattr(datamodule, "problems", {}).get("validation")
        if not problems:
            rank_zero_info("no validation problems: the static baselines are skipped")
            return
        grid = self.static_grid()
        self._prediction_sums.zero_()
        self.validation_results = evaluate(
            self.generation_model(), self.tokenizer, problems, grid + [self.autodeco_setting()],
            batch_size=getattr(datamodule, "eval_batch_size", 16), max_new_tokens=self.eval_max_new_tokens,
            seed=self.eval_seed, progress=self.global_rank == 0)
        self.best_static = pick_best(self.validation_results, grid)
        sums = self._prediction_sums
        if sums[2] > 0:
            self.mean_prediction = (float(sums[0] / sums[2]), float(sums[1] / sums[2]))
        rank_zero_info(f"validation ({len(problems)} problems): best static setting {self.best_static.name}; "
                       f"heads' mean prediction T={self.mean_prediction[0]:.3f} P={self.mean_prediction[1]:.3f}"
                       if self.mean_prediction else f"best static setting {self.best_static.name}")

    def on_test_epoch_start(self) -> None:
        self._test_tokens = []

    def _token_points(self) -> dict | None:
        """Every token AutoDeco generated on the test problems, gathered on global rank 0 (None on
        the others): T, P, position in the completion and type (`token_types`)."""
        rows, self._test_tokens = self._test_tokens or [], None
        if self.trainer.world_size > 1:  # a collective: every rank takes part
            gathered = [None] * self.trainer.world_size if self.trainer.is_global_zero else None
            torch.distributed.gather_object(rows, gathered, dst=0)
            rows = [r for part in gathered for r in part] if gathered is not None else None
        if not self.trainer.is_global_zero:
            return None
        eos = set(eos_token_ids(self.generation_model(), self.tokenizer))
        texts = {}  # token id -> decoded text ("<end>" for an EOS id)
        points = {"temperature": [], "top_p": [], "position": [], "type": []}
        for ids, used, temperature, top_p in rows:
            for b in range(ids.shape[0]):
                n = int(used[b].sum())  # the used tokens are a prefix: up to and with the EOS
                row = ids[b, :n].tolist()
                for i in row:
                    if i not in texts:
                        texts[i] = "<end>" if i in eos else self.tokenizer.decode([i])
                points["type"] += token_types([texts[i] for i in row], end_texts={"<end>"})
                points["temperature"] += temperature[b, :n].tolist()
                points["top_p"] += top_p[b, :n].tolist()
                points["position"] += list(range(n))
        return {k: np.asarray(v) for k, v in points.items()}

    def collect_test(self) -> dict:
        return {"points": self._token_points()}  # a gather: every rank takes part

    def test_report(self, accuracies: dict[str, float], n: int, collected: dict) -> dict:
        points = collected["points"]
        plots = sorted(glob.glob(os.path.join(self.results_dir(), "diagnostics", "*.png")))
        static = {}
        if self.best_static is not None:
            static[f"best static ({self.best_static.name})"] = self.best_static.temperature
        if self.mean_prediction is not None:
            static["heads' mean"] = self.mean_prediction[0]
        by_token_figure, by_token = temperature_by_token(points, static) if points is not None else (None, None)
        if plots:
            rank_zero_info("training diagnostics plots: " + ", ".join(plots))
        return {"results": accuracies, "n_problems": n,
                "title": f"AutoDeco evaluation, {n} test problems, k={self.eval_num_samples} samples per sampled "
                         "setting:",
                "payload": {"k": self.eval_num_samples,
                            "best_static": self.best_static.name if self.best_static else None,
                            "mean_prediction": self.mean_prediction,
                            "validation_results": getattr(self, "validation_results", None),
                            "diagnostics_plots": plots, "temperature_by_token": by_token},
                "figures": {"temperature_by_token.png": by_token_figure}}

    # -- export ------------------------------------------------------------------------------
    def export(self, output_dir: str, merged: bool = False) -> None:
        """The original AutoDeco format: config.json + heads-only model.safetensors (+ tokenizer).

        `merged=True` writes one servable checkpoint with the base weights (`llm.*`) instead.
        """
        if merged:
            with tempfile.TemporaryDirectory() as heads_dir:
                self.model.save_pretrained(heads_dir)
                merge_autodeco(heads_dir, output_dir, model=self.model.llm)
        else:
            self.model.save_pretrained(output_dir)
            self.tokenizer.save_pretrained(output_dir)

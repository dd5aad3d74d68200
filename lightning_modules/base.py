"""What every testtime LightningModule shares: the HF model, answer-accuracy evaluation, the primary
decoding setting for `predict`, partial checkpoints, and the results table.

A method subclasses `TesttimeModule`, builds its model in `configure_model` (through
`load_base_model`), and declares:

- `decoding_settings()`: the settings scored in validate/test (greedy and default sampling come
  first, a method appends its own), so a method's accuracy always sits beside the baselines on the
  same problems and seeds (`<stage>/acc_<setting>`);
- `primary_setting()`: the method's own way of decoding, used by the shared `predict_step`
  (greedy on the base model unless the method says otherwise);
- `checkpoint_key(key)`: which state-dict keys a checkpoint holds. Methods that train heads or
  adapters on a frozen base keep only those; loading then requires every one of them and ignores
  the frozen base (reloaded from `model_name_or_path`), with an error naming what is missing;
- `write_results(stage, results, ...)`: the table on the console plus `<stage>_results.md/.json`
  (and figures) in the log folder, on global rank 0.

`fit` with validation ends with the last validation metrics as a table on the console (and in
`val_results.md/.json`), as `test` does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from testtime.errors import CheckpointError
from testtime.evaluation import AnswerAccuracy, DecodingSetting, default_sampling, generate_completions, greedy
from testtime.io import format_table, save_figure, standard_error, write_results
from testtime.loading import load_model_and_tokenizer


def metrics_table(metrics: dict[str, float], n_problems: int | None = None) -> str:
    """A markdown table of logged metrics; accuracies (`*/acc_*`) get a binomial standard error."""
    lines = ["| metric | value | ± s.e. |", "|---|---:|---:|"]
    for name, value in metrics.items():
        se = standard_error(value, n_problems) if "/acc_" in name and n_problems else None
        lines.append(f"| {name} | {value:.4f} | {'' if se is None else f'{se:.3f}'} |")
    return "\n".join(lines)


class TesttimeModule(L.LightningModule):
    """Base class: `model_name_or_path` plus the evaluation knobs every method shares.

    Args:
        model_name_or_path: local HF folder, `.gguf` file, `smollm2-135m`, `tiny-random-<family>` or a hub id.
        eval_max_new_tokens: tokens generated per answer during validate/test/predict.
        eval_num_samples: k, the samples per problem for sampled pass@1.
        eval_seed: seed of the evaluation's sampling (the same problems and seeds for every setting).
    """

    def __init__(self, model_name_or_path: str, eval_max_new_tokens: int = 32, eval_num_samples: int = 4,
                 eval_seed: int = 0):
        super().__init__()
        self.model_name_or_path = model_name_or_path
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_num_samples = eval_num_samples
        self.eval_seed = eval_seed
        self.model = None
        self.tokenizer = None
        self._metrics: dict[str, AnswerAccuracy] = {}  # plain dict: never part of the checkpoint
        self._problems: dict[str, int] = {}  # problems scored per stage on this rank

    # -- model -------------------------------------------------------------------------------
    def load_base_model(self):
        """Load the HF model in float32 (master weights; mixed precision casts on the fly)."""
        model, tokenizer = load_model_and_tokenizer(self.model_name_or_path, dtype=torch.float32)
        self.tokenizer = tokenizer
        return model

    def generation_model(self):
        """The model `generate` runs on (a method may wrap or replace it)."""
        return self.model

    # -- optimization ------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping (`trainer.gradient_clip_val`), except by norm under FSDP, whose
        precision plugin refuses it: there the wrapped model clips its own (sharded) gradients with
        FSDP's `clip_grad_norm_`, which takes the norm over every rank's shard."""
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") \
                and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- partial checkpoints -----------------------------------------------------------------
    def checkpoint_key(self, key: str) -> bool:
        """Whether a checkpoint holds this state-dict key. Every key by default; a method on a
        frozen base returns True only for what it trains (its heads, adapter, gates)."""
        return True

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return type(state)((k, v) for k, v in state.items() if self.checkpoint_key(k))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a checkpoint: with `strict`, every key `checkpoint_key` keeps must be there (a
        checkpoint of another method would otherwise leave them at their initial values without a
        word), and a key the module does not have at all is an error; keys of the frozen base are
        ignored (the base is reloaded from `model_name_or_path`)."""
        own = super().state_dict(keep_vars=True).keys()
        wanted = [k for k in own if self.checkpoint_key(k)]
        if strict:
            missing = [k for k in wanted if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            if missing or unexpected:
                name = type(self).__name__
                parts = []
                if missing:
                    parts.append(f"it lacks {len(missing)} key(s) that {name} trains: {_listing(missing)}")
                if unexpected:
                    parts.append(f"it holds {len(unexpected)} key(s) {name} does not have: {_listing(unexpected)}")
                raise CheckpointError(f"this checkpoint does not fit {name} ({'; '.join(parts)}); was it written "
                                      f"by another method or another configuration?")
        return super().load_state_dict({k: v for k, v in state_dict.items() if k in wanted}, strict=False,
                                       assign=assign)

    # -- evaluation --------------------------------------------------------------------------
    def decoding_settings(self) -> list[DecodingSetting]:
        """The settings scored in validate/test; methods append their own."""
        return [greedy(), default_sampling(self.eval_num_samples)]

    def primary_setting(self) -> DecodingSetting:
        """The method's own decoding, used by `predict`; greedy on the base model here."""
        return greedy()

    def evaluate_batch(self, batch: dict, batch_idx: int, stage: str) -> None:
        if "prompt_ids" not in batch:
            return
        model = self.generation_model()
        # Every setting sees the same seed on a batch; batches and ranks get different ones.
        seed = self.eval_seed + batch_idx * self.trainer.world_size + self.global_rank
        for setting in self.decoding_settings():
            completions = generate_completions(
                model, self.tokenizer, batch["prompt_ids"], batch["prompt_mask"], setting,
                max_new_tokens=self.eval_max_new_tokens, seed=seed,
            )
            key = f"{stage}/acc_{setting.name}"
            if key not in self._metrics:
                self._metrics[key] = AnswerAccuracy().to(self.device)
            self._metrics[key].update(completions, batch["answers"])
        self._problems[stage] = self._problems.get(stage, 0) + len(batch["answers"])

    def problems_scored(self, stage: str) -> int:
        """Problems scored in `stage` on all ranks (a collective under DDP: every rank calls it)."""
        count = torch.tensor(float(self._problems.pop(stage, 0)), device=self.device)
        return int(self.trainer.strategy.reduce(count, reduce_op="sum"))

    def log_accuracies(self, stage: str) -> dict[str, float]:
        results = {}
        for key in [k for k in self._metrics if k.startswith(f"{stage}/")]:
            metric = self._metrics.pop(key)
            results[key] = float(metric.compute())  # torchmetrics syncs across DDP ranks here
            self.log(key, results[key])  # already reduced: identical on every rank
        return results

    def on_validation_epoch_end(self) -> None:
        self.log_accuracies("val")
        self._val_problems = self.problems_scored("val")

    def on_test_epoch_end(self) -> None:
        """The end of `test`, one template for every method. On every rank: the accuracies
        (torchmetrics syncs them), the problems scored on all ranks and `collect_test` (a method's
        own collectives; a rank that skipped one would hang the others under DDP); then the
        method's `test_report`, written on global rank 0."""
        accuracies = {k.removeprefix("test/acc_"): v for k, v in self.log_accuracies("test").items()}
        n = self.problems_scored("test")
        collected = self.collect_test()
        if accuracies:  # the same on every rank: the metrics are synced
            self.write_results("test", **self.test_report(accuracies, n, collected))

    def collect_test(self) -> dict:
        """What a method's test report needs beyond the accuracies, called on every rank (it may
        gather across ranks). Nothing by default."""
        return {}

    def test_report(self, accuracies: dict[str, float], n: int, collected: dict) -> dict:
        """The `write_results` arguments of the test report (called on every rank): the accuracy
        per decoding setting over `n` problems, with a title; methods add their payload, figures
        or own table."""
        return {"results": accuracies, "n_problems": n, "payload": {"k": self.eval_num_samples},
                "title": f"{type(self).__name__}: {n} test problems, k={self.eval_num_samples} samples per "
                         "sampled setting:"}

    def on_fit_end(self) -> None:
        """The last validation metrics as a table, so a `fit` shows its result without opening metrics.csv."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                   if k.startswith("val/") and torch.as_tensor(v).numel() == 1}
        if metrics:
            n = getattr(self, "_val_problems", 0) or None
            how = f", {n} problems" if n else ""
            self.write_results("val", metrics, metrics_table(metrics, n),
                               title=f"{type(self).__name__}: validation after fit (step {self.global_step}{how})",
                               payload={"n_problems": n, "step": self.global_step})

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Completions of the prompts with the method's `primary_setting` (one sample each), plus the
        reference answer where the data has one."""
        setting = dataclasses.replace(self.primary_setting(), num_samples=1)
        completions = generate_completions(self.generation_model(), self.tokenizer, batch["prompt_ids"],
                                           batch["prompt_mask"], setting, max_new_tokens=self.eval_max_new_tokens,
                                           seed=self.eval_seed + batch_idx)
        answers = batch.get("answers", [None] * len(completions))
        return [{"completion": c[0], "answer": a, "setting": setting.name} for c, a in zip(completions, answers)]

    # -- results -----------------------------------------------------------------------------
    def results_dir(self) -> str:
        return self.trainer.log_dir or self.trainer.default_root_dir

    def write_results(self, stage: str, results: dict[str, float], table: str | None = None, title: str = "",
                      payload: dict[str, Any] | None = None, figures: dict[str, Any] | None = None,
                      n_problems: int | None = None) -> list[str]:
        """Called on every rank; on global rank 0: print `title` and the table, write `<stage>_results.md` and `.json`
        (the results plus `payload`) and each figure (`{file name: matplotlib Figure}`) into the log
        folder; returns the paths written. `table` defaults to an accuracy table over `n_problems`."""
        folder = self.results_dir()  # trainer.log_dir broadcasts: every rank must ask
        if not self.trainer.is_global_zero:
            return []
        if table is None:
            table = format_table(results, n_problems or 0)
        rank_zero_info(f"\n{title}\n{table}" if title else f"\n{table}")
        paths = write_results(folder, f"{stage}_results", table,
                              {"stage": stage, "results": results, **({"n_problems": n_problems} if n_problems else {}),
                               **(payload or {})})
        for name, fig in (figures or {}).items():
            if fig is not None:
                paths.append(save_figure(fig, os.path.join(folder, name)))
        rank_zero_info(f"results written to {folder}: {', '.join(os.path.basename(str(p)) for p in paths)}")
        return [str(p) for p in paths]

    # -- optimization ------------------------------------------------------------------------
    def configure_optimizers(self):
        """AdamW over the trainable parameters, linear warm-up then constant (`learning_rate`,
        `weight_decay`, `warmup_steps` hyperparameters of the subclass)."""
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        warmup = max(1, hp.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- export ------------------------------------------------------------------------------
    def export(self, output_dir: str, merged: bool = False) -> None:
        """Write a serving checkpoint into `output_dir` (each method defines its format).

        `merged`: for methods that train a small part on a frozen base, also write the base
        weights, so that one folder serves on its own.
        """
        raise NotImplementedError(f"{type(self).__name__} has no export format")


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")

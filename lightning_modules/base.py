"""What every testtime LightningModule shares: loading the HF model and answer-accuracy evaluation.

A method subclasses `TesttimeModule`, builds its model in `configure_model` (through
`load_base_model`), and adds its own decoding setting(s) by overriding `decoding_settings()`.
Validation/test batches from `datamodules.tasks.TaskDataModule` carry prompts and answers; for
each setting the module generates, scores and logs `<stage>/acc_<setting>` so a method's
accuracy always sits beside greedy and default sampling on the same problems.
"""

from __future__ import annotations

import lightning as L
import torch

from testtime.evaluation import AnswerAccuracy, DecodingSetting, default_sampling, generate_completions, greedy
from testtime.loading import load_model_and_tokenizer


class TesttimeModule(L.LightningModule):
    """Base class: `model_name_or_path` plus the evaluation knobs every method shares.

    Args:
        model_name_or_path: local HF folder, `.gguf` file, `smollm2-135m`, `tiny-random-<family>` or a hub id.
        eval_max_new_tokens: tokens generated per answer during validate/test.
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

    # -- model -------------------------------------------------------------------------------
    def load_base_model(self):
        """Load the HF model in float32 (master weights; mixed precision casts on the fly)."""
        model, tokenizer = load_model_and_tokenizer(self.model_name_or_path, dtype=torch.float32)
        self.tokenizer = tokenizer
        return model

    def generation_model(self):
        """The model `generate` runs on (a method may wrap or replace it)."""
        return self.model

    # -- evaluation --------------------------------------------------------------------------
    def decoding_settings(self) -> list[DecodingSetting]:
        """The settings scored in validate/test; methods append their own."""
        return [greedy(), default_sampling(self.eval_num_samples)]

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

    def log_accuracies(self, stage: str) -> dict[str, float]:
        results = {}
        for key in [k for k in self._metrics if k.startswith(f"{stage}/")]:
            metric = self._metrics.pop(key)
            results[key] = float(metric.compute())  # torchmetrics syncs across DDP ranks here
            self.log(key, results[key])  # already reduced: identical on every rank
        return results

    def on_validation_epoch_end(self) -> None:
        self.log_accuracies("val")

    def on_test_epoch_end(self) -> None:
        self.log_accuracies("test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Greedy completions of the prompts (plus the reference answer where the data has one)."""
        completions = generate_completions(self.generation_model(), self.tokenizer, batch["prompt_ids"],
                                           batch["prompt_mask"], self.decoding_settings()[0],
                                           max_new_tokens=self.eval_max_new_tokens, seed=self.eval_seed)
        answers = batch.get("answers", [None] * len(completions))
        return [{"completion": c[0], "answer": a} for c, a in zip(completions, answers)]

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

"""Plain supervised fine-tuning (and evaluation) of a causal LM: the baseline every method compares to."""

from __future__ import annotations

import os

import torch

from lightning_modules.base import TesttimeModule
from testtime.lm import next_token_loss


class CausalLMModule(TesttimeModule):
    """Fine-tune every weight of a causal LM with completion-only next-token loss.

    Args:
        model_name_or_path: see `TesttimeModule`.
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then constant.
        gradient_checkpointing: trade compute for memory (non-reentrant, DDP-safe).
    """

    def __init__(self, model_name_or_path: str = "smollm2-135m", learning_rate: float = 2e-5,
                 weight_decay: float = 0.0, warmup_steps: int = 0, gradient_checkpointing: bool = False,
                 eval_max_new_tokens: int = 32, eval_num_samples: int = 4, eval_seed: int = 0):
        super().__init__(model_name_or_path, eval_max_new_tokens, eval_num_samples, eval_seed)
        self.save_hyperparameters()

    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this more than once
            return
        self.model = self.load_base_model().train()  # loaded in eval mode; every weight trains here
        if self.hparams.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, batch: dict) -> torch.Tensor:
        if "position_ids" in batch:
            # Packed rows: without a padding mask transformers derives one causal block per record
            # from the restarting position_ids, so packed records do not attend to each other.
            logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                use_cache=False).logits
        else:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return next_token_loss(logits, batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "labels" in batch:
            self.log("val/loss", self(batch), prog_bar=True, sync_dist=True, batch_size=batch["input_ids"].shape[0])
        self.evaluate_batch(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if "labels" in batch:
            self.log("test/loss", self(batch), sync_dist=True, batch_size=batch["input_ids"].shape[0])
        self.evaluate_batch(batch, batch_idx, "test")

    def export(self, output_dir: str, merged: bool = False) -> None:
        """A Hugging Face folder (safetensors + config + tokenizer) that reloads with `from_pretrained`.

        Every weight is trained here, so the export is always complete (`merged` changes nothing).
        """
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)

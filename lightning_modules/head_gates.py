"""Attention-head gating and pruning: learn which heads a frozen LM can lose, remove them from the
weights, recover with LoRA, export a smaller Hugging Face model.

The algorithms live in `testtime/heads/` (gates, importance, plans, exact physical pruning); this
module adds the training phases, perplexity, checkpoints and the export.

One `fit`, in up to two phases:
1. Gates: hard-concrete gates on every head (Louizos et al. 2018, applied to heads by Voita et
   al. 2019, "Analyzing Multi-Head Self-Attention: Specialized Heads Do the Heavy Lifting, the
   Rest Can Be Pruned"), trained with next-token loss plus the L0 penalty pulling the expected
   fraction of open heads toward `1 - target_sparsity`. The base stays frozen and in eval mode
   (no dropout); each training forward pass draws one gate sample (`HeadGates.overridden`), and
   validation uses the deterministic gates.
2. Recovery (with `prune_at_step`): at that optimizer step the plan is read from the gates
   (`prune_scope`), the heads are removed from the weights by `prune_heads` (exact: the kept
   heads' gate values are folded into their output columns, so the pruned model computes what
   the gated model computes with the pruned heads' gates at 0, where the L0 penalty has mostly
   put them already), LoRA adapters (PEFT) are put on the pruned model and a new optimizer
   trains only them. Swapping the model's parameters mid-fit needs a single process; under DDP
   run two fits: the gates (`prune_at_step: null`), then `init_gates_from: <that checkpoint>`
   with `prune_at_step: 0`, which prunes in `configure_model`, before DDP wraps the model.

`validate` / `test` report perplexity, exp(summed token NLL / token count) over the whole split
(the sums are reduced across DDP ranks before dividing), the loss, and the number and fraction of
heads the model still uses (`val/active_heads`, `val/active_fraction`).

Checkpoints hold only what trains: `head_gates.hard_concrete.log_alpha` before pruning; after
it the plan (`pruning_keep`, [L, H] bool, and `pruning_gates`, the gate values folded into the
kept heads) and the LoRA weights. Loading a checkpoint written after pruning prunes the freshly
loaded base with its plan first, so `validate`, `test`, `export` and resuming `fit` all see the
model that was saved.

`export` writes the physically pruned model (LoRA merged) with `save_pretrained` (safetensors),
the tokenizer, and `pruning.json` (the plan, the heads pruned / removed / left as zeros per
layer, and `prune_heads`' report). An export of a gates-only checkpoint prunes by the same plan.

Interface for the callbacks (`callbacks/head_gates.py`): `causal_lm` (the Hugging Face model),
`is_pruned`, `effective_gates()`, `set_gate_values(values)` and the `head_agency` attribute.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
from typing import Literal

import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info
from peft import PeftModel

from lightning_modules.base import TesttimeModule, metrics_table
from testtime.errors import CheckpointError, UsageError
from testtime.heads import (HardConcreteGates, attach_head_gates, attach_lora, head_layout, keep_from_gates,
                            plan_pruning, prune_heads)
from testtime.io import atomic_write_text
from testtime.lm import IGNORE_INDEX, next_token_loss

LOG_ALPHA_KEY = "head_gates.hard_concrete.log_alpha"
PLAN_KEYS = ("pruning_keep", "pruning_gates")


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


def _log_alpha_for(values: torch.Tensor, hc: HardConcreteGates, margin: float = 1.0) -> torch.Tensor:
    """log_alpha whose deterministic gate is `values` (the inverse of `HardConcreteGates.deterministic`);
    0 and 1 lie on clamped plateaus, reached with `margin` beyond their edge."""
    span = hc.zeta - hc.gamma
    closed, opened = math.log(-hc.gamma / hc.zeta), math.log((1 - hc.gamma) / (hc.zeta - 1))  # logits of the edges
    inner = torch.logit(((values - hc.gamma) / span).clamp(1e-6, 1 - 1e-6))
    return torch.where(values <= 0, closed - margin, torch.where(values >= 1, opened + margin, inner))


class HeadGateModule(TesttimeModule):
    """Hard-concrete head gates with an L0 penalty on a frozen LM, then pruning and LoRA recovery.

    Args:
        model_name_or_path: the frozen base model (see `testtime.loading`).
        target_sparsity: fraction of heads to remove: the L0 penalty pulls the expected open
            fraction toward 1 - target_sparsity, and the plan prunes this fraction (see
            `prune_scope`). None: Voita et al.'s plain penalty l0_lambda * E[L0] / heads (then
            `prune_scope` must be "gates").
        l0_lambda: weight of the L0 penalty (`HardConcreteGates.l0_penalty`).
        gate_learning_rate: AdamW learning rate of the gates' log_alpha.
        init_log_alpha: starting log_alpha of every gate (3: open, P(gate != 0) ~ 0.99).
        init_gates_from: a checkpoint of this module's gate phase to start the gates from.
        prune_at_step: the optimizer step at which `fit` prunes and switches to LoRA recovery;
            0 prunes at set-up (needs `init_gates_from`; the way to recover under DDP); None never
            prunes during fit (`export` still writes the pruned model).
        prune_scope: how the plan is read from the gates (`plan_pruning` on log_alpha, highest
            kept): "uniform" (every layer keeps the same head shape, the one nearest
            target_sparsity that the config can hold, so every pruned head leaves the weights),
            "global" (round(target_sparsity x heads) lowest of all heads), "layer" (the same
            count in every layer); or "gates" (the heads whose deterministic gate is 0,
            `keep_from_gates`).
        lora_r: LoRA rank of the recovery.
        lora_alpha: LoRA alpha (scale alpha / r).
        lora_target_modules: PEFT target module names; None: every linear layer of the decoder
            layers, leaving out the attention output projection when pruned heads remain as
            zeros (`lora_target_names`).
        learning_rate: AdamW learning rate of the LoRA recovery.
        weight_decay: AdamW weight decay of the LoRA recovery.
        warmup_steps: linear warm-up of each phase (restarted when the recovery begins).
        eval_max_new_tokens, eval_num_samples, eval_seed: answer accuracy when the validation data
            has prompts (a task datamodule), and `predict`.
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m",
        target_sparsity: float | None = 0.3,
        l0_lambda: float = 100.0,
        gate_learning_rate: float = 0.1,
        init_log_alpha: float = 3.0,
        init_gates_from: str | None = None,
        prune_at_step: int | None = None,
        prune_scope: Literal["uniform", "global", "layer", "gates"] = "uniform",
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_target_modules: list[str] | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        eval_max_new_tokens: int = 32,
        eval_num_samples: int = 4,
        eval_seed: int = 0,
    ):
        super().__init__(model_name_or_path, eval_max_new_tokens, eval_num_samples, eval_seed)
        if target_sparsity is not None and not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1) or null, got {target_sparsity}")
        if target_sparsity is None and prune_scope != "gates":
            raise ValueError(f"prune_scope {prune_scope!r} prunes target_sparsity of the heads, which is null; "
                             "set target_sparsity or use prune_scope: gates")
        if l0_lambda < 0:
            raise ValueError(f"l0_lambda must be >= 0, got {l0_lambda}")
        if prune_at_step is not None and prune_at_step < 0:
            raise ValueError(f"prune_at_step must be >= 0 or null, got {prune_at_step}")
        if prune_at_step == 0 and not init_gates_from:
            raise ValueError("prune_at_step: 0 prunes before any gate is learned; set init_gates_from to a "
                             "checkpoint of learned gates")
        if lora_r < 1:
            raise ValueError(f"lora_r must be >= 1, got {lora_r}")
        self.save_hyperparameters()
        self.head_gates = None  # HeadGates until pruning
        self.register_buffer("pruning_keep", None)  # set when pruned: part of the checkpoint from then on
        self.register_buffer("pruning_gates", None)
        self.pruning_report: dict | None = None
        self.head_agency = None  # set by callbacks.head_gates.HeadAgencyTracker
        self._sums: dict[str, torch.Tensor] = {}  # stage -> [summed NLL, tokens] (never checkpointed)

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this more than once
            return
        hp = self.hparams
        model = self.load_base_model().requires_grad_(False).eval()
        layout = head_layout(model)
        gates = HardConcreteGates(layout.num_layers, layout.num_heads, init_log_alpha=hp.init_log_alpha)
        if hp.init_gates_from:
            with torch.no_grad():
                gates.log_alpha.copy_(self._read_log_alpha(hp.init_gates_from, tuple(gates.log_alpha.shape)))
        self.model = model
        self.head_gates = attach_head_gates(model, mode="hard_concrete", hard_concrete=gates)
        if hp.prune_at_step == 0:
            self.prune()

    @staticmethod
    def _read_log_alpha(path: str, shape: tuple[int, int]) -> torch.Tensor:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init_gates_from: checkpoint {path!r} does not exist")
        state = torch.load(path, map_location="cpu", weights_only=False)
        state = state.get("state_dict", state)
        if LOG_ALPHA_KEY not in state:
            pruned = " (it was written after pruning: pass it as --ckpt_path instead)" if PLAN_KEYS[0] in state else ""
            raise CheckpointError(f"init_gates_from: {path} holds no {LOG_ALPHA_KEY}{pruned}")
        value = state[LOG_ALPHA_KEY]
        if tuple(value.shape) != shape:
            raise CheckpointError(f"init_gates_from: {path} has gates of shape {tuple(value.shape)} (layers, heads); "
                                  f"the model has {shape}")
        return value

    @property
    def causal_lm(self) -> nn.Module:
        """The Hugging Face model (under the LoRA wrapper once pruned)."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    @property
    def is_pruned(self) -> bool:
        return self.pruning_keep is not None

    def effective_gates(self) -> torch.Tensor:
        """[L, H] float on the CPU: the gate each head is multiplied by now (0 once pruned away)."""
        if self.is_pruned:
            return (self.pruning_keep * self.pruning_gates).float().cpu()
        return self.head_gates.values.detach().float().cpu()

    def set_gate_values(self, values: torch.Tensor) -> None:
        """Write deterministic gate values (e.g. from a pruning controller) into log_alpha; heads
        whose value does not change keep their log_alpha exactly."""
        if self.is_pruned:
            raise UsageError("set_gate_values: the model is already pruned; its gates are folded into the weights")
        hc = self.head_gates.hard_concrete
        values = values.detach().to(hc.log_alpha.device, torch.float32)
        changed = values != hc.deterministic().detach()
        with torch.no_grad():
            hc.log_alpha.copy_(torch.where(changed, _log_alpha_for(values, hc).to(hc.log_alpha.dtype), hc.log_alpha))

    def checkpoint_key(self, key: str) -> bool:
        """The gates before pruning; the plan and the LoRA weights after (the base is reloaded)."""
        return key.startswith("head_gates.") or key in PLAN_KEYS or "lora_" in key

    # -- pruning -----------------------------------------------------------------------------
    def pruning_plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep [L, H] bool, gate values [L, H]) read from the current gates by `prune_scope`."""
        hp = self.hparams
        values = self.head_gates.values.detach().float().cpu()
        if hp.prune_scope == "gates":
            return keep_from_gates(values), values
        scores = self.head_gates.hard_concrete.log_alpha.detach()  # continuous where the gates saturate
        return plan_pruning(scores, hp.target_sparsity, scope=hp.prune_scope, model=self.causal_lm), values

    def prune(self) -> dict:
        """Prune the heads by `pruning_plan`, physically, and put LoRA on the pruned model."""
        keep, values = self.pruning_plan()
        report = self._apply_pruning(keep, values)
        rank_zero_info(f"HeadGateModule: pruned {report['heads_pruned']} of {keep.numel()} heads at step "
                       f"{self.global_step} ({report['method']}: "
                       f"{report['heads_removed']} removed from the weights, {report['heads_zeroed']} left as zeros; "
                       f"{report['parameters_before']:,} -> {report['parameters_after']:,} parameters)")
        return report

    def _apply_pruning(self, keep: torch.Tensor, gate_values: torch.Tensor) -> dict:
        hp = self.hparams
        self.head_gates.detach()
        self.head_gates = None
        model = self.model
        report = prune_heads(model, keep, gate_values=gate_values)
        device = next(model.parameters()).device
        self.pruning_keep = keep.detach().bool().to(device)
        self.pruning_gates = gate_values.detach().float().to(device)
        self.pruning_report = report
        self.model = attach_lora(model, report["heads_zeroed"], r=hp.lora_r, alpha=hp.lora_alpha,
                                 target_modules=hp.lora_target_modules)
        return report

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.prune_at_step and self.trainer.world_size > 1:
            raise UsageError(
                f"prune_at_step: {self.hparams.prune_at_step} swaps the model's parameters in the middle of fit, "
                f"which DDP cannot follow ({self.trainer.world_size} processes). Fit the gates with "
                "prune_at_step: null, then fit again with init_gates_from: <that checkpoint> and prune_at_step: 0")

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        at = self.hparams.prune_at_step
        if at is not None and not self.is_pruned and self.global_step >= at:
            self.prune()
            self.trainer.strategy.setup_optimizers(self.trainer)  # LoRA parameters, a fresh warm-up

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A checkpoint written after pruning carries its plan: prune the fresh base with it first,
        so the LoRA weights land on the model they were trained on."""
        if PLAN_KEYS[0] in state_dict:
            if PLAN_KEYS[1] not in state_dict:
                raise CheckpointError(f"this checkpoint holds {PLAN_KEYS[0]} but not {PLAN_KEYS[1]}: its pruning "
                                      "cannot be reproduced")
            keep, values = state_dict[PLAN_KEYS[0]].cpu().bool(), state_dict[PLAN_KEYS[1]].cpu().float()
            if not self.is_pruned:
                self._apply_pruning(keep, values)
            elif not (torch.equal(self.pruning_keep.cpu(), keep) and torch.equal(self.pruning_gates.cpu(), values)):
                raise CheckpointError("this checkpoint was pruned with another plan than the one this module made from "
                                      f"init_gates_from={self.hparams.init_gates_from!r}")
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise
            raise CheckpointError(f"{err}\n(does lora_r={self.hparams.lora_r} match the checkpoint's?)") from None

    # -- training ----------------------------------------------------------------------------
    def _logits(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        if self.is_pruned:
            nll = next_token_loss(self._logits(batch), batch["labels"])
            penalty = torch.zeros((), device=nll.device)
            active = (self.effective_gates() > 0).float().mean()  # exact now: the gates are folded in
        else:
            gates = self.head_gates.hard_concrete
            # One sample for every layer of the pass; the base itself stays in eval mode.
            with self.head_gates.overridden(gates.sample()):
                nll = next_token_loss(self._logits(batch), batch["labels"])
            penalty = gates.l0_penalty(hp.l0_lambda, hp.target_sparsity)
            active = gates.expected_l0().detach() / gates.log_alpha.numel()
        loss = nll + penalty
        size = batch["input_ids"].shape[0]
        # The same keys in both phases: Lightning would otherwise keep logging a key's last value.
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/nll", nll, batch_size=size)
        self.log("train/l0_penalty", penalty, batch_size=size)
        self.log("train/expected_active", active, batch_size=size)
        return loss

    def configure_optimizers(self):
        """AdamW over log_alpha (gate phase) or the LoRA weights (after pruning), linear warm-up."""
        hp = self.hparams
        if self.is_pruned:
            params = [p for p in self.model.parameters() if p.requires_grad]
            lr, decay = hp.learning_rate, hp.weight_decay
        else:
            params, lr, decay = [self.head_gates.hard_concrete.log_alpha], hp.gate_learning_rate, 0.0
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=decay)
        warmup = max(1, hp.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- perplexity --------------------------------------------------------------------------
    def _accumulate(self, batch: dict, stage: str) -> None:
        labels = batch["labels"]
        count = int((labels[:, 1:] != IGNORE_INDEX).sum())
        if count:
            nll = next_token_loss(self._logits(batch), labels).double() * count
            sums = self._sums.setdefault(stage, torch.zeros(2, dtype=torch.float64, device=self.device))
            sums += torch.stack([nll.detach(), torch.tensor(float(count), dtype=torch.float64, device=self.device)])

    def _perplexity(self, stage: str) -> dict[str, float]:
        """exp(summed NLL / tokens) over the split; the sums are added across ranks first (every rank
        calls this: a collective)."""
        sums = self._sums.pop(stage, torch.zeros(2, dtype=torch.float64, device=self.device))
        nll, tokens = self.trainer.strategy.reduce(sums, reduce_op="sum").tolist()
        gates = self.effective_gates()
        active = int((gates > 0).sum())
        metrics = {f"{stage}/active_heads": float(active), f"{stage}/active_fraction": active / gates.numel()}
        if tokens:
            metrics = {f"{stage}/loss": nll / tokens, f"{stage}/ppl": math.exp(nll / tokens), **metrics}
        for key, value in metrics.items():
            self.log(key, value)  # already reduced: identical on every rank
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._sums.pop("val", None)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if "labels" in batch:
            self._accumulate(batch, "val")
        self.evaluate_batch(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._perplexity("val")
        super().on_validation_epoch_end()

    def on_test_epoch_start(self) -> None:
        self._sums.pop("test", None)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if "labels" in batch:
            self._accumulate(batch, "test")
        self.evaluate_batch(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        metrics = {**self._perplexity("test"), **self.log_accuracies("test")}
        state = "pruned" if self.is_pruned else "gated (not pruned yet)"
        self.write_results("test", metrics, metrics_table(metrics), title=f"HeadGateModule: test, {state}",
                           payload={"pruned": self.is_pruned, "gates": self.effective_gates().tolist()})

    # -- export ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _gates_detached(self):
        """The model without its gate hooks inside the block (a deep copy would keep hooks that still
        apply these gates), the same log_alpha reattached after."""
        hard_concrete = self.head_gates.hard_concrete
        self.head_gates.detach()
        try:
            yield
        finally:
            self.head_gates = attach_head_gates(self.model, mode="hard_concrete", hard_concrete=hard_concrete)

    def pruned_model(self) -> tuple[nn.Module, dict, torch.Tensor, torch.Tensor]:
        """(a pruned copy of the model with LoRA merged, prune_heads' report, keep, gate values);
        the module itself is left as it is."""
        if self.is_pruned:
            return (copy.deepcopy(self.model).merge_and_unload(), self.pruning_report, self.pruning_keep.cpu(),
                    self.pruning_gates.cpu())
        keep, values = self.pruning_plan()
        with self._gates_detached():
            model = copy.deepcopy(self.model)
        return model, prune_heads(model, keep, gate_values=values), keep, values

    def export(self, output_dir: str, merged: bool = False) -> None:
        """The pruned model as a Hugging Face folder (safetensors, config with the new head counts,
        tokenizer) plus `pruning.json`. The folder always holds every weight (LoRA merged), so
        `merged` changes nothing."""
        model, report, keep, values = self.pruned_model()
        os.makedirs(output_dir, exist_ok=True)
        model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)
        effective = (keep * values).tolist()
        physical = report["physical_heads"]
        layers, heads = keep.shape
        hp = self.hparams
        summary = {
            "model_name_or_path": self.model_name_or_path,
            "plan": {"source": "hard-concrete gates (Voita et al. 2019)", "prune_scope": hp.prune_scope,
                     "target_sparsity": hp.target_sparsity, "keep": keep.tolist(), "gate_values": values.tolist(),
                     "recovered_with_lora": self.is_pruned, "lora_r": hp.lora_r if self.is_pruned else None},
            "heads_pruned_per_layer": [[h for h in range(heads) if not keep[l, h]] for l in range(layers)],
            "heads_removed_per_layer": [[h for h in range(heads) if h not in physical[l]] for l in range(layers)],
            "heads_zeroed_per_layer": [[h for h in physical[l] if effective[l][h] == 0] for l in range(layers)],
            "report": report,
        }
        text = json.dumps(summary, indent=2)
        # one line per list of numbers (a layer's heads), not one line per number
        text = re.sub(r"\[[^\[\]{}\"]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
        atomic_write_text(os.path.join(output_dir, "pruning.json"), text + "\n")

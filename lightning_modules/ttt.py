"""TTT-E2E: meta-train a sliding-window transformer whose last quarter of MLPs train at test time.

The model is `testtime.ttt.TTTForCausalLM` ("End-to-End Test-Time Training for Long Context",
Tandon et al. 2025); this module adds the outer optimization (AdamW, warm-up then cosine decay,
the paper's betas and weight decay), the inner-lr warm-up, logging and evaluation:

- `fit` (on `LMTextDataModule`, the standard-library corpus by default) logs per step the outer
  loss and, every `log_ttt_stats_every_n_steps`, the inner loop at work: the chunk loss before and
  after its update (`train/ttt_loss_before`, `train/ttt_loss_after`: did the inner step help?) and
  the inner gradient norm before clipping.
- `validate` on LM text reports the loss by position bucket ([0, b), [b, 2b), ... up to the
  window k, then beyond it) for TTT on and for the same weights with TTT off
  (`val/loss_on_<bucket>`, `val/loss_off_<bucket>`), with a table and `val_loss_by_position.png`.
- `validate` on `datamodules.memory.MemoryTestDataModule` runs the memory test: the loss on the
  second copy of a repeated passage (and beyond the window of long documents) with TTT off
  ("pre") and on ("post"), over a grid of inner lr, chunk size and inner steps, for the model and,
  with `adapter_path`, the model with a PEFT adapter (TinyLoRA's export); a table and
  `memory_test.png`.
- `predict` chats on a prompt file (`PromptDataModule`, e.g. with `max_history_turns: 5`);
  `export` writes a Hugging Face folder (`model_type: ttt_e2e`) that
  `AutoModelForCausalLM.from_pretrained` reloads once `testtime.ttt` is imported.
"""

from __future__ import annotations

import contextlib
import itertools
import os

import torch
from lightning.pytorch.trainer.states import TrainerFn

from lightning_modules.base import TesttimeModule
from testtime.errors import CheckpointError, UsageError
from testtime.io import new_figure
from testtime.loading import folder_model_type, load_tokenizer, resolve
from testtime.ttt import TTTConfig, TTTForCausalLM
from testtime.ttt.evaluation import bucket_name, bucket_sums, memory_share, position_buckets, token_losses
from testtime.ttt.outer import outer_lr_factor, outer_optimizer

# the paper's TTT settings; None in the module's arguments means these (or the loaded folder's)
TTT_FIELDS = ("window_size", "chunk_size", "ttt_layer_fraction", "inner_lr", "inner_lr_warmup_steps",
              "inner_grad_clip", "inner_steps", "ttt", "attention", "first_order", "recompute", "post_norm",
              "rope_interleaved")


class TTTModule(TesttimeModule):
    """Meta-training and evaluation of a TTT-E2E model.

    Args:
        model_name_or_path: the tokenizer's source (an alias of `testtime.loading` or a folder), and
            the weights too when it is a TTT-E2E folder (an export of this module); otherwise a new
            model of `preset` is built with the tokenizer's vocabulary.
        preset: the size of a new model: "tiny" (tests), "small" (minutes on a GPU), "125m" (the paper).
        window_size: k, the sliding attention window in tokens (paper: 8192).
        chunk_size: b, tokens per inner step (paper: 1024); at most `window_size`.
        ttt_layer_fraction: the last fraction of blocks that carry the fast-weight MLP' (paper: 0.25).
        inner_lr: the inner SGD learning rate (paper: 1.0).
        inner_lr_warmup_steps: outer steps over which the inner lr rises from 0.1x (paper: 480 of 4800).
        inner_grad_clip: per-sample global norm clip of the inner gradient (paper: 1.0).
        inner_steps: SGD steps per chunk (paper: 1).
        ttt: run the inner loop (false: the same network as a plain transformer, the baseline).
        attention: "sliding" or "full" (the full-attention baseline).
        first_order: drop the second-order terms of the meta-gradient (cheaper).
        recompute: recompute activations per chunk in the backward pass (bounds memory).
        post_norm, rope_interleaved: the official layout (true, the presets'); false for both
            rebuilds the layout of checkpoints written before these fields existed.
        learning_rate: outer AdamW peak learning rate (paper: 3e-3 at 125M).
        min_learning_rate: the end of the cosine decay (paper: 1e-5).
        betas: AdamW betas (paper: 0.9, 0.95).
        weight_decay: AdamW weight decay of every parameter, norms and embeddings included, as the
            official code (paper: 0.1).
        warmup_steps: outer linear warm-up steps (paper: 480 of 4800); the decay lasts until `max_steps`.
        log_ttt_stats_every_n_steps: log the inner loop's before/after loss and gradient norm every n
            steps (0: never; it costs one more pass over each chunk).
        memory_inner_lrs: the memory test's grid of inner lr ([]: the model's).
        memory_chunk_sizes: the memory test's grid of chunk sizes ([]: the model's).
        memory_inner_steps: the memory test's grid of inner steps ([]: the model's).
        adapter_path: a PEFT adapter folder (e.g. a TinyLoRA export) to evaluate beside the model in
            the memory test.
        eval_max_new_tokens, eval_num_samples, eval_seed: generation in predict (see `TesttimeModule`).
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m",
        preset: str = "small",
        window_size: int | None = None,
        chunk_size: int | None = None,
        ttt_layer_fraction: float | None = None,
        inner_lr: float | None = None,
        inner_lr_warmup_steps: int | None = None,
        inner_grad_clip: float | None = None,
        inner_steps: int | None = None,
        ttt: bool | None = None,
        attention: str | None = None,
        first_order: bool | None = None,
        recompute: bool | None = None,
        post_norm: bool | None = None,
        rope_interleaved: bool | None = None,
        learning_rate: float = 3e-3,
        min_learning_rate: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        warmup_steps: int = 480,
        log_ttt_stats_every_n_steps: int = 10,
        memory_inner_lrs: list[float] = [],  # noqa: B006 (never mutated)
        memory_chunk_sizes: list[int] = [],  # noqa: B006
        memory_inner_steps: list[int] = [],  # noqa: B006
        adapter_path: str | None = None,
        eval_max_new_tokens: int = 64,
        eval_num_samples: int = 1,
        eval_seed: int = 0,
    ):
        super().__init__(model_name_or_path, eval_max_new_tokens, eval_num_samples, eval_seed)
        if log_ttt_stats_every_n_steps < 0:
            raise ValueError(f"log_ttt_stats_every_n_steps must be >= 0, got {log_ttt_stats_every_n_steps}")
        self.save_hyperparameters()
        self._sums: dict[str, list[torch.Tensor]] = {}  # validation accumulators: name -> [sum, count]
        self.adapter = None

    # -- model -------------------------------------------------------------------------------
    def ttt_overrides(self) -> dict:
        """The TTT settings given in this module's arguments (None: the preset's or folder's)."""
        return {k: self.hparams[k] for k in TTT_FIELDS if self.hparams[k] is not None}

    def configure_model(self) -> None:
        if self.model is not None:
            return
        folder = resolve(self.model_name_or_path)
        self.tokenizer = load_tokenizer(folder)
        # an export of this module: its weights, with the settings given here on top
        if folder_model_type(folder) == TTTConfig.model_type:
            self.model = TTTForCausalLM.from_pretrained(folder, dtype=torch.float32, **self.ttt_overrides())
        else:  # a new model of the preset's size over the tokenizer's vocabulary
            tok = self.tokenizer
            config = TTTConfig.from_preset(self.hparams.preset, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                           eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                           **self.ttt_overrides())
            self.model = TTTForCausalLM(config)
        self.model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        if self.hparams.adapter_path:
            self._load_adapter(self.hparams.adapter_path)

    def _load_adapter(self, path: str) -> None:
        """A PEFT adapter on the model for the memory test. PEFT puts its layers into the model
        itself, so everything but the memory test's "adapter" rows runs under `self.without_adapter()`."""
        from peft import PeftModel

        self.adapter = PeftModel.from_pretrained(self.model, path)
        self.adapter.eval()

    def without_adapter(self):
        """The model as it is without the adapter (a no-op when there is none)."""
        return self.adapter.disable_adapter() if self.adapter is not None else contextlib.nullcontext()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except CheckpointError as error:
            if self.model.config.post_norm and not any("post_attn_norm" in k for k in state_dict):
                raise CheckpointError(f"{error}. It has no post-norms: a checkpoint written before the official "
                                      "layout; load it with --model.post_norm false --model.rope_interleaved false"
                                      ) from None
            raise

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        if self.adapter is not None:
            raise UsageError("adapter_path is for the memory test (validate); to train an adapter on the TTT model "
                             "use lightning_modules.tinylora.TinyLoRAModule with this model's export")
        model = self.model
        model.set_inner_lr_step(self.global_step)
        every = self.hparams.log_ttt_stats_every_n_steps
        stats = bool(every) and self.global_step % every == 0
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                    return_ttt_stats=stats)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        self.log("train/inner_lr", model.inner_lr_at(self.global_step), batch_size=size)
        if stats and out.ttt_loss_before is not None:
            before, after = out.ttt_loss_before.nanmean(), out.ttt_loss_after.nanmean()
            self.log("train/ttt_loss_before", before, batch_size=size)
            self.log("train/ttt_loss_after", after, batch_size=size)
            self.log("train/ttt_inner_gain", before - after, batch_size=size)
            self.log("train/ttt_grad_norm", out.ttt_grad_norm.nanmean(), batch_size=size)
        return out.loss

    def configure_optimizers(self):
        """AdamW on every parameter, every one decayed (`testtime.ttt.outer`), linear warm-up to
        `learning_rate`, then a cosine decay to `min_learning_rate` at the trainer's `max_steps`."""
        hp = self.hparams
        optimizer = outer_optimizer(self.model.parameters(), hp.learning_rate, hp.betas, hp.weight_decay)
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        floor = hp.min_learning_rate / hp.learning_rate
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: outer_lr_factor(step, hp.warmup_steps, total, floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- validation: loss by position, the memory test ---------------------------------------
    def buckets(self) -> list[tuple[int, int | None]]:
        c = self.model.config
        return position_buckets(c.window_size, c.chunk_size)

    def _add(self, name: str, total: torch.Tensor, count: torch.Tensor) -> None:
        if name in self._sums:
            self._sums[name][0] += total
            self._sums[name][1] += count
        else:
            self._sums[name] = [total.clone(), count.clone()]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        if "memory_kind" in batch:
            return self._memory_step(batch)
        buckets = self.buckets()
        for mode in ("on", "off"):
            with self.without_adapter():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                    ttt=mode == "on").logits
            loss, counted = token_losses(logits, batch["labels"])
            sums, counts = bucket_sums(loss, counted, buckets)
            for (bucket, s), c in zip(zip(buckets, sums), counts):
                self._add(f"loss_{mode}_{bucket_name(bucket)}", s, c)
            self._add(f"loss_{mode}", sums.sum(), counts.sum())

    def memory_grid(self) -> list[tuple[float, int, int]]:
        hp, c = self.hparams, self.model.config
        return list(itertools.product(hp.memory_inner_lrs or [c.inner_lr], hp.memory_chunk_sizes or [c.chunk_size],
                                      hp.memory_inner_steps or [c.inner_steps]))

    def _memory_step(self, batch: dict) -> None:
        kind, window = batch["memory_kind"], self.model.config.window_size
        labels = batch["labels"]
        if kind == "long":  # only what lies beyond the window
            labels = labels.clone()
            labels[:, :window] = -100
        elif self.trainer.datamodule is not None and getattr(self.trainer.datamodule.hparams, "gap_tokens", window) \
                < window:
            raise UsageError(f"the memory test's gap_tokens ({self.trainer.datamodule.hparams.gap_tokens}) is not "
                             f"larger than window_size ({window}): sliding attention sees the first copy; raise "
                             "gap_tokens")
        models = [("base", self.model, self.without_adapter)]
        if self.adapter is not None:
            models.append(("adapter", self.adapter, contextlib.nullcontext))
        for name, model, context in models:
            def loss_of(**kwargs):
                with context():
                    logits = model(input_ids=batch["input_ids"], **kwargs).logits
                loss, counted = token_losses(logits, labels)
                return loss[counted].double().sum(), counted.sum().double()

            self._add(f"memory_{name}_{kind}_pre", *loss_of(ttt=False))
            for lr, b, steps in self.memory_grid():
                post = loss_of(ttt=True, inner_lr=lr, chunk_size=b, inner_steps=steps)
                self._add(f"memory_{name}_{kind}_post_lr{lr:g}_b{b}_s{steps}", *post)

    def on_validation_epoch_end(self) -> None:
        sums, self._sums = self._sums, {}
        if self.trainer.sanity_checking or not sums:
            return
        names = sorted(sums)
        totals = self.trainer.strategy.reduce(torch.stack([sums[n][0] for n in names]).to(self.device), reduce_op="sum")
        counts = self.trainer.strategy.reduce(torch.stack([sums[n][1] for n in names]).to(self.device), reduce_op="sum")
        means = {n: float(t / c) if c > 0 else float("nan") for n, t, c in zip(names, totals, counts)}
        for name, value in means.items():
            self.log(f"val/{name}", value)
        if "loss_on" in means:
            self.log("val/loss", means["loss_on"], prog_bar=True)
        if self.trainer.state.fn == TrainerFn.VALIDATING:
            if any(n.startswith("memory_") for n in means):
                self._write_memory_results(means)
            else:
                self._write_position_results(means)

    def _write_position_results(self, means: dict[str, float]) -> None:
        buckets = [bucket_name(b) for b in self.buckets()]
        lines = ["| positions | TTT on | TTT off | on - off |", "|---|---:|---:|---:|"]
        for b in buckets + [None]:
            on, off = means.get(f"loss_on_{b}" if b else "loss_on"), means.get(f"loss_off_{b}" if b else "loss_off")
            lines.append(f"| {b or 'all'} | {on:.4f} | {off:.4f} | {on - off:+.4f} |")
        fig, (ax,) = new_figure()
        x = range(len(buckets))
        for mode, style in (("on", "o-"), ("off", "s--")):
            ax.plot(x, [means[f"loss_{mode}_{b}"] for b in buckets], style, label=f"TTT {mode}")
        ax.set_xticks(list(x), buckets, rotation=30, fontsize=8)
        ax.axvline(len(buckets) - 1.5, color="gray", lw=0.8, ls=":", label="window edge")
        ax.set_xlabel("position in the sequence (tokens)")
        ax.set_ylabel("next-token loss (nats)")
        ax.set_title("TTT-E2E: loss by position, same weights with TTT on and off")
        ax.legend(fontsize=8)
        c = self.model.config
        self.write_results("val", means, "\n".join(lines), figures={"val_loss_by_position.png": fig},
                           title=f"TTT-E2E validation (window {c.window_size}, chunk {c.chunk_size}):",
                           payload={"buckets": buckets, "window_size": c.window_size, "chunk_size": c.chunk_size})

    def _write_memory_results(self, means: dict[str, float]) -> None:
        rows, points = [], {}
        lines = ["| model | documents | inner lr | chunk | steps | pre (TTT off) | post (TTT on) | reduction |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        shares = ["", "| model | inner lr | chunk | steps | TTT's drop, repeat | TTT's drop, control | share of the "
                      "drop from memory |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, kind in itertools.product(("base", "adapter"), ("repeat", "control", "long")):
            pre = means.get(f"memory_{name}_{kind}_pre")
            if pre is None:
                continue
            for lr, b, steps in self.memory_grid():
                post = means[f"memory_{name}_{kind}_post_lr{lr:g}_b{b}_s{steps}"]
                reduction = (pre - post) / pre
                row = {"model": name, "kind": kind, "inner_lr": lr, "chunk_size": b, "inner_steps": steps,
                       "pre": pre, "post": post, "reduction": reduction}
                lines.append(f"| {name} | {kind} | {lr:g} | {b} | {steps} | {pre:.4f} | {post:.4f} | "
                             f"{reduction:+.2%} |")
                points.setdefault((name, kind, b, steps), []).append((lr, reduction))
                repeat = means.get(f"memory_{name}_repeat_post_lr{lr:g}_b{b}_s{steps}")
                if kind == "control" and repeat is not None:
                    pre_repeat = means[f"memory_{name}_repeat_pre"]
                    row["memory_share"] = memory_share(pre_repeat, repeat, pre, post)
                    shares.append(f"| {name} | {lr:g} | {b} | {steps} | {pre_repeat - repeat:+.4f} | "
                                  f"{pre - post:+.4f} | {row['memory_share']:.1%} |")
                rows.append(row)
        if len(shares) > 3:
            lines += shares
        fig, (ax,) = new_figure()
        for (name, kind, b, steps), pts in sorted(points.items()):
            ax.plot(*zip(*sorted(pts)), "o-", label=f"{name}, {kind}, b={b}, steps={steps}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("inner learning rate")
        ax.set_ylabel("loss reduction from TTT (pre - post) / pre")
        ax.set_title("Memory test: what the fast weights remember beyond the window")
        ax.legend(fontsize=7)
        self.write_results("memory", means, "\n".join(lines), figures={"memory_test.png": fig},
                           title=f"TTT-E2E memory test (window {self.model.config.window_size}):",
                           payload={"rows": rows})

    # -- serving -----------------------------------------------------------------------------
    def export(self, output_dir: str, merged: bool = False) -> None:
        """A Hugging Face folder (config.json with model_type ttt_e2e, model.safetensors, tokenizer).

        Every weight trains here, so the export is always complete (`merged` changes nothing).
        """
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)

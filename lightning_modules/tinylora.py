"""TinyLoRA: few-parameter PEFT adapters on a frozen causal LM, trained by SFT or by GRPO.

The adapters come from `testtime/tinylora.py` (PEFT's TinyLoRA, LoRA, VeRA: `peft_method` picks
one), GRPO from `testtime/grpo.py`. Any Hugging Face causal LM works, the TTT-E2E model included
(a saved `testtime.ttt` folder as `model_name_or_path`). `fit` starts by logging the exact number
of trainable parameters beside the formula for the chosen method and tying.

Objectives:
- `sft`: completion-only next-token loss on the batch's labels (prompt/completion data, or every
  assistant turn of `datamodules.dialog` dialogs);
- `grpo`: reinforcement learning with a verifiable reward (Shao et al. 2024). Each training batch
  gives prompts and answers (`prompt_ids` + `answers` where the batch has them, else the prompt
  and reference completion of each SFT row, see `testtime.grpo.prompts_from_sft_batch`); the
  module samples `num_generations` completions per prompt from the current policy, rewards them
  with `reward_fn`, and minimizes the clipped GRPO loss with an optional KL penalty toward the
  base without adapter (`beta`). With `num_iterations` = mu > 1 a rollout serves mu consecutive
  training steps (the clip then acts; the batches of the mu - 1 reuse steps are not used).

`validate`/`test` log `<stage>/loss` (completion NLL of the reference, for both objectives) and
the accuracy of greedy and default sampling (T = 1, k samples: pass@1) with the adapter;
`predict` decodes greedily with the adapter, and chats on `datamodules.dialog` conversations
(the last `chat_history_turns` messages as history).

Checkpoints hold only the trainable adapter tensors (for TinyLoRA u x groups numbers; the frozen
SVD factors and projections are rebuilt from the base and `projection_seed`), plus, for TinyLoRA,
`frozen_factor_signature` of the factors they were trained with: loading onto a base whose factors
differ is an error rather than a silently different model. `export` writes PEFT's layout
(`--merged true`: one plain Hugging Face model with the update merged into the weights).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.base import TesttimeModule
from testtime.errors import CheckpointError
from testtime.grpo import (
    completion_logprobs,
    grpo_loss,
    load_reward_fn,
    prompts_from_sft_batch,
    sample_rollout,
)
from testtime.lm import left_pad, next_token_loss
from testtime.loading import resolve
from testtime.tinylora import (
    ALL_LINEAR,
    adapter_config,
    apply_adapter,
    chat,
    describe_adapter,
    expected_trainable_parameters,
    frozen_factor_signature,
    save_adapter,
    save_merged,
    trainable_parameters,
)

SIGNATURE_KEY = "tinylora_frozen_signature"


class TinyLoRAModule(TesttimeModule):
    """A PEFT adapter (TinyLoRA, LoRA or VeRA) on a frozen causal LM, trained by SFT or GRPO.

    Args:
        model_name_or_path: the frozen base (see `testtime.loading`).
        peft_method: "tinylora", or the baselines "lora" and "vera".
        r: TinyLoRA's SVD rank (the paper's best: 2), LoRA's and VeRA's rank.
        u: TinyLoRA's trainable vector size per group (13: the paper's headline adapter).
        weight_tying: TinyLoRA's share of modules tied to one vector, 0..1 (1: one vector for all).
        projection_seed: seed of TinyLoRA's random projections (and VeRA's random matrices).
        target_modules: adapted modules: names, a regex, or "all-linear" (every linear layer of the
            blocks, as the paper; the output head excluded).
        lora_alpha: LoRA's scale alpha / r.
        objective: "sft" or "grpo".
        num_generations: GRPO's group size G, completions sampled per prompt.
        max_completion_length: GRPO's longest sampled completion, in tokens.
        temperature: GRPO's sampling temperature (its log-probabilities use the same).
        beta: GRPO's KL penalty toward the base without adapter (0: no reference forward).
        epsilon: GRPO's ratio clip.
        num_iterations: GRPO's updates per rollout (mu; > 1 reuses it, with the clip).
        reward_fn: GRPO's reward, a dotted import path or a callable
            `f(completions, answers, **kwargs) -> list[float]` (default: last number equals the answer).
        chat_history_turns: messages of history (the user's new turn included) when chatting in predict.
        learning_rate: AdamW learning rate of the adapter.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps, then constant.
        eval_max_new_tokens: tokens generated per answer in validate/test/predict.
        eval_num_samples: k samples per problem for sampled pass@1.
        eval_seed: seed of evaluation sampling.
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m",
        peft_method: Literal["tinylora", "lora", "vera"] = "tinylora",
        r: int = 2,
        u: int = 13,
        weight_tying: float = 1.0,
        projection_seed: int = 42,
        target_modules: str | list[str] = ALL_LINEAR,
        lora_alpha: int = 8,
        objective: Literal["sft", "grpo"] = "sft",
        num_generations: int = 8,
        max_completion_length: int = 64,
        temperature: float = 1.0,
        beta: float = 0.0,
        epsilon: float = 0.2,
        num_iterations: int = 1,
        reward_fn: str | Callable[..., Sequence[float]] = "testtime.grpo.answer_reward",
        chat_history_turns: int = 5,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        eval_max_new_tokens: int = 32,
        eval_num_samples: int = 4,
        eval_seed: int = 0,
    ):
        super().__init__(model_name_or_path, eval_max_new_tokens, eval_num_samples, eval_seed)
        if objective == "grpo" and num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 for GRPO (advantages compare a prompt's completions), "
                             f"got {num_generations}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if beta < 0 or not epsilon > 0:
            raise ValueError(f"beta must be >= 0 and epsilon > 0, got beta={beta}, epsilon={epsilon}")
        self.save_hyperparameters(ignore=["reward_fn"] if callable(reward_fn) else None)
        self._reward_spec = reward_fn
        self.reward_fn = None  # resolved in configure_model, where a bad path ends with its message alone
        self.peft_config = adapter_config(peft_method, r=r, u=u, weight_tying=weight_tying,
                                          projection_seed=projection_seed, target_modules=target_modules,
                                          lora_alpha=lora_alpha)
        self.trainable_parameter_count: int | None = None
        self._adapter_keys: set[str] = set()
        self._rollout = None
        self._rollout_uses = 0

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.reward_fn = load_reward_fn(self._reward_spec)
        # Eval mode throughout: the base's dropout stays off, the adapters have none; gradients flow regardless.
        self.model = apply_adapter(self.load_base_model(), self.peft_config).eval()
        # One state-dict name per trained tensor (PEFT lists a shared TinyLoRA vector under every
        # module using it): the shortest, PEFT's model-level `base_model.tinylora_v.default.<group>`.
        names: dict[int, str] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if param.requires_grad and (id(param) not in names or len(name) < len(names[id(param)])):
                names[id(param)] = name
        self._adapter_keys = {f"model.{name}" for name in names.values()}

    def generation_model(self):
        """The HF model with the adapter layers in place (what PEFT wraps)."""
        return self.model.get_base_model()

    def checkpoint_key(self, key: str) -> bool:
        """Only the trained adapter tensors: the base is reloaded from `model_name_or_path`."""
        return key in self._adapter_keys

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.model is not None and self.hparams.peft_method == "tinylora":
            state[kwargs.get("prefix", "") + SIGNATURE_KEY] = frozen_factor_signature(self.model)
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The base class's strict loading, plus: a TinyLoRA checkpoint's frozen factors must be the
        ones rebuilt here (same base weights, same projections, same SVD signs)."""
        state_dict = dict(state_dict)
        saved = state_dict.pop(SIGNATURE_KEY, None)
        if self.hparams.peft_method == "tinylora" and (saved is not None or strict):
            here = frozen_factor_signature(self.model)
            if saved is None:
                raise CheckpointError(f"this checkpoint has no {SIGNATURE_KEY!r}: it was not written by a TinyLoRA "
                                      f"{type(self).__name__}")
            saved = saved.double().cpu()
            scale = float(here.abs().max()) if here.numel() else 1.0
            if saved.shape != here.shape or not torch.allclose(saved, here, rtol=1e-4, atol=1e-6 * scale):
                raise CheckpointError(
                    f"the TinyLoRA checkpoint was trained on other frozen factors than {self.model_name_or_path!r} "
                    f"gives here ({saved.numel()} module signature(s) saved, {here.numel()} here"
                    f"{'' if saved.shape != here.shape else ', values differ'}): another base model, other "
                    f"target_modules / projection_seed, or an SVD with other singular-vector signs; export the "
                    f"adapter (PEFT's layout keeps the factors) where it was trained")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_fit_start(self) -> None:
        """Log the exact number of trainable parameters, beside the formula's."""
        self.trainable_parameter_count = trainable_parameters(self.model)
        rank_zero_info(f"{type(self).__name__}: {describe_adapter(self.model)}")
        for logger in self.loggers:  # beside the metrics (metrics.csv, TensorBoard, ...), not only the console
            logger.log_metrics({"trainable_parameters": float(self.trainable_parameter_count)}, step=0)
        if self.trainable_parameter_count != expected_trainable_parameters(self.model):
            rank_zero_warn("the trainable parameter count differs from the formula of testtime.tinylora "
                           "(a PEFT version that groups or sizes adapters differently?)")
        mu = self.hparams.num_iterations
        if self.hparams.objective == "grpo" and mu > 1:
            rank_zero_info(f"num_iterations={mu}: each rollout serves {mu} training steps, so the batches of "
                           f"{mu - 1} steps in every {mu} are not sampled from ({1 / mu:.0%} of the training prompts "
                           "an epoch are used); raise max_steps or max_epochs to see them all")

    # -- losses ------------------------------------------------------------------------------
    def _sft_loss(self, batch: dict) -> torch.Tensor:
        model = self.generation_model()
        if "position_ids" in batch:  # packed rows: restarting positions keep records apart (see CausalLMModule)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        else:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return next_token_loss(logits, batch["labels"])

    def _new_rollout(self, batch: dict):
        hp = self.hparams
        if "prompt_ids" in batch and "answers" in batch:
            prompt_ids, prompt_mask, answers = batch["prompt_ids"], batch["prompt_mask"], batch["answers"]
        else:
            prompts, answers = prompts_from_sft_batch(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                      self.tokenizer)
            prompt_ids, prompt_mask = left_pad(prompts, self.tokenizer.pad_token_id, self.device)
        model = self.generation_model()
        rollout = sample_rollout(model, self.tokenizer, prompt_ids, prompt_mask, answers, self.reward_fn,
                                 hp.num_generations, hp.max_completion_length, hp.temperature)
        if hp.beta > 0:
            with torch.no_grad(), self.model.disable_adapter():
                rollout.ref_logps = completion_logprobs(model, rollout.input_ids, rollout.attention_mask,
                                                        rollout.completion_length, hp.temperature)
        return rollout

    def _grpo_loss(self, batch: dict):
        hp = self.hparams
        if self._rollout is None or self._rollout_uses >= hp.num_iterations:
            self._rollout, self._rollout_uses = self._new_rollout(batch), 0
        rollout = self._rollout
        self._rollout_uses += 1
        logps = completion_logprobs(self.generation_model(), rollout.input_ids, rollout.attention_mask,
                                    rollout.completion_length, hp.temperature)
        if rollout.old_logps is None:  # the first update: pi_old is the policy that sampled
            rollout.old_logps = logps.detach()
        loss, stats = grpo_loss(logps, rollout.old_logps, rollout.advantages, rollout.completion_mask,
                                rollout.ref_logps, hp.beta, hp.epsilon)
        return loss, rollout, stats

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hparams.objective == "sft":
            loss = self._sft_loss(batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
            return loss
        loss, rollout, stats = self._grpo_loss(batch)
        size = rollout.rewards.numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/reward", rollout.rewards.mean(), prog_bar=True, batch_size=size)
        self.log("train/completion_tokens", rollout.completion_mask.sum(1).float().mean(), batch_size=size)
        for name, value in stats.items():
            self.log(f"train/{name}", value, batch_size=size)
        return loss

    def on_train_end(self) -> None:
        self._rollout = None

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> None:
        if "labels" in batch:
            self.log(f"{stage}/loss", self._sft_loss(batch), prog_bar=stage == "val", sync_dist=True,
                     batch_size=batch["input_ids"].shape[0])
        self.evaluate_batch(batch, batch_idx, stage)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def test_report(self, accuracies: dict[str, float], n: int, collected: dict) -> dict:
        return {"results": accuracies, "n_problems": n,
                "title": f"{type(self).__name__} ({describe_adapter(self.model)}), {n} test problems, "
                         f"k={self.eval_num_samples} samples per sampled setting:",
                "payload": {"k": self.eval_num_samples, "trainable_parameters": trainable_parameters(self.model)}}

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        """Completions of prompt batches (base class), or a chat on each conversation of a dialog batch."""
        if "conversations" not in batch:
            return super().predict_step(batch, batch_idx)
        setting = dataclasses.replace(self.primary_setting(), num_samples=1)
        replies = chat(self.generation_model(), self.tokenizer, batch["conversations"],
                       history_turns=self.hparams.chat_history_turns, max_new_tokens=self.eval_max_new_tokens,
                       **setting.generate_kwargs())
        return [{"turns": [{"user": u, "assistant": a} for u, a in zip(c["user_turns"], r)], "setting": setting.name}
                for c, r in zip(batch["conversations"], replies)]

    # -- export ------------------------------------------------------------------------------
    def export(self, output_dir: str, merged: bool = False) -> None:
        """PEFT's adapter layout (`adapter_config.json` + `adapter_model.safetensors`, loadable with
        `PeftModel.from_pretrained(base, output_dir)`), or with `merged` a plain Hugging Face model
        with the update merged into the weights; the tokenizer beside either."""
        if merged:
            save_merged(self.model, output_dir)
        else:
            save_adapter(self.model, output_dir, base_model_name_or_path=resolve(self.model_name_or_path))
        self.tokenizer.save_pretrained(output_dir)

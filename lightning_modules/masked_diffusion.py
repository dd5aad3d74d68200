"""A small masked diffusion LM: training with the LLaDA / MDLM loss, evaluation of its samplers.

The model and the losses live in `testtime.diffusion.model`, the samplers in
`testtime.diffusion.sampling` (LLaDA, random remasking, Fast-dLLM, ReMDM) and
`testtime.diffusion.tta` (TTA uncertainty remasking); this module wires them into Lightning:

- `fit` trains every weight with `diffusion_loss` (LLaDA: Nie et al. 2025, "Large Language
  Diffusion Models"; MDLM: Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language
  Models"): `objective: sft` on `datamodules.diffusion.DiffusionTaskDataModule` (prompt never
  masked, answers padded with labelled EOS to `gen_length`, each row divided by its answer
  length), `objective: pretrain` on LM text (`datamodules.lm_text.LMTextDataModule`: every token
  maskable, divided by batch x length). Logs `train/loss`, `train/masked_fraction`, `val/loss`.
- `validate` / `test` decode the held-out prompts with each sampler of `samplers` (`val/acc_llada`,
  `val/acc_random`, ...) and with TTA at each `tta_ks` (`val/acc_tta_k<k>`), all at the same
  `steps`, on the same problems and seeds, through `testtime.evaluation` (`as_generate_fn`), and
  log each setting's network evaluations per sequence (`val/nfe_<setting>`). A `validate` or
  `test` run also writes `<stage>_results.md/.json`, `<stage>_accuracy_vs_nfe.png` and the
  seed's uncertainty figure of the first TTA batch (`<stage>_tta_uncertainty.png`).
- `predict` decodes with TTA at the first of `tta_ks` (the first sampler when `tta_ks` is empty).
- `export` writes a Hugging Face folder that `AutoModelForMaskedLM.from_pretrained` reloads once
  `testtime.diffusion` is imported; `model_name_or_path` pointing at such a folder continues from it.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable, Literal

import torch
from lightning.pytorch.trainer.states import TrainerFn
from transformers import AutoModelForMaskedLM

from lightning_modules.base import TesttimeModule
from testtime.diffusion.experiments import uncertainty_figure
from testtime.diffusion.model import MODEL_TYPE, PRESETS, build_diffusion_tokenizer, build_model, diffusion_loss
from testtime.diffusion.sampling import SAMPLERS, as_generate_fn, block_schedule
from testtime.diffusion.tta import generate_with_tta_uncertainty
from testtime.errors import CheckpointError, UsageError
from testtime.evaluation import DecodingSetting
from testtime.io import new_figure, standard_error
from testtime.loading import folder_model_type, load_tokenizer, resolve

SamplerName = Literal["llada", "random", "fast_dllm", "remdm"]
TTA = "tta"  # the key of the TTA sampler in `sampler_kwargs`
# set by the module from its own arguments, so never given through `sampler_kwargs`
RESERVED_KWARGS = {"model", "prompt", "steps", "gen_length", "block_length", "attention_mask", "seed", "generator",
                   "return_nfe", "tta_k", "mask_id", "temperature"}


class MaskedDiffusionModule(TesttimeModule):
    """Train a masked diffusion LM and score its samplers (baseline and TTA) on held-out problems.

    Args:
        model_name_or_path: a folder of this project's diffusion LM (an `export`, or any folder with
            `model_type: masked_diffusion_lm`): its weights and tokenizer are loaded. Anything else
            (`tiny-random-llama`, another model's folder) gives only the tokenizer, and a new model
            of `preset` is built over its vocabulary (plus a `<|mask|>` token if it has none).
        preset: the size of a new model: "tiny" (tests, seconds) or "small" (~5M parameters).
        model_overrides: config fields that replace the preset's (e.g. `{num_hidden_layers: 4}`).
        init_seed: seed of a new model's initial weights.
        objective: "sft" (prompt/answer data laid out by `DiffusionTaskDataModule`) or "pretrain"
            (LM text: every token maskable).
        eps: the floor of the masking probability, p = (1 - eps) t + eps.
        learning_rate, weight_decay, warmup_steps: AdamW, linear warm-up then constant.
        gen_length: tokens the samplers generate after the prompt (the datamodule pads answers to it).
        block_length: tokens per semi-autoregressive block (None: one block of gen_length).
        steps: sampler steps per generation, the same for every setting (None: gen_length, one token
            a step).
        temperature: Gumbel-max temperature of the samplers (0: argmax, LLaDA's default); TTA draws
            its K temperatures from `tta_temperature_range` in `sampler_kwargs.tta` instead.
        samplers: the baselines scored in validate/test: "llada" (low-confidence remasking),
            "random", "fast_dllm" (confidence threshold), "remdm" (ReMDM-cap remasking).
        tta_ks: the K values of TTA uncertainty sampling scored beside them (`tta_k<K>`).
        sampler_kwargs: more arguments per sampler, by name ("llada", ..., and "tta" for
            `generate_with_tta_uncertainty`), e.g. `{fast_dllm: {threshold: 0.8}, tta: {remask_top_pct: 0.2}}`.
        eval_seed: seed of the samplers' noise (the same on a batch for every setting).
    """

    def __init__(
        self,
        model_name_or_path: str = "tiny-random-llama",
        preset: str = "small",
        model_overrides: dict[str, Any] = {},  # noqa: B006 (never mutated)
        init_seed: int = 0,
        objective: Literal["sft", "pretrain"] = "sft",
        eps: float = 1e-3,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        gen_length: int = 32,
        block_length: int | None = None,
        steps: int | None = None,
        temperature: float = 0.0,
        samplers: list[SamplerName] = ["llada"],  # noqa: B006
        tta_ks: list[int] = [5],  # noqa: B006
        sampler_kwargs: dict[str, dict[str, Any]] = {},  # noqa: B006
        eval_seed: int = 0,
    ):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        if objective not in ("sft", "pretrain"):
            raise ValueError(f"objective must be 'sft' or 'pretrain', got {objective!r}")
        if not 0.0 < eps < 1.0:
            raise ValueError(f"eps must be in (0, 1), got {eps}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = argmax), got {temperature}")
        if not samplers and not tta_ks:
            raise ValueError("samplers and tta_ks are both empty: nothing to decode with")
        for name in samplers:
            if name not in SAMPLERS:
                raise ValueError(f"samplers: unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
        for k in tta_ks:
            if not isinstance(k, int) or k < 1:
                raise ValueError(f"tta_ks: each K must be a positive integer, got {k!r}")
        block_length = gen_length if block_length is None else block_length
        steps = gen_length if steps is None else steps
        block_schedule(gen_length, block_length, steps)  # ValueError naming the field that does not fit
        _check_sampler_kwargs(sampler_kwargs)
        # generation length = the shared evaluation's max_new_tokens; one decode per problem (each
        # sampler's own noise, if any, is seeded per batch)
        super().__init__(model_name_or_path, eval_max_new_tokens=gen_length, eval_num_samples=1, eval_seed=eval_seed)
        self.save_hyperparameters()
        self.block_length, self.steps = block_length, steps
        self._runs: dict[str, Any] = {}  # setting -> what its sampler returned besides the tokens, last batch
        self._nfe: dict[str, dict[str, tuple[float, int]]] = {}  # stage -> setting -> (NFE sum, sequences)
        self._tta_logs: dict[str, dict] = {}  # stage -> logs of the first TTA batch (uncertainty figure)

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning may call this more than once
            return
        hp = self.hparams
        folder = resolve(hp.model_name_or_path)
        model_type = folder_model_type(folder)
        if model_type == "llada":  # its weights need its own remote code; never replace them by a new model silently
            raise UsageError(f"{folder} is a LLaDA checkpoint (model_type 'llada'): this module loads only folders of "
                             f"model_type '{MODEL_TYPE}'; run testtime.diffusion's samplers on it directly")
        if model_type == MODEL_TYPE:  # this project's diffusion LM: continue from its weights
            self.tokenizer = build_diffusion_tokenizer(load_tokenizer(folder))
            model = AutoModelForMaskedLM.from_pretrained(folder, dtype=torch.float32)
            if model.config.mask_token_id != self.tokenizer.mask_token_id:
                raise CheckpointError(f"{folder}: the model's mask_token_id ({model.config.mask_token_id}) is not "
                                      f"its tokenizer's ({self.tokenizer.mask_token_id})")
        else:  # a new model of the preset over this tokenizer's vocabulary
            model, self.tokenizer = build_model(hp.preset, load_tokenizer(folder), seed=hp.init_seed,
                                                **hp.model_overrides)
        self.model = model.train()  # built / loaded in eval mode; every weight trains here

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The base's strict loading, plus a message (not torch's size-mismatch traceback) when the
        checkpoint was written by a model of another size: the model is rebuilt from `preset` and
        `model_overrides` before the weights are loaded, so they must be the ones of the run."""
        own = super().state_dict()
        wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state_dict.items()
                 if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            raise CheckpointError(f"this checkpoint is of a model of another size ({'; '.join(wrong[:3])}"
                                  f"{', ...' if len(wrong) > 3 else ''}); give the preset and model_overrides of the "
                                  f"run that wrote it (now preset={self.hparams.preset!r}, "
                                  f"model_overrides={dict(self.hparams.model_overrides)})")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def mask_id(self) -> int:
        return self.model.config.mask_token_id

    # -- training ----------------------------------------------------------------------------
    def loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        """`diffusion_loss` of a batch under the module's objective (sft: `labels` required)."""
        if self.hparams.objective == "sft":
            if "labels" not in batch:
                raise UsageError("objective 'sft' needs batches with labels (IGNORE_INDEX on the prompt); this "
                                 "datamodule gives none: use objective 'pretrain' for plain text")
            labels = batch["labels"]
        else:
            labels = None
        return diffusion_loss(self.model, batch["input_ids"], self.mask_id, labels=labels,
                              attention_mask=batch.get("attention_mask"), eps=self.hparams.eps, generator=generator)

    def on_fit_start(self) -> None:
        # The answers must be padded to the length the samplers fill (LLaDA's recipe); a causal-LM
        # SFT layout (right-padded, no EOS padding) would train a model that cannot fill gen_length.
        data = self.trainer.datamodule
        if self.hparams.objective != "sft" or data is None:
            return
        data_length = getattr(data, "gen_length", None)
        if data_length is None:
            raise UsageError(f"objective 'sft' trains on answers padded with EOS to gen_length; "
                             f"{type(data).__name__} does not lay them out so: use "
                             "datamodules.diffusion.DiffusionTaskDataModule (or objective 'pretrain' for LM text)")
        if data_length != self.hparams.gen_length:
            raise UsageError(f"the datamodule pads answers to gen_length={data_length} but the model generates "
                             f"gen_length={self.hparams.gen_length}; set both to the same value")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, info = self.loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/masked_fraction", info["masked_fraction"], batch_size=size)
        return loss

    def _eval_loss(self, batch: dict, batch_idx: int, stage: str) -> None:
        if self.hparams.objective == "sft" and "labels" not in batch:
            return
        # a fixed draw per batch: the same masks at every validation, so val/loss moves only with the weights
        generator = torch.Generator(device=self.device).manual_seed(self.eval_seed + batch_idx)
        loss, _ = self.loss(batch, generator)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=batch["input_ids"].shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_loss(batch, batch_idx, "val")
        self.evaluate_batch(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_loss(batch, batch_idx, "test")
        self.evaluate_batch(batch, batch_idx, "test")

    # -- decoding ----------------------------------------------------------------------------
    def _setting(self, name: str, sampler: Callable, **kwargs) -> DecodingSetting:
        """`sampler` in the evaluation's contract; what it returns besides the tokens (NFE, TTA logs)
        is kept in `self._runs[name]`."""

        @functools.wraps(sampler)  # as_generate_fn reads the sampler's signature through the wrapper
        def recorded(*args, **kw):
            tokens, extra = sampler(*args, **kw)
            self._runs[name] = extra
            return tokens, extra

        common = dict(steps=self.steps, block_length=self.block_length, gen_length=self.hparams.gen_length)
        return DecodingSetting(name, do_sample=False, generate_fn=as_generate_fn(recorded, **common, **kwargs))

    def sampler_setting(self, name: str) -> DecodingSetting:
        """A baseline sampler of `testtime.diffusion.sampling.SAMPLERS`, named as there."""
        hp = self.hparams
        return self._setting(name, SAMPLERS[name], temperature=hp.temperature, return_nfe=True,
                             **hp.sampler_kwargs.get(name, {}))

    def tta_setting(self, k: int) -> DecodingSetting:
        """TTA uncertainty sampling with K = k passes a step, `tta_k<k>`."""
        return self._setting(f"tta_k{k}", generate_with_tta_uncertainty, tta_k=k,
                             **self.hparams.sampler_kwargs.get(TTA, {}))

    def decoding_settings(self) -> list[DecodingSetting]:
        """Each sampler of `samplers`, then TTA at each K of `tta_ks`; no greedy or default
        sampling: a masked diffusion LM has no left-to-right `generate`."""
        return [self.sampler_setting(name) for name in self.hparams.samplers] + \
            [self.tta_setting(k) for k in self.hparams.tta_ks]

    def primary_setting(self) -> DecodingSetting:
        """TTA at the first of `tta_ks` (the method this model is for), else the first sampler."""
        hp = self.hparams
        return self.tta_setting(hp.tta_ks[0]) if hp.tta_ks else self.sampler_setting(hp.samplers[0])

    def evaluate_batch(self, batch: dict, batch_idx: int, stage: str) -> None:
        """The shared evaluation, plus the NFE per sequence of each setting (summed per stage)."""
        if "prompt_ids" not in batch:
            return
        self._runs = {}
        super().evaluate_batch(batch, batch_idx, stage)
        size = len(batch["answers"])
        sums = self._nfe.setdefault(stage, {})
        for name, extra in self._runs.items():
            nfe = extra["nfe"] if isinstance(extra, dict) else extra
            total, count = sums.get(name, (0.0, 0))
            sums[name] = (total + float(nfe) * size, count + size)
            if isinstance(extra, dict) and stage not in self._tta_logs:
                self._tta_logs[stage] = extra

    def log_nfe(self, stage: str) -> dict[str, float]:
        """`<stage>/nfe_<setting>`: mean NFE per sequence over every rank's problems (a collective)."""
        sums = self._nfe.pop(stage, {})
        names = [s.name for s in self.decoding_settings()]
        totals = torch.tensor([sums.get(n, (0.0, 0))[0] for n in names], dtype=torch.float64, device=self.device)
        counts = torch.tensor([sums.get(n, (0.0, 0))[1] for n in names], dtype=torch.float64, device=self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        means = {n: float(t / c) for n, t, c in zip(names, totals, counts) if c > 0}
        for name, value in means.items():
            self.log(f"{stage}/nfe_{name}", value)
        return means

    # -- results -----------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        accuracies = {k.removeprefix("val/acc_"): v for k, v in self.log_accuracies("val").items()}
        nfe = self.log_nfe("val")
        self._val_problems = self.problems_scored("val")
        tta = self._tta_logs.pop("val", None)
        if self.trainer.state.fn == TrainerFn.VALIDATING and accuracies:  # after fit, the base writes the table
            self.write_results("val", **self._stage_report("val", accuracies, nfe, self._val_problems, tta))

    def collect_test(self) -> dict:
        return {"nfe": self.log_nfe("test"), "tta": self._tta_logs.pop("test", None)}  # a reduce: every rank

    def test_report(self, accuracies: dict[str, float], n: int, collected: dict) -> dict:
        return self._stage_report("test", accuracies, collected["nfe"], n, collected["tta"])

    def _stage_report(self, stage: str, accuracies: dict[str, float], nfe: dict[str, float], n: int, tta) -> dict:
        """Accuracy ± s.e. and NFE per setting: the table, `<stage>_results.md/.json` and two figures
        (the `write_results` arguments)."""
        rows = [(s.name, accuracies[s.name], nfe.get(s.name, float("nan")))
                for s in self.decoding_settings() if s.name in accuracies]
        lines = [f"| decoding | NFE / sequence | accuracy (n={n}) | ± s.e. |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {cost:.1f} | {acc:.3f} | {standard_error(acc, n):.3f} |" for name, acc, cost in rows]
        fig, (ax,) = new_figure()
        for name, acc, cost in rows:
            ax.errorbar([cost], [acc], yerr=[standard_error(acc, n)], fmt="o", capsize=3, label=name)
        ax.set_xlabel("network evaluations per sequence (NFE)")
        ax.set_ylabel(f"accuracy (n={n})")
        ax.set_title(f"Masked diffusion LM samplers, steps={self.steps}, gen_length={self.hparams.gen_length}")
        ax.legend(fontsize=8)
        figures = {f"{stage}_accuracy_vs_nfe.png": fig}
        if tta is not None:
            figures[f"{stage}_tta_uncertainty.png"] = uncertainty_figure(tta)
        return {"results": {name: acc for name, acc, _ in rows}, "table": "\n".join(lines),
                "title": f"{type(self).__name__}: {stage} accuracy, {n} problems:",
                "payload": {"n_problems": n, "nfe": {name: cost for name, _, cost in rows}, "steps": self.steps,
                            "gen_length": self.hparams.gen_length, "block_length": self.block_length},
                "figures": figures}

    # -- export ------------------------------------------------------------------------------
    def export(self, output_dir: str, merged: bool = False) -> None:
        """A Hugging Face folder (config.json with model_type masked_diffusion_lm, model.safetensors,
        the tokenizer with its MASK token) that `AutoModelForMaskedLM.from_pretrained` reloads once
        `testtime.diffusion` is imported. Every weight trains here, so `merged` changes nothing."""
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir)
        self.tokenizer.save_pretrained(output_dir)


def _check_sampler_kwargs(sampler_kwargs: dict[str, dict[str, Any]]) -> None:
    """Each key names a sampler (or "tta") and each argument is one it takes and the module does not set."""
    samplers = {**SAMPLERS, TTA: generate_with_tta_uncertainty}
    for name, kwargs in sampler_kwargs.items():
        if name not in samplers:
            raise ValueError(f"sampler_kwargs: unknown sampler {name!r}; choose from {', '.join(samplers)}")
        accepted = set(inspect.signature(samplers[name]).parameters) - RESERVED_KWARGS
        for key in kwargs:
            if key not in accepted:
                raise ValueError(f"sampler_kwargs.{name}: {key!r} is not an argument it takes here; choose from "
                                 f"{', '.join(sorted(accepted))}")

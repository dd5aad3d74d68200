"""Goldilocks token selection for temperature-head training, as a Lightning callback.

`GoldilocksFilter` installs itself as `pl_module.token_filter`. A module that supports token
filtering (AutoDeco's) calls, inside `training_step`,

    mask = self.token_filter(logits, labels)   # logits [B, L-1, V], labels [B, L-1] (shifted, -100 = ignored)

and restricts its losses to `mask` (bool [B, L-1]). The selection itself is
`testtime.autodeco.goldilocks_mask`: keep tokens whose required temperature
T_req = relu(max z - z_y) / -ln(min_p_ratio) the head can reach (T_req <= temp_cap), optionally
drop hopeless tokens (label rank >= topk), keep only a fraction of the easy ones (label = argmax)
and rebalance T_req to a uniform histogram over [0, cap].

The seed's command-line flags map onto the init arguments like this:

| seed flag                            | here                                                      |
| ------------------------------------ | --------------------------------------------------------- |
| `--goldilocks_filter true`           | add this callback (cap + uniform rebalancing, the defaults) |
| `--goldilocks_filter false`          | no callback (the module's `token_filter` stays None)      |
| `--goldilocks_easy_frac X`           | `easy_frac: X`                                            |
| `--goldilocks_topk K`                | `topk: K`                                                 |
| `--temp_cap C` (model option)        | `temp_cap: C` (None: the module's `hparams.temp_cap`; -1: no cap) |
| `--min_p_ratio R` (model option)     | `min_p_ratio: R` (None: the module's `hparams.min_p_ratio`) |

In a LightningCLI config:

    trainer:
      callbacks:
        - class_path: GoldilocksFilter
          init_args: {easy_frac: 0.1, topk: 20}

In training, every call logs `goldilocks/kept` (tokens selected), `goldilocks/valid` (tokens
with a label) and `goldilocks/kept_frac` through `pl_module.log` (per step, this rank's batch).
When the module filters its validation/test loss too, the counts are summed over the epoch and
all ranks instead: `goldilocks/val_kept`, `goldilocks/val_valid` (`test_` in test). The last
counts are also kept on the callback (`last_kept`, `last_valid`).

Randomness (easy-token and rebalancing subsampling) comes from a `torch.Generator` on the logits'
device seeded with `seed + global_rank`, so ranks draw different subsets and a run is
reproducible. The generator's state is not checkpointed: a resumed run restarts the stream.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from testtime.autodeco import goldilocks_mask
from testtime.lm import IGNORE_INDEX

# What goldilocks_mask / min_p_hinge_loss use when neither the callback nor the module says.
_DEFAULT_TEMP_CAP = 2.0
_DEFAULT_MIN_P_RATIO = 0.1


class GoldilocksFilter(L.Callback):
    """Train the temperature head only on "just right" tokens (`goldilocks_mask`).

    Args:
        temp_cap: keep tokens with T_req <= temp_cap. None: the module's `hparams.temp_cap`
            (2.0 if it has none); -1 (any value <= 0) disables the cap.
        min_p_ratio: the min-p ratio r defining T_req. None: the module's `hparams.min_p_ratio`
            (0.1 if it has none). Use the module's, so the filter and the loss agree on T_req.
        rebalance: downsample T_req to a uniform histogram (`num_bins` bins over [0, cap], or
            over [0, max T_req] without a cap).
        num_bins: bins of the rebalancing.
        easy_frac: keep this fraction of the easy tokens (label = base argmax, T_req = 0),
            chosen at random; None keeps them all.
        topk: keep only tokens whose label ranks < topk under the base distribution; None: no limit.
        seed: the generator is seeded with `seed + global_rank`.
    """

    def __init__(self, temp_cap: float | None = None, min_p_ratio: float | None = None, rebalance: bool = True,
                 num_bins: int = 20, easy_frac: float | None = None, topk: int | None = None, seed: int = 0):
        super().__init__()
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if easy_frac is not None and not 0.0 <= easy_frac <= 1.0:
            raise ValueError(f"easy_frac must be in [0, 1], got {easy_frac}")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if min_p_ratio is not None and not 0.0 < min_p_ratio < 1.0:
            raise ValueError(f"min_p_ratio must be in (0, 1), got {min_p_ratio}")
        self.temp_cap = temp_cap
        self.min_p_ratio = min_p_ratio
        self.rebalance = rebalance
        self.num_bins = num_bins
        self.easy_frac = easy_frac
        self.topk = topk
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.last_kept: int | None = None
        self.last_valid: int | None = None
        self._module: L.LightningModule | None = None
        self._rank = 0

    # -- wiring ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "token_filter"):
            raise TypeError(f"GoldilocksFilter needs a module with a `token_filter` attribute (AutoDeco's); "
                            f"{type(pl_module).__name__} has none, so the filter would do nothing")
        current = pl_module.token_filter
        if current is not None and current is not self:
            raise ValueError(f"{type(pl_module).__name__}.token_filter is already set ({current!r}); "
                             "use a single token filter callback")
        self._module = pl_module
        self._rank = trainer.global_rank
        pl_module.token_filter = self

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(pl_module, "token_filter", None) is self:
            pl_module.token_filter = None
        self._module = None

    # -- settings ----------------------------------------------------------------------------
    def _hparam(self, name: str, default):
        hparams = getattr(self._module, "hparams", None) or {}
        return hparams[name] if name in hparams else default

    def resolved_temp_cap(self) -> float | None:
        """The cap in force: this callback's, else the module's `hparams.temp_cap`, else 2.0 (None = no cap)."""
        cap = self.temp_cap if self.temp_cap is not None else self._hparam("temp_cap", _DEFAULT_TEMP_CAP)
        return None if cap is None or cap <= 0 else float(cap)

    def resolved_min_p_ratio(self) -> float:
        """The min-p ratio in force: this callback's, else the module's `hparams.min_p_ratio`, else 0.1."""
        ratio = self.min_p_ratio if self.min_p_ratio is not None else self._hparam("min_p_ratio", None)
        return float(_DEFAULT_MIN_P_RATIO if ratio is None else ratio)

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.seed + self._rank)
        return self.generator

    # -- the filter --------------------------------------------------------------------------
    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """bool mask [B, L-1] of the tokens to train on (logits [B, L-1, V], labels [B, L-1], aligned)."""
        if logits.shape[:-1] != labels.shape:
            raise ValueError(f"token filter: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                             "are not aligned (expected [B, L, V] and [B, L], shifted for next-token prediction)")
        with torch.no_grad():
            mask = goldilocks_mask(
                logits.detach(), labels, min_p_ratio=self.resolved_min_p_ratio(), temp_cap=self.resolved_temp_cap(),
                rebalance=self.rebalance, num_bins=self.num_bins, easy_frac=self.easy_frac, topk=self.topk,
                generator=self._generator(logits.device),
            )
            kept = int(mask.sum())
            valid = int((labels != IGNORE_INDEX).sum())
        self.last_kept, self.last_valid = kept, valid
        self._log(kept, valid, batch_size=labels.shape[0])
        return mask

    def _log(self, kept: int, valid: int, batch_size: int) -> None:
        module = self._module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is None or trainer.sanity_checking:
            return  # used by hand (a notebook), or Lightning's sanity check: nothing to log
        try:
            if trainer.training:  # per step, this rank's batch
                values = {"goldilocks/kept": float(kept), "goldilocks/valid": float(valid),
                          "goldilocks/kept_frac": kept / valid if valid else 0.0}
                for name, value in values.items():
                    module.log(name, value, on_step=True, on_epoch=False, batch_size=batch_size)
            elif trainer.validating or trainer.testing:  # a module that filters its eval loss too
                stage = "val" if trainer.validating else "test"
                for name, value in ((f"goldilocks/{stage}_kept", kept), (f"goldilocks/{stage}_valid", valid)):
                    module.log(name, float(value), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True,
                               batch_size=batch_size)
        except MisconfigurationException:
            pass  # called from a hook that may not log (e.g. predict): the counts stay on the callback

    def __repr__(self) -> str:
        return (f"GoldilocksFilter(temp_cap={self.temp_cap}, min_p_ratio={self.min_p_ratio}, "
                f"rebalance={self.rebalance}, num_bins={self.num_bins}, easy_frac={self.easy_frac}, "
                f"topk={self.topk}, seed={self.seed})")

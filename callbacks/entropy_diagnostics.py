"""Per-token diagnostics of any method: JSON lines, sampled points and the method's own figures.

`EntropyDiagnostics` talks to a LightningModule through a small interface, so that a new method
gets diagnostics without editing this callback:

- `pl_module.collect_diagnostics` (a bool attribute): set True for fit / validate / test and
  restored afterwards; a module computes its diagnostics only then.
- `training_step` returns `{"loss": loss, "diagnostics": {name: tensor}}`: every value is a
  1-D tensor over the tokens that entered the loss (floats, ints or bools: a bool's mean is a
  fraction) or a scalar. Each gets statistics; the per-token ones (as long as the longest) go
  into a uniform sample of points.
- `validation_step` / `test_step` return `{"traces": [dict, ...]}`: one JSON-able record per
  decoded sample (TNOT: its per-token entropies, thresholds, stops and retries).
- optional `pl_module.diagnostics_summary(stage, traces) -> dict`: written as
  `<stage>_trace_summary.json`.
- optional `pl_module.diagnostics_figures(stage, **data) -> {file name: matplotlib Figure}`: the
  method draws its own figures (build them with `testtime.io.new_figure`); at the end of fit
  `data` is `points` (name -> array of sampled per-token values) and `records` (the JSON lines);
  at the end of a validation / test epoch it is `traces`.

Written on global rank 0 only, into `output_dir` (default `<trainer.log_dir>/diagnostics`):

- `diagnostics.jsonl`: one line every `every_n_steps` training batches:
  `{"step", "batch", "tokens", "stats": {name: {n, mean, std, min, max, q05, q50, q95}}}`;
  `step` is `trainer.global_step` after the batch, `batch` counts the training batches of this
  fit that returned diagnostics. Started afresh by each fit, appended to when it resumes.
- `points.npz`: a uniform random sample (reservoir, `max_points`, seeded) of the per-token values
  of the logged batches, one array per name (NaN where a batch lacked that name).
- `<stage>_traces.jsonl` and `<stage>_trace_summary.json` (validate / test), and the figures.

Under DDP the numbers are rank 0's share of each batch (a 1/world_size sample).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from testtime.io import atomic_write_text, save_figure

QUANTILES = (0.05, 0.5, 0.95)


def tensor_stats(values: np.ndarray) -> dict:
    """n, mean, std (population), min, max and the 5/50/95 % quantiles of a 1-D array; None when empty."""
    values = values[np.isfinite(values)]
    out: dict = {"n": int(values.size)}
    if values.size == 0:
        out.update(dict.fromkeys(("mean", "std", "min", "max", "q05", "q50", "q95")))
        return out
    q = np.quantile(values, QUANTILES)
    out.update(mean=float(values.mean()), std=float(values.std()), min=float(values.min()), max=float(values.max()),
               q05=float(q[0]), q50=float(q[1]), q95=float(q[2]))
    return out


class _Reservoir:
    """A uniform sample of at most `capacity` rows from a stream of batches (Algorithm R, vectorised).

    Rows are dicts name -> 1-D array (all of one batch's arrays have the same length); a name
    missing from a batch is NaN in its rows.
    """

    def __init__(self, capacity: int, seed: int):
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self.size = 0
        self.columns: dict[str, np.ndarray] = {}

    def _column(self, name: str) -> np.ndarray:
        if name not in self.columns:
            self.columns[name] = np.full(self.capacity, np.nan, dtype=np.float32)
        return self.columns[name]

    def add(self, batch: dict[str, np.ndarray]) -> None:
        n = len(next(iter(batch.values())))
        if n == 0 or self.capacity == 0:
            self.seen += n
            return
        index = self.seen + np.arange(n)  # stream position of each new row
        slot = np.where(index < self.capacity, index, self.rng.integers(0, index + 1))
        take = slot < self.capacity
        # Later rows win a slot drawn twice in one batch, as in the sequential algorithm.
        rev_slot = slot[take][::-1]
        rows = np.flatnonzero(take)[::-1]
        slot_u, first = np.unique(rev_slot, return_index=True)
        rows = rows[first]
        for name in set(self.columns) | set(batch):
            column = self._column(name)
            column[slot_u] = batch[name][rows] if name in batch else np.nan
        self.seen += n
        self.size = min(self.capacity, self.seen)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: column[: self.size].copy() for name, column in self.columns.items()}


class EntropyDiagnostics(L.Callback):
    """Statistics, sampled points, traces and the method's figures (see the module docstring).

    Args:
        output_dir: where to write; None: `<trainer.log_dir or default_root_dir>/diagnostics`.
        every_n_steps: write a line (and sample points) every n training batches.
        max_points: per-token points kept (uniform reservoir sample) for the figures and `points.npz`.
        plots: ask the module for its figures and write them as PNG.
        seed: seed of the reservoir sampling.
    """

    def __init__(self, output_dir: str | None = None, every_n_steps: int = 1, max_points: int = 20000,
                 plots: bool = True, seed: int = 0):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if max_points < 0:
            raise ValueError(f"max_points must be >= 0, got {max_points}")
        self.output_dir = output_dir
        self.every_n_steps = every_n_steps
        self.max_points = max_points
        self.plots = plots
        self.seed = seed
        self.plot_paths: list[str] = []
        self.jsonl_path: str | None = None
        self.points_path: str | None = None
        self.records: list[dict] = []  # the lines written during this fit (rank 0)
        self.trace_paths: list[str] = []
        self._dir: Path | None = None
        self._previous_flag = None
        self._batches = 0
        self._append = False
        self._reservoir = _Reservoir(max_points, seed)
        self._traces: list[dict] = []  # generation traces of the current validation/test epoch

    # -- wiring ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not hasattr(pl_module, "collect_diagnostics"):
            raise TypeError(f"EntropyDiagnostics needs a module with a `collect_diagnostics` attribute; "
                            f"{type(pl_module).__name__} has none, so no diagnostics would be produced")
        if stage not in ("fit", "validate", "test"):
            return
        self._previous_flag = pl_module.collect_diagnostics
        pl_module.collect_diagnostics = True
        # trainer.log_dir broadcasts: every rank must call it, so it is resolved here, not on rank 0 only.
        root = self.output_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "diagnostics")
        self._dir = Path(root)
        self._traces = []
        if stage != "fit":  # the per-token training statistics come from training_step only
            return
        self._batches = 0
        self._append = trainer.ckpt_path is not None
        self._reservoir = _Reservoir(self.max_points, self.seed)
        self.records, self.plot_paths = [], []
        self.jsonl_path = str(self._dir / "diagnostics.jsonl")
        self.points_path = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage in ("fit", "validate", "test") and self._previous_flag is not None:
            pl_module.collect_diagnostics = self._previous_flag
            self._previous_flag = None

    # -- training statistics -----------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("diagnostics"), dict):
            return
        index = self._batches
        self._batches += 1
        if not trainer.is_global_zero or index % self.every_n_steps != 0:
            return
        values = {name: t.detach().reshape(-1).float().cpu().numpy() for name, t in outputs["diagnostics"].items()
                  if isinstance(t, torch.Tensor) and not t.is_complex()}
        if not values:
            return
        record = {"step": int(trainer.global_step), "batch": int(index), "tokens": max(len(v) for v in values.values()),
                  "stats": {name: tensor_stats(v) for name, v in values.items()}}
        self.records.append(record)
        self._dir.mkdir(parents=True, exist_ok=True)
        with open(self.jsonl_path, "a" if self._append else "w") as f:
            f.write(json.dumps(record) + "\n")
        self._append = True  # later lines of this fit append
        n = record["tokens"]  # points are rows of one token each: the per-token tensors only
        self._reservoir.add({name: v for name, v in values.items() if len(v) == n})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self._dir is None:
            return
        if not self.records:
            rank_zero_warn("EntropyDiagnostics received no diagnostics: the module's training_step did not return "
                           "{'loss': ..., 'diagnostics': {...}} although collect_diagnostics was set")
            return
        points = self._reservoir.arrays()
        if points:
            self.points_path = str(self._dir / "points.npz")
            np.savez(self.points_path, **points)
        self.plot_paths = self._figures(pl_module, "fit", points=points, records=self.records)
        written = [self.jsonl_path] + ([self.points_path] if self.points_path else []) + self.plot_paths
        rank_zero_info("EntropyDiagnostics wrote " + ", ".join(written))

    # -- generation traces (validate / test) -------------------------------------------------
    def _collect_traces(self, trainer, outputs) -> None:
        if trainer.is_global_zero and isinstance(outputs, dict) and isinstance(outputs.get("traces"), list):
            self._traces.extend(outputs["traces"])

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._collect_traces(trainer, outputs)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect_traces(trainer, outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write_traces(pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write_traces(pl_module, "test")

    def _write_traces(self, pl_module, stage: str) -> None:
        traces, self._traces = self._traces, []
        if not traces or self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        paths = [str(atomic_write_text(self._dir / f"{stage}_traces.jsonl",
                                       "".join(json.dumps(t) + "\n" for t in traces)))]
        summarize = getattr(pl_module, "diagnostics_summary", None)
        if callable(summarize):
            paths.append(str(atomic_write_text(self._dir / f"{stage}_trace_summary.json",
                                               json.dumps(summarize(stage, traces), indent=2) + "\n")))
        paths += self._figures(pl_module, stage, traces=traces)
        self.trace_paths = paths
        rank_zero_info("EntropyDiagnostics wrote " + ", ".join(paths))

    # -- the method's figures ----------------------------------------------------------------
    def _figures(self, pl_module, stage: str, **data) -> list[str]:
        draw = getattr(pl_module, "diagnostics_figures", None)
        if not self.plots or not callable(draw):
            return []
        paths = []
        for name, fig in (draw(stage, **data) or {}).items():
            if fig is not None:
                paths.append(str(save_figure(fig, self._dir / name)))
        return paths

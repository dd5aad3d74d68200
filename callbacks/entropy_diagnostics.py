"""Per-token diagnostics: JSON lines and plots of training statistics (fit) and generation traces (validate/test).

`EntropyDiagnostics` sets `pl_module.collect_diagnostics = True`. A module that supports it
returns from `training_step`

    {"loss": loss, "diagnostics": {"temperature": T, "required_temperature": T_req, "entropy": H, ...}}

where every value is a 1-D float tensor over the tokens that entered the loss (AutoDeco: the
predicted temperature and top-p, the required temperature T_req of the min-p condition, and the
entropy in nats of the untempered base distribution). Any other method may feed any tensors
under its own names: every key gets statistics (ints and bools too; a bool's mean is a
fraction), per-token ones (as long as "temperature", or the longest) also go into the sampled
points, and a plot is drawn only when the keys it needs are there.

Written on global rank 0 only, into `output_dir` (default `<trainer.log_dir>/diagnostics`):

- `diagnostics.jsonl`: one line every `every_n_steps` training batches:
  `{"step", "batch", "tokens", "min_p_ratio", "stats": {name: {n, mean, std, min, max, q05, q50,
  q95}}, "min_p_ok_frac", "entropy_mean"}`. `min_p_ok_frac` is the fraction of tokens with
  temperature >= required_temperature, i.e. whose label survives min-p at the predicted T (only
  when both are given). `step` is `trainer.global_step` after the batch (optimizer steps
  taken), `batch` counts the training batches of this fit that returned diagnostics.
- `points.npz`: a uniform random sample (reservoir, `max_points`, seeded) of the per-token
  values of the logged batches, one array per name (NaN where a batch lacked that name).
- `temperature_vs_required.png`: predicted vs required temperature, with y = x (above it min-p
  keeps the label) and the head's range [0, 2].
- `by_entropy.png`: each other per-token value (mean +/- std) in bins of token entropy.
- `over_steps.png`: the per-line means and `min_p_ok_frac` over training.

Generation traces (`validate` / `test`): a module whose `validation_step` / `test_step` returns
`{"traces": [...]}` (TNOT: one trace per decoded sample: `setting`, `problem`, `draw`, per-token
`entropy`, `entropy_original`, `threshold` (None where nothing is watched), `stop_positions`,
`stop_entropies`, `retries`) gets, at the end of each such epoch:

- `<stage>_traces.jsonl`: the traces, one a line (`stage` is `val` or `test`);
- `<stage>_trace_summary.json`: per setting: samples, tokens, entropy statistics, the fraction of
  samples stopped at least once, mean and max retries, statistics of the stop positions;
- `<stage>_entropy_over_positions.png`: one panel per setting (up to 6): entropy over the generated
  positions for a few samples (the most stopped first) with their thresholds dashed and their
  forced stops marked, and the mean entropy of all samples.

Under DDP the numbers are rank 0's share of each batch (a 1/world_size sample); other ranks
write nothing. The JSON file is started afresh by each `fit`, and appended to when the fit
resumes from a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

QUANTILES = (0.05, 0.5, 0.95)
HEAD_T_RANGE = (0.0, 2.0)  # the temperature head's output range (sigmoid * 2)


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


def trace_summary(traces: list[dict]) -> dict:
    """Per setting: samples, tokens, entropy statistics, the fraction of samples stopped, retries, stop positions."""
    out = {}
    for setting in dict.fromkeys(t["setting"] for t in traces):
        mine = [t for t in traces if t["setting"] == setting]
        entropy = np.array([e for t in mine for e in t["entropy"]], dtype=float)
        original = np.array([e for t in mine for e in t.get("entropy_original", t["entropy"])], dtype=float)
        stops = [p for t in mine for p in t["stop_positions"]]
        out[setting] = {"samples": len(mine), "tokens": int(entropy.size),
                        "entropy": tensor_stats(entropy), "entropy_original_mean": tensor_stats(original)["mean"],
                        "stopped_frac": float(np.mean([bool(t["stop_positions"]) for t in mine])),
                        "retries_mean": float(np.mean([t["retries"] for t in mine])),
                        "retries_max": int(max(t["retries"] for t in mine)),
                        "stop_position": tensor_stats(np.array(stops, dtype=float))}
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
        names = set(self.columns) | set(batch)
        for name in names:
            column = self._column(name)
            column[slot_u] = batch[name][rows] if name in batch else np.nan
        self.seen += n
        self.size = min(self.capacity, self.seen)

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: column[: self.size].copy() for name, column in self.columns.items()}


class EntropyDiagnostics(L.Callback):
    """Per-token statistics of what the model predicts and needs, as JSON lines and plots.

    Args:
        output_dir: where to write; None: `<trainer.log_dir or default_root_dir>/diagnostics`.
        every_n_steps: write a line (and sample points) every n training batches.
        max_points: per-token points kept (uniform reservoir sample) for the plots and `points.npz`.
        plots: draw the PNG plots at the end of `fit`.
        min_p_ratio: evaluate the min-p condition at this ratio instead of the module's
            (`hparams.min_p_ratio`): the module's required temperatures are rescaled exactly,
            T_req(r) = T_req(r_module) * ln(r_module) / ln(r). None: the module's ratio.
        seed: seed of the reservoir sampling.
    """

    def __init__(self, output_dir: str | None = None, every_n_steps: int = 1, max_points: int = 20000,
                 plots: bool = True, min_p_ratio: float | None = None, seed: int = 0):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if max_points < 0:
            raise ValueError(f"max_points must be >= 0, got {max_points}")
        if min_p_ratio is not None and not 0.0 < min_p_ratio < 1.0:
            raise ValueError(f"min_p_ratio must be in (0, 1), got {min_p_ratio}")
        self.output_dir = output_dir
        self.every_n_steps = every_n_steps
        self.max_points = max_points
        self.plots = plots
        self.min_p_ratio = min_p_ratio
        self.seed = seed
        self.plot_paths: list[str] = []
        self.jsonl_path: str | None = None
        self.points_path: str | None = None
        self.records: list[dict] = []  # the lines written during this fit (rank 0)
        self._dir: Path | None = None
        self._module_ratio: float | None = None
        self._scale = 1.0
        self._previous_flag = None
        self._batches = 0
        self._append = False
        self._reservoir = _Reservoir(max_points, seed)
        self._traces: list[dict] = []  # generation traces of the current validation/test epoch
        self.trace_paths: list[str] = []

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
        root = self.output_dir
        if root is None:
            root = os.path.join(trainer.log_dir or trainer.default_root_dir, "diagnostics")
        self._dir = Path(root)
        self._traces = []
        if stage != "fit":  # the per-token training statistics come from training_step only
            return
        hparams = getattr(pl_module, "hparams", None) or {}
        module_ratio = hparams.get("min_p_ratio") if "min_p_ratio" in hparams else None
        self._module_ratio = float(module_ratio) if module_ratio is not None else None
        self._scale = 1.0
        if self.min_p_ratio is not None and self._module_ratio is not None:
            self._scale = math.log(self._module_ratio) / math.log(self.min_p_ratio)
        elif self.min_p_ratio is not None:
            rank_zero_warn(f"EntropyDiagnostics(min_p_ratio={self.min_p_ratio}): the module has no "
                           "hparams.min_p_ratio, so its required temperatures are used as they are")
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

    @property
    def effective_min_p_ratio(self) -> float | None:
        return self.min_p_ratio if self.min_p_ratio is not None else self._module_ratio

    # -- per batch ---------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not isinstance(outputs, dict) or not isinstance(outputs.get("diagnostics"), dict):
            return
        index = self._batches
        self._batches += 1
        if not trainer.is_global_zero or index % self.every_n_steps != 0:
            return
        values = self._to_numpy(outputs["diagnostics"])
        if not values:
            return
        record = self._record(values, step=trainer.global_step, batch=index)
        self.records.append(record)
        self._write_line(record)
        # Points are rows of one token each: the tensors as long as the temperature (or the longest)
        n = len(values["temperature"]) if "temperature" in values else max(len(v) for v in values.values())
        self._reservoir.add({name: v for name, v in values.items() if len(v) == n})

    def _to_numpy(self, diagnostics: dict) -> dict[str, np.ndarray]:
        values = {}
        for name, tensor in diagnostics.items():
            if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
                continue  # ints and bools count too (a bool's mean is a fraction)
            values[name] = tensor.detach().reshape(-1).float().cpu().numpy()
        if "required_temperature" in values and self._scale != 1.0:
            values["required_temperature"] = values["required_temperature"] * self._scale
        return values

    def _record(self, values: dict[str, np.ndarray], step: int, batch: int) -> dict:
        record: dict = {"step": int(step), "batch": int(batch), "tokens": max(len(v) for v in values.values()),
                        "min_p_ratio": self.effective_min_p_ratio,
                        "stats": {name: tensor_stats(v) for name, v in values.items()}}
        t, t_req = values.get("temperature"), values.get("required_temperature")
        if t is not None and t_req is not None and len(t) == len(t_req):
            record["min_p_ok_frac"] = float((t >= t_req).mean()) if len(t) else None
        if "entropy" in values:
            record["entropy_mean"] = record["stats"]["entropy"]["mean"]
        return record

    def _write_line(self, record: dict) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        mode = "a" if self._append else "w"
        self._append = True  # later lines of this fit append
        with open(self.jsonl_path, mode) as f:
            f.write(json.dumps(record) + "\n")

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
            self._write_traces("val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._write_traces("test")

    def _write_traces(self, stage: str) -> None:
        traces, self._traces = self._traces, []
        if not traces or self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        paths = [self._dir / f"{stage}_traces.jsonl", self._dir / f"{stage}_trace_summary.json"]
        with open(paths[0], "w") as f:
            for trace in traces:
                f.write(json.dumps(trace) + "\n")
        with open(paths[1], "w") as f:
            json.dump(trace_summary(traces), f, indent=2)
        if self.plots:
            fig = self._plot_traces(traces)
            if fig is not None:
                paths.append(self._dir / f"{stage}_entropy_over_positions.png")
                fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        self.trace_paths = [str(p) for p in paths]
        rank_zero_info("EntropyDiagnostics wrote " + ", ".join(self.trace_paths))

    def _plot_traces(self, traces: list[dict], max_lines: int = 6, max_panels: int = 6):
        names = list(dict.fromkeys(t["setting"] for t in traces if t["entropy"]))
        if not names:
            return None
        # round-robin over name prefixes ("plain", "slot", "srgen"): every family gets a panel first
        families = list(dict.fromkeys(n.split("_")[0] for n in names))
        rank = {n: [m for m in names if m.split("_")[0] == n.split("_")[0]].index(n) for n in names}
        settings = sorted(names, key=lambda n: (rank[n], families.index(n.split("_")[0])))[:max_panels]
        fig, axes = self._figure(min(3, len(settings)), len(settings))
        colors = [f"C{i}" for i in range(10)]
        for ax, setting in zip(axes, settings):
            mine = [t for t in traces if t["setting"] == setting and t["entropy"]]
            longest = max(len(t["entropy"]) for t in mine)
            padded = np.full((len(mine), longest), np.nan)
            for i, t in enumerate(mine):
                padded[i, :len(t["entropy"])] = t["entropy"]
            # samples that were stopped first, so the plot shows the thresholds at work
            shown = sorted(mine, key=lambda t: -len(t["stop_positions"]))[:max_lines]
            for color, t in zip(colors, shown):
                x = np.arange(len(t["entropy"]))
                ax.plot(x, t["entropy"], color=color, lw=0.8, alpha=0.8)
                thr = np.array([np.nan if v is None else v for v in t["threshold"]], dtype=float)
                if np.isfinite(thr).any():
                    ax.plot(x, thr, color=color, lw=0.8, ls="--")
                # at the entropy that triggered the stop (the kept token there is the retry's)
                at = t.get("stop_entropies") or [t["entropy"][p] if p < len(t["entropy"]) else np.nan
                                                 for p in t["stop_positions"]]
                for pos, e in zip(t["stop_positions"], at):
                    ax.plot(pos, e, "x", color="red", ms=7)
            ax.plot(np.arange(longest), np.nanmean(padded, axis=0), color="black", lw=2, label="mean entropy")
            ax.plot([], [], color="gray", ls="--", label="threshold (per sample)")
            ax.plot([], [], "x", color="red", label="forced stop")
            stopped = sum(1 for t in mine if t["stop_positions"])
            ax.set_title(f"{setting}: {len(mine)} samples, {stopped} stopped", fontsize=9)
            ax.set_xlabel("generated token position")
            ax.set_ylabel("entropy (nats)")
            ax.legend(fontsize=7)
        return fig

    # -- end of fit --------------------------------------------------------------------------
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
        if self.plots:
            self.plot_paths = self._plot(points)
        written = [self.jsonl_path] + ([self.points_path] if self.points_path else []) + self.plot_paths
        rank_zero_info("EntropyDiagnostics wrote " + ", ".join(written))

    def _plot(self, points: dict[str, np.ndarray]) -> list[str]:
        paths = []
        for name, draw in (("temperature_vs_required.png", self._plot_temperature_vs_required),
                           ("by_entropy.png", self._plot_by_entropy),
                           ("over_steps.png", self._plot_over_steps)):
            fig = draw(points)
            if fig is not None:
                path = self._dir / name
                fig.savefig(path, dpi=100, bbox_inches="tight")
                paths.append(str(path))
        return paths

    @staticmethod
    def _figure(ncols: int = 1, panels: int | None = None):
        """A figure of `panels` axes (default `ncols`), `ncols` a row."""
        # Figure + Agg canvas directly: no pyplot, so the user's global backend is left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        panels = ncols if panels is None else panels
        nrows = math.ceil(panels / ncols)
        fig = Figure(figsize=(5.5 * ncols, 4.5 * nrows))
        FigureCanvasAgg(fig)
        return fig, [fig.add_subplot(nrows, ncols, i + 1) for i in range(panels)]

    def _plot_temperature_vs_required(self, points):
        t, t_req = points.get("temperature"), points.get("required_temperature")
        if t is None or t_req is None:
            return None
        ok = np.isfinite(t) & np.isfinite(t_req)
        t, t_req = t[ok], t_req[ok]
        if t.size == 0:
            return None
        fig, (ax,) = self._figure()
        x_hi = max(HEAD_T_RANGE[1] * 1.25, float(np.quantile(t_req, 0.99)) * 1.05)
        shown = np.minimum(t_req, x_hi)  # beyond the axis: drawn at its edge
        alpha = float(np.clip(2000.0 / t.size, 0.05, 0.8))
        ax.scatter(shown, t, s=4, alpha=alpha, color="tab:blue", linewidths=0, rasterized=True)
        ax.plot([0, x_hi], [0, x_hi], color="black", lw=1, label="T = T_req (min-p boundary)")
        ax.axhspan(*HEAD_T_RANGE, color="tab:green", alpha=0.06, label="head range [0, 2]")
        for y in HEAD_T_RANGE:
            ax.axhline(y, color="tab:green", lw=0.8, ls="--")
        ax.set_xlim(0, x_hi)
        ax.set_ylim(HEAD_T_RANGE[0] - 0.05, HEAD_T_RANGE[1] + 0.1)
        ax.set_xlabel("required temperature T_req" + (f" (min-p r = {self.effective_min_p_ratio:g})"
                                                      if self.effective_min_p_ratio else ""))
        ax.set_ylabel("predicted temperature T")
        ax.set_title(f"{t.size} tokens: min-p keeps the label for {(t >= t_req).mean():.1%}")
        ax.legend(loc="lower right", fontsize=8)
        return fig

    def _plot_by_entropy(self, points, num_bins: int = 10):
        entropy = points.get("entropy")
        others = [n for n in ("temperature", "top_p", "required_temperature") if n in points]
        others += sorted(n for n in points if n not in others and n != "entropy")
        if entropy is None or not others or not np.isfinite(entropy).any():
            return None
        finite = entropy[np.isfinite(entropy)]
        hi = max(float(finite.max()), 1e-6)
        edges = np.linspace(0.0, hi, num_bins + 1)
        which = np.clip(np.digitize(entropy, edges[1:-1]), 0, num_bins - 1)
        centers = (edges[:-1] + edges[1:]) / 2
        # Predicted and required temperature share a panel; every other value gets its own.
        panels = [[n for n in ("temperature", "required_temperature") if n in others]]
        panels = [p for p in panels if p] + [[n] for n in others if n not in ("temperature", "required_temperature")]
        fig, axes = self._figure(len(panels))
        for ax, names in zip(axes, panels):
            for offset, name in zip((0.0, 0.15), names):
                means, stds, counts = [], [], []
                for b in range(num_bins):
                    v = points[name][(which == b) & np.isfinite(entropy) & np.isfinite(points[name])]
                    counts.append(v.size)
                    means.append(v.mean() if v.size else np.nan)
                    stds.append(v.std() if v.size else np.nan)
                x = centers + offset * (edges[1] - edges[0]) / 2
                ax.errorbar(x, means, yerr=stds, fmt="o-", capsize=3, ms=4, label=f"{name} (mean ± std)")
            for c, n in zip(centers, counts):
                if n:
                    ax.annotate(str(n), (c, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                                fontsize=6, color="gray")
            if "temperature" in names:
                ax.axhspan(*HEAD_T_RANGE, color="tab:green", alpha=0.06)
            ax.set_xlabel("entropy of the base distribution (nats)")
            ax.set_ylabel(" / ".join(names))
            ax.set_title(f"{' and '.join(names)} by token entropy")
            ax.legend(fontsize=8)
        return fig

    def _plot_over_steps(self, points):
        if len(self.records) < 2:
            return None
        steps = [r["batch"] for r in self.records]
        fig, (ax,) = self._figure()
        names = sorted({n for r in self.records for n in r["stats"]})
        for name in names:
            means = [(r["stats"].get(name) or {}).get("mean") for r in self.records]
            ax.plot(steps, [np.nan if m is None else m for m in means], label=f"mean {name}")
        if any("min_p_ok_frac" in r for r in self.records):
            ax.plot(steps, [r.get("min_p_ok_frac") if r.get("min_p_ok_frac") is not None else np.nan
                            for r in self.records], "k--", label="min_p_ok_frac")
        ax.set_xlabel("training batch")
        ax.set_title("per-token diagnostics over training")
        ax.legend(fontsize=8)
        return fig

"""Callbacks: diagnostics, token filtering, export hooks and prediction files shared by the methods.

Importing the package registers the classes, so configs may name them by their short names
(`class_path: GoldilocksFilter`) as well as by their full paths.

- `GoldilocksFilter` (`callbacks.goldilocks`): installs itself as `pl_module.token_filter` and
  selects the tokens a temperature head trains on (`testtime.autodeco.goldilocks_mask`).
- `EntropyDiagnostics` (`callbacks.entropy_diagnostics`): sets `pl_module.collect_diagnostics`
  and turns the per-token tensors `training_step` returns, and the generation traces
  `validation_step`/`test_step` return, into JSON lines; the module summarizes and draws its
  own figures (`diagnostics_summary`, `diagnostics_figures`).
- `ExportOnFitEnd` (`callbacks.export`): writes the method's serving checkpoint when `fit` ends.
- `PredictionWriter` (`callbacks.predictions`): writes what `predict` returns to `predictions.jsonl`.
- `HeadAgencyTracker`, `EntropyPruningController`, `GateHeatmap` (`callbacks.head_gates`): per-head
  utilization states, the seed's controller that lowers the gates of high-entropy heads on a
  schedule, and a gate heat map PNG per epoch, through `HeadGateModule`'s small interface.

Callbacks import `testtime/` only, never `lightning_modules/` or `cli.py`; they talk to a module
through the attributes and methods above (`token_filter`, `collect_diagnostics`, `export`, ...).
"""

from callbacks.entropy_diagnostics import EntropyDiagnostics
from callbacks.export import ExportOnFitEnd
from callbacks.goldilocks import GoldilocksFilter
from callbacks.head_gates import EntropyPruningController, GateHeatmap, HeadAgencyTracker
from callbacks.predictions import PredictionWriter

__all__ = ["EntropyDiagnostics", "EntropyPruningController", "ExportOnFitEnd", "GateHeatmap", "GoldilocksFilter",
           "HeadAgencyTracker", "PredictionWriter"]

"""Write what `predict` returns to a JSON-lines file (Lightning's `predict` returns it to nobody on the CLI).

Each row a module's `predict_step` returns (a dict, e.g. `{"completion", "answer", ...}`) becomes one
line, with the batch's `ids` (a prompt datamodule's record ids), else the dataset index of the row, as `"id"`.
"""

from __future__ import annotations

import json
import os

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    """One JSON line per predicted row.

    Args:
        output_path: the file; None: `<trainer.log_dir or default_root_dir>/predictions.jsonl`. Under
            DDP every rank writes its own file, `.rank<N>` inserted before the suffix.
    """

    def __init__(self, output_path: str | None = None):
        super().__init__(write_interval="batch")
        self.output_path = output_path
        self.path: str | None = None
        self._rows = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        path = self.output_path or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.jsonl")
        if trainer.world_size > 1:
            root, ext = os.path.splitext(path)
            path = f"{root}.rank{trainer.global_rank}{ext}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(path, "w").close()  # each predict run starts the file afresh
        self.path, self._rows = path, 0

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        ids = batch.get("ids") if isinstance(batch, dict) else None
        if ids is None and batch_indices is not None and len(batch_indices) == len(prediction):
            ids = list(batch_indices)  # dataset indices: unique across DDP ranks
        with open(self.path, "a") as f:
            for i, row in enumerate(prediction):
                rid = ids[i] if ids is not None else self._rows + i
                f.write(json.dumps({"id": rid, **row} if isinstance(row, dict) else {"id": rid, "prediction": row}) + "\n")
        self._rows += len(prediction)

    def on_predict_end(self, trainer, pl_module) -> None:
        rank_zero_info(f"{self._rows} predictions written to {self.path}")

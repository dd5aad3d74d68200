"""A callback for the DDP test: every rank saves its final weights, so the test can compare them."""

import os

import lightning as L
import torch


class SaveWeightsPerRank(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                   os.path.join(self.out_dir, f"initial-rank{trainer.global_rank}.pt"))

    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()},
                   os.path.join(self.out_dir, f"final-rank{trainer.global_rank}.pt"))

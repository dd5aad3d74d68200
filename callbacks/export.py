"""Write the serving checkpoint when `fit` ends, so a training run leaves something to serve.

    trainer:
      callbacks:
        - class_path: ExportOnFitEnd
          init_args: {output_dir: served/autodeco}

Global rank 0 calls `pl_module.export(output_dir)` (the method's own format, as
`python cli.py export` writes it); every rank then waits at a barrier, so no rank exits, or
starts writing elsewhere, while the export is being written. If the export fails on rank 0,
every rank raises (instead of the other ranks waiting forever or finishing as if it had worked).

Under FSDP each rank holds only a shard of every parameter when `fit` ends; all ranks first
gather the full parameters onto rank 0 (`summon_full_params(rank0_only=True)`, in CPU memory
when they are sharded, no write-back), so rank 0 exports whole tensors rather than its shard.
"""

from __future__ import annotations

import contextlib

import lightning as L
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info


def full_parameters(trainer: L.Trainer):
    """A context in which rank 0 sees whole parameters: FSDP gathers them (a collective: every
    rank must enter it); other strategies already hold them."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

        # torch refuses offload_to_cpu when nothing is sharded (NO_SHARD, or one process)
        sharded = trainer.world_size > 1 and getattr(strategy, "sharding_strategy", None) != ShardingStrategy.NO_SHARD
        return FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False, rank0_only=True,
                                                           offload_to_cpu=sharded)
    return contextlib.nullcontext()


class ExportOnFitEnd(L.Callback):
    """Call `pl_module.export(output_dir)` on global rank 0 at the end of `fit`.

    Args:
        output_dir: the folder to write.
        merged: pass `merged=True` to `export` (methods that train heads or adapters then
            include the frozen base weights, so the folder serves on its own).
    """

    def __init__(self, output_dir: str, merged: bool = False):
        super().__init__()
        self.output_dir = output_dir
        self.merged = merged

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not callable(getattr(pl_module, "export", None)):
            raise TypeError(f"ExportOnFitEnd: {type(pl_module).__name__} does not define export(output_dir)")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        error: BaseException | None = None
        with full_parameters(trainer):
            if trainer.is_global_zero:
                try:
                    if self.merged:
                        pl_module.export(self.output_dir, merged=True)
                    else:
                        pl_module.export(self.output_dir)
                    rank_zero_info(f"ExportOnFitEnd: exported {type(pl_module).__name__} to {self.output_dir}")
                except Exception as e:  # reach the barrier anyway, then fail on every rank
                    error = e
        trainer.strategy.barrier("ExportOnFitEnd")
        failed = trainer.strategy.broadcast(error is not None, src=0)
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(f"ExportOnFitEnd: the export to {self.output_dir} failed on global rank 0")

"""ExportOnFitEnd: global rank 0 exports once into the folder; every rank meets at the barrier."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from callbacks import ExportOnFitEnd


class FakeModule(L.LightningModule):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.exports = []
        self.fail = fail
        self.trained_steps = 0

    def training_step(self, batch, batch_idx):
        self.trained_steps += 1
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def export(self, output_dir: str, merged: bool = False) -> None:
        # export runs after training: every step has happened by then
        self.exports.append((output_dir, merged, self.trained_steps))
        if self.fail:
            raise OSError("disk full")


class StubStrategy:
    def __init__(self, rank0_failed: bool = False):
        self.barriers = 0
        self.rank0_failed = rank0_failed

    def barrier(self, name=None):
        self.barriers += 1

    def broadcast(self, obj, src=0):
        return self.rank0_failed  # what rank 0 sent


def test_exports_once_into_the_folder_at_the_end_of_fit(tmp_path):
    module = FakeModule()
    out = str(tmp_path / "served")
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[ExportOnFitEnd(out)],
                        default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(6, 2), batch_size=2))
    assert module.exports == [(out, False, 3)]

    module = FakeModule()
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ExportOnFitEnd(out, merged=True)], default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(2, 2), batch_size=2))
    assert module.exports == [(out, True, 1)]


def test_other_ranks_do_not_export_but_wait_at_the_barrier(tmp_path):
    module = FakeModule()
    strategy = StubStrategy()
    ExportOnFitEnd(str(tmp_path)).on_fit_end(SimpleNamespace(is_global_zero=False, strategy=strategy), module)
    assert module.exports == [] and strategy.barriers == 1

    strategy = StubStrategy()
    ExportOnFitEnd(str(tmp_path)).on_fit_end(SimpleNamespace(is_global_zero=True, strategy=strategy), module)
    assert module.exports == [(str(tmp_path), False, 0)] and strategy.barriers == 1


def test_a_failed_export_reaches_the_barrier_and_fails_on_every_rank(tmp_path):
    strategy = StubStrategy()
    with pytest.raises(OSError, match="disk full"):
        ExportOnFitEnd(str(tmp_path)).on_fit_end(SimpleNamespace(is_global_zero=True, strategy=strategy),
                                                 FakeModule(fail=True))
    assert strategy.barriers == 1  # rank 0 did not leave the others waiting

    strategy = StubStrategy(rank0_failed=True)
    module = FakeModule()
    with pytest.raises(RuntimeError, match="failed on global rank 0"):
        ExportOnFitEnd(str(tmp_path)).on_fit_end(SimpleNamespace(is_global_zero=False, strategy=strategy), module)
    assert module.exports == [] and strategy.barriers == 1


def test_a_module_without_export_is_refused_before_training():
    class NoExport(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="does not define export"):
        ExportOnFitEnd("x").setup(None, NoExport(), "fit")

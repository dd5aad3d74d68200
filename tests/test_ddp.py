"""Data-parallel training on CPU: 2 processes, started through the CLI as a user would."""

import torch

from tests.conftest import ROOT


def test_cpu_ddp_fit_ends_with_identical_weights_on_both_ranks(run_cli, tmp_path):
    probe = tmp_path / "weights"
    out = run_cli(
        "fit", "--config", str(ROOT / "configs/sft/tiny.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
        "--trainer.max_steps=4", "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.callbacks+=tests.ddp_probe.SaveWeightsPerRank", f"--trainer.callbacks.out_dir={probe}",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    initial = torch.load(probe / "initial-rank0.pt")
    rank0 = torch.load(probe / "final-rank0.pt")
    rank1 = torch.load(probe / "final-rank1.pt")
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    assert any(not torch.equal(initial[n], rank0[n]) for n in rank0), "training changed nothing"

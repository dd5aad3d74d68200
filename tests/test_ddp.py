"""Data-parallel training on CPU: 2 processes, started through the CLI as a user would, with the
shipped `configs/trainer/ddp.yaml` (its GPU and bf16 settings overridden for the CPU). FSDP has no
CPU path in Lightning (it requires a GPU accelerator); `benchmarks/strategies.py` runs it on the GPU."""

import json

import pytest
import torch

from tests.conftest import ROOT


# AutoDeco: a frozen base with trainable heads must not trip DDP's unused-parameter check.
# TTT-E2E: the inner loop takes gradients inside the forward, which DDP must not mistake for its own.
@pytest.mark.parametrize("config", ["configs/sft/tiny.yaml", "configs/autodeco/tiny.yaml", "configs/ttt/tiny.yaml"])
def test_cpu_ddp_fit_ends_with_identical_weights_on_both_ranks(run_cli, tmp_path, config):
    probe = tmp_path / "weights"
    out = run_cli(
        "fit", "--config", str(ROOT / config), "--config", str(ROOT / "configs/trainer/ddp.yaml"),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true",
        "--trainer.max_steps=4", "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
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


def test_autodeco_trains_under_bf16_mixed(run_cli, tmp_path):
    probe = tmp_path / "weights"
    out = run_cli("fit", "--config", str(ROOT / "configs/autodeco/tiny.yaml"), "--trainer.precision=bf16-mixed",
                  "--trainer.max_steps=4", "--trainer.limit_val_batches=0", "--trainer.logger=false",
                  "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
                  "--trainer.callbacks=[]", "--trainer.callbacks+=tests.ddp_probe.SaveWeightsPerRank",
                  f"--trainer.callbacks.out_dir={probe}")
    assert out.returncode == 0, out.stderr[-3000:]
    initial, final = torch.load(probe / "initial-rank0.pt"), torch.load(probe / "final-rank0.pt")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in final.values())  # fp32 heads
    assert any(not torch.equal(initial[n], final[n]) for n in final)


TEST_STAGES = ["configs/autodeco/tiny.yaml", "configs/diffusion/tiny.yaml", "configs/head_gates/tiny.yaml",
               "configs/sft/tiny.yaml", "configs/tinylora/tiny.yaml", "configs/tnot/tiny.yaml"]


@pytest.mark.parametrize("config", TEST_STAGES)
def test_every_method_finishes_test_under_cpu_ddp(run_cli, tmp_path, config):
    """`test` on 2 processes: every rank goes through the same collectives at the end of the
    stage (TesttimeModule's test template), so none waits forever, and rank 0 writes the report
    over both ranks' problems."""
    out = run_cli("test", "--config", str(ROOT / config), "--config", str(ROOT / "configs/trainer/ddp.yaml"),
                  "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.precision=32-true",
                  "--trainer.limit_test_batches=2", "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                  timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    reports = list(tmp_path.rglob("test_results.json"))
    assert len(reports) == 1, reports  # rank 0 alone
    report = json.loads(reports[0].read_text())
    assert report["stage"] == "test" and report["results"] and report.get("n_problems", 1) > 0

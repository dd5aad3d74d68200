"""TNOTModule: the plain model beside TNOT/SLOT over a sweep, traces for EntropyDiagnostics, the CLI."""

import json

import pytest
import torch

from datamodules.tasks import TaskDataModule
from lightning_modules.tnot import TNOTModule
from testtime.evaluation import generate_completions
from tests.conftest import ROOT

TINY = str(ROOT / "configs/tnot/tiny.yaml")


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    dm = TaskDataModule(tiny_model_dir, n_train=4, n_val=4, n_test=4, eval_batch_size=4)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))


def _module(path, **kwargs):
    module = TNOTModule(model_name_or_path=path, **kwargs)
    module.configure_model()
    return module


def _completions(module, batch, setting, seed=0):
    return generate_completions(module.model, module.tokenizer, batch["prompt_ids"], batch["prompt_mask"], setting,
                                max_new_tokens=6, seed=seed)


def test_sweep_settings_carry_their_config(tiny_model_dir, batch):
    module = _module(tiny_model_dir, modes=["slot", "srgen"], sweep_times=[1, 3], sweep_lrs=[0.01, 0.1],
                     max_retries=1, eval_num_samples=2)
    names = [s.name for s in module.decoding_settings()]
    assert names == ["plain"] + [f"{m}_t{t}_lr{lr}" for m in ("slot", "srgen") for t in (1, 3) for lr in (0.01, 0.1)]
    assert all(p.grad is None and not p.requires_grad for p in module.model.parameters())
    setting = next(s for s in module.decoding_settings() if s.name == "slot_t3_lr0.1")
    assert setting.do_sample and setting.temperature == 0.6 and setting.num_samples == 2
    _completions(module, batch, setting)
    cfg = module.model.tnot_config
    assert (cfg.mode, cfg.times, cfg.lr, cfg.prompt_only, cfg.entropy_control) == ("slot", 3, 0.1, True, False)
    assert module.model.delta.shape[0] == 8 and torch.count_nonzero(module.model.delta) > 0
    srgen = next(s for s in module.decoding_settings() if s.name == "srgen_t1_lr0.01")
    _completions(module, batch, srgen)
    cfg = module.model.tnot_config
    assert (cfg.mode, cfg.times, cfg.entropy_control, cfg.max_retries, cfg.entropy_weight) == ("srgen", 1, True, 1, 0.05)


def test_same_seeds_for_plain_and_tnot(tiny_model_dir, batch):
    # with no optimization step, TNOT must sample exactly what the plain model samples on the same seed
    module = _module(tiny_model_dir, modes=["slot"], times=0, eval_num_samples=2)
    plain, slot = module.decoding_settings()
    assert _completions(module, batch, plain, seed=3) == _completions(module, batch, slot, seed=3)
    assert _completions(module, batch, plain, seed=3) != _completions(module, batch, plain, seed=4)
    module.collect_diagnostics = True  # the recording path (TNOT generate with hooks) samples the same too
    assert _completions(module, batch, plain, seed=3) == _completions(module, batch, slot, seed=3)


def test_traces_follow_the_samples(tiny_model_dir, batch):
    module = _module(tiny_model_dir, modes=["srgen"], times=1, max_retries=2, eval_num_samples=2)
    module.collect_diagnostics = True
    module._traces = []
    plain, srgen = module.decoding_settings()
    _completions(module, batch, plain)
    _completions(module, batch, srgen)
    traces = module._traces
    assert [(t["setting"], t["problem"], t["draw"]) for t in traces] == \
        [(s, p, d) for s in ("plain", "srgen_t1_lr0.01") for p in range(4) for d in range(2)]
    for t in traces:
        assert len(t["entropy"]) == len(t["threshold"]) == len(t["entropy_original"]) >= 1
        if t["setting"] == "plain":
            assert t["retries"] == 0 and not t["stop_positions"] and set(t["threshold"]) == {None}
        else:  # a random model's entropy (~log vocab) is above the static 3.0: every sample stops and retries
            assert t["retries"] == 2 and t["stop_positions"] == [0, 1, 2] and len(t["stop_entropies"]) == 3
            assert all(e > 3.0 for e in t["stop_entropies"])
            # judged tokens against 3.0; the reflected ones and those of the last pass are not judged
            assert t["threshold"][:3] == [None, None, None] and set(t["threshold"][3:]) == {None}
            assert len(t["entropy"]) == 6  # the last pass finished the answer


def test_fit_is_refused_with_a_clear_message(run_cli):
    out = run_cli("fit", "--config", TINY, "--trainer.fast_dev_run=true")
    assert out.returncode == 1 and "TNOTModule has nothing to train" in out.stderr
    assert "Traceback" not in out.stderr  # the message alone (TESTTIME_TRACEBACK=1 shows where)


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        TNOTModule(temperature=-1.0)
    with pytest.raises(ValueError, match="modes"):
        TNOTModule(modes=[])


def test_cli_test_writes_table_sweep_plot_and_traces(run_cli, tmp_path):
    out = run_cli("test", "--config", TINY, "--model.init_args.sweep_times=[1, 2]", "--model.init_args.sweep_lrs=[0.1]",
                  "--data.init_args.n_test=4", "--data.init_args.eval_batch_size=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TNOT evaluation, 4 test problems, T=0.6, k=2" in out.stdout + out.stderr
    log_dir = tmp_path / "runs/tnot-tiny/lightning_logs/version_0"
    results = json.loads((log_dir / "test_results.json").read_text())
    assert set(results["results"]) == {"plain", "slot_t1_lr0.1", "slot_t2_lr0.1", "srgen_t1_lr0.1", "srgen_t2_lr0.1"}
    assert (log_dir / "test_sweep.png").stat().st_size > 0
    diagnostics = log_dir / "diagnostics"
    traces = [json.loads(line) for line in (diagnostics / "test_traces.jsonl").read_text().splitlines()]
    assert len(traces) == 5 * 4 * 2  # settings x problems x k
    summary = json.loads((diagnostics / "test_trace_summary.json").read_text())
    assert summary["plain"]["stopped_frac"] == 0.0 and summary["srgen_t1_lr0.1"]["stopped_frac"] == 1.0
    assert summary["srgen_t2_lr0.1"]["retries_max"] == 2  # tiny.yaml: max_retries 2
    assert (diagnostics / "test_entropy_over_positions.png").stat().st_size > 0


def test_cli_predict_writes_completions_with_retries(run_cli, tmp_path):
    out = run_cli("predict", "--config", TINY, "--data.init_args.n_test=3", "--model.init_args.modes=[srgen]",
                  "--model.init_args.sweep_times=[]", "--model.init_args.times=1")
    assert out.returncode == 0, out.stderr[-3000:]
    path = tmp_path / "runs/tnot-tiny/lightning_logs/version_0/predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert all(isinstance(r["completion"], str) and r["completion"] and r["answer"] for r in rows)
    assert all(r["retries"] == 2 and len(r["stop_positions"]) == 3 for r in rows)  # tiny.yaml: max_retries 2

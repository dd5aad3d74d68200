"""AutoDecoModule: frozen base, heads-only checkpoints, training modes, evaluation table, export via the CLI."""

import json
import pytest
import torch

from datamodules.tasks import TaskDataModule
from lightning_modules.autodeco import AutoDecoModule
from testtime.autodeco import autodeco_generate
from testtime.autodeco_export import load_autodeco
from tests.conftest import ROOT

TINY = str(ROOT / "configs/autodeco/tiny.yaml")


def _module(path, **kwargs):
    module = AutoDecoModule(model_name_or_path=path, learning_rate=1e-2, **kwargs)
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    dm = TaskDataModule(tiny_model_dir, n_train=16, n_val=4, n_test=4, batch_size=8)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _train(module, batch, steps):
    optimizer = module.configure_optimizers()["optimizer"]
    for _ in range(steps):
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()


@pytest.mark.parametrize("objective", ["legacy_ce", "analytic_min_p_hinge"])
def test_training_lowers_the_loss_and_leaves_the_base_untouched(tiny_model_dir, batch, objective):
    module = _module(tiny_model_dir, objective=objective, easy_token_drop=0.0)
    base_before = {k: v.clone() for k, v in module.model.llm.state_dict().items()}
    first = module._losses(batch)[0]["loss"].item()
    _train(module, batch, 30)
    assert module._losses(batch)[0]["loss"].item() < 0.9 * first
    for name, param in module.model.llm.named_parameters():
        assert param.grad is None and not param.requires_grad, name
        assert torch.equal(param, base_before[name]), name
    assert not module.model.llm.training  # frozen base stays in eval mode


def test_checkpoint_holds_only_the_heads_and_restores_them(tiny_model_dir, batch):
    module = _module(tiny_model_dir)
    _train(module, batch, 3)
    state = module.state_dict()
    assert state and all(k.startswith(("model.temp_head.", "model.top_p_head.")) for k in state)
    fresh = _module(tiny_model_dir)
    fresh.load_state_dict(state, strict=fresh.strict_loading)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_training_modes_choose_the_trainable_heads(tiny_model_dir, batch, tmp_path):
    temp_only = _module(tiny_model_dir, train_top_p=False)
    assert temp_only.model.top_p_head is None
    assert temp_only._losses(batch)[0]["top_p_loss"] is None

    temp_only.export(str(tmp_path / "temp"))
    staged = _module(tiny_model_dir, train_temp=False, train_top_p=True, init_heads_from=str(tmp_path / "temp"))
    for k, v in staged.model.temp_head.state_dict().items():  # the exported head, frozen
        assert torch.equal(v, temp_only.model.temp_head.state_dict()[k]), k
    frozen = {k: v.clone() for k, v in staged.model.temp_head.state_dict().items()}
    _train(staged, batch, 3)
    assert all(torch.equal(v, frozen[k]) for k, v in staged.model.temp_head.state_dict().items())
    assert all(p.grad is None for p in staged.model.temp_head.parameters())
    assert any(p.grad is not None for p in staged.model.top_p_head.parameters())

    with pytest.raises(ValueError, match="nothing to train"):
        AutoDecoModule(tiny_model_dir, train_temp=False, train_top_p=False)


def test_token_filter_restricts_the_loss(tiny_model_dir, batch):
    module = _module(tiny_model_dir, objective="analytic_min_p_hinge")
    module.collect_diagnostics = True
    calls = []

    def keep_first_valid_token(logits, labels):
        mask = torch.zeros_like(labels, dtype=torch.bool)
        row, col = (labels != -100).nonzero()[0]
        mask[row, col] = True
        calls.append(logits.shape[:2] == labels.shape)
        return mask

    module.token_filter = keep_first_valid_token
    out = module.training_step(batch, 0)
    assert calls == [True]
    assert out["diagnostics"]["temperature"].numel() == 1  # the diagnostics cover the kept token only

    # the filter restricts the temperature head's loss only: the top-p head trains on every token
    module.token_filter, module._generator = None, None
    plain = module._losses(batch)[0]
    module.token_filter, module._generator = keep_first_valid_token, None
    filtered = module._losses(batch)[0]
    assert not torch.equal(filtered["temp_loss"], plain["temp_loss"])
    assert plain["top_p_loss"] is not None and torch.equal(filtered["top_p_loss"], plain["top_p_loss"])


def test_recorded_mean_prediction_matches_the_generation(tiny_model_dir, tiny_llama):
    module = _module(tiny_model_dir)
    tok = module.tokenizer
    ids = torch.tensor([tok("1+2=")["input_ids"], tok("3+4=")["input_ids"]])
    mask = torch.ones_like(ids)
    torch.manual_seed(0)
    expected = autodeco_generate(module.model.llm, module.model, ids, mask, max_new_tokens=6,
                                 pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    sequences = module.autodeco_generate_fn(record=True)(module.model.llm, ids, mask, max_new_tokens=6,
                                                         pad_token_id=tok.pad_token_id, do_sample=True,
                                                         temperature=0.3, top_p=0.5, top_k=0)
    assert torch.equal(sequences, expected.sequences)  # the user's static T/P never leak into AutoDeco
    new = expected.sequences[:, ids.shape[1]:]
    eos = new == tok.eos_token_id
    used = (eos.long().cumsum(1) - eos.long()) == 0  # up to and including the first EOS
    sums = module._prediction_sums
    assert sums[2] == used.sum()
    assert torch.isclose(sums[0], (expected.temperature * used).sum().double(), atol=1e-5)
    assert torch.isclose(sums[1], (expected.top_p * used).sum().double(), atol=1e-5)


def test_cli_fit_test_export_roundtrip(run_cli, tmp_path):
    root = tmp_path / "run"
    common = ["--config", TINY, f"--trainer.default_root_dir={root}",
              f"--trainer.logger.init_args.save_dir={root}", f"--trainer.callbacks.dirpath={root}/checkpoints"]
    out = run_cli("fit", *common, "--test_after_fit=true")  # one command: fit, then the evaluation table
    assert out.returncode == 0, out.stderr[-3000:]
    assert "AutoDeco evaluation" in out.stderr + out.stdout
    assert len(list(root.rglob("test_results.json"))) == 1
    ckpt = root / "checkpoints" / "last.ckpt"

    out = run_cli("test", *common, f"--ckpt_path={ckpt}")
    assert out.returncode == 0, out.stderr[-3000:]
    newest = max(root.rglob("test_results.json"), key=lambda p: p.stat().st_mtime)
    results = json.loads(newest.read_text())
    assert set(results["results"]) == {"greedy", "sample_T1_p1_k2", "best_static", "mean_static", "autodeco"}
    assert results["best_static"] in {f"sample_T{t}_p{p}_k2" for t in ("0.5", "1") for p in ("0.9", "1")}
    assert "AutoDeco evaluation" in out.stderr + out.stdout

    for merged in (False, True):
        export = tmp_path / f"export-{merged}"
        out = run_cli("export", *common, f"--ckpt_path={ckpt}", f"--output_dir={export}", f"--merged={merged}")
        assert out.returncode == 0, out.stderr[-3000:]
        config = json.loads((export / "config.json").read_text())
        assert config["model_type"] == "autodeco"
        reloaded = load_autodeco(export)
        heads = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        for name, value in reloaded.heads_state_dict().items():
            assert torch.equal(value, heads[f"model.{name}"]), name
    merged_files = {p.name for p in (tmp_path / "export-True").iterdir()}
    heads_only_files = {p.name for p in (tmp_path / "export-False").iterdir()}
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "export-True") > 2 * size(tmp_path / "export-False")  # base weights included
    assert "config.json" in merged_files and "config.json" in heads_only_files


def test_the_static_baselines_are_chosen_on_validation_never_on_test(tiny_model_dir, monkeypatch, tmp_path):
    import lightning as L

    import lightning_modules.autodeco as autodeco_module

    seen = []
    real = autodeco_module.evaluate

    def recording(model, tokenizer, problems, settings, **kwargs):
        seen.append([p.question for p in problems])
        results = real(model, tokenizer, problems, settings, **kwargs)
        # make one grid point the clear winner, to check it is the one tested
        return {**results, "sample_T0.5_p1": 1.0}

    monkeypatch.setattr(autodeco_module, "evaluate", recording)
    module = AutoDecoModule(model_name_or_path=tiny_model_dir, static_temperatures=[0.5, 1.0], static_top_ps=[0.9, 1.0],
                            eval_num_samples=1, eval_max_new_tokens=3)
    dm = TaskDataModule(tiny_model_dir, n_train=4, n_val=3, n_test=3, eval_batch_size=3, seed=5)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, dm)
    validation = [p.question for p in dm.problems["validation"]]
    test = {p.question for p in dm.problems["test"]}
    assert seen == [validation] and not test & set(validation)  # only the validation problems, once
    assert module.best_static.temperature == 0.5 and module.best_static.top_p == 1.0
    results = json.loads((tmp_path / "test_results.json").read_text())
    assert results["best_static"] == "sample_T0.5_p1" and "best_static" in results["results"]


def test_the_hinge_recipe_runs_through_the_cli_on_the_tiny_model(run_cli, tmp_path):
    root = tmp_path / "runs/autodeco-smollm2-hinge"  # the recipe's folders, under the test's working folder
    out = run_cli("fit", "--config", str(ROOT / "configs/autodeco/smollm2_hinge.yaml"),
                  "--model.init_args.model_name_or_path=tiny-random-llama", "--model.init_args.eval_num_samples=1",
                  "--model.init_args.eval_max_new_tokens=4", "--data=datamodules.tasks.TaskDataModule",
                  "--data.n_train=16", "--data.n_val=2", "--data.n_test=2", "--data.batch_size=8",
                  "--trainer.max_steps=2", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1")
    assert out.returncode == 0, out.stderr[-3000:]
    header = next(root.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert "goldilocks/kept" in header and "train/temp_loss" in header and "train/top_p_loss" not in header
    config = json.loads((root / "export" / "config.json").read_text())
    assert config["enable_temperature_head"] and not config["enable_top_p_head"]
    results = json.loads(next(root.rglob("test_results.json")).read_text())
    assert set(results["results"]) == {"greedy", "sample_T1_p1", "best_static", "mean_static", "autodeco"}


def test_test_writes_the_temperature_of_every_generated_token(tiny_model_dir, monkeypatch, tmp_path):
    """`temperature_by_token` (test_results.json, and its PNG) covers exactly the tokens AutoDeco
    generated on the test problems, up to and with each row's EOS, with the T they were sampled at."""
    import lightning as L

    import lightning_modules.autodeco as autodeco_module

    module = AutoDecoModule(model_name_or_path=tiny_model_dir, static_temperatures=[1.0], static_top_ps=[1.0],
                            eval_num_samples=2, eval_max_new_tokens=5)
    real, test_outputs = autodeco_module.autodeco_generate, []

    def recording(model, heads, input_ids, *args, **kwargs):
        out = real(model, heads, input_ids, *args, **kwargs)
        # the test epoch, not the validation pass before it (only the count below tells them apart)
        if module._test_tokens is not None:
            test_outputs.append((out.sequences[:, input_ids.shape[1]:], out.temperature))
        return out

    monkeypatch.setattr(autodeco_module, "autodeco_generate", recording)
    dm = TaskDataModule(tiny_model_dir, n_train=4, n_val=2, n_test=3, eval_batch_size=3, seed=5)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, dm)
    eos = module.tokenizer.eos_token_id
    count, total = 0, 0.0
    for new, temperature in test_outputs:
        for row, t in zip(new.tolist(), temperature.tolist()):
            n = row.index(eos) + 1 if eos in row else len(row)
            count, total = count + n, total + sum(t[:n])
    assert sum(new.shape[0] for new, _ in test_outputs) == 6 and count > 0  # k = 2 samples of 3 test problems
    summary = json.loads((tmp_path / "test_results.json").read_text())["temperature_by_token"]
    assert summary["tokens"] == count
    by_type = summary["by_type"].values()
    assert sum(v["tokens"] for v in by_type) == count
    assert sum(v["mean_temperature"] * v["tokens"] for v in by_type) == pytest.approx(total, rel=1e-5)
    assert (tmp_path / "temperature_by_token.png").stat().st_size > 0

"""EntropyDiagnostics: JSON lines whose numbers match the tensors the module returned, the module's
own figures and trace summaries through the callback's small interface, rank 0 only.

The module is a fake following the AutoDeco contract: with `collect_diagnostics` set,
training_step returns {"loss", "diagnostics": {temperature, top_p, required_temperature, entropy}}
(1-D tensors over the tokens in the loss), and `diagnostics_figures` draws AutoDeco's figures.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from callbacks import EntropyDiagnostics
from callbacks.entropy_diagnostics import _Reservoir
from testtime.autodeco import required_temperature
from testtime.autodeco_plots import training_figures
from testtime.lm import IGNORE_INDEX

V, L_SEQ, B = 16, 10, 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L_SEQ, V, generator=g) * torch.linspace(0.5, 3.0, B)[:, None, None]
    labels = torch.randint(0, V, (B, L_SEQ), generator=g)
    labels[:, :2] = IGNORE_INDEX
    return {"logits": logits, "labels": labels}


class FakeAutoDeco(L.LightningModule):
    """training_step returns the contract's diagnostics dict when collect_diagnostics is set."""

    def __init__(self, min_p_ratio: float = 0.1, temp_cap: float = 2.0, names=("temperature", "top_p",
                                                                                 "required_temperature", "entropy")):
        super().__init__()
        self.save_hyperparameters()
        self.token_filter = None
        self.collect_diagnostics = False
        self.temp = torch.nn.Linear(V, 1)
        self.top_p = torch.nn.Linear(V, 1)
        self.returned = []  # the diagnostics dicts returned, in order
        self.figure_calls = []  # what diagnostics_figures was given

    def training_step(self, batch, batch_idx):
        z, y = batch["logits"][:, :-1], batch["labels"][:, 1:]
        sel = y != IGNORE_INDEX
        t = torch.sigmoid(self.temp(z)).squeeze(-1) * 2
        p = torch.sigmoid(self.top_p(z)).squeeze(-1)
        t_req = required_temperature(z, y, self.hparams.min_p_ratio)
        loss = (torch.relu(t_req - t)[sel]).mean() + p[sel].mean()
        if not self.collect_diagnostics:
            return loss
        probs = torch.softmax(z, -1)
        entropy = -(probs * torch.log_softmax(z, -1)).sum(-1)
        all_values = {"temperature": t, "top_p": p, "required_temperature": t_req, "entropy": entropy}
        d = {k: all_values[k][sel].detach() for k in self.hparams.names}
        self.returned.append({k: v.clone() for k, v in d.items()})
        return {"loss": loss, "diagnostics": d}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def diagnostics_figures(self, stage, points=None, records=None, **_):
        self.figure_calls.append((stage, points, records))
        return training_figures(points, records, self.hparams.min_p_ratio)


class NoFigures(FakeAutoDeco):
    diagnostics_figures = None  # a method that draws nothing


def fit(module, callbacks, tmp_path, max_steps=4, logger=False):
    loader = torch.utils.data.DataLoader([make_batch(i) for i in range(max_steps)], batch_size=None)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, loader)
    return trainer


def read_lines(path):
    return [json.loads(line) for line in open(path)]


def assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 2000


# ---------------------------------------------------------------------------------------------


def test_json_lines_match_the_returned_tensors_and_plots_are_written(tmp_path):
    module = FakeAutoDeco()
    callback = EntropyDiagnostics(output_dir=str(tmp_path / "diag"), every_n_steps=2)
    fit(module, [callback], tmp_path, max_steps=4)

    assert len(module.returned) == 4
    lines = read_lines(tmp_path / "diag" / "diagnostics.jsonl")
    assert len(lines) == 4 // 2
    for line, d in zip(lines, module.returned[::2]):  # batches 0 and 2
        t, t_req, h = d["temperature"], d["required_temperature"], d["entropy"]
        assert line["tokens"] == t.numel()
        assert line["stats"]["temperature"]["mean"] == pytest.approx(float(t.mean()), rel=1e-5)
        assert line["stats"]["temperature"]["std"] == pytest.approx(float(t.std(unbiased=False)), rel=1e-4)
        assert line["stats"]["top_p"]["max"] == pytest.approx(float(d["top_p"].max()), rel=1e-6)
        assert line["stats"]["required_temperature"]["q50"] == pytest.approx(float(t_req.quantile(0.5)), rel=1e-5)
        assert line["stats"]["entropy"]["q95"] == pytest.approx(float(h.quantile(0.95)), rel=1e-5)
    assert [line["batch"] for line in lines] == [0, 2]

    # the module drew its own figures from exactly the lines written and the sampled points
    (stage, points_given, records_given), = module.figure_calls[-1:]
    assert stage == "fit" and records_given == lines and set(points_given) == set(module.hparams.names)

    names = {p.rsplit("/", 1)[-1] for p in callback.plot_paths}
    assert names == {"temperature_vs_required.png", "by_entropy.png", "over_steps.png"}
    for path in callback.plot_paths:
        assert path.startswith(str(tmp_path / "diag"))
        assert_png(path)

    # the reservoir holds real (T, T_req) pairs of the logged batches: rows stay aligned
    points = np.load(tmp_path / "diag" / "points.npz")
    logged = torch.cat([torch.stack([d["temperature"], d["required_temperature"]], 1) for d in module.returned[::2]])
    assert len(points["temperature"]) == len(logged)  # fewer than max_points: all of them
    pairs = {(round(a, 5), round(b, 5)) for a, b in logged.tolist()}
    assert {(round(float(a), 5), round(float(b), 5)) for a, b in zip(points["temperature"],
                                                                   points["required_temperature"])} == pairs

    # the flag is restored after fit
    assert module.collect_diagnostics is False


def test_default_folder_is_under_the_log_dir_and_plots_false_draws_nothing(tmp_path):
    module = FakeAutoDeco(min_p_ratio=0.1)
    logger = CSVLogger(save_dir=str(tmp_path / "logs"), name="run")
    callback = EntropyDiagnostics(plots=False)
    fit(module, [callback], tmp_path, max_steps=2, logger=logger)
    folder = tmp_path / "logs" / "run" / "version_0" / "diagnostics"
    lines = read_lines(folder / "diagnostics.jsonl")
    assert len(lines) == 2 and callback.plot_paths == [] and module.figure_calls == []
    assert not list(folder.glob("*.png"))
    assert [line["stats"]["temperature"]["mean"] for line in lines] == pytest.approx(
        [float(d["temperature"].mean()) for d in module.returned], rel=1e-5)


def test_any_per_token_tensor_gets_statistics(tmp_path):
    # a later method returning entropy alone and drawing no figures: statistics and points only
    module = NoFigures(names=("entropy",))
    callback = EntropyDiagnostics(output_dir=str(tmp_path / "d"), every_n_steps=1)
    fit(module, [callback], tmp_path, max_steps=3)
    lines = read_lines(tmp_path / "d" / "diagnostics.jsonl")
    assert len(lines) == 3
    assert [set(line["stats"]) for line in lines] == [{"entropy"}] * 3
    assert [line["stats"]["entropy"]["mean"] for line in lines] == pytest.approx(
        [float(d["entropy"].mean()) for d in module.returned], rel=1e-5)
    assert callback.plot_paths == [] and sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "diagnostics.jsonl", "points.npz"]


def _stub_trainer(rank0: bool, step: int = 0):
    return SimpleNamespace(is_global_zero=rank0, global_rank=0 if rank0 else 1, global_step=step, ckpt_path=None,
                           log_dir=None, default_root_dir=".")


def _outputs(seed):
    g = torch.Generator().manual_seed(seed)
    t, t_req = torch.rand(50, generator=g) * 2, torch.rand(50, generator=g) * 3
    return {"loss": torch.tensor(1.0), "diagnostics": {"temperature": t, "required_temperature": t_req,
                                                       "entropy": torch.rand(50, generator=g) * 3}}


@pytest.mark.parametrize("rank0", [True, False])
def test_only_global_rank_zero_writes(tmp_path, rank0):
    module = FakeAutoDeco()
    callback = EntropyDiagnostics(output_dir=str(tmp_path / "d"))
    trainer = _stub_trainer(rank0)
    callback.setup(trainer, module, "fit")
    assert module.collect_diagnostics is True  # every rank computes the diagnostics
    for i in range(3):
        callback.on_train_batch_end(trainer, module, _outputs(i), None, i)
    callback.on_fit_end(trainer, module)
    written = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    if rank0:
        assert written == ["by_entropy.png", "diagnostics.jsonl", "over_steps.png", "points.npz",
                           "temperature_vs_required.png"]
    else:
        assert written == [] and callback.plot_paths == [] and callback.records == []


def test_reservoir_keeps_a_uniform_sample_of_aligned_rows():
    reservoir = _Reservoir(capacity=500, seed=0)
    for start in range(0, 10000, 250):  # 40 batches, 20x the capacity
        x = np.arange(start, start + 250, dtype=np.float32)
        reservoir.add({"x": x, "twice": 2 * x})
    points = reservoir.arrays()
    assert len(points["x"]) == 500 and len(np.unique(points["x"])) == 500
    assert np.array_equal(points["twice"], 2 * points["x"])
    # uniform over the stream: each quarter holds about a quarter of the sample (binomial sd ~ 10)
    quarters = np.bincount((points["x"] // 2500).astype(int), minlength=4)
    assert quarters.min() > 80 and quarters.max() < 170


def test_scalars_and_bool_tensors_get_statistics_without_breaking_the_points(tmp_path):
    module = FakeAutoDeco()
    callback = EntropyDiagnostics(output_dir=str(tmp_path / "d"), plots=False)
    trainer = _stub_trainer(True)
    callback.setup(trainer, module, "fit")
    for i in range(2):
        out = _outputs(i)
        t, t_req = out["diagnostics"]["temperature"], out["diagnostics"]["required_temperature"]
        out["diagnostics"].update(min_p_ok=t >= t_req, batch_loss=torch.tensor(0.5 + i))
        callback.on_train_batch_end(trainer, module, out, None, i)
        line = callback.records[-1]
        assert line["stats"]["min_p_ok"]["mean"] == pytest.approx(float((t >= t_req).float().mean()))
        assert line["stats"]["batch_loss"] == {"n": 1, "mean": 0.5 + i, "std": 0.0, "min": 0.5 + i,
                                               "max": 0.5 + i, "q05": 0.5 + i, "q50": 0.5 + i, "q95": 0.5 + i}
        assert line["tokens"] == 50
    callback.on_fit_end(trainer, module)
    points = np.load(tmp_path / "d" / "points.npz")
    assert len(points["temperature"]) == 100 and "batch_loss" not in points
    assert np.array_equal(points["min_p_ok"] == 1, points["temperature"] >= points["required_temperature"])


class FakeGenerator(L.LightningModule):
    """A generation method: test_step returns one trace per sample; it summarizes and draws them."""

    def __init__(self, summary: bool = True):
        super().__init__()
        self.collect_diagnostics = False
        self.layer = torch.nn.Linear(1, 1)
        if not summary:
            self.diagnostics_summary = None

    def test_step(self, batch, batch_idx):
        if not self.collect_diagnostics:
            return None
        return {"traces": [{"setting": "plain", "problem": batch_idx, "entropy": batch.tolist()}]}

    def diagnostics_summary(self, stage, traces):
        return {"stage": stage, "samples": len(traces), "tokens": sum(len(t["entropy"]) for t in traces)}

    def diagnostics_figures(self, stage, traces=None, **_):
        from testtime.io import new_figure

        fig, (ax,) = new_figure()
        for t in traces:
            ax.plot(t["entropy"])
        return {f"{stage}_entropy.png": fig}


@pytest.mark.parametrize("summary", [True, False])
def test_traces_are_written_with_the_modules_summary_and_figures(tmp_path, summary):
    module = FakeGenerator(summary)
    callback = EntropyDiagnostics(output_dir=str(tmp_path / "d"))
    data = [torch.tensor([0.5, 1.5, 2.0]), torch.tensor([1.0, 0.25])]
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(module, torch.utils.data.DataLoader(data, batch_size=None))
    traces = read_lines(tmp_path / "d" / "test_traces.jsonl")
    assert traces == [{"setting": "plain", "problem": i, "entropy": d.tolist()} for i, d in enumerate(data)]
    written = sorted(p.name for p in (tmp_path / "d").iterdir())
    if summary:
        assert written == ["test_entropy.png", "test_trace_summary.json", "test_traces.jsonl"]
        assert json.loads((tmp_path / "d" / "test_trace_summary.json").read_text()) == {
            "stage": "test", "samples": 2, "tokens": 5}
    else:
        assert written == ["test_entropy.png", "test_traces.jsonl"]
    assert_png(tmp_path / "d" / "test_entropy.png")
    assert module.collect_diagnostics is False  # restored after test

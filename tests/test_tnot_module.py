"""TNOTModule: the plain model beside TNOT/SLOT over a sweep, traces for EntropyDiagnostics, the CLI."""

import json
import statistics

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from datamodules.prompts import PromptDataModule
from datamodules.tasks import TaskDataModule
from lightning_modules.tnot import TNOTModule
from testtime.evaluation import extract_answer, generate_completions, is_correct
from testtime.io import save_figure
from testtime.tnot import TNOTConfigError
from testtime.tnot_plots import entropy_over_positions, sweep_figure, trace_summary
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


def _completions(module, batch, setting, seed=0, max_new_tokens=6):
    return generate_completions(module.model, module.tokenizer, batch["prompt_ids"], batch["prompt_mask"], setting,
                                max_new_tokens=max_new_tokens, seed=seed)


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
    assert (cfg.mode, cfg.times, cfg.entropy_control, cfg.max_retries, cfg.entropy_weight) == \
        ("srgen", 1, True, 1, 0.05)


def test_same_seeds_for_plain_and_tnot(tiny_model_dir, batch):
    # with no optimization step, TNOT must sample exactly what the plain model samples on the same seed
    module = _module(tiny_model_dir, modes=["slot"], times=0, eval_num_samples=2)
    plain, slot = module.decoding_settings()
    assert _completions(module, batch, plain, seed=3) == _completions(module, batch, slot, seed=3)
    assert _completions(module, batch, plain, seed=3) != _completions(module, batch, plain, seed=4)
    module.collect_diagnostics = True  # the recording path (TNOT generate with hooks) samples the same too
    assert _completions(module, batch, plain, seed=3) == _completions(module, batch, slot, seed=3)


def test_early_stopping_batches_are_independent(tiny_model_dir, batch):
    # max_retries 0: a forced EOS ends the sample, and the next batch is a new problem (not the
    # caller's retry of the last one, as a generate while model.delta is set would be)
    module = _module(tiny_model_dir, modes=["srgen"], times=1, max_retries=0, temperature=0.0)
    srgen = module.decoding_settings()[1]
    first = _completions(module, batch, srgen)
    assert module.model.stop_positions == [[0]] * 4 and module.model.retries == [0] * 4
    assert _completions(module, batch, srgen) == first and module.model.stop_positions == [[0]] * 4


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


def _traces():
    return [
        {"setting": "plain", "problem": 0, "draw": 0, "entropy": [1.0, 2.0, 3.0], "entropy_original": [1.0, 2.0, 3.0],
         "threshold": [None] * 3, "stop_positions": [], "stop_entropies": [], "retries": 0},
        {"setting": "srgen_t1_lr0.1", "problem": 0, "draw": 0, "entropy": [2.0, 4.0], "entropy_original": [2.5, 4.0],
         "threshold": [3.0, 3.5], "stop_positions": [1], "stop_entropies": [5.0], "retries": 1},
        {"setting": "srgen_t1_lr0.1", "problem": 1, "draw": 0, "entropy": [1.0, 1.0, 1.0, 1.0],
         "entropy_original": [1.0] * 4, "threshold": [3.0] * 4, "stop_positions": [], "stop_entropies": [],
         "retries": 0},
    ]


def test_trace_summary_and_figures_show_the_traces():
    traces = _traces()
    summary = trace_summary(traces)
    srgen = summary["srgen_t1_lr0.1"]
    values = [2.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    assert (srgen["samples"], srgen["tokens"], srgen["stopped_frac"], srgen["retries_mean"], srgen["retries_max"]) == \
        (2, 6, 0.5, 0.5, 1)
    assert srgen["entropy"]["mean"] == pytest.approx(statistics.mean(values))
    assert srgen["entropy"]["std"] == pytest.approx(statistics.pstdev(values))
    assert (srgen["entropy"]["min"], srgen["entropy"]["max"]) == (1.0, 4.0)
    assert srgen["entropy_original_mean"] == pytest.approx(statistics.mean([2.5, 4.0, 1.0, 1.0, 1.0, 1.0]))
    assert srgen["stop_position"]["mean"] == 1.0 and summary["plain"]["stop_position"]["n"] == 0

    fig = entropy_over_positions(traces)
    plain_ax, srgen_ax = fig.axes
    assert srgen_ax.get_title() == "srgen_t1_lr0.1: 2 samples, 1 stopped"
    lines = {tuple(line.get_ydata()): line for line in srgen_ax.get_lines() if len(line.get_ydata())}
    assert (2.0, 4.0) in lines and (3.0, 3.5) in lines  # the stopped sample (first) and its threshold
    assert lines[(3.0, 3.5)].get_linestyle() == "--"
    stops = [line for line in srgen_ax.get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert [(list(s.get_xdata()), list(s.get_ydata())) for s in stops] == [([1], [5.0])]  # at the stop's entropy
    mean = next(line for line in srgen_ax.get_lines() if line.get_label() == "mean entropy")
    assert list(mean.get_ydata()) == [1.5, 2.5, 1.0, 1.0]

    results = {"plain": 0.5, "slot_t1_lr0.1": 0.25, "slot_t3_lr0.1": 0.75, "srgen_t1_lr0.1": 1.0}
    sweep = [("slot", 1, 0.1), ("slot", 3, 0.1), ("srgen", 1, 0.1)]
    (ax,) = sweep_figure(results, sweep, n=4).axes
    drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert drawn["slot lr=0.1"] == ([1, 3], [0.25, 0.75]) and drawn["srgen lr=0.1"] == ([1], [1.0])
    assert drawn["plain 0.500"][1] == [0.5, 0.5]
    band = ax.patches[0].get_bbox()  # plain ± one binomial standard error over 4 problems
    assert (band.y0, band.y1) == pytest.approx((0.5 - 0.25, 0.5 + 0.25))


def test_fit_is_refused_with_a_clear_message(run_cli):
    out = run_cli("fit", "--config", TINY, "--trainer.fast_dev_run=true")
    assert out.returncode == 1 and "TNOTModule has nothing to train" in out.stderr
    assert "Traceback" not in out.stderr  # the message alone (TESTTIME_TRACEBACK=1 shows where)


def test_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        TNOTModule(temperature=-1.0)
    with pytest.raises(ValueError, match="modes"):
        TNOTModule(modes=[])
    # TNOT's own settings fail when the module is built, naming the field
    with pytest.raises(TNOTConfigError, match="^entropy_weight must be in"):
        TNOTModule(entropy_weight=2.0)
    with pytest.raises(TNOTConfigError, match="^times must be >= 0, got -1"):
        TNOTModule(sweep_times=[1, -1])


def _same_png(path, fig, tmp_path):
    """The PNG written equals the figure drawn again from the written data (pixel for pixel)."""
    again = save_figure(fig, tmp_path / f"again-{path.name}")
    return np.array_equal(imread(path), imread(again))


def test_cli_test_writes_table_sweep_plot_and_traces(run_cli, tmp_path):
    out = run_cli("test", "--config", TINY, "--model.init_args.sweep_times=[1, 2]", "--model.init_args.sweep_lrs=[0.1]",
                  "--data.init_args.n_test=4", "--data.init_args.eval_batch_size=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "TNOT evaluation, 4 test problems, T=0.6, k=2" in out.stdout + out.stderr
    log_dir = tmp_path / "runs/tnot-tiny/lightning_logs/version_0"
    written = json.loads((log_dir / "test_results.json").read_text())
    results = written["results"]
    assert set(results) == {"plain", "slot_t1_lr0.1", "slot_t2_lr0.1", "srgen_t1_lr0.1", "srgen_t2_lr0.1"}
    assert written["n_problems"] == 4 and all(v * 8 == int(v * 8) for v in results.values())  # 4 problems x k=2
    table = (log_dir / "test_results.md").read_text()
    assert all(f"| {name} | {value:.3f} |" in table for name, value in results.items())
    sweep = [(m, t, 0.1) for m in ("slot", "srgen") for t in (1, 2)]
    assert _same_png(log_dir / "test_sweep.png", sweep_figure(results, sweep, 4), tmp_path)
    diagnostics = log_dir / "diagnostics"
    traces = [json.loads(line) for line in (diagnostics / "test_traces.jsonl").read_text().splitlines()]
    assert sorted((t["setting"], t["problem"], t["draw"]) for t in traces) == \
        sorted((s, p, d) for s in results for p in range(4) for d in range(2))
    summary = json.loads((diagnostics / "test_trace_summary.json").read_text())
    assert summary == json.loads(json.dumps(trace_summary(traces)))
    assert summary["plain"]["stopped_frac"] == 0.0 and summary["srgen_t1_lr0.1"]["stopped_frac"] == 1.0
    assert summary["srgen_t2_lr0.1"]["retries_max"] == 2  # tiny.yaml: max_retries 2
    assert _same_png(diagnostics / "test_entropy_over_positions.png", entropy_over_positions(traces), tmp_path)


def test_cli_predict_writes_completions_with_retries(run_cli, tmp_path):
    out = run_cli("predict", "--config", TINY, "--data.init_args.n_test=3", "--model.init_args.modes=[srgen]",
                  "--model.init_args.sweep_times=[]", "--model.init_args.times=1")
    assert out.returncode == 0, out.stderr[-3000:]
    path = tmp_path / "runs/tnot-tiny/lightning_logs/version_0/predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]
    assert all(r["setting"] == "srgen_t1_lr0.01" and r["completion"] and r["answer"] for r in rows)
    assert all(r["retries"] == 2 and r["stop_positions"] == [0, 1, 2] for r in rows)  # tiny.yaml: max_retries 2


def test_cli_test_under_ddp_scores_every_problem_once(run_cli, tmp_path):
    # 8 prompts of one length (no padding), sampled here in one process as the 2 ranks sample them:
    # DistributedSampler gives rank r the problems r, r+2, ... in batches of 2, and batch b of rank r
    # is seeded eval_seed + b * world_size + r. Each answer comes from one setting's completion, so
    # every accuracy is known and > 0: a problem scored twice, or by no rank, would change it.
    texts = [f"What is {i}+{i + 1}?" for i in range(8)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    data = PromptDataModule("tiny-random-llama", str(prompts), batch_size=8)
    data.setup("predict")
    full = next(iter(data.predict_dataloader()))
    assert full["prompt_mask"].all()
    module = _module("tiny-random-llama", modes=["slot", "srgen"], sweep_times=[1], sweep_lrs=[0.1], max_retries=2,
                     eval_num_samples=2, eval_max_new_tokens=8)
    completions = {s.name: [None] * 8 for s in module.decoding_settings()}
    for rank in range(2):
        for b in range(2):
            rows = [rank + 2 * (2 * b), rank + 2 * (2 * b + 1)]
            part = {"prompt_ids": full["prompt_ids"][rows], "prompt_mask": full["prompt_mask"][rows]}
            for setting in module.decoding_settings():
                for row, done in zip(rows, _completions(module, part, setting, seed=b * 2 + rank, max_new_tokens=8)):
                    completions[setting.name][row] = done
    names = list(completions)
    answers = []
    for i in range(8):  # the first setting, in turn from i, whose completion holds a number
        found = (extract_answer(completions[names[(i + j) % 3]][i][d]) for j in range(3) for d in range(2))
        answers.append(next((a for a in found if a is not None), "424242"))
    expected = {name: sum(sum(is_correct(c, a) for c in done[i]) / 2 for i, a in enumerate(answers)) / 8
                for name, done in completions.items()}
    assert all(v > 0 for v in expected.values()), expected
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t, "answer": a}) + "\n"
                               for i, (t, a) in enumerate(zip(texts, answers))))
    out = run_cli("test", "--config", TINY, "--trainer.devices=2", "--trainer.strategy=ddp",
                  "--data=datamodules.prompts.PromptDataModule", f"--data.path={prompts}", "--data.batch_size=2",
                  "--model.init_args.sweep_times=[1]", "--model.init_args.sweep_lrs=[0.1]", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    written = json.loads((tmp_path / "runs/tnot-tiny/lightning_logs/version_0/test_results.json").read_text())
    assert written["n_problems"] == 8  # 4 per rank, none twice
    assert written["results"] == pytest.approx(expected)

"""The CLI as a user runs it: help, config printing, every tiny recipe, errors, export."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from testtime.loading import resolve
from tests.conftest import ROOT

TINY_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/tiny.yaml"))


def test_help_describes_the_project_and_lists_every_subcommand(run_cli):
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.lstrip().startswith("usage:") and "testtime: train and evaluate test-time adaptation" in out.stdout
    assert "Lightning Trainer command line tool" not in out.stdout
    listed = re.search(r"\{([a-z,]+)\}", out.stdout).group(1).split(",")
    assert listed == ["fit", "validate", "test", "predict", "export"]


def test_print_config_links_model_name_into_data(run_cli):
    out = run_cli("fit", "--config", str(ROOT / "configs/sft/tiny.yaml"),
                  "--model.init_args.model_name_or_path=tiny-random-gpt2", "--print_config")
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    assert config["model"]["init_args"]["model_name_or_path"] == "tiny-random-gpt2"
    assert "model_name_or_path" not in config["data"]["init_args"]  # linked, written once


def test_link_reaches_the_datamodule():
    from cli import TesttimeCLI, Trainer
    import lightning as L

    cli = TesttimeCLI(L.LightningModule, None, subclass_mode_model=True, subclass_mode_data=True,
                      trainer_class=Trainer, run=False,
                      args=["--config", str(ROOT / "configs/sft/tiny.yaml"),
                            "--model.init_args.model_name_or_path=tiny-random-opt"])
    assert cli.datamodule.hparams.get("model_name_or_path", getattr(cli.datamodule, "model_name_or_path", None)) \
        == "tiny-random-opt"


EVALUATION_ONLY = {"configs/tnot/tiny.yaml"}  # methods with nothing to train run `test`


@pytest.mark.parametrize("config", TINY_CONFIGS)
def test_tiny_recipe_fast_dev_run(run_cli, config, tmp_path):
    subcommand = "test" if config in EVALUATION_ONLY else "fit"
    out = run_cli(subcommand, "--config", str(ROOT / config), "--trainer.fast_dev_run=true",
                  f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    stage = "test" if subcommand == "test" else "val"
    # the run ends with its table on the console and the same numbers in <stage>_results.json
    saved = json.loads(next(tmp_path.rglob(f"{stage}_results.json")).read_text())
    assert saved["results"], saved
    digits = 4 if stage == "val" else 3  # the metrics table (val) and the accuracy table (test)
    for name, value in saved["results"].items():
        assert f"| {name} | {value:.{digits}f} |" in printed, (name, printed[-2000:])
    # what every run printed before, although nothing is wrong
    for noise in ("module(s) in eval mode", "💡 Tip", "LeafSpec", "Traceback", "Warning"):
        assert noise not in printed, noise


@pytest.mark.parametrize(
    "args, named",
    [
        (["--model=lightning_modules.causal_lm.NoSuchModule"], "NoSuchModule"),
        (["--model.init_args.learning_rate=fast"], "learning_rate"),
        (["--trainer.callbacks+=lightning.pytorch.callbacks.EarlyStopping"], "monitor"),
    ],
)
def test_bad_config_exits_with_a_message_not_a_traceback(run_cli, args, named):
    out = run_cli("fit", "--config", str(ROOT / "configs/sft/tiny.yaml"), *args)
    assert out.returncode != 0
    assert named in out.stderr
    assert "Traceback" not in out.stderr


def test_fit_then_export_reloads_identical_weights(run_cli, tmp_path):
    out = run_cli("fit", "--config", str(ROOT / "configs/sft/tiny.yaml"), "--trainer.max_steps=5",
                  f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false")
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))
    export_dir = tmp_path / "export"
    out = run_cli("export", "--config", str(ROOT / "configs/sft/tiny.yaml"), f"--ckpt_path={ckpt}",
                  f"--output_dir={export_dir}")
    assert out.returncode == 0, out.stderr[-3000:]

    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    exported = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32)
    for name, value in exported.state_dict().items():
        assert torch.equal(value, state[f"model.{name}"]), name
    initial = AutoModelForCausalLM.from_pretrained(resolve("tiny-random-llama"), dtype=torch.float32)
    changed = [n for n, v in initial.state_dict().items() if not torch.equal(v, exported.state_dict()[n])]
    assert changed, "fit did not change any weight: the export test would prove nothing"

    # the same checkpoint given to a method that trains heads: refused naming what is missing, nothing written
    out = run_cli("export", "--config", str(ROOT / "configs/autodeco/tiny.yaml"), f"--ckpt_path={ckpt}",
                  f"--output_dir={tmp_path / 'heads'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "does not fit AutoDecoModule" in out.stderr and "model.temp_head.mlp.0.weight" in out.stderr
    assert not (tmp_path / "heads").exists()


@pytest.mark.parametrize(
    "args, env, named",
    [
        (["fit", "--model.init_args.model_name_or_path=./no/such/model"], {}, "model path './no/such/model' does not exist"),
        (["fit", "--model.init_args.model_name_or_path=someone/unknown-model"], {"HF_HUB_OFFLINE": "1"},
         "the Hugging Face Hub is unreachable (HF_HUB_OFFLINE is set)"),
        (["test", "--ckpt_path=nothing.ckpt"], {}, "nothing.ckpt"),
        (["export", "--ckpt_path=nothing.ckpt", "--output_dir=out"], {}, "checkpoint 'nothing.ckpt' does not exist"),
    ],
)
def test_runtime_errors_end_with_the_message_alone(run_cli, args, env, named):
    out = run_cli(args[0], "--config", str(ROOT / "configs/sft/tiny.yaml"), *args[1:], env=env)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-2:]  # the message ends the output, nothing after it
    assert last[0].startswith("error: ") and named in last[0] and "TESTTIME_TRACEBACK=1" in last[1], out.stderr
    assert "Traceback" not in out.stderr


def test_a_setting_a_module_refuses_ends_with_its_message_alone(run_cli):
    out = run_cli("fit", "--config", str(ROOT / "configs/head_gates/tiny.yaml"), "--model.init_args.target_sparsity=1.0")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "Namespace(" not in out.stderr
    assert out.stderr.strip().splitlines()[-2] == (
        "error: lightning_modules.head_gates.HeadGateModule: target_sparsity must be in [0, 1) or null, got 1.0")


def test_traceback_on_request(run_cli):
    out = run_cli("fit", "--config", str(ROOT / "configs/sft/tiny.yaml"),
                  "--model.init_args.model_name_or_path=./no/such/model", env={"TESTTIME_TRACEBACK": "1"})
    assert out.returncode != 0 and "Traceback" in out.stderr and "ModelNotFoundError" in out.stderr


def test_console_script_runs_the_same_cli(tmp_path):
    script = Path(sys.executable).with_name("testtime")  # installed by `pip install -e .`
    assert script.is_file(), "the `testtime` console script is not installed: pip install -e ."
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "testtime: train and evaluate test-time adaptation" in " ".join(out.stdout.split())
    assert "export" in out.stdout and "fit" in out.stdout


# recipes that complete another (`--config base --config overlay`), with their base
OVERLAYS = {
    "configs/autodeco/large_data.yaml": "configs/autodeco/smollm2_large.yaml",
    "configs/ttt/baseline_full.yaml": "configs/ttt/small.yaml",
    "configs/ttt/baseline_swa.yaml": "configs/ttt/small.yaml",
    "configs/ttt/chat.yaml": "configs/ttt/small.yaml",
    "configs/ttt/memory_small.yaml": "configs/ttt/small.yaml",
    "configs/ttt/memory_tiny.yaml": "configs/ttt/tiny.yaml",
}
RECIPES = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/*.yaml") if p.parent.name != "trainer")
TRAINERS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/trainer/*.yaml"))


def test_every_recipe_parses_with_every_trainer_file(capsys):
    """Each recipe (an overlay after its base) with each trainer file, as `--print_config` parses
    them: a setting a class does not take (an FSDP option Lightning's signature lacks, say) fails
    here rather than on the GPU node."""
    import cli

    failures = []
    for recipe in RECIPES:
        model = (yaml.safe_load((ROOT / recipe).read_text()) or {}).get("model", {})
        if "class_path" not in model:
            assert recipe in OVERLAYS, f"{recipe} names no model: list the recipe it completes in OVERLAYS"
        configs = [OVERLAYS[recipe], recipe] if recipe in OVERLAYS else [recipe]
        for trainer in TRAINERS:
            args = ["fit"] + [a for c in configs for a in ("--config", str(ROOT / c))] + ["--config", str(ROOT / trainer),
                                                                                          "--print_config"]
            with pytest.raises(SystemExit) as exit_:
                cli.main(args)
            printed = capsys.readouterr()
            if exit_.value.code != 0:
                failures.append(f"{' + '.join(configs)} + {trainer}: {printed.err.strip().splitlines()[-3:]}")
            else:
                assert yaml.safe_load(printed.out)["trainer"] is not None
    assert not failures, "\n".join(failures)

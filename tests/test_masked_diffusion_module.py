"""MaskedDiffusionModule and DiffusionTaskDataModule: the LLaDA SFT layout, the loss the module
trains with, validation accuracy against the samplers' own output, export, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from transformers import AutoModelForMaskedLM

import testtime.diffusion  # noqa: F401 (registers the model with the Auto classes)
from datamodules.diffusion import DiffusionTaskDataModule
from datamodules.tasks import TaskDataModule
from lightning_modules.masked_diffusion import MaskedDiffusionModule
from testtime.diffusion import diffusion_loss, generate_random_remasking, generate_with_tta_uncertainty
from testtime.errors import CheckpointError, DataError, UsageError
from testtime.evaluation import extract_answer, is_correct
from testtime.lm import IGNORE_INDEX, cut_at_eos
from tests.conftest import ROOT

TOKENIZER = "tiny-random-llama"  # its character tokenizer; the diffusion LM is built new
GEN = 32


def make_data(**overrides) -> DiffusionTaskDataModule:
    kwargs = dict(gen_length=GEN, n_train=16, n_val=8, n_test=4, batch_size=8, eval_batch_size=4)
    data = DiffusionTaskDataModule(TOKENIZER, **{**kwargs, **overrides})
    data.setup("fit")
    return data


def make_module(**overrides) -> MaskedDiffusionModule:
    kwargs = dict(model_name_or_path=TOKENIZER, preset="tiny", gen_length=GEN, steps=8, samplers=["llada"], tta_ks=[3],
                  warmup_steps=0)
    module = MaskedDiffusionModule(**{**kwargs, **overrides})
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def data():
    return make_data()


def test_answers_are_padded_to_gen_length_with_labelled_eos_after_a_left_padded_prompt(data):
    tok = data.tokenizer
    batch = next(iter(data.val_dataloader()))
    problems = data.problems["validation"][:4]
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt_len = ids.shape[1] - GEN
    assert torch.equal(batch["prompt_ids"], ids[:, :prompt_len])
    assert torch.equal(batch["prompt_mask"], mask[:, :prompt_len])
    # the prompt is what the shared evaluation decodes from: TaskDataModule's left-padded prompts
    plain = TaskDataModule(TOKENIZER, n_train=16, n_val=8, n_test=4, difficulty=1, eval_batch_size=4)
    reference = next(iter(plain.val_dataloader()))
    assert torch.equal(reference["prompt_ids"], batch["prompt_ids"]) and reference["answers"] == batch["answers"]
    assert (labels[:, :prompt_len] == IGNORE_INDEX).all() and mask[:, prompt_len:].all()
    assert torch.equal(labels[:, prompt_len:], ids[:, prompt_len:])  # every answer position carries the loss
    for row, problem in zip(ids[:, prompt_len:].tolist(), problems):
        solution = tok(problem.solution, add_special_tokens=False)["input_ids"]
        assert row[:len(solution)] == solution
        assert row[len(solution):] == [tok.eos_token_id] * (GEN - len(solution))  # EOS to the end, at least one
        assert tok.decode(cut_at_eos(row, [tok.eos_token_id])) == problem.solution
    # train batches: the same layout
    batch = data.train_dataloader().collate_fn(data.dataset("train")[:3])
    prompt_len = batch["input_ids"].shape[1] - GEN
    for row, labels, problem in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), data.problems["train"][:3]):
        assert tok.decode(cut_at_eos(row[prompt_len:], [tok.eos_token_id])) == problem.solution
        assert labels[prompt_len:] == row[prompt_len:] and set(labels[:prompt_len]) == {IGNORE_INDEX}


def test_gen_length_too_short_for_an_answer_is_an_error_naming_it():
    data = DiffusionTaskDataModule(TOKENIZER, gen_length=12, n_train=4, n_val=2, n_test=2)
    with pytest.raises(DataError, match=r"gen_length=12 is too short for the answer of 'What is"):
        data.setup("fit")


def test_training_step_loss_is_diffusion_loss_with_the_same_random_numbers(data):
    module = make_module()
    batch = data.train_dataloader().collate_fn(data.dataset("train")[:8])
    module.model.train()  # dropout on: its masks must come from the same stream too
    torch.manual_seed(3)
    loss = module.training_step(batch, 0)
    torch.manual_seed(3)
    expected, _ = diffusion_loss(module.model, batch["input_ids"], module.tokenizer.mask_token_id,
                                 labels=batch["labels"], attention_mask=batch["attention_mask"])
    assert torch.equal(loss, expected)
    torch.manual_seed(4)
    assert not torch.equal(module.training_step(batch, 0), loss)  # other numbers, another loss: not a constant

    pretrain = make_module(objective="pretrain")
    torch.manual_seed(3)
    loss = pretrain.training_step(batch, 0)
    torch.manual_seed(3)
    expected, _ = diffusion_loss(pretrain.model, batch["input_ids"], pretrain.tokenizer.mask_token_id,
                                 attention_mask=batch["attention_mask"])  # no labels: every real token maskable
    assert torch.equal(loss, expected)


def test_a_few_steps_on_a_repeated_batch_lower_the_loss(data):
    module = make_module(learning_rate=1e-2)
    batch = data.train_dataloader().collate_fn(data.dataset("train")[:8])
    optimizer = module.configure_optimizers()["optimizer"]

    def held_loss():  # the same masks every time, dropout off
        module.model.eval()
        with torch.no_grad():
            return module.loss(batch, torch.Generator().manual_seed(0))[0].item()

    before = held_loss()
    module.model.train()
    torch.manual_seed(0)
    for step in range(25):
        optimizer.zero_grad()
        module.training_step(batch, step).backward()
        optimizer.step()
    assert held_loss() < 0.7 * before


def test_validation_accuracy_is_is_correct_over_each_samplers_own_output(tmp_path):
    data = make_data()
    module = make_module(samplers=["llada", "random"], tta_ks=[3])
    model, tok = module.model.eval(), module.tokenizer
    hp = module.hparams
    samplers = {
        "llada": lambda ids, mask: testtime.diffusion.generate(model, ids, 8, GEN, GEN, attention_mask=mask),
        "random": lambda ids, mask: generate_random_remasking(model, ids, 8, GEN, GEN, attention_mask=mask),
        "tta_k3": lambda ids, mask: generate_with_tta_uncertainty(model, ids, 8, GEN, tta_k=3, block_length=GEN,
                                                                  attention_mask=mask)[0],
    }
    texts = {name: [] for name in samplers}
    for batch_idx, batch in enumerate(data.val_dataloader()):
        for name, sample in samplers.items():
            torch.manual_seed(hp.eval_seed + batch_idx)  # the evaluation's seed for this batch
            out = sample(batch["prompt_ids"], batch["prompt_mask"])[:, batch["prompt_ids"].shape[1]:]
            texts[name] += [tok.decode(cut_at_eos(r, [tok.eos_token_id]), skip_special_tokens=True).strip()
                            for r in out.tolist()]
    # answers a random model gets right: the number the baseline wrote, on every other problem
    examples = data.dataset("validation")
    for i, example in enumerate(examples):
        example["answer"] = (extract_answer(texts["llada"][i]) or "0") if i % 2 == 0 else "-1"
    expected = {name: sum(is_correct(t, e["answer"]) for t, e in zip(texts[name], examples)) / len(examples)
                for name in samplers}
    assert 0 < expected["llada"] < 1 and texts["random"] != texts["llada"] != texts["tta_k3"]

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    for name, value in expected.items():
        assert metrics[f"val/acc_{name}"] == pytest.approx(value, abs=1e-6), name
    assert metrics["val/nfe_llada"] == 8 and metrics["val/nfe_tta_k3"] == 24
    saved = json.loads((tmp_path / "val_results.json").read_text())
    assert saved["results"] == pytest.approx(expected) and saved["n_problems"] == len(examples)
    assert (tmp_path / "val_accuracy_vs_nfe.png").is_file() and (tmp_path / "val_tta_uncertainty.png").is_file()

    # predict decodes the test problems with the method's own setting, TTA at the first K
    predicted = [row for rows in trainer.predict(module, datamodule=data) for row in rows]
    expected_texts = []
    for batch_idx, batch in enumerate(data.predict_dataloader()):
        torch.manual_seed(hp.eval_seed + batch_idx)
        out = samplers["tta_k3"](batch["prompt_ids"], batch["prompt_mask"])[:, batch["prompt_ids"].shape[1]:]
        expected_texts += [tok.decode(cut_at_eos(r, [tok.eos_token_id]), skip_special_tokens=True).strip()
                           for r in out.tolist()]
    assert [row["completion"] for row in predicted] == expected_texts
    assert {row["setting"] for row in predicted} == {"tta_k3"}

    metrics = trainer.test(module, datamodule=data, verbose=False)[0]
    saved = json.loads((tmp_path / "test_results.json").read_text())
    assert saved["n_problems"] == 4 and set(saved["results"]) == set(samplers) and "test/loss" in metrics
    assert all(saved["results"][name] == metrics[f"test/acc_{name}"] for name in samplers)


def test_export_reloads_to_identical_logits_and_continues_from_the_folder(data, tmp_path):
    module = make_module(init_seed=7)
    module.export(str(tmp_path / "export"))
    batch = next(iter(data.val_dataloader()))
    module.model.eval()
    with torch.no_grad():
        logits = module.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "export").eval()
        assert torch.equal(reloaded(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, logits)
        again = make_module(model_name_or_path=str(tmp_path / "export"), init_seed=0)  # weights from the folder
        again.model.eval()
        assert torch.equal(again.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits, logits)
    assert again.tokenizer.mask_token_id == module.tokenizer.mask_token_id


@pytest.mark.parametrize("kwargs, message", [
    (dict(samplers=["greedy"]), "samplers: unknown sampler 'greedy'"),
    (dict(tta_ks=[0]), "tta_ks: each K must be a positive integer"),
    (dict(sampler_kwargs={"tta": {"tta_k": 2}}), "sampler_kwargs.tta: 'tta_k' is not an argument"),
    (dict(sampler_kwargs={"beam": {}}), "sampler_kwargs: unknown sampler 'beam'"),
    (dict(gen_length=32, steps=7, block_length=8), "steps=7 must be a multiple of the number of blocks"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskedDiffusionModule(TOKENIZER, preset="tiny", **kwargs)


def test_a_checkpoint_of_another_size_is_an_error_naming_the_settings():
    small = make_module(model_overrides={"hidden_size": 64})
    with pytest.raises(CheckpointError, match=r"another size .*model_overrides=\{\}"):
        make_module().load_state_dict(small.state_dict())


def test_a_llada_folder_is_refused_not_replaced_by_a_new_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llada", "mask_token_id": 126336}))
    module = MaskedDiffusionModule(str(tmp_path), preset="tiny")
    with pytest.raises(UsageError, match="is a LLaDA checkpoint"):
        module.configure_model()


def test_sft_refuses_data_that_is_not_padded_to_gen_length(data):
    module = MaskedDiffusionModule(TOKENIZER, preset="tiny", gen_length=48)
    module._trainer = SimpleNamespace(datamodule=data)
    with pytest.raises(UsageError, match="pads answers to gen_length=32 but the model generates gen_length=48"):
        module.on_fit_start()
    module._trainer = SimpleNamespace(datamodule=TaskDataModule(TOKENIZER, n_train=4, n_val=2, n_test=2))
    with pytest.raises(UsageError, match="use datamodules.diffusion.DiffusionTaskDataModule"):
        module.on_fit_start()


def test_cli_fit_validate_export(run_cli, tmp_path):
    config = str(ROOT / "configs/diffusion/tiny.yaml")
    run = tmp_path / "run"
    paths = [f"--trainer.default_root_dir={run}", f"--trainer.logger.init_args.save_dir={run}"]
    out = run_cli("fit", "--config", config, *paths, f"--trainer.callbacks.init_args.dirpath={run}/ckpt",
                  "--trainer.max_steps=5", "--trainer.num_sanity_val_steps=0")  # one validation, at the end
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = run / "ckpt" / "last.ckpt"
    out = run_cli("validate", "--config", config, *paths, f"--ckpt_path={ckpt}",
                  f"--trainer.callbacks.init_args.dirpath={run}/ckpt")
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr
    results_file = sorted(run.rglob("val_results.json"))[-1]  # the validate run's
    saved = json.loads(results_file.read_text())
    for figure in ("val_accuracy_vs_nfe.png", "val_tta_uncertainty.png"):
        assert (results_file.parent / figure).read_bytes()[:4] == b"\x89PNG", figure
    assert set(saved["results"]) == {"llada", "random", "fast_dllm", "remdm", "tta_k3"}
    for name, value in saved["results"].items():
        assert f"| {name} | {saved['nfe'][name]:.1f} | {value:.3f} |" in printed, name
    assert "Traceback" not in printed and "Warning" not in printed

    out = run_cli("export", "--config", config, f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'export'}")
    assert out.returncode == 0, out.stderr[-3000:]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    module = MaskedDiffusionModule(TOKENIZER, preset="tiny")
    module.configure_model()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    assert any(not torch.equal(initial[k], state[k]) for k in state), "fit changed no weight: the test proves nothing"
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.tensor([module.tokenizer.encode("What is 3 + 4?")] * 2)
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, module.model.eval()(ids).logits)
    assert Path(tmp_path / "export" / "tokenizer.json").is_file()

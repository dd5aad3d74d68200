"""TinyLoRAModule: fit trains only the adapter, checkpoints hold it alone and refuse another base,
GRPO's rollout reuse, the TTT-E2E model, the tiny recipe through the CLI for both objectives
(fit, export in PEFT's layout and merged, predict and chat), and GRPO under CPU DDP."""

import json
import logging

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from cli import main as cli_main
from datamodules.tasks import TaskDataModule
from lightning_modules.tinylora import SIGNATURE_KEY, TinyLoRAModule
from testtime.errors import CheckpointError
from testtime.grpo import completion_logprobs
from testtime.loading import load_model_and_tokenizer, resolve
from testtime.tiny import save_tiny_model
from tests.conftest import ROOT

TINY = str(ROOT / "configs/tinylora/tiny.yaml")
# PeftModel.from_pretrained reads a transformers property deprecated in 5.x; nothing these tests can change
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def length_reward(completions, answers, **_):
    """A reward that differs between completions of a random model (the answer check would give 0s)."""
    return [float(len(c)) for c in completions]


def _module(path, **kwargs):
    module = TinyLoRAModule(path, **{"u": 4, "weight_tying": 0.5, "num_generations": 4, "max_completion_length": 6,
                                     "reward_fn": length_reward, "learning_rate": 0.05, "eval_max_new_tokens": 4,
                                     "eval_num_samples": 2, **kwargs})
    module.configure_model()
    return module


def _base_weights(module) -> dict[str, torch.Tensor]:
    """The frozen base's state dict under its own names (PEFT's base_layer wrappers and adapter tensors left out)."""
    state = module.generation_model().state_dict()
    return {k.replace("base_layer.", ""): v for k, v in state.items() if "tinylora_" not in k}


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_fit_changes_only_the_adapter_and_checkpoints_hold_only_it(tiny_model_dir, tmp_path, caplog, objective):
    module = _module(tiny_model_dir, objective=objective)
    initial = load_model_and_tokenizer(tiny_model_dir)[0].state_dict()
    dm = TaskDataModule(tiny_model_dir, n_train=12, n_val=4, n_test=4, difficulty=1, batch_size=4, eval_batch_size=4)
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    with caplog.at_level(logging.INFO):
        trainer.fit(module, dm)
    # 14 modules, weight_tying 0.5: round(14 * 0.5) = 7 vectors of u = 4
    assert module.trainable_parameter_count == 28
    assert "TinyLoRA r=2, u=4, weight_tying=0.5: 7 shared vector(s) over 14 modules: 28 trainable parameters " \
           "(formula: 28)" in caplog.text
    base = _base_weights(module)
    assert base.keys() == initial.keys()
    assert all(torch.equal(base[k], initial[k]) for k in initial), "fit changed the frozen base"
    vectors = module.model.base_model.tinylora_v["default"]
    assert len(vectors) == 7 and any(v.abs().sum() > 0 for v in vectors.values()), "fit did not train the adapter"

    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert set(state) == {f"model.base_model.tinylora_v.default.{g}" for g in range(7)} | {SIGNATURE_KEY}
    assert (tmp_path / "last.ckpt").stat().st_size < 20_000
    fresh = _module(tiny_model_dir, objective=objective)
    fresh.load_state_dict(state)
    ids = torch.tensor([module.tokenizer("What is 1 + 2?")["input_ids"]])
    assert torch.equal(fresh.generation_model()(input_ids=ids).logits, module.generation_model()(input_ids=ids).logits)


def test_a_checkpoint_refuses_another_base_or_method(tiny_model_dir, tmp_path):
    state = _module(tiny_model_dir).state_dict()
    save_tiny_model("llama", tmp_path / "other", seed=1)  # the same architecture, other weights
    with pytest.raises(CheckpointError, match="trained on other frozen factors"):
        _module(str(tmp_path / "other")).load_state_dict(state)
    with pytest.raises(CheckpointError, match="lacks 28 key"):
        _module(tiny_model_dir, peft_method="vera").load_state_dict({})
    lora = _module(tiny_model_dir, peft_method="lora", r=1).state_dict()
    with pytest.raises(CheckpointError, match=f"no '{SIGNATURE_KEY}'"):
        _module(tiny_model_dir).load_state_dict(lora)


def test_grpo_reuses_a_rollout_for_num_iterations_and_clips(tiny_model_dir):
    module = _module(tiny_model_dir, objective="grpo", num_iterations=2, epsilon=0.01, max_completion_length=8)
    dm = TaskDataModule(tiny_model_dir, n_train=8, n_val=0, n_test=0, difficulty=1, batch_size=4)
    batches = iter(dm.train_dataloader())
    optimizer = module.configure_optimizers()["optimizer"]
    torch.manual_seed(0)
    rollouts, clipped = [], []
    for _ in range(3):
        loss, rollout, stats = module._grpo_loss(next(batches) if not rollouts or len(rollouts) % 2 == 0 else None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rollouts.append(rollout)
        clipped.append(stats["clip_fraction"].item())
    assert rollouts[0] is rollouts[1] and rollouts[2] is not rollouts[0]
    assert clipped[1] > 0  # the reused rollout: the ratio moved past 1 +- 0.01 after the first update


def test_grpo_reference_is_the_base_without_adapter(tiny_model_dir):
    module = _module(tiny_model_dir, objective="grpo", beta=0.1)
    with torch.no_grad():
        for vector in module.model.base_model.tinylora_v["default"].values():
            vector.normal_(0, 0.5)  # an adapter that changes the model
    dm = TaskDataModule(tiny_model_dir, n_train=4, n_val=0, n_test=0, difficulty=1, batch_size=4)
    torch.manual_seed(0)
    loss, rollout, stats = module._grpo_loss(next(iter(dm.train_dataloader())))
    base = load_model_and_tokenizer(tiny_model_dir)[0]
    reference = completion_logprobs(base, rollout.input_ids, rollout.attention_mask, rollout.completion_length)
    torch.testing.assert_close(rollout.ref_logps, reference)
    assert not torch.allclose(rollout.old_logps, reference) and stats["kl"] > 0


def test_ttt_model_through_the_module(tokenizer, tmp_path):
    from testtime.ttt import TTTConfig, TTTForCausalLM

    config = TTTConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    TTTForCausalLM(config).save_pretrained(tmp_path / "ttt")
    tokenizer.save_pretrained(tmp_path / "ttt")
    module = _module(str(tmp_path / "ttt"), u=13, weight_tying=1.0)
    module.on_fit_start()
    assert module.trainable_parameter_count == 13
    dm = TaskDataModule(str(tmp_path / "ttt"), n_train=4, n_val=0, n_test=0, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    module._sft_loss(batch).backward()
    (vector,) = [p for p in module.parameters() if p.requires_grad]
    assert vector.grad is not None and vector.grad.abs().sum() > 0


def _logits(model, tokenizer):
    return model(input_ids=torch.tensor([tokenizer("What is 2 + 2? It is")["input_ids"]])).logits


@pytest.mark.parametrize("objective", ["sft", "grpo"])
def test_cli_fit_export_predict(objective, tmp_path, monkeypatch):
    """The CLI (in this process: the same parser and commands, without 8 s of start-up per call)."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    common = ["--config", TINY, f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
              f"--trainer.callbacks.dirpath={root}/checkpoints", f"--model.init_args.objective={objective}",
              "--model.init_args.reward_fn=tests.test_tinylora_module.length_reward"]
    cli_main(["fit", *common, f"--test_after_fit={objective == 'sft'}"])
    saved = json.loads(next(root.rglob("val_results.json")).read_text())
    assert {"val/loss", "val/acc_greedy", "val/acc_sample_T1_p1_k2"} <= set(saved["results"])
    if objective == "sft":
        tested = json.loads(next(root.rglob("test_results.json")).read_text())
        assert set(tested["results"]) == {"greedy", "sample_T1_p1_k2"} and tested["n_problems"] == 8
        assert tested["trainable_parameters"] == 13
    ckpt = root / "checkpoints" / "last.ckpt"
    trained = TinyLoRAModule("tiny-random-llama", u=13, weight_tying=1.0)
    trained.configure_model()
    trained.load_state_dict(torch.load(ckpt, weights_only=False)["state_dict"])
    assert trained.model.base_model.tinylora_v["default"]["0"].abs().sum() > 0
    expected = _logits(trained.generation_model(), trained.tokenizer)

    merged = objective == "grpo"
    cli_main(["export", *common, f"--ckpt_path={ckpt}", f"--output_dir={tmp_path / 'export'}", f"--merged={merged}"])
    base, tokenizer = load_model_and_tokenizer("tiny-random-llama")
    if merged:
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
        torch.testing.assert_close(_logits(exported, tokenizer), expected, rtol=0, atol=1e-5)
    else:
        config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
        assert config["peft_type"] == "TINYLORA" and config["u"] == 13 and config["weight_tying"] == 1.0
        assert config["base_model_name_or_path"] == resolve("tiny-random-llama")
        exported = PeftModel.from_pretrained(base, tmp_path / "export")
        assert torch.equal(_logits(exported, tokenizer), expected)

    if merged:  # chat on a conversation file: one reply per user turn
        conversations = tmp_path / "chat.jsonl"
        conversations.write_text(json.dumps({"dialog": ["Hi", "Hello", "What is 2 + 2?"]}) + "\n")
        data = ["--data=datamodules.dialog.DialogDataModule", f"--data.predict_files=[{conversations}]"]
    else:  # the test problems
        data = []
    cli_main(["predict", *common, f"--ckpt_path={ckpt}", *data, "--trainer.callbacks+=PredictionWriter",
              f"--trainer.callbacks.output_path={tmp_path / 'predictions.jsonl'}"])
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    if merged:
        assert len(rows) == 1 and [t["user"] for t in rows[0]["turns"]] == ["Hi", "What is 2 + 2?"]
    else:
        assert len(rows) == 8 and all(r["setting"] == "greedy" and "completion" in r for r in rows)


def test_grpo_under_cpu_ddp_ends_with_identical_adapters(run_cli, tmp_path):
    probe = tmp_path / "weights"
    out = run_cli(
        "fit", "--config", TINY, "--model.init_args.objective=grpo",
        "--model.init_args.reward_fn=tests.test_tinylora_module.length_reward",
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=3",
        "--trainer.val_check_interval=null", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
        "--trainer.callbacks+=tests.ddp_probe.SaveWeightsPerRank", f"--trainer.callbacks.out_dir={probe}",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    initial, rank0, rank1 = (torch.load(probe / f"{n}.pt") for n in ("initial-rank0", "final-rank0", "final-rank1"))
    key = "model.base_model.tinylora_v.default.0"
    assert rank0.keys() == rank1.keys() == {key, SIGNATURE_KEY}
    assert torch.equal(rank0[key], rank1[key]) and not torch.equal(rank0[key], initial[key])


@pytest.mark.parametrize("recipe", ["smollm2.yaml", "dialog.yaml"])
def test_smollm2_recipes_run_on_the_tiny_model(recipe, tmp_path, monkeypatch):
    """The SmolLM2 recipes parse and run end to end (one batch each, on the tiny model)."""
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(ROOT / "configs/tinylora" / recipe), "--trainer.fast_dev_run=true",
              "--model.init_args.model_name_or_path=tiny-random-llama", "--model.init_args.eval_max_new_tokens=4",
              "--model.init_args.max_completion_length=4", "--data.init_args.n_train=16", "--data.init_args.n_val=4",
              "--data.init_args.n_test=4", f"--trainer.default_root_dir={tmp_path}"])
    results = json.loads(next(tmp_path.rglob("val_results.json")).read_text())["results"]
    assert {"val/loss", "val/acc_greedy", "val/acc_sample_T1_p1_k4"} <= set(results)

"""TTTModule: the outer schedule, loss by position against a hand computation, the memory test's
documents and numbers, and the tiny recipe through the CLI (fit, validate, memory test, export,
predict)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from lightning_modules.ttt import TTTModule
from testtime.lm import IGNORE_INDEX
from testtime.ttt.evaluation import bucket_sums, position_buckets, repeated_passage_documents, token_losses
from tests.conftest import ROOT

TINY = str(ROOT / "configs/ttt/tiny.yaml")
MEMORY = str(ROOT / "configs/ttt/memory_tiny.yaml")


def _module(tiny_model_dir, **kwargs):
    module = TTTModule(model_name_or_path=tiny_model_dir, preset="tiny", window_size=8, chunk_size=4, **kwargs)
    module.configure_model()
    return module


def test_position_buckets_follow_the_chunks_up_to_the_window():
    assert position_buckets(8, 4) == [(0, 4), (4, 8), (8, None)]
    assert position_buckets(8192, 1024) == [(i * 1024, (i + 1) * 1024) for i in range(8)] + [(8192, None)]
    assert position_buckets(512, 32) == [(i * 64, (i + 1) * 64) for i in range(8)] + [(512, None)]  # merged to 8


def test_bucket_losses_equal_the_per_token_cross_entropy_by_hand():
    torch.manual_seed(0)
    logits = torch.randn(2, 10, 7)
    labels = torch.randint(0, 7, (2, 10))
    labels[1, :3] = IGNORE_INDEX
    loss, counted = token_losses(logits, labels)
    sums, counts = bucket_sums(loss, counted, [(0, 4), (4, 8), (8, None)])
    by_hand = {0: [], 1: [], 2: []}
    for b in range(2):
        for t in range(1, 10):  # token t predicted from position t - 1
            if labels[b, t] != IGNORE_INDEX:
                ce = -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]].item()
                by_hand[0 if t < 4 else 1 if t < 8 else 2].append(ce)
    assert counts.tolist() == [len(by_hand[i]) for i in range(3)]
    assert sums.tolist() == pytest.approx([sum(by_hand[i]) for i in range(3)], rel=1e-6)


def test_memory_documents_repeat_the_passage_beyond_the_gap():
    tokens = np.arange(1000) % 97 + 3
    docs = repeated_passage_documents(tokens, num_documents=5, passage_tokens=6, gap_tokens=20, seed=1)
    for doc in docs:
        ids, labels = doc["input_ids"], doc["labels"]
        assert len(ids) == 6 + 20 + 6 and torch.equal(ids[:6], ids[-6:])
        assert (labels[:27] == IGNORE_INDEX).all() and torch.equal(labels[27:], ids[27:])  # second copy, 1st excepted
    again = repeated_passage_documents(tokens, num_documents=5, passage_tokens=6, gap_tokens=20, seed=1)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(docs, again))
    controls = repeated_passage_documents(tokens, num_documents=5, passage_tokens=6, gap_tokens=20, seed=1,
                                          control=True)
    for doc, ctrl in zip(docs, controls):  # same gap, final passage and labels; another first passage
        assert torch.equal(ctrl["input_ids"][6:], doc["input_ids"][6:]) and torch.equal(ctrl["labels"], doc["labels"])
        assert not torch.equal(ctrl["input_ids"][:6], doc["input_ids"][:6])
    with pytest.raises(ValueError, match="needs at least"):
        repeated_passage_documents(tokens[:60], 1, passage_tokens=6, gap_tokens=20)


def test_outer_schedule_warms_up_then_decays_to_the_floor(tiny_model_dir):
    module = _module(tiny_model_dir, learning_rate=1e-2, min_learning_rate=1e-4, warmup_steps=4, weight_decay=0.1)
    module.trainer = type("T", (), {"max_steps": 20})()  # what configure_optimizers reads
    setup = module.configure_optimizers()
    optimizer, schedule = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(21):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    expected = [1e-2 * (s + 1) / 4 for s in range(4)]
    expected += [1e-4 + (1e-2 - 1e-4) * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(4, 21)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    (group,) = optimizer.param_groups  # the official code decays every parameter, norms included
    assert group["weight_decay"] == 0.1
    assert {id(p) for p in group["params"]} == {id(p) for p in module.model.parameters()}
    norm = module.model.model.norm.weight
    with torch.no_grad():
        norm.fill_(1.0)
    norm.grad = torch.zeros_like(norm)
    before = optimizer.param_groups[0]["lr"]
    optimizer.step()  # zero gradient: AdamW moves the weight by the decay alone
    assert norm.detach() == pytest.approx(torch.full_like(norm, 1 - before * 0.1), rel=1e-6)
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def memory_batch() -> dict:
    """Two repeat documents of a periodic token stream, as MemoryTestDataModule batches them."""
    doc = repeated_passage_documents(np.arange(400) % 90 + 3, 2, passage_tokens=6, gap_tokens=10, seed=0)
    return {"input_ids": torch.stack([d["input_ids"] for d in doc]), "labels": torch.stack([d["labels"] for d in doc]),
            "memory_kind": "repeat"}


def test_memory_step_compares_ttt_off_with_each_grid_point(tiny_model_dir):
    module = _module(tiny_model_dir, memory_inner_lrs=[0.5, 2.0])
    module.trainer = type("T", (), {"datamodule": None})()
    batch = memory_batch()
    with torch.no_grad():
        module._memory_step(batch)
    sums = module._sums

    def by_hand(**kwargs):
        with torch.no_grad():
            logits = module.model(input_ids=batch["input_ids"], **kwargs).logits
        loss, counted = token_losses(logits, batch["labels"])
        return float(loss[counted].mean())

    mean = lambda name: float(sums[name][0] / sums[name][1])  # noqa: E731
    assert mean("memory_base_repeat_pre") == pytest.approx(by_hand(ttt=False), rel=1e-6)
    for lr in (0.5, 2.0):
        post = mean(f"memory_base_repeat_post_lr{lr:g}_b4_s1")
        assert post == pytest.approx(by_hand(ttt=True, inner_lr=lr), rel=1e-6)
    assert mean("memory_base_repeat_post_lr0.5_b4_s1") != mean("memory_base_repeat_post_lr2_b4_s1")


def test_cli_fit_validate_memory_export_predict(run_cli, tmp_path):
    root = tmp_path / "run"
    common = ["--config", TINY, f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
              f"--trainer.callbacks.dirpath={root}/checkpoints"]
    out = run_cli("fit", *common, "--trainer.max_steps=3", "--trainer.val_check_interval=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val/loss_on_8+" in out.stderr + out.stdout  # the validation table at the end of fit
    logged = [line.split(",") for line in next(root.rglob("metrics.csv")).read_text().splitlines()]
    header = logged[0]
    for name in ("train/loss", "train/ttt_loss_before", "train/ttt_loss_after", "train/ttt_grad_norm"):
        assert name in header, name
    ckpt = root / "checkpoints" / "last.ckpt"

    out = run_cli("validate", *common, f"--ckpt_path={ckpt}")
    assert out.returncode == 0, out.stderr[-3000:]
    position = json.loads(max(root.rglob("val_results.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert position["buckets"] == ["0-4", "4-8", "8+"]
    res = position["results"]
    assert res["loss_on_0-4"] == pytest.approx(res["loss_off_0-4"])  # chunk 0 is read with W_0 either way
    assert res["loss_on_8+"] != res["loss_off_8+"]
    assert (next(root.rglob("val_loss_by_position.png"))).stat().st_size > 5000

    out = run_cli("validate", *common, "--config", MEMORY, f"--ckpt_path={ckpt}")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(next(root.rglob("memory_results.json")).read_text())["rows"]
    assert {(r["kind"], r["inner_lr"], r["chunk_size"]) for r in rows} == {
        (k, lr, b) for k in ("repeat", "control", "long") for lr in (0.1, 1.0) for b in (4, 8)}
    assert all(r["reduction"] == pytest.approx((r["pre"] - r["post"]) / r["pre"]) for r in rows)
    by = {(r["kind"], r["inner_lr"], r["chunk_size"]): r for r in rows}
    for lr, b in itertools.product((0.1, 1.0), (4, 8)):
        repeat, control = by["repeat", lr, b], by["control", lr, b]
        assert control["memory_share"] == pytest.approx(
            ((repeat["pre"] - repeat["post"]) - (control["pre"] - control["post"])) / (repeat["pre"] - repeat["post"]))

    export = tmp_path / "export"
    out = run_cli("export", *common, f"--ckpt_path={ckpt}", f"--output_dir={export}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((export / "config.json").read_text())["model_type"] == "ttt_e2e"
    import testtime.ttt  # noqa: F401  (registers ttt_e2e with the Auto classes)

    reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, state[f"model.{name}"]), name

    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "def f(x):"}]}) + "\n")
    out = run_cli("predict", *common, f"--ckpt_path={ckpt}", "--config", str(ROOT / "configs/ttt/chat.yaml"),
                  f"--data.path={prompts}", "--trainer.callbacks+=PredictionWriter", "--print_config")
    assert out.returncode == 0, out.stderr[-3000:]
    data = yaml.safe_load(out.stdout)["data"]  # the chat overlay replaces the training data: 5 messages of history
    assert data["class_path"] == "datamodules.prompts.PromptDataModule" and data["init_args"]["max_history_turns"] == 5
    out = run_cli("predict", *common, f"--ckpt_path={ckpt}", "--config", str(ROOT / "configs/ttt/chat.yaml"),
                  f"--data.path={prompts}", "--trainer.callbacks+=PredictionWriter")
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = [json.loads(line) for line in next(root.rglob("predictions.jsonl")).read_text().splitlines()]
    assert row["setting"] == "greedy" and isinstance(row["completion"], str)


def test_memory_test_beside_a_tinylora_adapter(tokenizer, tmp_path):
    """The seed's memory test base vs adapter: the adapter's numbers come from the model with the
    adapter (an export of TinyLoRA on the TTT model), the base's from the model alone."""
    from peft import PeftModel

    from testtime.tinylora import adapter_config, apply_adapter, save_adapter
    from testtime.ttt import TTTConfig, TTTForCausalLM

    config = TTTConfig.from_preset("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    TTTForCausalLM(config).save_pretrained(tmp_path / "ttt")
    tokenizer.save_pretrained(tmp_path / "ttt")
    adapted = apply_adapter(TTTForCausalLM.from_pretrained(tmp_path / "ttt"), adapter_config("tinylora", u=4))
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.fill_(0.5)  # an adapter that changes the model
    save_adapter(adapted, tmp_path / "adapter")

    module = TTTModule(model_name_or_path=str(tmp_path / "ttt"), adapter_path=str(tmp_path / "adapter"))
    module.configure_model()
    module.trainer = type("T", (), {"datamodule": None})()
    batch = memory_batch()
    with torch.no_grad():
        module._memory_step(batch)
        reference = PeftModel.from_pretrained(TTTForCausalLM.from_pretrained(tmp_path / "ttt"), tmp_path / "adapter")
        loss, counted = token_losses(reference(input_ids=batch["input_ids"], ttt=False).logits, batch["labels"])
    mean = lambda name: float(module._sums[name][0] / module._sums[name][1])  # noqa: E731
    assert mean("memory_adapter_repeat_pre") == pytest.approx(float(loss[counted].mean()), rel=1e-6)
    with torch.no_grad():
        plain = TTTForCausalLM.from_pretrained(tmp_path / "ttt")
        loss, counted = token_losses(plain(input_ids=batch["input_ids"], ttt=False).logits, batch["labels"])
    assert mean("memory_base_repeat_pre") == pytest.approx(float(loss[counted].mean()), rel=1e-6)  # no adapter
    assert mean("memory_adapter_repeat_pre") != mean("memory_base_repeat_pre")
    assert "memory_adapter_repeat_post_lr1_b4_s1" in module._sums


def test_a_checkpoint_from_before_the_post_norms_loads_with_the_old_layout(tiny_model_dir):
    from testtime.errors import CheckpointError

    old = _module(tiny_model_dir, post_norm=False, rope_interleaved=False)
    state = old.state_dict()
    with pytest.raises(CheckpointError, match="--model.post_norm false --model.rope_interleaved false"):
        _module(tiny_model_dir).load_state_dict(state)
    again = _module(tiny_model_dir, post_norm=False, rope_interleaved=False)
    again.load_state_dict(state)
    ids = torch.randint(3, 50, (1, 11))
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, old.model(ids).logits)

"""What every method inherits from TesttimeModule: strict partial checkpoints, the primary decoding
setting in `predict`, and the validation table at the end of `fit`."""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch

from datamodules.tasks import TaskDataModule
from lightning_modules.autodeco import AutoDecoModule
from lightning_modules.causal_lm import CausalLMModule
from testtime.autodeco import autodeco_generate
from testtime.errors import CheckpointError
from testtime.lm import cut_at_eos, eos_token_ids


def _autodeco(path, **kwargs):
    module = AutoDecoModule(model_name_or_path=path, eval_max_new_tokens=8, **kwargs)
    module.configure_model()
    return module


def test_a_checkpoint_of_another_method_is_refused_naming_the_missing_keys(tiny_model_dir):
    sft = CausalLMModule(model_name_or_path=tiny_model_dir)
    sft.configure_model()
    module = _autodeco(tiny_model_dir)
    with pytest.raises(CheckpointError) as err:
        module.load_state_dict(sft.state_dict(), strict=module.strict_loading)
    message = str(err.value)
    assert "model.temp_head.mlp.0.weight" in message and "AutoDecoModule" in message
    assert "model.model.layers.0" in message  # and what does not belong to it at all


def test_heads_load_strictly_and_the_frozen_base_is_ignored(tiny_model_dir):
    trained = _autodeco(tiny_model_dir)
    with torch.no_grad():
        for p in trained.model.temp_head.parameters():
            p.add_(1.0)
    state = trained.state_dict()
    assert state and all(k.startswith(("model.temp_head.", "model.top_p_head.")) for k in state)

    fresh = _autodeco(tiny_model_dir)
    fresh.load_state_dict(state, strict=fresh.strict_loading)
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())

    # a checkpoint that also holds the frozen base (e.g. written with another state_dict) loads too
    full = {**state, **{f"model.llm.{k}": v + 1 for k, v in fresh.model.llm.state_dict().items()}}
    base_before = {k: v.clone() for k, v in fresh.model.llm.state_dict().items()}
    fresh.load_state_dict(full, strict=True)
    assert all(torch.equal(v, base_before[k]) for k, v in fresh.model.llm.state_dict().items())

    missing = {k: v for k, v in state.items() if not k.startswith("model.top_p_head.mlp.2")}
    with pytest.raises(CheckpointError, match=r"model\.top_p_head\.mlp\.2\.(weight|bias)"):
        fresh.load_state_dict(missing, strict=True)
    fresh.load_state_dict(missing, strict=False)  # strict=False: PyTorch's meaning, no check


def test_predict_decodes_with_the_heads(tiny_model_dir):
    module = _autodeco(tiny_model_dir)
    dm = TaskDataModule(tiny_model_dir, n_train=4, n_val=4, n_test=4, eval_batch_size=4)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    rows = module.predict_step(batch, batch_idx=1)
    assert [r["setting"] for r in rows] == ["autodeco"] * 4

    # the heads' sampling by hand, on the seed predict uses (eval_seed + batch_idx)
    tok = module.tokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(module.eval_seed + 1)
        out = autodeco_generate(module.model.llm, module.model, batch["prompt_ids"], batch["prompt_mask"],
                                max_new_tokens=8, pad_token_id=tok.pad_token_id)
    eos = eos_token_ids(module.model.llm, tok)
    expected = [tok.decode(cut_at_eos(row, eos), skip_special_tokens=True).strip()
                for row in out.sequences[:, batch["prompt_ids"].shape[1]:].tolist()]
    assert [r["completion"] for r in rows] == expected
    greedy = module.model.llm.generate(input_ids=batch["prompt_ids"], attention_mask=batch["prompt_mask"],
                                       max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert not torch.equal(greedy, out.sequences)  # the heads' sampling, not the base's greedy decoding


def test_fit_ends_with_the_validation_table(tiny_model_dir, tmp_path, caplog):
    module = CausalLMModule(model_name_or_path=tiny_model_dir, learning_rate=1e-3, eval_max_new_tokens=4,
                            eval_num_samples=1)
    dm = TaskDataModule(tiny_model_dir, n_train=8, n_val=4, n_test=4, batch_size=4, eval_batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    assert set(metrics) == {"val/loss", "val/acc_greedy", "val/acc_sample_T1_p1"}
    printed = caplog.text
    assert "validation after fit" in printed and "4 problems" in printed
    for name, value in metrics.items():
        assert f"| {name} | {value:.4f} |" in printed
    saved = json.loads((tmp_path / "val_results.json").read_text())
    assert saved["results"] == pytest.approx(metrics) and saved["n_problems"] == 4
    assert (tmp_path / "val_results.md").read_text().count("| val/") == 3


def test_gradient_clipping_by_norm_under_fsdp_goes_through_the_wrapped_model(tiny_model_dir):
    """FSDP's precision plugin refuses Lightning's clipping by norm; the wrapped module's own
    clip_grad_norm_ (the norm over every rank's shard) takes it. Other strategies clip as before."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    module = CausalLMModule(model_name_or_path=tiny_model_dir)
    module.configure_model()
    calls = []
    fsdp = FSDPStrategy()
    fsdp.model = SimpleNamespace(clip_grad_norm_=lambda value: calls.append(value))
    module.trainer = SimpleNamespace(strategy=fsdp)
    module.configure_gradient_clipping(None, 0.5, "norm")
    module.configure_gradient_clipping(None, 0.5, None)
    assert calls == [0.5, 0.5]

    seen = []
    module.clip_gradients = lambda optimizer, value, algorithm: seen.append((value, algorithm))
    module.configure_gradient_clipping(None, 0.5, "value")  # by value: Lightning's own path (FSDP allows it)
    module.trainer = SimpleNamespace(strategy=SingleDeviceStrategy(torch.device("cpu")))
    module.configure_gradient_clipping(None, 1.0, "norm")
    assert seen == [(0.5, "value"), (1.0, "norm")] and calls == [0.5, 0.5]

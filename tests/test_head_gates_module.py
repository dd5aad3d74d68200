"""HeadGateModule: perplexity by hand, the L0 pull toward the target, gates-only and LoRA-only
checkpoints, pruning mid-fit, the export against the gated model, and the CLI round trip."""

from __future__ import annotations

import json
import math
import re
import sysconfig
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_modules.head_gates import LOG_ALPHA_KEY, HeadGateModule
from testtime.errors import CheckpointError
from testtime.heads import attach_head_gates, output_projections
from testtime.lm import next_token_loss
from testtime.loading import load_model_and_tokenizer
from testtime.tiny import build_tokenizer, save_tiny_model
from tests.conftest import ROOT

TINY = str(ROOT / "configs/head_gates/tiny.yaml")
DEAD = torch.tensor([[True, False, False, True], [False, True, True, False]])  # heads silenced in `trained_dir`


def text_batches(n: int, rows: int = 4, length: int = 32, offset: int = 0) -> list[dict]:
    """`n` batches of consecutive blocks of real text (the stdlib's textwrap.py, character tokens)."""
    tokenizer = build_tokenizer()
    text = Path(sysconfig.get_paths()["stdlib"], "textwrap.py").read_text()
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    start = offset * rows * length
    blocks = ids[start:start + n * rows * length].view(n, rows, length)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in blocks]


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def module(path, **kwargs) -> HeadGateModule:
    m = HeadGateModule(model_name_or_path=str(path), **kwargs)
    m.configure_model()
    return m


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def set_gates(m: HeadGateModule) -> torch.Tensor:
    """Gates open, partly open and closed, then the plan applied (the pruned heads' gates at 0, as the
    L0 penalty leaves them); returns the keep-mask. The uniform plan at 0.5 keeps one head of each
    pair: layer 0 heads 0 and 2, layer 1 heads 1 and 2."""
    with torch.no_grad():
        m.head_gates.hard_concrete.log_alpha.copy_(torch.tensor([[2.0, -3.0, 0.5, -1.0], [-2.0, 1.5, 3.0, -4.0]]))
    keep, values = m.pruning_plan()
    assert keep.tolist() == [[True, False, True, False], [False, True, True, False]]
    assert 0 < values[0, 2] < 1 and values[0, 3] > 0  # a kept head's gate is folded; a pruned one was open
    m.set_gate_values(values * keep)
    return keep


def perturb_lora(m: HeadGateModule) -> None:
    """LoRA's B starts at 0 (an identity adapter): give it values so that LoRA changes the model."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> str:
    """A tiny Llama trained briefly on text (so that its heads matter), with the heads in DEAD
    silenced (their output-projection columns zeroed): the gates of those carry no signal."""
    path = tmp_path_factory.mktemp("trained") / "llama"
    save_tiny_model("llama", path)
    model, tokenizer = load_model_and_tokenizer(str(path))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = text_batches(8, rows=8, length=64)
    for step in range(300):
        batch = batches[step % 8]
        loss = next_token_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for layer, proj in enumerate(output_projections(model)):
            for head in DEAD[layer].nonzero().flatten().tolist():
                proj.weight[:, head * 8:(head + 1) * 8] = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_validation_perplexity_is_exp_of_the_token_mean_nll(tiny_model_dir, tmp_path):
    """Over the whole split: exp(sum of token NLLs / tokens), with the deterministic gates applied;
    unequal batches and ignored labels would make a mean of batch means differ."""
    values = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.25]])
    m = module(tiny_model_dir)
    m.set_gate_values(values)
    torch.testing.assert_close(m.effective_gates(), values, rtol=0, atol=1e-6)
    first, second = text_batches(1, rows=3, length=12)[0], text_batches(1, rows=1, length=6, offset=40)[0]
    first["labels"][1, :8] = -100  # a prompt-like prefix carries no loss
    metrics = trainer().validate(m, dataloaders=loader([first, second]), verbose=False)[0]

    reference, _ = load_model_and_tokenizer(tiny_model_dir)
    attach_head_gates(reference, mode="fixed").values.copy_(m.effective_gates())
    total, tokens, batch_means = 0.0, 0, []
    for batch in (first, second):
        logp = torch.log_softmax(logits(reference, batch).double(), -1)
        nlls = [-float(logp[r, t, batch["labels"][r, t + 1]]) for r in range(logp.shape[0])
                for t in range(logp.shape[1] - 1) if batch["labels"][r, t + 1] != -100]
        total, tokens = total + sum(nlls), tokens + len(nlls)
        batch_means.append(sum(nlls) / len(nlls))
    assert tokens == 3 * 11 - 7 + 5
    assert metrics["val/loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert metrics["val/ppl"] != pytest.approx(math.exp(sum(batch_means) / 2), rel=1e-3)
    assert metrics["val/active_heads"] == 6 and metrics["val/active_fraction"] == 0.75
    tested = trainer(default_root_dir=tmp_path).test(m, dataloaders=loader([first, second]), verbose=False)[0]
    assert tested["test/ppl"] == pytest.approx(metrics["val/ppl"], rel=1e-6)
    saved = json.loads((tmp_path / "test_results.json").read_text())["results"]
    assert saved["test/ppl"] == pytest.approx(tested["test/ppl"], rel=1e-6) and saved["test/active_heads"] == 6


def test_l0_penalty_pulls_the_open_fraction_to_the_target_and_closes_the_silent_heads(trained_dir):
    batches = loader(text_batches(4, rows=4, length=64))
    for target in (0.5, 0.25):
        torch.manual_seed(0)
        m = HeadGateModule(trained_dir, target_sparsity=target, l0_lambda=10.0, gate_learning_rate=0.1)
        trainer(max_steps=100).fit(m, train_dataloaders=batches)
        hc = m.head_gates.hard_concrete
        assert hc.expected_l0().item() / 8 == pytest.approx(1 - target, abs=0.04)  # from 0.99
        log_alpha = hc.log_alpha.detach()
        assert log_alpha[~DEAD].min() > log_alpha[DEAD].max()  # the silenced heads go first
        if target == 0.5:  # ... and close; the plan removes exactly them
            assert (m.effective_gates()[DEAD] == 0).all()
            keep, _ = m.pruning_plan()
            assert torch.equal(keep, ~DEAD)
            assert m.prune()["heads_removed"] == 4


def test_checkpoints_hold_only_what_trains_and_reload_after_pruning(tiny_model_dir, tmp_path):
    batch = text_batches(1)[0]
    m = module(tiny_model_dir, target_sparsity=0.5)
    keep = set_gates(m)
    gated = logits(m.model, batch)
    gates_state = m.state_dict()
    assert list(gates_state) == [LOG_ALPHA_KEY]
    fresh = module(tiny_model_dir, target_sparsity=0.5)
    fresh.load_state_dict(gates_state)
    assert torch.equal(fresh.effective_gates(), m.effective_gates())

    m.prune()
    torch.testing.assert_close(logits(m.model, batch), gated, rtol=1e-5, atol=1e-5)  # exact: LoRA starts at 0
    perturb_lora(m)
    recovered = logits(m.model, batch)
    assert not torch.allclose(recovered, gated, atol=1e-3)
    state = m.state_dict()
    lora = {k for k in state if "lora_" in k}
    assert set(state) == {"pruning_keep", "pruning_gates"} | lora
    assert len(lora) == sum(1 for n, p in m.model.named_parameters() if p.requires_grad) == 2 * 2 * 7

    reloaded = module(tiny_model_dir, target_sparsity=0.5)  # unpruned: the checkpoint's plan prunes it
    reloaded.load_state_dict(state)
    assert reloaded.is_pruned and torch.equal(reloaded.pruning_keep, keep)
    torch.testing.assert_close(logits(reloaded.model, batch), recovered, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="lora_A"):  # a gates checkpoint lacks what a pruned module trains
        reloaded.load_state_dict(gates_state)
    with pytest.raises(CheckpointError, match="lora_r=2"):
        module(tiny_model_dir, target_sparsity=0.5, lora_r=2).load_state_dict(state)

    # two fits (the DDP way): the gates' checkpoint, then prune at set-up and load the recovery's
    torch.save({"state_dict": gates_state}, tmp_path / "gates.ckpt")
    staged = module(tiny_model_dir, target_sparsity=0.5, init_gates_from=str(tmp_path / "gates.ckpt"),
                    prune_at_step=0)
    assert staged.is_pruned and torch.equal(staged.pruning_keep, keep)
    staged.load_state_dict(state)
    torch.testing.assert_close(logits(staged.model, batch), recovered, rtol=0, atol=1e-6)
    with pytest.raises(CheckpointError, match="after pruning"):
        torch.save({"state_dict": state}, tmp_path / "pruned.ckpt")
        module(tiny_model_dir, init_gates_from=str(tmp_path / "pruned.ckpt"))


def test_pruning_mid_fit_switches_the_optimizer_to_lora(tiny_model_dir):
    seen = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            optimizer = trainer.optimizers[0]
            params = [p for group in optimizer.param_groups for p in group["params"]]
            gates = pl_module.head_gates
            seen.append({"pruned": pl_module.is_pruned, "params": params, "lr": optimizer.param_groups[0]["lr"],
                         "gates": pl_module.effective_gates(),
                         "log_alpha": None if gates is None else gates.hard_concrete.log_alpha.detach().clone()})

    m = HeadGateModule(tiny_model_dir, target_sparsity=0.5, prune_at_step=3, gate_learning_rate=0.1,
                       learning_rate=1e-2)
    trainer(max_steps=6, callbacks=[Probe()]).fit(m, train_dataloaders=loader(text_batches(6)))
    before, after = seen[:3], seen[3:]
    assert [s["pruned"] for s in seen] == [False] * 3 + [True] * 3
    assert all(s["lr"] == 0.1 and len(s["params"]) == 1 and s["params"][0].shape == (2, 4) for s in before)
    assert not torch.equal(before[0]["log_alpha"], before[2]["log_alpha"])  # the gates learned
    assert torch.equal(m.pruning_gates, before[2]["gates"])  # pruned with the gates of step 3
    lora = {id(p): n for n, p in m.model.named_parameters() if "lora_" in n}
    assert all(s["lr"] == 1e-2 and {id(p) for p in s["params"]} == set(lora) for s in after)
    assert any(p.detach().abs().sum() > 0 for n, p in m.model.named_parameters() if "lora_B" in n)  # LoRA learned
    assert all(p.grad is None and not p.requires_grad for n, p in m.model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("pruned", [False, True])
def test_export_is_the_gated_model_and_reloads(tiny_model_dirs, tmp_path, family, pruned):
    """Llama: the pruned heads leave the weights (2 of 4 per layer); GPT-2's config cannot hold fewer
    heads, so they stay as zero columns, and LoRA then stays off the output projection."""
    batch = text_batches(1)[0]
    m = module(tiny_model_dirs[family], target_sparsity=0.5)
    keep = set_gates(m)
    if pruned:
        m.prune()
        perturb_lora(m)
        names = [n for n, _ in m.model.named_parameters() if "lora_A" in n]
        on_output = [n for n in names if (".o_proj." in n if family == "llama" else ".attn.c_proj." in n)]
        assert len(on_output) == (2 if family == "llama" else 0)
    reference = logits(m.model, batch)
    m.export(str(tmp_path))
    torch.testing.assert_close(logits(m.model, batch), reference, rtol=0, atol=0)  # the module is untouched

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(reloaded, batch), reference, rtol=1e-5, atol=1e-5)
    summary = json.loads((tmp_path / "pruning.json").read_text())
    pruned_heads = [[h for h in range(4) if not keep[layer, h]] for layer in range(2)]
    assert summary["heads_pruned_per_layer"] == pruned_heads and summary["plan"]["keep"] == keep.tolist()
    assert summary["plan"]["recovered_with_lora"] == pruned
    if family == "llama":
        assert reloaded.config.num_attention_heads == 2 and summary["heads_removed_per_layer"] == pruned_heads
        assert summary["report"]["parameters_after"] < summary["report"]["parameters_before"]
    else:
        assert reloaded.config.n_head == 4 and summary["heads_removed_per_layer"] == [[], []]
        assert summary["heads_zeroed_per_layer"] == pruned_heads
    prompt = batch["input_ids"][:1, :8]
    out = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                            do_sample=False)
    assert torch.equal(out, m.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                             max_new_tokens=5, min_new_tokens=5, do_sample=False))


def test_cli_fit_validate_export_reload_generate(run_cli, tmp_path):
    """The tiny recipe: gates for 6 steps, pruning, LoRA for 6; the checkpoint written after pruning
    validates to the same perplexity and exports a smaller model that equals it."""
    root = tmp_path / "run"
    common = ["--config", TINY, f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
              f"--trainer.callbacks.dirpath={root}/checkpoints"]
    out = run_cli("fit", *common)
    assert out.returncode == 0, out.stderr[-3000:]
    fitted = json.loads(next(root.rglob("val_results.json")).read_text())["results"]
    assert fitted["val/active_heads"] == 4.0 and len(list(root.rglob("gate_heatmaps/epoch_000.png"))) == 1
    ckpt = root / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert all(k in ("pruning_keep", "pruning_gates") or "lora_" in k for k in state)

    out = run_cli("validate", *common, f"--ckpt_path={ckpt}")
    assert out.returncode == 0, out.stderr[-3000:]
    printed = float(re.search(r"val/ppl\W+([0-9]+\.[0-9]+)", out.stdout + out.stderr).group(1))
    assert printed == pytest.approx(fitted["val/ppl"], rel=1e-6)

    export = tmp_path / "export"
    out = run_cli("export", *common, f"--ckpt_path={ckpt}", f"--output_dir={export}")
    assert out.returncode == 0, out.stderr[-3000:]
    reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert reloaded.config.num_attention_heads == 2
    m = module("tiny-random-llama", target_sparsity=0.5, lora_r=4)
    m.load_state_dict(state)
    batch = text_batches(1)[0]
    torch.testing.assert_close(logits(reloaded, batch), logits(m.model, batch), rtol=1e-5, atol=1e-5)
    summary = json.loads((export / "pruning.json").read_text())
    assert sum(map(len, summary["heads_removed_per_layer"])) == 4 and summary["plan"]["recovered_with_lora"]
    prompt = batch["input_ids"][:1, :8]
    generated = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                  min_new_tokens=6, do_sample=False)
    expected = prompt  # a plain greedy loop over the trained module's pruned model, no cache, EOS held off
    eos = reloaded.generation_config.eos_token_id
    with torch.no_grad():
        for _ in range(6):
            last = m.model(input_ids=expected).logits[:, -1]
            if eos is not None:
                last[:, eos] = float("-inf")
            expected = torch.cat([expected, last.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("kwargs, named", [
    ({"target_sparsity": 1.0}, "target_sparsity"),
    ({"target_sparsity": None}, "prune_scope"),
    ({"prune_at_step": 0}, "init_gates_from"),
    ({"prune_at_step": -1}, "prune_at_step"),
    ({"lora_r": 0}, "lora_r"),
])
def test_bad_settings_are_named(kwargs, named):
    with pytest.raises(ValueError, match=named):
        HeadGateModule("tiny-random-llama", **kwargs)

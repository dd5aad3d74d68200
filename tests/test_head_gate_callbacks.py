"""The head-gate callbacks against rules written here: the controller lowers exactly the scheduled
heads (from a fresh measurement or from the agency), the agency is an EMA of the measured
utilisation, and the heat map writes one PNG per epoch of the gates in force."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from callbacks.head_gates import EntropyPruningController, GateHeatmap, HeadAgencyTracker
from lightning_modules.causal_lm import CausalLMModule
from lightning_modules.head_gates import HeadGateModule
from testtime.heads import attention_entropy, head_rows
from testtime.heads.extras import OVERLOADED, WITHDRAWN, HeadAgency
from tests.test_head_gates_module import loader, text_batches, trainer


def frozen_gates_module(path) -> HeadGateModule:
    """Gates the optimizer cannot move (learning rate 0): every change comes from a callback. Two
    heads' queries are scaled up: layer 0 head 1 attends sharply (normalised entropy ~0.4), layer 1
    head 3 a little (~0.9, the lowest of its layer); the others are near uniform (~1)."""
    m = HeadGateModule(model_name_or_path=path, gate_learning_rate=0.0, l0_lambda=0.0)
    m.configure_model()
    with torch.no_grad():
        for layer, head, scale in ((0, 1, 300.0), (1, 3, 60.0)):
            module, idx = head_rows(m.model, layer)["q"]
            module.weight[idx[head]] *= scale
    return m


def lowered_by_hand(entropy: torch.Tensor, threshold: float) -> list[list[int]]:
    """The seed's rule: every head above the threshold except the lowest-entropy head of its layer."""
    heads = []
    for layer in range(entropy.shape[0]):
        spared = int(entropy[layer].argmin())
        heads += [[layer, h] for h in range(entropy.shape[1]) if entropy[layer, h] > threshold and h != spared]
    return heads


class Probe(L.Callback):
    """Before the callbacks under test: the gates and the measured entropy after each step."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({"step": trainer.global_step, "gates": pl_module.effective_gates(),
                           "entropy": attention_entropy(pl_module.causal_lm, [batch])})


def test_controller_lowers_exactly_the_scheduled_heads(tiny_model_dir):
    m = frozen_gates_module(tiny_model_dir)
    batch = text_batches(1)[0]
    entropy = attention_entropy(m.causal_lm, [batch])
    threshold = 0.8
    assert entropy[0, 1] < threshold < entropy[1, 3] < entropy[1].max()
    assert lowered_by_hand(entropy, threshold) == [[0, 0], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2]]  # (1, 3) spared
    probe, controller = Probe(), EntropyPruningController(start=2, every=2, threshold=threshold, decay=0.25)
    trainer(max_steps=5, callbacks=[probe, controller]).fit(m, train_dataloaders=loader([batch] * 5))

    expected, history = torch.ones(2, 4), []
    for before, after in zip(probe.steps, probe.steps[1:] + [{"gates": m.effective_gates()}]):
        torch.testing.assert_close(before["gates"], expected, rtol=0, atol=1e-6)
        if before["step"] in (2, 4):
            heads = lowered_by_hand(before["entropy"], threshold)
            history.append({"step": before["step"], "lowered": heads})
            for layer, head in heads:
                expected[layer, head] -= 0.25
        torch.testing.assert_close(after["gates"], expected, rtol=0, atol=1e-6)
    assert controller.history == history and len(history) == 2
    assert (expected == 0.5).any()  # some head was lowered twice


def test_controller_reads_the_agency_instead_of_measuring(tiny_model_dir):
    m = frozen_gates_module(tiny_model_dir)
    m.head_agency = HeadAgency(2, 4, momentum=0.0)
    chosen = torch.tensor([[0.9, 0.2, 0.95, 0.3], [0.1, 0.85, 0.2, 0.99]])  # normalised entropies
    m.head_agency.update(chosen)
    controller = EntropyPruningController(every=1, threshold=0.5, decay=0.5)
    trainer(max_steps=1, callbacks=[controller]).fit(m, train_dataloaders=loader(text_batches(1)))
    assert controller.history == [{"step": 1, "lowered": [[0, 0], [0, 2], [1, 1], [1, 3]]}]
    assert lowered_by_hand(chosen, 0.5) == controller.history[0]["lowered"]
    assert torch.equal(m.effective_gates() == 0.5, torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool))


def test_agency_tracker_keeps_an_ema_of_the_measured_utilisation(tiny_model_dir):
    m = frozen_gates_module(tiny_model_dir)
    batches = text_batches(4)
    tracker = HeadAgencyTracker(every_n_steps=2, momentum=0.5, overloaded_utilization=0.5)
    run = trainer(max_steps=4, callbacks=[tracker])
    run.fit(m, train_dataloaders=loader(batches))
    u = [1 - attention_entropy(m.causal_lm, [batches[i]]).clamp(0, 1) for i in (1, 3)]  # after steps 2 and 4
    torch.testing.assert_close(m.head_agency.utilization, 0.5 * u[0] + 0.5 * u[1], rtol=0, atol=1e-6)
    states = torch.zeros(2, 4, dtype=torch.long)
    states[m.head_agency.utilization > 0.5] = OVERLOADED
    states[m.head_agency.utilization < 0.05] = WITHDRAWN
    assert torch.equal(m.head_agency.states, states)
    assert m.head_agency.counts() == {"active": 1, "overloaded": 1, "withdrawn": 6}
    counts = m.head_agency.counts()
    assert {k: float(v) for k, v in run.callback_metrics.items() if k.startswith("agency/")} == \
        {f"agency/{state}": float(n) for state, n in counts.items()}


def test_heat_map_png_per_epoch_of_the_gates_in_force(tiny_model_dir, tmp_path):
    """Three epochs of one batch, pruning at the start of the third: its map shows the pruned heads at 0."""
    gates_at_epoch_end = []

    class EpochProbe(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            gates_at_epoch_end.append(pl_module.effective_gates())

    m = HeadGateModule(tiny_model_dir, target_sparsity=0.5, gate_learning_rate=0.5, prune_at_step=2)
    heat = GateHeatmap(output_dir=str(tmp_path / "maps"))
    trainer(max_epochs=3, callbacks=[EpochProbe(), heat]).fit(m, train_dataloaders=loader(text_batches(1)))
    assert [p.rsplit("/", 1)[1] for p in heat.paths] == ["epoch_000.png", "epoch_001.png", "epoch_002.png"]
    for path in heat.paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert all(torch.equal(a, b) for a, b in zip(heat.history, gates_at_epoch_end)) and len(heat.history) == 3
    assert not torch.equal(heat.history[0], heat.history[1])  # the gates moved
    assert torch.equal(heat.history[2] == 0, ~m.pruning_keep.cpu()) and m.is_pruned


@pytest.mark.parametrize("callback", [GateHeatmap(), HeadAgencyTracker(), EntropyPruningController()])
def test_callbacks_refuse_a_module_without_gates(tiny_model_dir, callback):
    with pytest.raises(TypeError, match="effective_gates.*set_gate_values"):
        callback.setup(None, CausalLMModule(tiny_model_dir), "fit")

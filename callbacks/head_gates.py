"""Callbacks of head gating: per-head agency, the seed's entropy pruning controller, gate heat maps.

They talk to the module through a small interface (`lightning_modules.head_gates.HeadGateModule`
has it), never importing it:

- `pl_module.causal_lm`: the Hugging Face model, whose attention entropy is measured;
- `pl_module.is_pruned`: True once the heads are removed from the weights (the gates are then
  folded in: the agency and the controller stop, the heat map shows the plan);
- `pl_module.effective_gates()`: [L, H] the gate each head is multiplied by now;
- `pl_module.set_gate_values(values)`: write gates (the controller);
- `pl_module.head_agency`: a `testtime.heads.extras.HeadAgency`, set by `HeadAgencyTracker` and
  read by `EntropyPruningController`.

Entropies are measured on the training batch just trained on (`attention_entropy`, normalised:
0 = one key, 1 = uniform) and averaged over DDP ranks, so every rank makes the same change to
the gates and holds the same agency states.
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from testtime.heads import attention_entropy
from testtime.heads.extras import HeadAgency, entropy_gate_schedule
from testtime.io import new_figure, save_figure

INTERFACE = ("causal_lm", "is_pruned", "effective_gates", "set_gate_values", "head_agency")


def _check_interface(callback, pl_module) -> None:
    missing = [name for name in INTERFACE if not hasattr(pl_module, name)]
    if missing:
        raise TypeError(f"{type(callback).__name__} needs a head-gated module; {type(pl_module).__name__} lacks "
                        f"{', '.join(missing)} (see callbacks/head_gates.py)")


def measured_entropy(trainer: L.Trainer, pl_module, batch: dict) -> torch.Tensor:
    """[L, H] normalised attention entropy on `batch`, averaged over ranks (a collective)."""
    entropy = attention_entropy(pl_module.causal_lm, [batch]).to(pl_module.device)
    return trainer.strategy.reduce(entropy, reduce_op="mean").cpu()


class HeadAgencyTracker(L.Callback):
    """Keep `pl_module.head_agency` (`HeadAgency`: EMA utilisation 1 - entropy, and a state per head:
    active, overloaded, withdrawn) up to date during the gate phase, and log the state counts as
    `agency/<state>`.

    Args:
        every_n_steps: measure after every n-th optimizer step (one extra eager forward pass).
        momentum: EMA momentum of the utilisation.
        withdrawn_gate: a gate at or below this counts as withdrawn.
        withdrawn_utilization: utilisation below this is withdrawn (attention spread uniformly).
        overloaded_utilization: utilisation above this is overloaded (attention on one key).
    """

    def __init__(self, every_n_steps: int = 10, momentum: float = 0.9, withdrawn_gate: float = 0.05,
                 withdrawn_utilization: float = 0.05, overloaded_utilization: float = 0.95):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.settings = dict(momentum=momentum, withdrawn_gate=withdrawn_gate,
                             withdrawn_utilization=withdrawn_utilization,
                             overloaded_utilization=overloaded_utilization)
        HeadAgency(1, 1, **self.settings)  # checks the settings now, not at the first measurement

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _check_interface(self, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if pl_module.is_pruned or trainer.global_step % self.every_n_steps:
            return
        gates = pl_module.effective_gates()
        if pl_module.head_agency is None:
            pl_module.head_agency = HeadAgency(*gates.shape, **self.settings)
        pl_module.head_agency.update(measured_entropy(trainer, pl_module, batch), gate_values=gates)
        for state, count in pl_module.head_agency.counts().items():
            pl_module.log(f"agency/{state}", float(count))


class EntropyPruningController(L.Callback):
    """The seed's pruning controller: every `every` optimizer steps from `start`, lower by `decay`
    (down to `floor`) the gate of every head whose normalised attention entropy exceeds
    `threshold`, except the most focused head of each layer (`entropy_gate_schedule`).

    The entropy is the agency's (1 - its EMA utilisation) when a `HeadAgencyTracker` keeps one,
    else measured on the training batch. On hard-concrete gates the lowered value is written into
    log_alpha, and training goes on from there. Each intervention is appended to `history`
    (`{"step", "lowered": [[layer, head], ...]}`) and logged as `controller/lowered`.

    Args:
        start: the first step of the schedule.
        every: steps between interventions.
        threshold: normalised entropy above which a head's gate is lowered.
        decay: how much a gate is lowered per intervention.
        floor: the lowest gate the controller sets.
    """

    def __init__(self, start: int = 0, every: int = 100, threshold: float = 0.8, decay: float = 0.1,
                 floor: float = 0.0):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor}")
        self.start, self.every, self.threshold, self.decay, self.floor = start, every, threshold, decay, floor
        self.history: list[dict] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _check_interface(self, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if pl_module.is_pruned or step < self.start or (step - self.start) % self.every:
            pl_module.log("controller/lowered", 0.0)  # Lightning would repeat the last count otherwise
            return
        agency = pl_module.head_agency
        if agency is not None and agency.utilization is not None:
            entropy = 1.0 - agency.utilization
        else:
            entropy = measured_entropy(trainer, pl_module, batch)
        values = pl_module.effective_gates()
        new = entropy_gate_schedule(values, entropy, step, start=self.start, every=self.every,
                                    threshold=self.threshold, decay=self.decay, floor=self.floor)
        lowered = (new < values).nonzero().tolist()
        pl_module.set_gate_values(new)
        self.history.append({"step": step, "lowered": lowered})
        pl_module.log("controller/lowered", float(len(lowered)))


class GateHeatmap(L.Callback):
    """A heat map of the gates (layers x heads) at the end of every training epoch:
    `<output_dir>/epoch_<NNN>.png` (default output_dir: `<log folder>/gate_heatmaps`), written on
    global rank 0. After pruning it shows the folded gates, 0 on pruned heads. The gates drawn are
    kept in `history` (one [L, H] tensor per epoch), the files in `paths`.

    Args:
        output_dir: the folder to write into.
        annotate: print each gate's value in its cell (only up to 600 heads: beyond, unreadable).
    """

    def __init__(self, output_dir: str | None = None, annotate: bool = True):
        super().__init__()
        self.output_dir = output_dir
        self.annotate = annotate
        self.paths: list[str] = []
        self.history: list[torch.Tensor] = []
        self._dir: str | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _check_interface(self, pl_module)
        # trainer.log_dir broadcasts: every rank resolves it here, not on rank 0 alone.
        self._dir = self.output_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "gate_heatmaps")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        gates = pl_module.effective_gates()
        self.history.append(gates)
        path = save_figure(self.figure(gates, trainer.current_epoch, trainer.global_step, pl_module.is_pruned),
                           os.path.join(self._dir, f"epoch_{trainer.current_epoch:03d}.png"))
        self.paths.append(str(path))
        rank_zero_info(f"GateHeatmap wrote {path}")

    def figure(self, gates: torch.Tensor, epoch: int, step: int, pruned: bool):
        layers, heads = gates.shape
        fig, (ax,) = new_figure(panel_size=(max(4.0, 0.45 * heads + 2.0), max(3.0, 0.28 * layers + 1.5)))
        image = ax.imshow(gates.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="gate")
        if self.annotate and gates.numel() <= 600:
            for (layer, head), value in zip(torch.cartesian_prod(torch.arange(layers), torch.arange(heads)).tolist(),
                                            gates.flatten().tolist()):
                ax.text(head, layer, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if value < 0.6 else "black")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(0, layers, max(1, layers // 16)))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        active = int((gates > 0).sum())
        ax.set_title(f"epoch {epoch}, step {step}: {active}/{gates.numel()} heads active"
                     f"{' (pruned)' if pruned else ''}", fontsize=9)
        return fig

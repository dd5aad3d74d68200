"""GoldilocksFilter: installed as the module's token_filter, reproduces goldilocks_mask, logs its counts.

The module here is a small fake that follows the AutoDeco contract (`token_filter` called in
training_step with the shifted logits/labels, hparams `temp_cap` and `min_p_ratio`), so these
tests do not depend on lightning_modules/.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from callbacks import GoldilocksFilter
from testtime.lm import IGNORE_INDEX
from testtime.autodeco import goldilocks_mask, label_rank, min_p_hinge_loss

V, L_SEQ, B = 16, 12, 4


def t_req_by_hand(logits, labels, r):
    """(max z - z_label) / -ln r, 0 at ignored positions: written here, not taken from the code under test."""
    z_y = logits.gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return ((logits.max(-1).values - z_y) / -torch.log(torch.tensor(r))).masked_fill(labels == IGNORE_INDEX, 0.0)


def make_batch(seed: int) -> dict:
    """Full-length (unshifted) base logits [B, L, V] and HF-style labels [B, L] with a prompt of -100."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 4.0, B)[:, None, None]  # rows from confident-ish to very peaked
    logits = torch.randn(B, L_SEQ, V, generator=g) * scale
    labels = torch.randint(0, V, (B, L_SEQ), generator=g)
    # about a third of the labels are the argmax of the previous position's logits ("easy")
    easy = torch.rand(B, L_SEQ - 1, generator=g) < 0.35
    labels[:, 1:] = torch.where(easy, logits[:, :-1].argmax(-1), labels[:, 1:])
    labels[:, :2] = IGNORE_INDEX
    return {"logits": logits, "labels": labels}


class FakeAutoDeco(L.LightningModule):
    """Follows the AutoDecoModule contract: token_filter(logits[:, :-1], labels[:, 1:]) -> bool mask."""

    def __init__(self, temp_cap: float | None = 2.0, min_p_ratio: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.token_filter = None
        self.collect_diagnostics = False
        self.head = torch.nn.Linear(V, 1)
        self.calls = []  # (logits, labels, mask) seen in training_step
        self.val_masks = []

    def training_step(self, batch, batch_idx):
        logits, labels = batch["logits"][:, :-1], batch["labels"][:, 1:]
        mask = self.token_filter(logits, labels) if self.token_filter is not None else None
        if mask is not None:
            assert mask.dtype == torch.bool and mask.shape == labels.shape
        self.calls.append((logits.clone(), labels.clone(), None if mask is None else mask.clone()))
        temperature = torch.sigmoid(self.head(logits)).squeeze(-1) * 2
        return min_p_hinge_loss(logits, temperature, labels, self.hparams.min_p_ratio,
                                temp_cap=self.hparams.temp_cap, mask=mask)

    def validation_step(self, batch, batch_idx):
        logits, labels = batch["logits"][:, :-1], batch["labels"][:, 1:]
        self.val_masks.append(self.token_filter(logits, labels).clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ListLogger(Logger):
    """Keeps every logged metrics dict in memory."""

    def __init__(self):
        super().__init__()
        self.metrics: list[dict] = []

    @property
    def name(self):
        return "list"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def fit(module, callbacks, max_steps=2, logger=None, tmp_path=None, val_batches=0):
    data = [make_batch(i) for i in range(max_steps)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    val = [make_batch(100 + i) for i in range(val_batches)]
    val_loader = torch.utils.data.DataLoader(val, batch_size=None) if val_batches else None
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger or False,
                        callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=val_batches)
    trainer.fit(module, loader, val_loader)
    return trainer


def attach(callback, module, rank=0):
    """setup() with a minimal trainer, for calling the filter directly."""
    callback.setup(SimpleNamespace(global_rank=rank), module, "fit")
    return callback


def shifted(seed=0):
    batch = make_batch(seed)
    return batch["logits"][:, :-1], batch["labels"][:, 1:]


# ---------------------------------------------------------------------------------------------


def test_in_training_the_mask_is_goldilocks_mask_and_the_logged_counts_match(tmp_path):
    module, logger = FakeAutoDeco(temp_cap=2.0, min_p_ratio=0.1), ListLogger()
    callback = GoldilocksFilter(easy_frac=0.5, seed=3)
    fit(module, [callback], max_steps=2, logger=logger, tmp_path=tmp_path)
    assert len(module.calls) == 2 and all(mask is not None for _, _, mask in module.calls)

    # The same sequence of draws from a generator seeded with seed + rank gives the same masks.
    generator = torch.Generator().manual_seed(3)
    other = torch.Generator().manual_seed(4)
    for logits, labels, mask in module.calls:
        kwargs = dict(min_p_ratio=0.1, temp_cap=2.0, rebalance=True, num_bins=20, easy_frac=0.5)
        expected = goldilocks_mask(logits, labels, generator=generator, **kwargs)
        assert torch.equal(mask, expected)
        # ...and the randomness matters: another seed selects other tokens (same count per bin).
        assert not torch.equal(mask, goldilocks_mask(logits, labels, generator=other, **kwargs))

    kept = [m["goldilocks/kept"] for m in logger.metrics if "goldilocks/kept" in m]
    valid = [m["goldilocks/valid"] for m in logger.metrics if "goldilocks/valid" in m]
    frac = [m["goldilocks/kept_frac"] for m in logger.metrics if "goldilocks/kept_frac" in m]
    assert kept == [float(mask.sum()) for _, _, mask in module.calls]
    assert valid == [float((labels != IGNORE_INDEX).sum()) for _, labels, _ in module.calls]
    assert frac == pytest.approx([k / v for k, v in zip(kept, valid)])
    assert 0 < kept[0] < valid[0]

    # Removed after fit: the module trains on every token again.
    assert module.token_filter is None


def test_cap_topk_and_easy_frac_select_what_they_promise():
    logits, labels = shifted(1)
    module = FakeAutoDeco(temp_cap=2.0)
    valid = labels != IGNORE_INDEX
    t_req = t_req_by_hand(logits, labels, 0.1)
    rank = label_rank(logits, labels)

    def kept(**kwargs):
        f = attach(GoldilocksFilter(rebalance=False, **kwargs), module)
        mask = f(logits, labels)
        f.teardown(None, module, "fit")
        return mask

    # cap: exactly the valid tokens the head can reach; a lower cap keeps fewer; -1 keeps all
    for cap in (0.5, 1.0, 2.0):
        assert torch.equal(kept(temp_cap=cap), valid & (t_req <= cap))
    assert kept(temp_cap=0.5).sum() < kept(temp_cap=1.0).sum() < kept(temp_cap=2.0).sum() < valid.sum()
    assert torch.equal(kept(temp_cap=-1), valid)

    # topk: drops labels ranked >= k; topk=1 keeps only the easy tokens
    assert torch.equal(kept(temp_cap=-1, topk=1), valid & (rank == 0))
    assert kept(temp_cap=-1, topk=2).sum() < kept(temp_cap=-1, topk=5).sum() < valid.sum()

    # easy_frac: keeps round(frac * n_easy) of the easy tokens and every hard one
    n_easy = int((valid & (rank == 0)).sum())
    hard = valid & (rank > 0)
    assert n_easy >= 4
    for frac in (0.0, 0.5, 1.0):
        mask = kept(temp_cap=-1, easy_frac=frac)
        assert int((mask & (rank == 0)).sum()) == round(frac * n_easy)
        assert torch.equal(mask & (rank > 0), hard)


def test_rebalance_flattens_the_required_temperature_histogram():
    logits, labels = shifted(2)
    module = FakeAutoDeco()
    mask = attach(GoldilocksFilter(num_bins=4), module)(logits, labels)
    t_req = t_req_by_hand(logits, labels, 0.1)
    reachable = (labels != IGNORE_INDEX) & (t_req <= 2.0)
    bins = (t_req / 2.0 * 4).floor().long().clamp(0, 3)
    before = torch.bincount(bins[reachable], minlength=4)
    after = torch.bincount(bins[mask], minlength=4)
    assert len(set(before[before > 0].tolist())) > 1  # the data really is unbalanced
    assert set(after[before > 0].tolist()) == {int(before[before > 0].min())}
    assert mask.sum() < reachable.sum()


def test_unset_options_fall_back_to_the_module_hparams():
    logits, labels = shifted(3)
    valid = labels != IGNORE_INDEX

    # temp_cap=None: the module's hparams.temp_cap (0.5), not the default 2.0
    f = attach(GoldilocksFilter(rebalance=False), FakeAutoDeco(temp_cap=0.5))
    assert f.resolved_temp_cap() == 0.5
    assert torch.equal(f(logits, labels), valid & (t_req_by_hand(logits, labels, 0.1) <= 0.5))
    # the callback's own value wins
    f = attach(GoldilocksFilter(temp_cap=1.5, rebalance=False), FakeAutoDeco(temp_cap=0.5))
    assert torch.equal(f(logits, labels), valid & (t_req_by_hand(logits, labels, 0.1) <= 1.5))
    # the module's -1 / None disable the cap
    for cap in (-1, None):
        f = attach(GoldilocksFilter(rebalance=False), FakeAutoDeco(temp_cap=cap))
        assert f.resolved_temp_cap() is None and torch.equal(f(logits, labels), valid)

    # min_p_ratio=None: the module's ratio defines T_req (0.3 makes T_req larger than 0.1 does)
    f = attach(GoldilocksFilter(rebalance=False), FakeAutoDeco(temp_cap=1.0, min_p_ratio=0.3))
    expected = valid & (t_req_by_hand(logits, labels, 0.3) <= 1.0)
    assert torch.equal(f(logits, labels), expected)
    assert expected.sum() < (valid & (t_req_by_hand(logits, labels, 0.1) <= 1.0)).sum()


def test_ranks_draw_from_different_seeds_and_installation_is_checked():
    logits, labels = shifted(4)
    masks = [attach(GoldilocksFilter(easy_frac=0.5, seed=7), FakeAutoDeco(), rank=r)(logits, labels) for r in (0, 1)]
    assert masks[0].sum() == masks[1].sum() and not torch.equal(masks[0], masks[1])
    expected = goldilocks_mask(logits, labels, rebalance=True, easy_frac=0.5,
                               generator=torch.Generator().manual_seed(7 + 1))
    assert torch.equal(masks[1], expected)

    module = FakeAutoDeco()
    first = attach(GoldilocksFilter(), module)
    assert module.token_filter is first
    with pytest.raises(ValueError, match="already set"):
        attach(GoldilocksFilter(), module)
    first.teardown(None, module, "fit")
    assert module.token_filter is None

    class NoFilter(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="token_filter"):
        attach(GoldilocksFilter(), NoFilter())


def test_a_validation_loss_filtered_too_logs_epoch_sums(tmp_path):
    module, logger = FakeAutoDeco(), ListLogger()
    fit(module, [GoldilocksFilter(easy_frac=0.5)], max_steps=2, logger=logger, tmp_path=tmp_path, val_batches=3)
    assert len(module.val_masks) == 3
    val = [m for m in logger.metrics if "goldilocks/val_kept" in m]
    assert len(val) == 1  # one value for the epoch, the sum over its batches
    assert val[0]["goldilocks/val_kept"] == float(sum(int(m.sum()) for m in module.val_masks))
    assert val[0]["goldilocks/val_valid"] == float(3 * (make_batch(0)["labels"][:, 1:] != IGNORE_INDEX).sum())
    # training steps still log per step, under their own names
    assert len([m for m in logger.metrics if "goldilocks/kept" in m]) == 2

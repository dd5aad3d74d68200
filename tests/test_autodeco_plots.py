"""AutoDeco's diagnostics figures: clipped points are counted, bins hold equally many tokens, one
panel per unit."""

from __future__ import annotations

import numpy as np

from testtime.autodeco_plots import _equal_count_bins, by_entropy, over_steps, temperature_vs_required


def _points(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    entropy = rng.gamma(1.5, 0.7, n)
    t_req = np.abs(rng.normal(0, 1, n)) * entropy
    t = np.clip(0.4 + 0.2 * entropy, 0, 2)
    return {"temperature": t, "required_temperature": t_req, "entropy": entropy, "top_p": np.full(n, 0.9),
            "min_p_ok": (t >= t_req).astype(float)}


def test_points_beyond_the_axis_are_counted_in_the_legend():
    points = _points()
    fig = temperature_vs_required(points, min_p_ratio=0.1)
    ax = fig.axes[0]
    x_hi = max(2.5, float(np.quantile(points["required_temperature"], 0.99)) * 1.05)
    beyond = int((points["required_temperature"] > x_hi).sum())
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert beyond > 0 and any(label.startswith(f"{beyond} tokens with T_req >") for label in labels)
    kept = (points["temperature"] >= points["required_temperature"]).mean()
    assert ax.get_title().endswith(f"{kept:.1%}")
    assert "r = 0.1" in ax.get_xlabel()


def test_entropy_bins_hold_equally_many_tokens_and_fewer_bins_for_few_tokens():
    values = np.random.default_rng(1).exponential(size=1003)
    counts = np.bincount(_equal_count_bins(values, 8))
    assert len(counts) == 8 and counts.max() - counts.min() <= 1
    order = np.argsort(values)
    assert (np.diff(_equal_count_bins(values, 8)[order]) >= 0).all()  # bins follow the values
    fig = by_entropy(_points(n=60), num_bins=8, min_tokens=20)
    assert "3 bins of ~20 tokens" in fig.axes[0].get_xlabel()  # 60 tokens: merged to 3 bins of 20
    assert fig.axes[0].get_ylim()[0] == 0.0
    assert by_entropy(_points(n=10), min_tokens=20) is None  # too few tokens to say anything


def test_over_steps_puts_each_unit_on_its_own_axis():
    points = _points()
    records = [{"batch": i, "stats": {k: {"mean": float(v.mean())} for k, v in points.items()}} for i in range(3)]
    fig = over_steps(records)
    assert sorted(ax.get_ylabel() for ax in fig.axes) == ["entropy (nats)", "fraction of tokens",
                                                          "temperature (dimensionless)", "top-p (probability mass)"]
    assert len(fig.axes[0].get_lines()) == 2  # temperature and required temperature share their unit
    assert over_steps(records[:1]) is None

"""AutoDeco's diagnostics figures: clipped points are counted, bins hold equally many tokens, one
panel per unit."""

from __future__ import annotations

import numpy as np
import pytest

from testtime.autodeco_plots import (
    _equal_count_bins,
    by_entropy,
    over_steps,
    temperature_by_token,
    temperature_vs_required,
    token_types,
)


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


def test_token_types_of_a_worked_solution():
    pieces = [" 3", " +", " 4", " =", " 7", ".", " The", " answer", " is", " 1", "2", ".", "\n", "<eos>"]
    assert token_types(pieces, {"<eos>"}) == [
        "number", "operator", "number", "operator", "number", "punctuation", "word", "word", "word",
        "final answer", "final answer", "punctuation", "punctuation", "end"]
    # digits after "Answer:" are the answer too; a number after more words is not
    assert token_types(["Answer", ":", " -5", " apples", " 6"]) == ["word", "punctuation", "final answer", "word", "number"]


def test_temperature_by_token_summarizes_by_type_and_position():
    t = np.array([0.2, 0.4, 1.0, 1.2, 0.6, 0.8])
    points = {"temperature": t, "top_p": np.full(6, 0.9), "position": np.array([0, 1, 2, 0, 1, 5]),
              "type": np.array(["number", "number", "word", "word", "final answer", "end"])}
    fig, summary = temperature_by_token(points, {"best static": 0.7}, position_bin=2, min_tokens=1)
    assert fig is not None and summary["tokens"] == 6
    assert summary["by_type"]["number"]["mean_temperature"] == pytest.approx(0.3)
    assert summary["by_type"]["number"]["se"] == pytest.approx(np.std([0.2, 0.4], ddof=1) / np.sqrt(2))
    assert summary["by_type"]["word"]["mean_temperature"] == pytest.approx(1.1)
    assert "operator" not in summary["by_type"]
    # positions 0-1: T 0.2, 0.4, 1.2, 0.6; 2-3: 1.0; 4-5: 0.8
    assert {k: v["tokens"] for k, v in summary["by_position"].items()} == {0: 4, 2: 1, 4: 1}
    assert summary["by_position"][0]["mean_temperature"] == pytest.approx(0.6)

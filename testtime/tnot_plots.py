"""TNOT's summaries and figures: generation traces (per-token entropy, thresholds, forced stops,
retries) and the accuracy of a (times, lr) sweep against the plain model.

A trace is one decoded sample: `setting`, `problem`, `draw`, per-token `entropy`,
`entropy_original`, `threshold` (None where nothing is watched), `stop_positions`,
`stop_entropies` and `retries` (see `testtime.tnot.sample_traces`).
"""

from __future__ import annotations

import numpy as np

from testtime.io import new_figure, standard_error


def _stats(values: np.ndarray) -> dict:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(values.size), "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def trace_summary(traces: list[dict]) -> dict:
    """Per setting: samples, tokens, entropy statistics, the fraction of samples stopped, retries, stop positions."""
    out = {}
    for setting in dict.fromkeys(t["setting"] for t in traces):
        mine = [t for t in traces if t["setting"] == setting]
        entropy = np.array([e for t in mine for e in t["entropy"]], dtype=float)
        original = np.array([e for t in mine for e in t.get("entropy_original", t["entropy"])], dtype=float)
        stops = [p for t in mine for p in t["stop_positions"]]
        out[setting] = {"samples": len(mine), "tokens": int(entropy.size),
                        "entropy": _stats(entropy), "entropy_original_mean": _stats(original)["mean"],
                        "stopped_frac": float(np.mean([bool(t["stop_positions"]) for t in mine])),
                        "retries_mean": float(np.mean([t["retries"] for t in mine])),
                        "retries_max": int(max(t["retries"] for t in mine)),
                        "stop_position": _stats(np.array(stops, dtype=float))}
    return out


def entropy_over_positions(traces: list[dict], max_lines: int = 6, max_panels: int = 6):
    """One panel per setting (up to `max_panels`): entropy over the generated positions for a few
    samples (the most stopped first) with their thresholds dashed and forced stops marked, and the
    mean entropy of all samples. None when no trace has a token."""
    names = list(dict.fromkeys(t["setting"] for t in traces if t["entropy"]))
    if not names:
        return None
    # round-robin over name prefixes ("plain", "slot", "srgen"): every family gets a panel first
    families = list(dict.fromkeys(n.split("_")[0] for n in names))
    rank = {n: [m for m in names if m.split("_")[0] == n.split("_")[0]].index(n) for n in names}
    settings = sorted(names, key=lambda n: (rank[n], families.index(n.split("_")[0])))[:max_panels]
    fig, axes = new_figure(min(3, len(settings)), len(settings))
    colors = [f"C{i}" for i in range(10)]
    for ax, setting in zip(axes, settings):
        mine = [t for t in traces if t["setting"] == setting and t["entropy"]]
        longest = max(len(t["entropy"]) for t in mine)
        padded = np.full((len(mine), longest), np.nan)
        for i, t in enumerate(mine):
            padded[i, :len(t["entropy"])] = t["entropy"]
        # samples that were stopped first, so the plot shows the thresholds at work
        shown = sorted(mine, key=lambda t: -len(t["stop_positions"]))[:max_lines]
        for color, t in zip(colors, shown):
            x = np.arange(len(t["entropy"]))
            ax.plot(x, t["entropy"], color=color, lw=0.8, alpha=0.8)
            thr = np.array([np.nan if v is None else v for v in t["threshold"]], dtype=float)
            if np.isfinite(thr).any():
                ax.plot(x, thr, color=color, lw=0.8, ls="--")
            # at the entropy that triggered the stop (the kept token there is the retry's)
            at = t.get("stop_entropies") or [t["entropy"][p] if p < len(t["entropy"]) else np.nan
                                             for p in t["stop_positions"]]
            for pos, e in zip(t["stop_positions"], at):
                ax.plot(pos, e, "x", color="red", ms=7)
        ax.plot(np.arange(longest), np.nanmean(padded, axis=0), color="black", lw=2, label="mean entropy")
        ax.plot([], [], color="gray", ls="--", label="threshold (per sample)")
        ax.plot([], [], "x", color="red", label="forced stop")
        stopped = sum(1 for t in mine if t["stop_positions"])
        ax.set_title(f"{setting}: {len(mine)} samples, {stopped} stopped", fontsize=9)
        ax.set_xlabel("generated token position")
        ax.set_ylabel("entropy (nats)")
        ax.legend(fontsize=7)
    return fig


def sweep_figure(results: dict[str, float], sweep: list[tuple[str, int, float]], n: int):
    """Accuracy over times, one line per (mode, lr), the plain model as a band (± 1 s.e.); None if
    there is nothing to draw. Setting names are `plain` and `<mode>_t<times>_lr<lr>`."""
    if "plain" not in results or not sweep:
        return None
    fig, (ax,) = new_figure(panel_size=(6, 4.5))
    base = results["plain"]
    se = standard_error(base, n) if n else 0.0
    ax.axhline(base, color="black", lw=1.5, label=f"plain {base:.3f}")
    ax.axhspan(base - se, base + se, color="gray", alpha=0.2, label="plain ± 1 s.e.")
    for mode, lr in sorted({(m, lr) for m, _, lr in sweep}):
        points = sorted((t, results[f"{m}_t{t}_lr{lr:g}"]) for m, t, r in sweep if (m, r) == (mode, lr)
                        and f"{m}_t{t}_lr{lr:g}" in results)
        if points:
            ax.plot(*zip(*points), "o-" if mode == "srgen" else "s--", label=f"{mode} lr={lr:g}")
    ax.set_xlabel("optimization steps (times)")
    ax.set_ylabel(f"accuracy (n={n})")
    ax.set_title("TNOT / SLOT against the plain model")
    ax.legend(fontsize=8)
    return fig

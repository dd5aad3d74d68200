"""AutoDeco's diagnostics figures, drawn from the per-token points and JSON lines that
`callbacks.EntropyDiagnostics` collects during training (through `AutoDecoModule.diagnostics_figures`).

- `temperature_vs_required.png`: predicted vs required temperature, with y = x (above it min-p
  keeps the label) and the head's range [0, 2].
- `by_entropy.png`: each other per-token value (mean +/- std) in bins of token entropy.
- `over_steps.png`: the per-line means over training.
"""

from __future__ import annotations

import numpy as np

from testtime.io import new_figure

HEAD_T_RANGE = (0.0, 2.0)  # the temperature head's output range (sigmoid * 2)


def training_figures(points: dict[str, np.ndarray], records: list[dict], min_p_ratio: float | None = None) -> dict:
    """{file name: Figure} of the figures the data allows (a figure whose inputs are missing is left out)."""
    figures = {"temperature_vs_required.png": temperature_vs_required(points, min_p_ratio),
               "by_entropy.png": by_entropy(points),
               "over_steps.png": over_steps(records)}
    return {name: fig for name, fig in figures.items() if fig is not None}


def temperature_vs_required(points: dict[str, np.ndarray], min_p_ratio: float | None = None):
    t, t_req = points.get("temperature"), points.get("required_temperature")
    if t is None or t_req is None:
        return None
    ok = np.isfinite(t) & np.isfinite(t_req)
    t, t_req = t[ok], t_req[ok]
    if t.size == 0:
        return None
    fig, (ax,) = new_figure()
    x_hi = max(HEAD_T_RANGE[1] * 1.25, float(np.quantile(t_req, 0.99)) * 1.05)
    shown = np.minimum(t_req, x_hi)  # beyond the axis: drawn at its edge
    alpha = float(np.clip(2000.0 / t.size, 0.05, 0.8))
    ax.scatter(shown, t, s=4, alpha=alpha, color="tab:blue", linewidths=0, rasterized=True)
    ax.plot([0, x_hi], [0, x_hi], color="black", lw=1, label="T = T_req (min-p boundary)")
    ax.axhspan(*HEAD_T_RANGE, color="tab:green", alpha=0.06, label="head range [0, 2]")
    for y in HEAD_T_RANGE:
        ax.axhline(y, color="tab:green", lw=0.8, ls="--")
    ax.set_xlim(0, x_hi)
    ax.set_ylim(HEAD_T_RANGE[0] - 0.05, HEAD_T_RANGE[1] + 0.1)
    ax.set_xlabel("required temperature T_req" + (f" (min-p r = {min_p_ratio:g})" if min_p_ratio else ""))
    ax.set_ylabel("predicted temperature T")
    ax.set_title(f"{t.size} tokens: min-p keeps the label for {(t >= t_req).mean():.1%}")
    ax.legend(loc="lower right", fontsize=8)
    return fig


def by_entropy(points: dict[str, np.ndarray], num_bins: int = 10):
    entropy = points.get("entropy")
    others = [n for n in ("temperature", "top_p", "required_temperature") if n in points]
    others += sorted(n for n in points if n not in others and n not in ("entropy", "min_p_ok"))
    if entropy is None or not others or not np.isfinite(entropy).any():
        return None
    finite = entropy[np.isfinite(entropy)]
    hi = max(float(finite.max()), 1e-6)
    edges = np.linspace(0.0, hi, num_bins + 1)
    which = np.clip(np.digitize(entropy, edges[1:-1]), 0, num_bins - 1)
    centers = (edges[:-1] + edges[1:]) / 2
    # Predicted and required temperature share a panel; every other value gets its own.
    panels = [[n for n in ("temperature", "required_temperature") if n in others]]
    panels = [p for p in panels if p] + [[n] for n in others if n not in ("temperature", "required_temperature")]
    fig, axes = new_figure(len(panels))
    for ax, names in zip(axes, panels):
        counts = []
        for offset, name in zip((0.0, 0.15), names):
            means, stds, counts = [], [], []
            for b in range(num_bins):
                v = points[name][(which == b) & np.isfinite(entropy) & np.isfinite(points[name])]
                counts.append(v.size)
                means.append(v.mean() if v.size else np.nan)
                stds.append(v.std() if v.size else np.nan)
            x = centers + offset * (edges[1] - edges[0]) / 2
            ax.errorbar(x, means, yerr=stds, fmt="o-", capsize=3, ms=4, label=f"{name} (mean ± std)")
        for c, n in zip(centers, counts):
            if n:
                ax.annotate(str(n), (c, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom",
                            fontsize=6, color="gray")
        if "temperature" in names:
            ax.axhspan(*HEAD_T_RANGE, color="tab:green", alpha=0.06)
        ax.set_xlabel("entropy of the base distribution (nats)")
        ax.set_ylabel(" / ".join(names))
        ax.set_title(f"{' and '.join(names)} by token entropy")
        ax.legend(fontsize=8)
    return fig


def over_steps(records: list[dict]):
    if len(records) < 2:
        return None
    steps = [r["batch"] for r in records]
    fig, (ax,) = new_figure()
    for name in sorted({n for r in records for n in r["stats"]}):
        means = [(r["stats"].get(name) or {}).get("mean") for r in records]
        ax.plot(steps, [np.nan if m is None else m for m in means], label=f"mean {name}")
    ax.set_xlabel("training batch")
    ax.set_title("per-token diagnostics over training")
    ax.legend(fontsize=8)
    return fig

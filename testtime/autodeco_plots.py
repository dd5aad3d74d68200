"""AutoDeco's diagnostics figures, drawn from the per-token points and JSON lines that
`callbacks.EntropyDiagnostics` collects during training (through `AutoDecoModule.diagnostics_figures`).
Each figure says one thing:

- `temperature_vs_required.png`: does the temperature head keep the label under min-p? Predicted
  T against the required T_req (above the diagonal min-p keeps the label); points beyond the
  x-axis are drawn at its edge and counted in the legend.
- `by_entropy.png`: how the heads' outputs follow the base model's uncertainty: median and
  interquartile range of each value in bins of token entropy that hold equally many tokens.
- `over_steps.png`: how the per-token means moved during training, one panel per unit
  (temperatures, top-p mass, entropy in nats, the fraction whose label min-p keeps).
- `temperature_by_token.png` (test): where AutoDeco departs from a static setting: the T the
  heads chose for each generated token, by token type (`token_types`) and by position.
"""

from __future__ import annotations

import re

import numpy as np

from testtime.io import new_figure

HEAD_T_MAX = 2.0  # the temperature head's upper bound (sigmoid * 2)


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
    x_hi = max(HEAD_T_MAX * 1.25, float(np.quantile(t_req, 0.99)) * 1.05)
    inside = t_req <= x_hi
    alpha = float(np.clip(2000.0 / t.size, 0.05, 0.8))
    ax.scatter(t_req[inside], t[inside], s=4, alpha=alpha, color="tab:blue", linewidths=0, rasterized=True,
               label="tokens")
    beyond = int((~inside).sum())
    if beyond:
        ax.scatter(np.full(beyond, x_hi), t[~inside], s=14, marker=">", color="tab:red", linewidths=0,
                   label=f"{beyond} tokens with T_req > {x_hi:.1f}, drawn at the edge")
    ax.plot([0, x_hi], [0, x_hi], color="black", lw=1, label="T = T_req: above it min-p keeps the label")
    ax.axhline(HEAD_T_MAX, color="tab:green", lw=0.8, ls="--", label=f"the head's maximum T = {HEAD_T_MAX:g}")
    ax.set_xlim(0, x_hi * 1.02)
    ax.set_ylim(0, HEAD_T_MAX * 1.05)
    ratio = f", min-p ratio r = {min_p_ratio:g}" if min_p_ratio else ""
    ax.set_xlabel(f"required temperature T_req = (max logit - label logit) / -ln r{ratio}")
    ax.set_ylabel("predicted temperature T (divides the logits)")
    ax.set_title(f"{t.size} tokens: min-p keeps the label for {(t >= t_req).mean():.1%}")
    ax.legend(loc="upper left", fontsize=7)
    return fig


def _equal_count_bins(values: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin index of each value, bins holding (nearly) equally many values."""
    order = np.argsort(values, kind="stable")
    which = np.empty(values.size, dtype=int)
    which[order] = np.arange(values.size) * num_bins // max(values.size, 1)
    return which


UNITS = {"temperature": "temperature (dimensionless)", "required_temperature": "temperature (dimensionless)",
         "top_p": "top-p (probability mass)"}


def by_entropy(points: dict[str, np.ndarray], num_bins: int = 8, min_tokens: int = 20):
    """Median and interquartile range of T, T_req and P per bin of entropy; bins of equal counts,
    fewer bins when there are fewer than `min_tokens` per bin."""
    entropy = points.get("entropy")
    names = [n for n in ("temperature", "required_temperature", "top_p") if n in points]
    if entropy is None or not names:
        return None
    ok = np.isfinite(entropy)
    for name in names:
        ok &= np.isfinite(points[name])
    if ok.sum() < min_tokens:
        return None
    entropy = entropy[ok]
    num_bins = max(1, min(num_bins, int(ok.sum()) // min_tokens))
    which = _equal_count_bins(entropy, num_bins)
    centers = np.array([np.median(entropy[which == b]) for b in range(num_bins)])
    counts = np.bincount(which, minlength=num_bins)
    panels = [[n for n in ("temperature", "required_temperature") if n in names]] + [[n] for n in names if n == "top_p"]
    panels = [p for p in panels if p]
    fig, axes = new_figure(len(panels))
    for ax, group in zip(axes, panels):
        for offset, name in zip((-0.01, 0.01), group):
            v = points[name][ok]
            q25, q50, q75 = (np.array([np.quantile(v[which == b], q) for b in range(num_bins)])
                             for q in (0.25, 0.5, 0.75))
            x = centers * (1 + offset)
            ax.errorbar(x, q50, yerr=[q50 - q25, q75 - q50], fmt="o-", capsize=3, ms=4,
                        label=f"{name}: median, 25-75%")
        ax.set_xlabel(f"entropy of the base distribution (nats); {num_bins} bins of ~{int(counts.mean())} tokens")
        ax.set_ylabel(UNITS[group[0]])
        ax.set_ylim(bottom=0)
        ax.set_title(" and ".join(group) + " by token entropy")
        ax.legend(fontsize=7)
    return fig


def over_steps(records: list[dict]):
    """Per-line means over the training batches, one panel per unit."""
    if len(records) < 2:
        return None
    steps = [r["batch"] for r in records]
    groups = [("temperature (dimensionless)", ["temperature", "required_temperature"]),
              ("top-p (probability mass)", ["top_p"]),
              ("entropy (nats)", ["entropy"]),
              ("fraction of tokens", ["min_p_ok"])]
    present = {n for r in records for n in r["stats"]}
    groups = [(unit, [n for n in names if n in present]) for unit, names in groups]
    groups = [(unit, names) for unit, names in groups if names]
    if not groups:
        return None
    fig, axes = new_figure(min(2, len(groups)), len(groups), panel_size=(5.0, 3.6))
    for ax, (unit, names) in zip(axes, groups):
        for name in names:
            means = [(r["stats"].get(name) or {}).get("mean") for r in records]
            label = "min-p keeps the label (min_p_ok)" if name == "min_p_ok" else f"mean {name}"
            ax.plot(steps, [np.nan if m is None else m for m in means], label=label)
        ax.set_xlabel("training batch")
        ax.set_ylabel(unit)
        ax.legend(fontsize=7)
    fig.suptitle("per-token diagnostics over training")
    return fig


TOKEN_TYPES = ("number", "final answer", "operator", "word", "punctuation", "end")
_ANSWER_CUE = re.compile(r"\banswer\s*(is|:)?\s*$", re.IGNORECASE)


def token_types(texts: list[str], end_texts=()) -> list[str]:
    """The type of each generated token of one completion, from its decoded text: "end" (an EOS
    text, one of `end_texts`), "final answer" (the digits after "answer is" or "answer:"), "number" (other
    digits), "operator" (+ - * / x =), "word" (letters) or "punctuation" (the rest: ". , \\n" ...).
    Made for the project's solutions ("... The answer is 42."): other answer formats ("#### 42",
    "$42") and decimals after their point come out as "number" or "punctuation"."""
    types, text, in_answer = [], "", False
    for piece in texts:
        stripped = piece.strip()
        if piece in end_texts:
            kind = "end"
        elif stripped and all(c.isdigit() or c in "-," for c in stripped) and any(c.isdigit() for c in stripped):
            in_answer = in_answer or bool(_ANSWER_CUE.search(text))
            kind = "final answer" if in_answer else "number"
        elif stripped and all(c in "+-*/x=×÷" for c in stripped):
            kind = "operator"
        elif any(c.isalpha() for c in stripped):
            kind = "word"
        else:
            kind = "punctuation"
        if kind != "final answer":
            in_answer = False
        types.append(kind)
        text += piece
    return types


def _mean_se(v: np.ndarray) -> tuple[float, float]:
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def temperature_by_token(points: dict[str, np.ndarray], static: dict[str, float] | None = None,
                         position_bin: int = 4, min_tokens: int = 5):
    """(figure, summary) of the heads' T (and P, where there is a top-p head) per generated token:
    mean +- standard error by token type (`points["type"]`, see `token_types`) and by position in
    the completion (`points["position"]`, bins of `position_bin` tokens); `static` draws reference
    lines ({label: temperature}, e.g. the best static setting). Types or bins with fewer than
    `min_tokens` tokens are left out of the figure (their counts stay in the summary)."""
    t, kinds, pos = points["temperature"], np.asarray(points["type"]), np.asarray(points["position"])
    summary = {"tokens": int(len(t)), "by_type": {}, "by_position": {}}
    for kind in TOKEN_TYPES:
        sel = kinds == kind
        if sel.any():
            mean, se = _mean_se(t[sel])
            summary["by_type"][kind] = {"tokens": int(sel.sum()), "mean_temperature": mean, "se": se}
            if "top_p" in points:
                summary["by_type"][kind]["mean_top_p"] = float(points["top_p"][sel].mean())
    bins = pos // position_bin
    for b in np.unique(bins):
        sel = bins == b
        mean, se = _mean_se(t[sel])
        summary["by_position"][int(b * position_bin)] = {"tokens": int(sel.sum()), "mean_temperature": mean, "se": se}
    if not len(t):
        return None, summary
    fig, (ax_type, ax_pos) = new_figure(2)
    shown = [k for k, v in summary["by_type"].items() if v["tokens"] >= min_tokens]
    ax_type.bar(range(len(shown)), [summary["by_type"][k]["mean_temperature"] for k in shown],
                yerr=[summary["by_type"][k]["se"] for k in shown], capsize=3, color="tab:blue")
    ax_type.set_xticks(range(len(shown)), [f"{k}\n({summary['by_type'][k]['tokens']})" for k in shown], fontsize=7)
    ax_type.set_ylabel(UNITS["temperature"])
    ax_type.set_title("predicted T by token type (mean +- s.e.; token counts)")
    starts = [s for s, v in summary["by_position"].items() if v["tokens"] >= min_tokens]
    means = np.array([summary["by_position"][s]["mean_temperature"] for s in starts])
    ses = np.array([summary["by_position"][s]["se"] for s in starts])
    centers = np.array(starts) + (position_bin - 1) / 2
    ax_pos.plot(centers, means, "o-", ms=3, color="tab:blue", label="AutoDeco T")
    ax_pos.fill_between(centers, means - ses, means + ses, color="tab:blue", alpha=0.2)
    ax_pos.set_xlabel(f"position of the generated token (bins of {position_bin})")
    ax_pos.set_ylabel(UNITS["temperature"])
    ax_pos.set_title("predicted T over the completion")
    for (label, value), color in zip((static or {}).items(), ("tab:red", "tab:green", "tab:gray")):
        for ax in (ax_type, ax_pos):
            ax.axhline(value, color=color, ls="--", lw=1, label=f"{label} T={value:.2f}")
    for ax in (ax_type, ax_pos):
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    return fig, summary

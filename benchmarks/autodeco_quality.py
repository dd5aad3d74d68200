"""AutoDeco's quality study: the test tables of several `cli.py fit` runs side by side.

    python benchmarks/autodeco_quality.py RESULTS_DIR --out runs/bench/autodeco_quality

RESULTS_DIR holds run folders (any depth) with the `config.yaml` LightningCLI saves and the
`test_results.json` AutoDecoModule's test writes (e.g. `benchmarks/gpu_quality.sh`'s tarball,
unpacked), and optionally `rejection/*.stats.json` (the sidecars of the rejection-sampled sets).
One row per run: objective, difficulty, the training set (problems x samples at T, the solutions
kept), the heads' mean (T, P), AutoDeco and the static setting equal to that mean, beside the
baselines every run shares when its test problems and seeds are the same (greedy, default sampling,
the best static setting chosen on validation). Writes quality.json, quality.md and quality.png
(accuracy per run, the shared baselines as lines; one panel per difficulty) into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import finish  # noqa: E402
from testtime.io import standard_error  # noqa: E402


def stats_for(stats: list[dict], data: dict) -> dict | None:
    """The rejection sidecar built with this run's problems and sampling settings."""
    for s in stats:
        p, k = s["problems_settings"], s["settings"]
        if (p["n_train"], p["difficulty"], p["seed"], k["k"], k["temperature"]) == (
                data["n_train"], data["difficulty"], data.get("seed", 0), data["samples_per_problem"],
                data["sample_temperature"]):
            return s
    return None


def collect(root: Path) -> list[dict]:
    stats = [json.loads(p.read_text()) for p in sorted(root.rglob("*.stats.json"))]
    rows = []
    for path in sorted(root.rglob("test_results.json")):
        config = yaml.safe_load((path.parent / "config.yaml").read_text())
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        test = json.loads(path.read_text())
        built = stats_for(stats, data)
        rows.append({
            "run": str(path.parent.relative_to(root)), "objective": model["objective"],
            "difficulty": data["difficulty"], "n_train": data["n_train"], "k": data["samples_per_problem"],
            "sample_temperature": data["sample_temperature"],
            "solutions": None if built is None else built["kept"] - built.get("kept_unfinished", 0),
            "n_test": test["n_problems"], "eval_k": test["k"], "mean_prediction": test["mean_prediction"],
            "best_static": test["best_static"], "results": test["results"],
            "validation_autodeco": test.get("validation_results", {}).get("autodeco")})
    rows.sort(key=lambda r: (r["difficulty"], -r["sample_temperature"], r["n_train"] * r["k"],
                             r["objective"] != "legacy_ce"))
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for difficulty in sorted({r["difficulty"] for r in rows}):
        group = [r for r in rows if r["difficulty"] == difficulty]
        first = group[0]
        res, n = first["results"], first["n_test"]
        shared = ("greedy", "best_static")
        differ = [r["run"] for r in group if any(r["results"][key] != res[key] for key in shared)]
        if differ:  # other test problems or seeds: the rows do not compare
            raise SystemExit(f"difficulty {difficulty}: {', '.join(differ)} score greedy / best static unlike "
                             f"{first['run']}: not the same test problems and seeds")
        base = ", ".join(f"{name} {res[key]:.3f}" for name, key in (
            ("greedy", "greedy"), ("default sampling", next(k for k in res if k.startswith("sample_T1_p1"))),
            (f"best static on validation ({first['best_static']})", "best_static")))
        lines += [f"Difficulty {difficulty}, {n} test problems, k = {first['eval_k']} (s.e. ~{standard_error(res['greedy'], n):.3f}): "
                  f"{base}", "",
                  "| objective | training set: problems x samples at T -> solutions | heads' mean T, P | "
                  "static = mean | AutoDeco | AutoDeco on validation |", "|---|---|---:|---:|---:|---:|"]
        for r in group:
            t, p = r["mean_prediction"] or (float("nan"), float("nan"))
            lines.append(f"| {r['objective']} | {r['n_train']} x {r['k']} at {r['sample_temperature']:g} -> "
                         f"{r['solutions']} | {t:.2f}, {p:.3f} | {r['results']['mean_static']:.3f} | "
                         f"{r['results']['autodeco']:.3f} | {r['validation_autodeco']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    from testtime.io import new_figure, save_figure

    rows = results["rows"]
    difficulties = sorted({r["difficulty"] for r in rows})
    fig, axes = new_figure(ncols=len(difficulties), panel_size=(7.0, 5.0))
    for ax, difficulty in zip(axes, difficulties):
        group = [r for r in rows if r["difficulty"] == difficulty]
        res = group[0]["results"]
        labels = [f"{'hinge' if 'hinge' in r['objective'] else 'CE'} {r['n_train']}x{r['k']}@T{r['sample_temperature']:g}"
                  f"\n{r['solutions']} sol." for r in group]
        x = range(len(group))
        n = group[0]["n_test"]
        for shift, key, name in ((-0.2, "autodeco", "AutoDeco"), (0.2, "mean_static", "static = heads' mean")):
            values = [r["results"][key] for r in group]
            ax.bar([i + shift for i in x], values, 0.4, yerr=[standard_error(v, n) for v in values], capsize=2, label=name)
        for key, name, style in (("greedy", "greedy", "-"), ("best_static", "best static (validation)", "--")):
            ax.axhline(res[key], color="k" if key == "greedy" else "gray", ls=style, lw=1, label=name)
        ax.set_xticks(list(x), labels, fontsize=6, rotation=35, ha="right")
        ax.set_ylabel(f"test pass@1 ({n} problems; bars +- 1 s.e.)")
        ax.set_title(f"difficulty {difficulty}", fontsize=9)
        ax.legend(fontsize=6)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results_dir")
    parser.add_argument("--out", default="runs/bench/autodeco_quality")
    args = parser.parse_args()
    rows = collect(Path(args.results_dir))
    if not rows:
        raise SystemExit(f"no test_results.json under {args.results_dir}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    finish({"rows": rows}, str(out / "quality.json"), table(rows), plot)


if __name__ == "__main__":
    main()

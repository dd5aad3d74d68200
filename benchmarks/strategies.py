"""Every recipe under every trainer file: exit status, step time and peak memory; checkpoints across
strategies; export from an FSDP checkpoint.

    python benchmarks/strategies.py --cpu --recipes configs/sft/tiny.yaml --out /tmp/strategies   # smoke test

On the GPU machine (one GPU: every strategy at world size 1; from the repository root with the
wheels of ../shared/device/wheels.sh installed and PYTHONPATH=$PWD):

    python benchmarks/strategies.py --out $OUT/strategies            # every tiny recipe x gpu, ddp, fsdp

For each recipe and trainer file (`configs/trainer/<strategy>.yaml`): `fit` for --max-steps steps
(`test` for the evaluation-only TNOT), through the CLI as a user runs it, with a probe callback
that times each training step (device synchronized) and reads the peak GPU memory. Then, per
recipe that trained: the FSDP checkpoint validated under no strategy (gpu.yaml) and the gpu.yaml
checkpoint under FSDP, and `export` from both checkpoints: the same files, and the FSDP export's
tensors equal to its checkpoint's. What one GPU cannot show (scaling, communication, sharding
across ranks) is not measured here.

Writes `<out>.json` (rewritten after every run) and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import dump, log  # noqa: E402

EVALUATION_ONLY = {"configs/tnot/tiny.yaml", "configs/tnot/smollm2.yaml"}
STRATEGIES = ("gpu", "ddp", "fsdp")


class StepProbe(L.Callback):
    """Times every training (or test) step with the device synchronized, and the peak GPU memory;
    writes them as JSON to `out` at the end (rank 0)."""

    def __init__(self, out: str):
        self.out, self.seconds, self.start = out, [], None

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def _begin(self, trainer, pl_module, *args):
        self._sync(pl_module)
        self.start = time.perf_counter()

    def _end(self, trainer, pl_module, *args):
        self._sync(pl_module)
        self.seconds.append(time.perf_counter() - self.start)

    on_train_batch_start = on_test_batch_start = _begin
    on_train_batch_end = on_test_batch_end = _end

    def _write(self, trainer, pl_module):
        if trainer.global_rank == 0:
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
            Path(self.out).write_text(json.dumps({"step_seconds": self.seconds, "peak_gib": peak}))

    on_train_end = on_test_end = _write


def cli(*args: str, timeout: int) -> tuple[int, str, float]:
    """(exit status, the end of stderr, seconds) of `python cli.py ARGS`."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        return done.returncode, done.stderr[-1500:], time.perf_counter() - start
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s", time.perf_counter() - start


def run_one(recipe: str, strategy: str, args, folder: Path) -> dict:
    subcommand = "test" if recipe in EVALUATION_ONLY else "fit"
    probe = folder / "probe.json"
    settings = ["--config", str(ROOT / recipe), "--config", str(ROOT / f"configs/trainer/{strategy}.yaml"),
                f"--trainer.default_root_dir={folder}", "--trainer.logger=false",
                "--trainer.callbacks+=benchmarks.strategies.StepProbe", f"--trainer.callbacks.out={probe}"]
    if subcommand == "fit":
        settings += [f"--trainer.max_steps={args.max_steps}", "--trainer.limit_val_batches=0",
                     "--trainer.val_check_interval=null", "--trainer.enable_checkpointing=true"]
    else:
        settings += [f"--trainer.limit_test_batches={args.max_steps}"]
    if args.cpu:
        settings += ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"]
    started = time.time()
    code, err, seconds = cli(subcommand, *settings, timeout=args.timeout)
    keep_checkpoints(recipe, folder, started)
    row = {"recipe": recipe, "strategy": strategy, "subcommand": subcommand, "exit": code, "seconds": seconds}
    if code == 0 and probe.exists():
        measured = json.loads(probe.read_text())
        steps = measured["step_seconds"][1:] or measured["step_seconds"]  # the first step compiles, allocates
        row.update(step_ms=1e3 * statistics.median(steps) if steps else None, peak_gib=measured["peak_gib"])
    else:
        row["error"] = err.strip().splitlines()[-3:] if err else []
    checkpoints = sorted(folder.rglob("last.ckpt")) or sorted(folder.rglob("*.ckpt"))
    row["checkpoint"] = str(checkpoints[-1]) if checkpoints else None
    return row


def keep_checkpoints(recipe: str, folder: Path, since: float) -> None:
    """Move the checkpoints a run wrote where its recipe's ModelCheckpoint points (shared by every
    strategy's run) into the run's own folder."""
    import yaml

    trainer = (yaml.safe_load((ROOT / recipe).read_text()) or {}).get("trainer") or {}
    dirs = [ROOT / c["init_args"]["dirpath"] for c in trainer.get("callbacks") or []
            if isinstance(c, dict) and c.get("class_path", "").endswith("ModelCheckpoint")
            and (c.get("init_args") or {}).get("dirpath")]
    target = folder / "checkpoints"
    for directory in dirs:
        for ckpt in directory.glob("*.ckpt") if directory.is_dir() else []:
            if ckpt.stat().st_mtime >= since:
                target.mkdir(parents=True, exist_ok=True)
                ckpt.replace(target / ckpt.name)


def cross_checks(recipe: str, rows: dict, args, root: Path) -> dict:
    """The FSDP checkpoint under no strategy and the reverse (validate), and export from both (on a
    CPU smoke test the DDP checkpoint stands in for FSDP's)."""
    sharded = "ddp" if args.cpu else "fsdp"
    fsdp, single = rows.get(sharded, {}).get("checkpoint"), rows.get("gpu", {}).get("checkpoint")
    out = {"recipe": recipe, "against": sharded}
    cpu = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true"] if args.cpu else []
    for name, ckpt, trainer in (("fsdp_ckpt_under_gpu", fsdp, "gpu"), ("gpu_ckpt_under_fsdp", single, sharded)):
        if ckpt:
            code, err, _ = cli("validate", "--config", str(ROOT / recipe), "--config",
                               str(ROOT / f"configs/trainer/{trainer}.yaml"), "--trainer.logger=false",
                               "--trainer.limit_val_batches=2", f"--trainer.default_root_dir={root / name}",
                               f"--ckpt_path={ckpt}", *cpu, timeout=args.timeout)
            out[name] = code if code == 0 else f"exit {code}: {err.strip().splitlines()[-1:] if err else ''}"
    exports = {}
    for name, ckpt in (("fsdp", fsdp), ("gpu", single)):
        if ckpt:
            folder = root / f"export_{name}"
            code, err, _ = cli("export", "--config", str(ROOT / recipe), f"--ckpt_path={ckpt}",
                               f"--output_dir={folder}", timeout=args.timeout)
            exports[name] = folder if code == 0 else None
            out[f"export_{name}"] = code
    if exports.get("fsdp") and exports.get("gpu"):
        files = lambda f: sorted(p.name for p in f.iterdir())  # noqa: E731
        out["same_files"] = files(exports["fsdp"]) == files(exports["gpu"])
        out["export_equals_checkpoint"] = export_matches(exports["fsdp"], fsdp)
    return out


def export_matches(folder: Path, ckpt: str) -> bool | None:
    """Whether every tensor of the export's safetensors equals the checkpoint's (by name suffix)."""
    from safetensors.torch import load_file

    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    files = list(folder.glob("*.safetensors"))
    if not files:
        return None
    for file in files:
        for name, value in load_file(file).items():
            match = [v for k, v in state.items() if k.endswith(name)]
            if not match or not any(m.shape == value.shape and torch.equal(m.to(value.dtype), value) for m in match):
                return False
    return True


def table(results: dict) -> str:
    lines = ["| recipe | strategy | exit | step ms (median) | peak GiB |", "|---|---|---:|---:|---:|"]
    for r in results["runs"]:
        step = f"{r['step_ms']:.1f}" if r.get("step_ms") is not None else "-"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {r['recipe']} | {r['strategy']} | {r['exit']} | {step} | {peak} |")
    if results["cross"]:
        lines += ["", "| recipe | FSDP ckpt validated without a strategy | single-device ckpt under FSDP | "
                  "export from both: same files | FSDP export = its checkpoint |", "|---|---|---|---|---|"]
        lines += [f"| {c['recipe']} | {c.get('fsdp_ckpt_under_gpu', '-')} | {c.get('gpu_ckpt_under_fsdp', '-')} | "
                  f"{c.get('same_files', '-')} | {c.get('export_equals_checkpoint', '-')} |" for c in results["cross"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=None, help="comma list (default: every configs/*/tiny.yaml)")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per CLI run")
    parser.add_argument("--cpu", action="store_true", help="a smoke test: the gpu and ddp files on the CPU")
    parser.add_argument("--out", default="strategies")
    args = parser.parse_args()
    recipes = args.recipes.split(",") if args.recipes else sorted(
        str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*/tiny.yaml"))
    strategies = [s for s in args.strategies.split(",") if not (args.cpu and s == "fsdp")]  # FSDP needs a GPU
    root = Path(f"{args.out}_runs")
    results = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.cpu else "cpu",
               "torch": torch.__version__, "lightning": L.__version__, "runs": [], "cross": []}
    for recipe in recipes:
        by_strategy = {}
        for strategy in strategies:
            folder = root / Path(recipe).parent.name / Path(recipe).stem / strategy
            row = run_one(recipe, strategy, args, folder)
            by_strategy[strategy] = row
            results["runs"].append(row)
            log(f"{recipe} {strategy}: exit {row['exit']}, step {row.get('step_ms')} ms, peak {row.get('peak_gib')}"
                + (f"  {row['error']}" if row.get("error") else ""))
            dump(results, f"{args.out}.json")
        if recipe not in EVALUATION_ONLY and ("ddp" if args.cpu else "fsdp") in by_strategy and "gpu" in by_strategy:
            results["cross"].append(cross_checks(recipe, by_strategy, args, root / "cross" / Path(recipe).parent.name))
            log(f"{recipe} across strategies: {results['cross'][-1]}")
            dump(results, f"{args.out}.json")
    text = table(results)
    Path(f"{args.out}.md").write_text(text + "\n")
    log(text)


if __name__ == "__main__":
    main()

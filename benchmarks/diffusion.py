"""Masked diffusion LM samplers on held-out arithmetic at equal compute, and TTA's wall time.

    python benchmarks/diffusion.py --tiny --out runs/bench/diffusion_tiny.json             # CPU smoke test, seconds
    python benchmarks/diffusion.py --device cuda --out $OUT/diffusion.json                 # GPU: train, evaluate, time
    OMP_NUM_THREADS=1 python benchmarks/diffusion.py --device cpu --timing-only \\
        --out runs/bench/diffusion_cpu_timing.json                                          # CPU wall time

Plain PyTorch (no Lightning or datamodules: the GPU image has no trl / datasets), one
process: train, evaluate and time the same model.

Training (skipped with --model DIR, an export of `lightning_modules.masked_diffusion`, or with
--timing-only): a new `testtime.diffusion` model of --preset trained with LLaDA's SFT loss
(`diffusion_loss` with labels: the prompt never masked, each row divided by its answer length;
Nie et al. 2025) on the training problems of `testtime.tasks.make_splits(--n-train, --n-val,
--n-test, --seed, --difficulty)` laid out by `testtime.diffusion.data`, as the recipe's
`DiffusionTaskDataModule` serves them (left-padded prompt, then the worked solution padded with
labelled EOS to --gen-length; the same split sizes by default, so the held-out problems are the
recipe's validation + test problems). AdamW, linear warm-up then constant, gradient clipping at
1.0; --train-steps steps, or fewer if --train-seconds runs out first (recorded).

Accuracy (skipped with --timing-only) on the held-out problems (validation + test: never trained
on), each decoded --repeats times with seeds seed + 1000 r + batch (the same for every method),
answers scored as `testtime.evaluation` scores them (cut at the first EOS, last number). For each
S in --steps, at gen_length = block_length = --gen-length, temperature 0:
- `llada_s<S>` (low-confidence remasking, LLaDA's baseline), `random_s<S>` (random order),
  `remdm_s<S>` (ReMDM-cap, eta 0.008), `tta_k<K>_s<S>` for K in --tta-ks (TTA uncertainty
  sampling, the seed's defaults), and `llada_s<S*K>`: the baseline given TTA's NFE as more steps
  (steps beyond gen_length commit nothing: LLaDA cannot spend more than one step per token);
- `fast_dllm` once, at Fast-dLLM's own setting (steps = gen_length, threshold 0.9); its NFE is adaptive.
Reported per method: accuracy ± s.e. (over problems, of each problem's mean over repeats), NFE per
sequence, and paired differences ± s.e. to `llada_s<S>` and to the baseline at equal NFE. Also the
baseline's accuracy on the training problems, to tell fitting from generalizing.

Wall time: TTA at K = 5 (--timing-ks) against `llada` at the same --timing-steps, per batch size
(the first held-out prompts, repeated if needed), interleaved over --timing-repeats rounds (order
reversed every other round) after one warm-up each; the ratio is the median over rounds of the
paired ratio. Goal: at most 2.0x at K = 5 (the seed's guide: "~5x slower"). Speed does not depend
on the weights: --timing-only uses a new model of --preset.

Writes the JSON given by --out, the markdown tables (.md) and a PNG of accuracy against NFE and of
the time ratios (.png) next to it, and prints the tables.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import dump, environment, finish, log, paired_ratio, timed  # noqa: E402
from testtime.diffusion import SAMPLERS, build_model, diffusion_loss, generate_with_tta_uncertainty  # noqa: E402
from testtime.diffusion.data import collate_examples, encode_example  # noqa: E402
from testtime.diffusion.model import parameter_count  # noqa: E402
from testtime.evaluation import is_correct  # noqa: E402
from testtime.lm import cut_at_eos, encode_prompt, left_pad  # noqa: E402
from testtime.tasks import make_splits, prompt_messages  # noqa: E402

TIMING_GOAL = 2.0


def load_or_train(args, splits, device):
    """(model in eval mode, tokenizer, training record)."""
    if args.model:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        model = AutoModelForMaskedLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
        return model, AutoTokenizer.from_pretrained(args.model), {"loaded_from": args.model}
    model, tokenizer = build_model(args.preset, seed=args.seed)
    model.to(device)
    record = {"preset": args.preset, "parameters": parameter_count(model), "steps": 0, "seconds": 0.0, "loss": [],
              "held_out_accuracy": []}
    if args.timing_only or args.train_steps == 0:
        return model.eval(), tokenizer, record
    examples = [encode_example(tokenizer, p, args.gen_length) for p in splits["train"]]
    held_out = splits["validation"] + splits["test"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = max(1, args.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    rng, order = random.Random(args.seed), []
    model.train()
    started, running = time.perf_counter(), None
    for step in range(1, args.train_steps + 1):
        if len(order) < args.batch_size:  # epochs of shuffled problems
            order += rng.sample(range(len(examples)), len(examples))
        batch = collate_examples([examples[i] for i in order[:args.batch_size]], tokenizer.pad_token_id)
        batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
        del order[:args.batch_size]
        loss, _ = diffusion_loss(model, batch["input_ids"], tokenizer.mask_token_id, labels=batch["labels"],
                                 attention_mask=batch["attention_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        elapsed = time.perf_counter() - started
        if step % args.log_every == 0 or step == args.train_steps:
            record["loss"].append((step, running))
            log(f"  step {step}: loss (smoothed) {running:.4f}, {elapsed:.0f} s")
        if args.eval_every and step % args.eval_every == 0:  # the learning curve: llada at the most --steps
            model.eval()
            curve = score(model, tokenizer, dict(sampler="llada", steps=max(args.steps)), held_out, args.gen_length,
                          args.eval_batch_size, 1, args.seed, device)["accuracy"]
            model.train()
            record["held_out_accuracy"].append((step, curve))
            log(f"  step {step}: held-out accuracy of llada_s{max(args.steps)} {curve:.3f}")
        record["steps"], record["seconds"] = step, elapsed
        if elapsed > args.train_seconds:
            log(f"  --train-seconds {args.train_seconds} reached after {step} steps")
            break
    record["stopped_by_time"] = record["steps"] < args.train_steps
    if args.save_model:
        model.save_pretrained(args.save_model)
        tokenizer.save_pretrained(args.save_model)
    return model.eval(), tokenizer, record


# ------------------------------------------------------------------------------------------------
# decoding

def decode(model, method: dict, ids, mask, gen_length: int, seed: int):
    """(tokens, NFE per sequence) of one method on a left-padded batch."""
    common = dict(steps=method["steps"], gen_length=gen_length, block_length=gen_length, attention_mask=mask, seed=seed)
    if method["sampler"] == "tta":
        tokens, logs = generate_with_tta_uncertainty(model, ids, tta_k=method["tta_k"], **common)
        return tokens, logs["nfe"]
    return SAMPLERS[method["sampler"]](model, ids, temperature=0.0, return_nfe=True, **method.get("kwargs", {}),
                                       **common)


def accuracy_methods(steps_list: list[int], tta_ks: list[int], gen_length: int) -> list[dict]:
    """Every method of the accuracy table; `reference`: the baseline at the same steps, `matched`: at equal NFE."""
    methods = []
    for s in steps_list:
        base = f"llada_s{s}"
        methods += [dict(name=base, sampler="llada", steps=s, reference=base, matched=base),
                    dict(name=f"random_s{s}", sampler="random", steps=s, reference=base, matched=base),
                    dict(name=f"remdm_s{s}", sampler="remdm", steps=s, reference=base, matched=base)]
        for k in tta_ks:
            methods += [dict(name=f"tta_k{k}_s{s}", sampler="tta", steps=s, tta_k=k, reference=base,
                             matched=f"llada_s{s * k}"),
                        dict(name=f"llada_s{s * k}", sampler="llada", steps=s * k, reference=base,
                             matched=f"llada_s{s * k}")]
    methods.append(dict(name="fast_dllm", sampler="fast_dllm", steps=gen_length, kwargs={"threshold": 0.9},
                        reference=f"llada_s{gen_length}" if gen_length in steps_list else None, matched=None))
    unique = {}
    for m in methods:  # llada at S * K may equal another S: run it once
        unique.setdefault(m["name"], m)
    return list(unique.values())


def score(model, tokenizer, method, problems, gen_length, batch_size, repeats, seed, device) -> dict:
    """Per-problem mean correctness over repeats, NFE per sequence and seconds."""
    correct = [0.0] * len(problems)
    nfe_total, seconds, examples = 0.0, 0.0, []
    eos = tokenizer.eos_token_id
    for r in range(repeats):
        for i, begin in enumerate(range(0, len(problems), batch_size)):
            chunk = problems[begin:begin + batch_size]
            ids, mask = left_pad([encode_prompt(tokenizer, prompt_messages(p)) for p in chunk], tokenizer.pad_token_id,
                                 device)
            elapsed, (tokens, nfe) = timed(lambda: decode(model, method, ids, mask, gen_length, seed + 1000 * r + i),
                                           device)
            seconds += elapsed
            nfe_total += float(nfe) * len(chunk)
            for j, (row, problem) in enumerate(zip(tokens[:, ids.shape[1]:].tolist(), chunk)):
                text = tokenizer.decode(cut_at_eos(row, [eos]), skip_special_tokens=True).strip()
                correct[begin + j] += is_correct(text, problem.answer) / repeats
                if r == 0 and len(examples) < 3:
                    examples.append({"question": problem.question, "completion": text})
    n = len(problems)
    return {"correct": correct, "accuracy": sum(correct) / n, "se": _se(correct),
            "nfe": nfe_total / (n * repeats), "seconds_per_sequence": seconds / (n * repeats), "examples": examples}


def _se(values: list[float]) -> float:
    """Standard error of the mean over problems (sample std / sqrt(n)); NaN for n < 2."""
    n = len(values)
    return statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")


def bench_accuracy(model, tokenizer, args, splits, device, results) -> None:
    held_out = splits["validation"] + splits["test"]
    methods = accuracy_methods(args.steps, args.tta_ks, args.gen_length)
    log(f"== accuracy: {len(held_out)} held-out problems x {args.repeats} repeats, {len(methods)} methods")
    rows = {}
    for method in methods:
        rows[method["name"]] = {**{k: v for k, v in method.items() if k != "kwargs"},
                                **score(model, tokenizer, method, held_out, args.gen_length, args.eval_batch_size,
                                        args.repeats, args.seed, device)}
        r = rows[method["name"]]
        log(f"  {method['name']}: {r['accuracy']:.3f} ± {r['se']:.3f}, NFE {r['nfe']:.1f}, e.g. "
            f"{r['examples'][0]['completion']!r}")
    for r in rows.values():
        for key in ("reference", "matched"):
            other = rows.get(r[key]) if r[key] else None
            if other is not None and other is not r:
                diff = [a - b for a, b in zip(r["correct"], other["correct"])]
                r[f"delta_{key}"] = (sum(diff) / len(diff), _se(diff))
    base = f"llada_s{max(args.steps)}"
    train = score(model, tokenizer, next(m for m in methods if m["name"] == base), splits["train"], args.gen_length,
                  args.eval_batch_size, 1, args.seed, device)
    results["accuracy"] = {"held_out_problems": len(held_out), "repeats": args.repeats, "methods": rows,
                           "train_accuracy": {base: train["accuracy"], "problems": len(splits["train"])}}
    dump(results, args.out)


# ------------------------------------------------------------------------------------------------
# wall time

def bench_timing(model, tokenizer, args, splits, device, results) -> None:
    prompts = [encode_prompt(tokenizer, prompt_messages(p)) for p in splits["validation"] + splits["test"]]
    s = args.timing_steps
    methods = [dict(name="llada", sampler="llada", steps=s)] + \
        [dict(name=f"tta_k{k}", sampler="tta", steps=s, tta_k=k) for k in args.timing_ks]
    log(f"== wall time at steps={s}, gen_length={args.gen_length}, {args.timing_repeats} rounds")
    rows = []
    for b in args.batch_sizes:
        chosen = [prompts[i % len(prompts)] for i in range(b)]
        ids, mask = left_pad(chosen, tokenizer.pad_token_id, device)
        times = {m["name"]: [] for m in methods}
        for m in methods:  # warm-up (allocator, kernels)
            decode(model, m, ids, mask, args.gen_length, args.seed)
        for round_ in range(args.timing_repeats):
            for m in methods if round_ % 2 == 0 else methods[::-1]:
                elapsed, _ = timed(lambda: decode(model, m, ids, mask, args.gen_length, args.seed + round_), device)
                times[m["name"]].append(elapsed)
        row = {"batch": b, "steps": s, **{f"{n}_s": statistics.median(t) for n, t in times.items()}}
        for m in methods[1:]:
            ratios = [x / y for x, y in zip(times[m["name"]], times["llada"])]
            row[f"{m['name']}_ratio"] = paired_ratio(times[m["name"]], times["llada"])
            row[f"{m['name']}_ratio_range"] = (min(ratios), max(ratios))
        rows.append(row)
        log("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                             if not k.endswith("_range")))
        results["timing"] = rows
        dump(results, args.out)


# ------------------------------------------------------------------------------------------------
# report

def markdown(results) -> str:
    lines = []
    train = results.get("training", {})
    if train.get("steps"):
        lines.append(f"Training: preset {train['preset']} ({train['parameters']:,} parameters), {train['steps']} steps "
                     f"in {train['seconds']:.0f} s, final smoothed loss {train['loss'][-1][1]:.4f}"
                     + (" (stopped by --train-seconds)" if train.get("stopped_by_time") else "") + ".")
    if train.get("held_out_accuracy"):
        curve = ", ".join(f"{a:.3f} at step {s}" for s, a in train["held_out_accuracy"])
        lines.append(f"Held-out accuracy of llada during training: {curve}.")
    acc = results.get("accuracy")
    if acc:
        (base, train_acc), = [(k, v) for k, v in acc["train_accuracy"].items() if k != "problems"]
        lines += [f"Held-out problems: {acc['held_out_problems']} x {acc['repeats']} repeats; {base} on the "
                  f"{acc['train_accuracy']['problems']} training problems: {train_acc:.3f}.", "",
                  "| method | steps | NFE / seq | accuracy ± s.e. | Δ vs llada, same steps | Δ vs llada, same NFE |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in acc["methods"].values():
            def delta(key):
                return f"{r[key][0]:+.3f} ± {r[key][1]:.3f}" if key in r else "-"
            lines.append(f"| {r['name']} | {r['steps']} | {r['nfe']:.1f} | {r['accuracy']:.3f} ± {r['se']:.3f} | "
                         f"{delta('delta_reference')} | {delta('delta_matched')} |")
    timing = results.get("timing")
    if timing:
        names = [k[:-6] for k in timing[0] if k.endswith("_ratio")]
        lines += ["", f"Wall time at steps={timing[0]['steps']} (median of paired ratios; "
                      f"goal <= {TIMING_GOAL}x at K=5):",
                  "", "| batch | llada s | " + " | ".join(f"{n} s | {n} / llada (range)" for n in names) + " |",
                  "|---:|---:|" + "---:|---:|" * len(names)]
        for r in timing:
            cells = " | ".join(f"{r[n + '_s']:.4f} | {r[n + '_ratio']:.2f}x ({r[n + '_ratio_range'][0]:.2f}-"
                               f"{r[n + '_ratio_range'][1]:.2f})" for n in names)
            lines.append(f"| {r['batch']} | {r['llada_s']:.4f} | {cells} |")
    return "\n".join(lines)


def plot(results, path: Path) -> None:
    from testtime.io import new_figure, save_figure

    acc, timing = results.get("accuracy"), results.get("timing")
    panels = [p for p in (acc, timing) if p]
    if not panels:
        return
    fig, axes = new_figure(ncols=len(panels))
    if acc:
        ax = axes[0]
        for family, marker in (("llada", "o"), ("random", "v"), ("remdm", "s"), ("tta", "D"), ("fast_dllm", "*")):
            rows = sorted((r for r in acc["methods"].values() if r["sampler"] == family), key=lambda r: r["nfe"])
            if rows:
                ax.errorbar([r["nfe"] for r in rows], [r["accuracy"] for r in rows], yerr=[r["se"] for r in rows],
                            fmt=marker, capsize=3, label=family, ls="-" if family == "llada" else "")
        ax.set_xscale("log")
        ax.set_xlabel("network evaluations per sequence (NFE, log)")
        ax.set_ylabel(f"held-out accuracy (n={acc['held_out_problems']})")
        ax.set_title("Samplers at equal compute", fontsize=9)
        ax.legend(fontsize=7)
    if timing:
        ax = axes[-1]
        for name in [k[:-6] for k in timing[0] if k.endswith("_ratio")]:
            ax.plot([r["batch"] for r in timing], [r[f"{name}_ratio"] for r in timing], "o-", label=f"{name} / llada")
        ax.axhline(TIMING_GOAL, color="tab:green", ls="--", lw=1, label=f"goal {TIMING_GOAL}x")
        ax.set_xscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"wall time ratio at steps={timing[0]['steps']}")
        ax.set_title(f"TTA wall time, {results['device'] or 'CPU'} ({results['threads']} threads)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps and problems: a CPU smoke test")
    p.add_argument("--timing-only", action="store_true", help="only the wall time, on a new (untrained) model")
    p.add_argument("--model", default=None, help="an exported diffusion LM folder to evaluate instead of training one")
    p.add_argument("--save-model", default=None, help="write the trained model (an HF folder) here")
    p.add_argument("--preset", default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--difficulty", type=int, default=1)
    p.add_argument("--n-train", type=int, default=95)
    p.add_argument("--n-val", type=int, default=30)
    p.add_argument("--n-test", type=int, default=30)
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--train-steps", type=int, default=20000)
    p.add_argument("--train-seconds", type=float, default=330, help="stop training after this many seconds")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1.0)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=2000, help="held-out accuracy during training (0: never)")
    p.add_argument("--steps", default="8,32", help="sampler steps of the accuracy table (comma list)")
    p.add_argument("--tta-ks", default="3,5,7")
    p.add_argument("--repeats", type=int, default=4, help="decodes per held-out problem (seeds)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--timing-steps", type=int, default=32)
    p.add_argument("--timing-ks", default="5")
    p.add_argument("--batch-sizes", default="1,16,64", help="batch sizes of the wall-time rows")
    p.add_argument("--timing-repeats", type=int, default=5)
    p.add_argument("--out", default="runs/bench/diffusion.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.preset, args.n_train, args.train_steps, args.log_every, args.warmup_steps = "tiny", 32, 20, 10, 5
        args.eval_every = 10
        args.n_val, args.n_test, args.batch_size, args.repeats = 4, 4, 8, 1
        args.steps, args.tta_ks, args.timing_steps, args.timing_ks = "8", "3,5", 8, "5"
        args.batch_sizes, args.timing_repeats = "1,4", 2
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    args.steps, args.tta_ks, args.timing_ks, args.batch_sizes = (ints(args.steps), ints(args.tta_ks),
                                                                 ints(args.timing_ks), ints(args.batch_sizes))
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = {**environment(args, device, torch.float32), "threads": torch.get_num_threads()}
    splits = make_splits(args.n_train, args.n_val, args.n_test, seed=args.seed, difficulty=args.difficulty)
    log(f"== model ({'loaded' if args.model else 'trained' if not args.timing_only else 'new, untrained'})")
    model, tokenizer, results["training"] = load_or_train(args, splits, device)
    dump(results, args.out)
    if not args.timing_only:
        bench_accuracy(model, tokenizer, args, splits, device, results)
    bench_timing(model, tokenizer, args, splits, device, results)
    finish(results, args.out, markdown(results), plot)


if __name__ == "__main__":
    main()

"""TinyLoRA in miniature: trainable parameters against held-out accuracy under SFT and GRPO, and
the training-step / decoding cost of TinyLoRA against LoRA of the same rank.

    python benchmarks/tinylora.py study --out runs/bench/tinylora                 # SmolLM2-135M, CPU, hours
    python benchmarks/tinylora.py study --tiny --out /tmp/tinylora                # smoke test, seconds
    python benchmarks/tinylora.py step-time --device cuda --out runs/bench/tinylora-gpu
    python benchmarks/tinylora.py step-time --tiny --device cpu --out /tmp/tinylora-step

`study` ("Learning to Reason in 13 Parameters", Morris et al. 2026, in miniature): the embedded
SmolLM2-135M-Instruct on the arithmetic tasks of `testtime.tasks`, every adapter over all linear
layers of the blocks (210 modules): TinyLoRA r=2 fully tied with u=1 and u=13, TinyLoRA u=64
untied, VeRA, LoRA r=1 and r=8, each trained under SFT (reference solutions, completion-only
loss) and under GRPO (the answer check as reward, G completions per prompt, T=1), with the same
steps and the same number of examples per step (SFT: batch x G reference solutions; GRPO: batch
prompts x G samples). Each is scored on the same held-out test problems, greedy and T=1 pass@1
over k samples (`testtime.evaluation.evaluate`, identical seeds), beside the base model. On a
2-core CPU the study takes hours: each GRPO step samples 32 completions and back-propagates
through them, and each TinyLoRA row first spends ~30 s on PEFT's 210 SVDs (with more torch
threads than free cores, MKL's SVD and matmuls slow down many times: set --threads). Writes
`study.json` (rewritten after every row: a killed run keeps what it finished, and a rerun with
the same --out skips finished rows unless --fresh), `study.md` and `study.png` (accuracy against
trainable parameters, log scale). Learning rates per method: --lr; each method keeps the same
rate under SFT and GRPO.

`step-time`: random-weight Llama configs (`benchmarks.common`), float32 master weights under
bf16 autocast (the recipes' bf16-mixed) on a GPU. Per adapter: one training step (forward,
next-token loss over a [batch, seq] of tokens, backward, AdamW) and sampled decoding with the
adapter unmerged (GRPO's rollouts), against LoRA r=2 and the model without adapter; methods
interleaved over --repeats rounds, medians and paired ratios (`benchmarks.common.paired_ratio`).
Writes `step_time.json`, `step_time.md`, `step_time.png`. Imports neither trl nor datasets.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import default_dtype, environment, log, paired_ratio, random_llama, timed  # noqa: E402
from testtime.io import atomic_write_text, new_figure, save_figure, standard_error  # noqa: E402
from testtime.lm import next_token_loss  # noqa: E402
from testtime.tinylora import adapter_config, apply_adapter, trainable_parameters  # noqa: E402

# name -> (peft_method, adapter_config kwargs); every adapter targets "all-linear"
ADAPTERS = {
    "tinylora_u1_tied": ("tinylora", dict(r=2, u=1, weight_tying=1.0)),
    "tinylora_u13_tied": ("tinylora", dict(r=2, u=13, weight_tying=1.0)),
    "tinylora_u64_untied": ("tinylora", dict(r=2, u=64, weight_tying=0.0)),
    "vera_r256": ("vera", dict(r=256)),
    "lora_r1": ("lora", dict(r=1)),
    "lora_r8": ("lora", dict(r=8)),
}
# AdamW learning rates. TinyLoRA's vector acts on all 210 modules at once: on SmolLM2-135M with
# u=13 tied, |v_i| = 0.03 moves the next-token distributions by ~0.03 nats (KL), 0.1 by ~0.2 and
# 0.3 breaks the model (6 nats), so 40 steps of 2e-3 (Adam moves each v_i at most ~lr per step)
# stay in the useful range. LoRA: a usual small-model rate; VeRA's scaling vectors need large ones.
LEARNING_RATES = {"tinylora": 2e-3, "vera": 4e-3, "lora": 1e-4}


def _write(out: Path, stem: str, payload: dict, table: str, figure) -> None:
    atomic_write_text(out / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out / f"{stem}.md", table + "\n")
    if figure is not None:
        save_figure(figure, out / f"{stem}.png")


# ------------------------------------------------------------------------------------------------
# study: parameters against accuracy, SFT against GRPO


def _train(model, tokenizer, method: str, objective: str, train, args) -> dict:
    """`args.steps` AdamW steps of `objective` on the adapter of `model` (a PEFT-injected HF model)."""
    from datamodules.common import PadCollator, tokenize_prompt_completion
    from testtime.grpo import answer_reward, completion_logprobs, grpo_loss, sample_rollout
    from testtime.lm import encode_prompt, left_pad
    from testtime.tasks import prompt_messages, sft_example

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr[method], weight_decay=0.0)
    collate = PadCollator(tokenizer.pad_token_id)
    per_step = args.batch * args.generations  # examples (SFT) or samples (GRPO) per step
    rewards, losses = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        if objective == "grpo":
            problems = [train[(step * args.batch + i) % len(train)] for i in range(args.batch)]
            prompts = [encode_prompt(tokenizer, prompt_messages(p)) for p in problems]
            ids, mask = left_pad(prompts, tokenizer.pad_token_id)
            rollout = sample_rollout(model, tokenizer, ids, mask, [p.answer for p in problems], answer_reward,
                                     args.generations, args.max_new_tokens, temperature=1.0)
            logps = completion_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.completion_length)
            loss, _ = grpo_loss(logps, logps.detach(), rollout.advantages, rollout.completion_mask)
            rewards.append(rollout.rewards.mean().item())
        else:
            problems = [train[(step * per_step + i) % len(train)] for i in range(per_step)]
            batch = collate([tokenize_prompt_completion(tokenizer, sft_example(p)) for p in problems])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = next_token_loss(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            log(f"    step {step + 1}/{args.steps}: loss {loss.item():.4f}"
                + (f", reward {rewards[-1]:.3f}" if rewards else "") + f" ({time.perf_counter() - start:.0f} s)")
    return {"train_seconds": time.perf_counter() - start, "losses": losses, "train_rewards": rewards}


def _evaluate(model, tokenizer, test, args) -> dict:
    from testtime.evaluation import default_sampling, evaluate, greedy

    settings = [greedy(), default_sampling(args.k)]
    results = evaluate(model, tokenizer, test, settings, batch_size=args.eval_batch, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, progress=False)
    return {"greedy": results["greedy"], "pass1_T1": results[settings[1].name]}


def study(args) -> dict:
    from testtime.loading import load_model_and_tokenizer
    from testtime.tasks import make_splits

    out = Path(args.out)
    path = out / "study.json"
    results = json.loads(path.read_text()) if path.is_file() and not args.fresh else {}
    results = {"environment": environment(args, torch.device("cpu"), torch.float32), "rows": results.get("rows", [])}
    done = {(r["adapter"], r["objective"]) for r in results["rows"]}
    splits = make_splits(args.n_train, 0, args.n_test, seed=args.seed, difficulty=args.difficulty)
    train, test = splits["train"], splits["test"]
    log(f"study: {args.model}, difficulty {args.difficulty}, {len(train)} training / {len(test)} test problems, "
        f"{args.steps} steps x {args.batch * args.generations} examples or samples")

    runs = [("base", None)] + [(name, objective) for name in args.adapters for objective in args.objectives]
    for name, objective in runs:
        if (name, objective) in done:
            log(f"  {name} {objective or ''}: done before, kept")
            continue
        model, tokenizer = load_model_and_tokenizer(args.model)
        row = {"adapter": name, "objective": objective, "trainable_parameters": 0}
        if name != "base":
            method, kwargs = ADAPTERS[name]
            model = apply_adapter(model, adapter_config(method, **kwargs)).eval().get_base_model()
            row.update(method=method, **kwargs, learning_rate=args.lr[method],
                       trainable_parameters=trainable_parameters(model))
            log(f"  {name} {objective}: {row['trainable_parameters']:,} trainable parameters")
            torch.manual_seed(args.seed)
            row.update(_train(model, tokenizer, method, objective, train, args))
        row.update(_evaluate(model, tokenizer, test, args))
        log(f"  {name} {objective or ''}: greedy {row['greedy']:.3f}, T=1 pass@1 {row['pass1_T1']:.3f}")
        results["rows"].append(row)
        _write(out, "study", results, study_table(results["rows"], len(test), args.k), None)
    _write(out, "study", results, study_table(results["rows"], len(test), args.k), study_figure(results["rows"]))
    log(f"written: {out / 'study.json'}, study.md, study.png")
    return results


def study_table(rows: list[dict], n: int, k: int) -> str:
    lines = [f"| adapter | objective | trainable parameters | greedy (n={n}) | T=1 pass@1 (k={k}) | train s |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['adapter']} | {r['objective'] or '-'} | {r['trainable_parameters']:,} | "
                     f"{r['greedy']:.3f} ± {standard_error(r['greedy'], n):.3f} | "
                     f"{r['pass1_T1']:.3f} ± {standard_error(r['pass1_T1'], n):.3f} | "
                     f"{r.get('train_seconds', 0):.0f} |")
    return "\n".join(lines)


def study_figure(rows: list[dict]):
    fig, axes = new_figure(ncols=2)
    base = next((r for r in rows if r["adapter"] == "base"), None)
    for ax, metric, title in zip(axes, ("greedy", "pass1_T1"), ("greedy", "T=1 pass@1")):
        for objective, marker in (("sft", "s"), ("grpo", "o")):
            points = sorted((r["trainable_parameters"], r[metric], r["adapter"])
                            for r in rows if r["objective"] == objective)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=objective.upper())
                for x, y, name in points:
                    ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if base is not None:
            ax.axhline(base[metric], color="gray", linestyle="--", label="base")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"held-out accuracy ({title})")
        ax.set_title(title)
        ax.legend()
    return fig


# ------------------------------------------------------------------------------------------------
# step time: TinyLoRA against LoRA


STEP_VARIANTS = {  # name -> (peft_method, kwargs); None: the model without adapter
    "no_adapter": None,
    "lora_r2": ("lora", dict(r=2)),
    "tinylora_r2_u13_tied": ("tinylora", dict(r=2, u=13, weight_tying=1.0)),
    "tinylora_r2_u64_untied": ("tinylora", dict(r=2, u=64, weight_tying=0.0)),
}


def step_time(args) -> dict:
    device = torch.device(args.device)
    dtype = default_dtype(device, args.dtype)
    out = Path(args.out)
    results = {"environment": environment(args, device, dtype), "rows": []}
    for name in args.models:
        models = {}
        for variant, spec in STEP_VARIANTS.items():
            model = random_llama(name, device, torch.float32)  # the same seeded weights for every variant
            models[variant] = (model.requires_grad_(False) if spec is None
                               else apply_adapter(model, adapter_config(spec[0], **spec[1])).eval())
        vocab = models["no_adapter"].config.vocab_size
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (args.batch, args.seq_len), generator=generator).to(device)
        prompts = torch.randint(1, vocab, (args.gen_batch, args.prompt_len), generator=generator).to(device)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

        def train_step(model, optimizer):
            with autocast:
                loss = next_token_loss(model(input_ids=ids, use_cache=False).logits, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def forward_only(model):
            with torch.no_grad(), autocast:
                model(input_ids=ids, use_cache=False)

        def decode(model):
            with autocast:
                model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_k=0,
                               max_new_tokens=args.new_tokens)

        fns = {}
        for variant, model in models.items():
            params = [p for p in model.parameters() if p.requires_grad]
            if params:
                optimizer = torch.optim.AdamW(params, lr=1e-4)
                fns[f"{variant}/train_step"] = lambda m=model, o=optimizer: train_step(m, o)
            else:  # nothing to train: the frozen forward is the reference
                fns[f"{variant}/forward"] = lambda m=model: forward_only(m)
            fns[f"{variant}/decode"] = lambda m=model: decode(m)
        for fn in fns.values():  # warm-up (allocator, kernels, clocks)
            for _ in range(args.warmup):
                fn()
        times = {key: [] for key in fns}
        for r in range(args.repeats):
            for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                times[key].append(timed(fns[key], device)[0])
        row = {"model": name, "batch": args.batch, "seq_len": args.seq_len, "gen_batch": args.gen_batch,
               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "trainable_parameters": {v: trainable_parameters(m) for v, m in models.items()}}
        for key, values in times.items():
            row[f"{key}_ms"] = 1000 * statistics.median(values)
        for variant in models:
            if f"{variant}/train_step" in times:
                row[f"{variant}/train_step_vs_lora_r2"] = paired_ratio(times[f"{variant}/train_step"],
                                                                       times["lora_r2/train_step"])
                row[f"{variant}/train_step_vs_forward"] = paired_ratio(times[f"{variant}/train_step"],
                                                                       times["no_adapter/forward"])
            row[f"{variant}/decode_vs_lora_r2"] = paired_ratio(times[f"{variant}/decode"], times["lora_r2/decode"])
            row[f"{variant}/decode_vs_no_adapter"] = paired_ratio(times[f"{variant}/decode"],
                                                                  times["no_adapter/decode"])
        log("  " + json.dumps(row))
        results["rows"].append(row)
        _write(out, "step_time", results, step_time_table(results["rows"]), None)
        del models, fns
    _write(out, "step_time", results, step_time_table(results["rows"]), step_time_figure(results["rows"]))
    log(f"written: {out / 'step_time.json'}, step_time.md, step_time.png")
    return results


def step_time_table(rows: list[dict]) -> str:
    lines = ["| model | adapter | trainable | train step ms | vs LoRA r=2 | vs frozen forward | decode ms | "
             "vs LoRA r=2 | vs no adapter |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for variant in STEP_VARIANTS:
            train = r.get(f"{variant}/train_step_ms")
            cells = (f"{train:.1f} | {r[f'{variant}/train_step_vs_lora_r2']:.3f} | "
                     f"{r[f'{variant}/train_step_vs_forward']:.2f}" if train is not None
                     else f"({r[f'{variant}/forward_ms']:.1f}: forward) | - | -")
            lines.append(f"| {r['model']} | {variant} | {r['trainable_parameters'][variant]:,} | {cells} | "
                         f"{r[f'{variant}/decode_ms']:.1f} | {r[f'{variant}/decode_vs_lora_r2']:.3f} | "
                         f"{r[f'{variant}/decode_vs_no_adapter']:.3f} |")
    return "\n".join(lines)


def step_time_figure(rows: list[dict]):
    fig, axes = new_figure(ncols=2)
    variants = [v for v in STEP_VARIANTS if v != "no_adapter"]
    width = 0.8 / max(1, len(rows))
    panels = (("train_step", "training step / LoRA r=2"), ("decode", "decoding / LoRA r=2"))
    for ax, (what, ylabel) in zip(axes, panels):
        for i, r in enumerate(rows):
            ax.bar([j + i * width for j in range(len(variants))], [r[f"{v}/{what}_vs_lora_r2"] for v in variants],
                   width=width, label=r["model"])
        ax.axhline(1.0, color="gray", linestyle="--")
        ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(variants))], variants, rotation=15,
                      fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend()
    return fig


# ------------------------------------------------------------------------------------------------


def _learning_rates(items: list[str]) -> dict[str, float]:
    rates = dict(LEARNING_RATES)
    for item in items:
        method, _, value = item.partition("=")
        if method not in rates or not value:
            raise SystemExit(f"--lr takes METHOD=RATE with METHOD one of {sorted(rates)}, got {item!r}")
        rates[method] = float(value)
    return rates


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("study", help="parameters against held-out accuracy, SFT and GRPO (CPU)")
    s.add_argument("--tiny", action="store_true", help="a tiny random model and a few steps: a smoke test")
    s.add_argument("--model", default=None, help="default smollm2-135m (tiny: tiny-random-llama)")
    s.add_argument("--adapters", default=",".join(ADAPTERS), help=f"comma list of {list(ADAPTERS)}")
    s.add_argument("--objectives", default="sft,grpo")
    s.add_argument("--difficulty", type=int, default=2)
    s.add_argument("--n-train", type=int, default=2000)
    s.add_argument("--n-test", type=int, default=200)
    s.add_argument("--steps", type=int, default=40)
    s.add_argument("--batch", type=int, default=4, help="prompts per GRPO step (SFT: batch x generations examples)")
    s.add_argument("--generations", type=int, default=8, help="GRPO's group size G")
    s.add_argument("--max-new-tokens", type=int, default=32, help="of GRPO's samples and of the evaluation")
    s.add_argument("--k", type=int, default=4, help="samples per test problem for T=1 pass@1")
    s.add_argument("--eval-batch", type=int, default=50)
    s.add_argument("--lr", action="append", default=[], help=f"METHOD=RATE (defaults {LEARNING_RATES})")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    s.add_argument("--fresh", action="store_true", help="redo rows already in OUT/study.json")
    s.add_argument("--out", default="runs/bench/tinylora")
    t = sub.add_parser("step-time", help="training step and decoding: TinyLoRA against LoRA (GPU)")
    t.add_argument("--tiny", action="store_true", help="the tiny config, short sequences: a CPU smoke test")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--dtype", default=None, help="autocast dtype: bfloat16 (GPU default) or float32 (CPU default)")
    t.add_argument("--models", default="smollm2-135m,llama3.2-1b", help="comma list of benchmarks.common configs")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--gen-batch", type=int, default=32)
    t.add_argument("--prompt-len", type=int, default=64)
    t.add_argument("--new-tokens", type=int, default=64)
    t.add_argument("--repeats", type=int, default=7)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--out", default="runs/bench/tinylora-step-time")
    args = parser.parse_args(argv)

    if args.mode == "study":
        args.adapters = [a for a in args.adapters.split(",") if a]
        args.objectives = [o for o in args.objectives.split(",") if o]
        unknown = [a for a in args.adapters if a not in ADAPTERS]
        unknown += [o for o in args.objectives if o not in ("sft", "grpo")]
        if unknown:
            raise SystemExit(f"unknown adapters / objectives {unknown}; adapters: {list(ADAPTERS)}, "
                             f"objectives: sft, grpo")
        args.lr = _learning_rates(args.lr)
        if args.tiny:
            args.model = args.model or "tiny-random-llama"
            args.difficulty, args.n_train, args.n_test, args.steps = 1, 16, 6, 2
            args.batch, args.generations, args.max_new_tokens, args.k, args.eval_batch = 2, 2, 6, 2, 6
        args.model = args.model or "smollm2-135m"
        if args.threads:
            torch.set_num_threads(args.threads)
        return study(args)
    args.models = [m for m in args.models.split(",") if m]
    if args.tiny:
        args.models = ["tiny"]
        args.batch, args.seq_len, args.gen_batch, args.prompt_len, args.new_tokens = 2, 16, 2, 8, 4
        args.repeats, args.warmup = 2, 1
    return step_time(args)


if __name__ == "__main__":
    main()

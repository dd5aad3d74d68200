"""Head pruning: held-out perplexity against the fraction of heads pruned, per method, before and
after LoRA recovery (a study on the embedded SmolLM2-135M: hours on a CPU, minutes on a GPU), and
the speed of physically pruned models against dense ones (GPU, random weights).

    python benchmarks/head_gates.py ppl --tiny --out /tmp/head_gates_tiny                  # smoke test
    python benchmarks/head_gates.py throughput --tiny --device cpu --out /tmp/head_gates_tiny

    # the CPU study (several hours on 2 cores; --resume continues a killed run, --methods splits it)
    python benchmarks/head_gates.py ppl --model smollm2-135m --out runs/bench/head_gates --resume
    # on the GPU machine (benchmarks/gpu_quality.sh: the model and these blocks travel there)
    python benchmarks/head_gates.py ppl --model smollm2-135m --blocks blocks.pt --only-blocks      # here
    python3 benchmarks/head_gates.py ppl --model smollm2-135m --device cuda --blocks blocks.pt --out DIR
    # the GPU throughput (H200; each command fits the 10-minute call; PYTHONPATH=$PWD from the repo root)
    python benchmarks/head_gates.py throughput --device cuda --models llama3.2-3b-mha --out $OUT/head_gates
    python benchmarks/head_gates.py throughput --device cuda --models llama3.2-3b,smollm2-135m --out $OUT/head_gates_gqa
    python benchmarks/head_gates.py throughput --device cuda --paths static --batch-sizes 16 --out $OUT/head_gates_static

`ppl` (needs the project's full environment: `datamodules`, PEFT, matplotlib). Data: the
standard-library source (`LMTextDataModule`, `source: stdlib`), blocks of --block-size tokens;
held-out perplexity, exp(summed token NLL / tokens), on --eval-blocks blocks spread evenly over
the test split. From one seeded permutation of the training blocks, disjoint slices feed the
importance scores (--score-blocks), the L0 gates and the recovery, the same for every method.
For each method and fraction of all heads (--fractions; the plan's scope --scope, "global" by
default: exactly round(fraction x heads) pruned, wherever they are):
- random: uniform scores (seeded); the baseline every method must beat;
- entropy: the heads with the most diffuse attention go first (the seed's rule);
- magnitude: the smallest Frobenius norm of a head's q/k/v/o weights go first;
- michel: |dL/dgate| summed over the score batches, per layer L2-normalised (Michel et al. 2019,
  "Are Sixteen Heads Really Better than One?"), one shot;
- michel_iterative: the same re-scored after every 10% of the heads, with the pruned ones at 0;
- l0: hard-concrete gates trained --gate-steps on the frozen model with the L0 penalty pulling
  the open fraction toward 1 - fraction (Voita et al. 2019), then plan_pruning on log_alpha; the
  kept heads' gate values are folded into the weights (as HeadGateModule does).
The model is pruned physically (`prune_heads`), scored ("before"), then recovered with LoRA
(`testtime.heads.attach_lora`: every linear layer of the decoder, r --lora-r, the
output projection left out where pruned heads stay as zeros) for --recovery-steps AdamW steps
and scored again ("after"). The dense model gets the same recovery ("dense" row, fraction 0), so
the table separates what pruning costs from what fine-tuning on this text gains. Goal: at 30% of
heads removed, at most +10% perplexity after recovery (against the dense model as loaded; the
ratio against the dense model after the same recovery is given too). Writes ppl.json (rewritten
after every row), ppl.md and ppl.png (perplexity over the fraction pruned, per method, before and
after recovery) into --out.

`throughput` (torch + transformers only; the GPU machine's image suffices). Speed does not
depend on the weights: random-weight Llama configs (bf16 on GPU, sdpa). `llama3.2-3b-mha` is
Llama-3.2-3B's shape (hidden 3072, 28 layers, 24 heads of 128) with full multi-head attention
(24 KV heads), so removing heads also shrinks the KV cache; `llama3.2-3b` keeps its 8 KV heads
(grouped-query attention: a uniform plan then removes query heads first). Each model is pruned at
--fractions (default 0.3, 0.5) with a uniform plan on random scores (`plan_pruning(...,
scope="uniform")`: every layer keeps the same head shape, so every pruned head leaves the weights;
LlamaConfig needs the head count to divide hidden_size, so the fraction removed can differ from the
one asked for: it is reported). Per batch size: prefill = one forward of --prompt-len tokens
(logits of the last position only, as generate's prefill); decode = (generate of --new-tokens
tokens - the median generate of 1 token) / (--new-tokens - 1), greedy, no EOS, dynamic cache
(eager; or --paths static: generate compiles the decode step, minutes per model and batch size:
one --batch-sizes value a call). Dense and pruned models alternate within
each of --repeats rounds (order reversed every other round); speedup = median over rounds of
dense time / pruned time (paired: slow drifts of the machine cancel). Goal: at least 1.15x at
30%. Writes throughput.json, throughput.md and throughput.png into --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    default_dtype, dump, environment, log, paired_ratio, raise_recompile_limits, random_llama, timed,
)
from testtime.io import atomic_write  # noqa: E402
from testtime.heads import (HardConcreteGates, attach_head_gates, head_importance, head_layout,  # noqa: E402
                            iterative_pruning_plan, plan_pruning, prune_heads, random_importance)
from testtime.lm import IGNORE_INDEX, next_token_loss  # noqa: E402

METHODS = ("random", "entropy", "magnitude", "michel", "michel_iterative", "l0")

# (base config of benchmarks.common, overrides)
THROUGHPUT_CONFIGS = {
    "llama3.2-3b-mha": ("llama3.2-1b", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                            num_attention_heads=24, num_key_value_heads=24, head_dim=128)),
    "llama3.2-3b": ("llama3.2-1b", dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                        num_attention_heads=24, num_key_value_heads=8, head_dim=128)),
    "smollm2-135m": ("smollm2-135m", {}),
    # CPU smoke test: 12 heads of 8, hidden 96 (divisible by the 8 and 6 heads kept at 30% and 50%)
    "tiny-mha": ("tiny", dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=12, head_dim=8)),
}

START = time.perf_counter()


# ------------------------------------------------------------------------------------------------
# perplexity study
# ------------------------------------------------------------------------------------------------


def blocks_of(dataset, indices) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["input_ids"] for i in indices])


def batches_of(ids: torch.Tensor, batch_size: int) -> list[dict]:
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in ids.split(batch_size)]


def load_data(args, model_name: str, device):
    """(score batches, training blocks for gates and recovery, held-out eval batches), on `device`.

    With --blocks FILE: read the three tensors from FILE when it exists (so a machine without this
    Python's standard library, the GPU machine, measures the same tokens), else build them from
    the stdlib and write them there. The file records the settings it was cut with; a mismatch
    is an error naming the setting.
    """
    settings = {"model": model_name, "block_size": args.block_size, "max_files": args.max_files,
                "seed": args.seed, "score_blocks": args.score_blocks, "eval_blocks": args.eval_blocks,
                "need": args.score_blocks + (args.gate_steps + args.recovery_steps) * args.batch_size}
    blocks = Path(args.blocks) if args.blocks else None
    if blocks is not None and blocks.is_file():
        saved = torch.load(blocks)
        for key, value in settings.items():
            if saved["settings"].get(key) != value:
                raise SystemExit(f"{blocks}: cut with {key}={saved['settings'].get(key)!r}, this run has "
                                 f"{key}={value!r}; pass the same settings or another --blocks file")
        score, rest, held_out = saved["score"], saved["rest"], saved["held_out"]
        log(f"data: {blocks} ({saved['source']}); scoring {len(score)}, eval {len(held_out)} "
            f"({held_out.numel()} tokens)")
    else:
        from datamodules.lm_text import LMTextDataModule

        dm = LMTextDataModule(model_name, source="stdlib", block_size=args.block_size, batch_size=args.batch_size,
                              max_files=args.max_files)
        dm.setup("fit")
        train, test = dm.datasets["train"], dm.datasets["test"]
        need = settings["need"]
        if len(train) < need:
            raise SystemExit(f"the training split has {len(train)} blocks; the settings need {need}")
        if len(test) < args.eval_blocks:
            raise SystemExit(f"the test split has {len(test)} blocks, fewer than --eval-blocks {args.eval_blocks}")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
        score = blocks_of(train, order[:args.score_blocks])
        rest = blocks_of(train, order[args.score_blocks:need])
        held_out = blocks_of(test, torch.linspace(0, len(test) - 1, args.eval_blocks).round().long())
        source = f"stdlib of Python {sys.version.split()[0]}: {len(train)} train / {len(test)} test blocks"
        log(f"data: {source} of {args.block_size}; scoring {len(score)}, eval {len(held_out)} "
            f"({held_out.numel()} tokens)")
        if blocks is not None:
            saved = {"settings": settings, "source": source, "score": score, "rest": rest, "held_out": held_out}
            atomic_write(blocks, lambda f: torch.save(saved, f), mode="wb")
            log(f"wrote the blocks to {blocks}")
    score, rest, held_out = score.to(device), rest.to(device), held_out.to(device)
    return batches_of(score, args.batch_size), rest, batches_of(held_out, args.batch_size)


@torch.no_grad()
def perplexity(model, batches) -> float:
    """exp(summed token NLL / tokens) over the batches."""
    total, tokens = 0.0, 0
    for b in batches:
        count = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total += float(next_token_loss(logits, b["labels"])) * count
        tokens += count
    return math.exp(total / tokens)


def training_batches(blocks: torch.Tensor, batch_size: int, start: int, steps: int):
    return batches_of(blocks[start * batch_size:(start + steps) * batch_size], batch_size)


def learn_l0_gates(model, batches, fraction, args) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """HeadGateModule's gate phase as a plain loop: one gate sample per pass, NLL + L0 pull."""
    layout = head_layout(model)
    hc = HardConcreteGates(layout.num_layers, layout.num_heads)
    gates = attach_head_gates(model, mode="hard_concrete", hard_concrete=hc)
    optimizer = torch.optim.AdamW([hc.log_alpha], lr=args.gate_lr, weight_decay=0.0)
    torch.manual_seed(args.seed)
    try:
        for b in batches:
            with gates.overridden(hc.sample()):
                nll = next_token_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                      b["labels"])
            loss = nll + hc.l0_penalty(args.l0_lambda, fraction)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        values = gates.values.detach().clone()
        keep = plan_pruning(hc.log_alpha.detach(), fraction, scope=args.scope, model=model)
    finally:
        gates.detach()
    info = {"expected_active": float(hc.expected_l0().detach()) / hc.log_alpha.numel(),
            "closed_gates": int((values == 0).sum()), "last_nll": float(nll.detach())}
    return keep, values, info


def recover(model, heads_zeroed: int, batches, args):
    """LoRA on the pruned model, --recovery-steps AdamW steps; returns the PEFT model."""
    from testtime.heads import attach_lora

    torch.manual_seed(args.seed)  # LoRA's init: the same for every row, whatever ran before it in this process
    peft_model = attach_lora(model, heads_zeroed, r=args.lora_r, alpha=2.0 * args.lora_r)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lora_lr, weight_decay=0.0)
    for b in batches:
        loss = next_token_loss(peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                               b["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return peft_model


def run_ppl(args) -> None:
    from testtime.loading import load_model_and_tokenizer

    torch.set_num_threads(args.threads)
    if args.only_blocks:  # no model and no --out: only the token blocks
        if not args.blocks:
            raise SystemExit("--only-blocks needs --blocks FILE")
        load_data(args, args.model, torch.device("cpu"))
        return
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "ppl.json"
    base, _ = load_model_and_tokenizer(args.model, device=device)
    base.requires_grad_(False).eval()
    layout = head_layout(base)
    total_heads = layout.num_layers * layout.num_heads
    results = {**environment(args, device, torch.float32), "model": args.model,
               "heads": {"layers": layout.num_layers, "heads": layout.num_heads, "kv_heads": layout.num_kv_heads},
               "rows": []}
    if args.resume and path.is_file():
        results["rows"] = json.loads(path.read_text())["rows"]
    done = {(r["method"], r["fraction"]) for r in results["rows"]}
    score_batches, train_blocks, eval_batches = load_data(args, args.model, device)
    recovery = training_batches(train_blocks, args.batch_size, args.gate_steps, args.recovery_steps)
    gate_batches = training_batches(train_blocks, args.batch_size, 0, args.gate_steps)

    def measure(method, fraction, model, report, seconds, extra=None):
        t = time.perf_counter()
        before = perplexity(model, eval_batches)
        recovered = recover(model, report["heads_zeroed"], recovery, args)
        after = perplexity(recovered, eval_batches)
        row = {"method": method, "fraction": fraction, "pruned": report["heads_pruned"],
               "pruned_fraction": report["heads_pruned"] / total_heads, "removed": report["heads_removed"],
               "zeroed": report["heads_zeroed"], "ppl_before": before, "ppl_after": after,
               "plan_s": seconds, "measure_s": time.perf_counter() - t, "device": results["device"],
               **(extra or {})}
        results["rows"].append(row)
        dump(results, path)
        log(f"  {method} {fraction:.2f}: pruned {row['pruned']}/{total_heads}, ppl {before:.3f} -> {after:.3f} "
            f"after recovery ({row['plan_s']:.0f} s plan, {row['measure_s']:.0f} s measure)")

    if ("dense", 0.0) not in done:
        model = copy.deepcopy(base)
        measure("dense", 0.0, model, prune_heads(model, torch.ones(layout.num_layers, layout.num_heads, dtype=bool)),
                0.0)
    scores = {}
    for method in args.methods:
        for fraction in args.fractions:
            if (method, fraction) in done:
                continue
            log(f"== {method} at {fraction:.0%}")
            model = copy.deepcopy(base)
            t = time.perf_counter()
            values, extra = None, {}
            if method == "michel_iterative":
                keep, _ = iterative_pruning_plan(model, score_batches, fraction, step=0.1, method="gradient",
                                                 scope=args.scope)
            elif method == "l0":
                keep, values, extra = learn_l0_gates(model, gate_batches, fraction, args)
            else:
                if method not in scores:
                    kind = "gradient" if method == "michel" else method
                    scores[method] = (random_importance(model, seed=args.seed) if method == "random" else
                                      head_importance(model, score_batches, method=kind))
                keep = plan_pruning(scores[method], fraction, scope=args.scope, model=model)
            report = prune_heads(model, keep, gate_values=values)
            measure(method, fraction, model, report, time.perf_counter() - t, extra)
    write_ppl_outputs(results, out)


def ppl_markdown(results) -> str:
    rows = results["rows"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    fractions = sorted({r["fraction"] for r in rows if r["method"] != "dense"})
    lines = [f"Perplexity on {results['model']} (held-out stdlib blocks); each cell: before -> after LoRA recovery"]
    if dense:
        lines.append(f"(dense: {dense['ppl_before']:.3f}; dense after the same recovery: {dense['ppl_after']:.3f})")
    lines += ["", "| method | " + " | ".join(f"{f:.0%} pruned" for f in fractions) + " |",
              "|---|" + "---:|" * len(fractions)]
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        cells = []
        for f in fractions:
            r = next((r for r in rows if r["method"] == method and r["fraction"] == f), None)
            cells.append("-" if r is None else f"{r['ppl_before']:.2f} -> {r['ppl_after']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    at30 = [r for r in rows if r["method"] != "dense" and abs(r["fraction"] - 0.3) < 1e-9]
    if dense and at30:
        best = min(at30, key=lambda r: r["ppl_after"])
        lines += ["", f"At 30%: best after recovery {best['method']} {best['ppl_after']:.3f}, "
                      f"{100 * (best['ppl_after'] / dense['ppl_before'] - 1):+.1f}% against the dense model "
                      f"(goal <= +10%), {100 * (best['ppl_after'] / dense['ppl_after'] - 1):+.1f}% against the "
                      "dense model after the same recovery"]
    return "\n".join(lines)


def write_ppl_outputs(results, out: Path) -> None:
    from testtime.io import new_figure, save_figure

    table = ppl_markdown(results)
    print(table)
    (out / "ppl.md").write_text(table + "\n")
    rows = results["rows"]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    fig, axes = new_figure(ncols=2)
    for ax, key, title in zip(axes, ("ppl_before", "ppl_after"), ("pruned, before recovery", "after LoRA recovery")):
        for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
            points = sorted((r["pruned_fraction"], r[key]) for r in rows if r["method"] == method)
            if dense:
                points = [(0.0, dense[key])] + points
            ax.plot(*zip(*points), marker="o", label=method)
        if dense:
            ax.axhline(1.1 * dense["ppl_before"], color="gray", ls="--", lw=1, label="dense +10% (goal)")
        if max(ax.get_ylim()) > 3 * min(ax.get_ylim()):  # random pruning can multiply the perplexity
            ax.set_yscale("log")
        ax.set_xlabel("fraction of heads pruned")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    save_figure(fig, out / "ppl.png")
    log(f"wrote {out / 'ppl.json'}, {out / 'ppl.md'}, {out / 'ppl.png'}")


# ------------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------------


def build_model(name: str, device, dtype):
    base, overrides = THROUGHPUT_CONFIGS[name]
    return random_llama(base, device, dtype, attn_implementation="sdpa", **overrides)


def pruned_copy(model, fraction: float, seed: int):
    pruned = copy.deepcopy(model)
    keep = plan_pruning(random_importance(pruned, seed=seed), fraction, scope="uniform", model=pruned)
    return pruned, prune_heads(pruned, keep)


def run_throughput(args) -> None:
    device = torch.device(args.device)
    dtype = default_dtype(device, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "throughput.json"
    raise_recompile_limits()
    results = {**environment(args, device, dtype), "rows": [], "models": {}}
    for name in args.models:
        log(f"== {name}")
        dense = build_model(name, device, dtype)
        variants = {"dense": dense}
        info = {}
        for fraction in args.fractions:
            model, report = pruned_copy(dense, fraction, args.seed)
            key = f"pruned_{fraction:g}"
            variants[key] = model
            info[key] = {"asked": fraction, "removed_fraction": report["heads_removed"] / (
                report["heads_per_layer_before"] * dense.config.num_hidden_layers),
                "heads": f"{report['heads_per_layer_before']} -> {report['heads_per_layer_after']}",
                "kv_heads": f"{report['kv_heads_per_layer_before']} -> {report['kv_heads_per_layer_after']}",
                "parameters": f"{report['parameters_before']:,} -> {report['parameters_after']:,}"}
            log(f"  {key}: {info[key]}")
        results["models"][name] = {"config": THROUGHPUT_CONFIGS[name], "variants": info}
        for path_kind in args.paths:
            for batch in args.batch_sizes:
                measure_throughput(name, variants, path_kind, batch, args, device, results)
                dump(results, path)
        del variants, dense
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_throughput_outputs(results, out)


def measure_throughput(name, variants, path_kind, batch, args, device, results) -> None:
    generator = torch.Generator().manual_seed(batch)
    vocab = next(iter(variants.values())).config.vocab_size
    ids = torch.randint(1, vocab, (batch, args.prompt_len), generator=generator).to(device)
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=mask)
    if path_kind == "static":
        kwargs["cache_implementation"] = "static"

    def prefill(model):
        return lambda: model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)

    def generate(model, n):
        return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)

    times = {k: {"prefill": [], "generate_1": [], "generate_n": []} for k in variants}
    with torch.inference_mode():
        for key, model in variants.items():  # warm-up (compiles on the static path)
            for _ in range(max(1, args.warmup)):
                prefill(model)()
                out = generate(model, args.new_tokens)()
                generate(model, 1)()
            assert out.shape == (batch, args.prompt_len + args.new_tokens), out.shape
        for r in range(args.repeats):
            for key in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
                model = variants[key]
                times[key]["prefill"].append(timed(prefill(model), device)[0])
                times[key]["generate_1"].append(timed(generate(model, 1), device)[0])
                times[key]["generate_n"].append(timed(generate(model, args.new_tokens), device)[0])
    for t in times.values():
        # a generate's fixed part (prefill, set-up) is its median with one token: less noise than a
        # per-round difference
        fixed = statistics.median(t["generate_1"])
        t["decode"] = [max(n - fixed, 1e-12) / (args.new_tokens - 1) for n in t["generate_n"]]
    row = {"model": name, "path": path_kind, "batch": batch, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "rounds": args.repeats}
    for key, t in times.items():
        row[f"{key}_prefill_ms"] = 1000 * statistics.median(t["prefill"])
        row[f"{key}_decode_ms_per_token"] = 1000 * statistics.median(t["decode"])
        row[f"{key}_prefill_tokens_per_s"] = batch * args.prompt_len / statistics.median(t["prefill"])
        row[f"{key}_decode_tokens_per_s"] = batch / statistics.median(t["decode"])
        if key != "dense":
            for phase in ("prefill", "decode"):
                row[f"{key}_{phase}_speedup"] = paired_ratio(times["dense"][phase], t[phase])
    row["runs"] = times
    results["rows"].append(row)
    log("  " + json.dumps({k: v for k, v in row.items() if k != "runs"}))


def throughput_markdown(results) -> str:
    lines = ["| model | cache | batch | prompt | variant | heads (KV) | prefill tok/s | speedup | "
             "decode tok/s | speedup |", "|---|---|---:|---:|---|---|---:|---:|---:|---:|"]
    for r in results["rows"]:
        variants = results["models"][r["model"]]["variants"]
        for key in ["dense"] + list(variants):
            v = variants.get(key)
            heads = "dense" if v is None else f"{v['heads']} ({v['kv_heads']}), {v['removed_fraction']:.0%} removed"
            speed = lambda phase: "1.00x" if v is None else f"{r[f'{key}_{phase}_speedup']:.2f}x"  # noqa: E731
            lines.append(f"| {r['model']} | {r['path']} | {r['batch']} | {r['prompt_len']} | {key} | {heads} | "
                         f"{r[f'{key}_prefill_tokens_per_s']:,.0f} | {speed('prefill')} | "
                         f"{r[f'{key}_decode_tokens_per_s']:,.0f} | {speed('decode')} |")
    return "\n".join(lines)


def write_throughput_outputs(results, out: Path) -> None:
    table = throughput_markdown(results)
    print(table)
    (out / "throughput.md").write_text(table + "\n")
    try:
        from testtime.io import new_figure, save_figure

        fig, axes = new_figure(ncols=2)
    except ImportError:  # the GPU image may lack matplotlib: the JSON and the table suffice
        return
    for ax, phase in zip(axes, ("prefill", "decode")):
        labels, bars = [], {}
        for r in results["rows"]:
            labels.append(f"{r['model']}\n{r['path']} b{r['batch']}")
            for key in results["models"][r["model"]]["variants"]:
                bars.setdefault(key, []).append(r[f"{key}_{phase}_speedup"])
        width = 0.8 / max(1, len(bars))
        for i, (key, values) in enumerate(bars.items()):
            ax.bar([x + i * width for x in range(len(values))], values, width, label=key)
        ax.set_xticks([x + width * (len(bars) - 1) / 2 for x in range(len(labels))], labels, fontsize=6)
        ax.axhline(1.15, color="tab:green", ls="--", lw=1, label="goal 1.15x at 30%")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_ylabel(f"{phase} speedup (dense time / pruned time)")
        ax.legend(fontsize=7)
    save_figure(fig, out / "throughput.png")
    log(f"wrote {out / 'throughput.json'}, {out / 'throughput.md'}, {out / 'throughput.png'}")


# ------------------------------------------------------------------------------------------------


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity vs fraction pruned, per method, before/after recovery (CPU)")
    ppl.add_argument("--tiny", action="store_true", help="tiny random Llama, few blocks and steps: a smoke test")
    ppl.add_argument("--model", default="smollm2-135m")
    ppl.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ppl.add_argument("--fractions", default="0.1,0.2,0.3,0.5", help="fractions of all heads to prune (0 = dense)")
    ppl.add_argument("--scope", default="global", choices=["global", "layer", "uniform"])
    ppl.add_argument("--block-size", type=int, default=128)
    ppl.add_argument("--batch-size", type=int, default=8)
    ppl.add_argument("--max-files", type=int, default=None, help="stdlib files to read (default all)")
    ppl.add_argument("--eval-blocks", type=int, default=96)
    ppl.add_argument("--score-blocks", type=int, default=32)
    ppl.add_argument("--gate-steps", type=int, default=150)
    ppl.add_argument("--gate-lr", type=float, default=0.1)
    ppl.add_argument("--l0-lambda", type=float, default=100.0)
    ppl.add_argument("--recovery-steps", type=int, default=100)
    ppl.add_argument("--lora-r", type=int, default=8)
    ppl.add_argument("--lora-lr", type=float, default=2e-4)
    ppl.add_argument("--seed", type=int, default=0)
    ppl.add_argument("--threads", type=int, default=torch.get_num_threads())
    ppl.add_argument("--device", default="cpu", help="cpu, or cuda (float32 either way)")
    ppl.add_argument("--blocks", default=None,
                     help="token blocks file: read when it exists, else cut from the stdlib and written there")
    ppl.add_argument("--only-blocks", action="store_true", help="write the --blocks file and stop")
    ppl.add_argument("--resume", action="store_true", help="keep the rows of an existing ppl.json, run the rest")
    ppl.add_argument("--out", default="runs/bench/head_gates")

    tp = sub.add_parser("throughput", help="physically pruned vs dense: prefill and decode speed (GPU)")
    tp.add_argument("--tiny", action="store_true", help="tiny config, short prompts, few tokens: a CPU smoke test")
    tp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    tp.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    tp.add_argument("--models", default="llama3.2-3b-mha", help=f"comma list of {', '.join(THROUGHPUT_CONFIGS)}")
    tp.add_argument("--fractions", default="0.3,0.5")
    tp.add_argument("--paths", default="dynamic", help="cache paths: dynamic (eager), static (compiled)")
    tp.add_argument("--batch-sizes", default="1,16")
    tp.add_argument("--prompt-len", type=int, default=1024)
    tp.add_argument("--new-tokens", type=int, default=128)
    tp.add_argument("--repeats", type=int, default=5)
    tp.add_argument("--warmup", type=int, default=1)
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--out", default="runs/bench/head_gates")
    args = p.parse_args(argv)

    if args.command == "ppl":
        if args.tiny:
            args.model, args.fractions, args.block_size, args.batch_size = "tiny-random-llama", "0.25,0.5", 64, 4
            args.max_files, args.eval_blocks, args.score_blocks = 20, 16, 8
            args.gate_steps, args.recovery_steps, args.lora_lr = 10, 3, 1e-3
        args.methods = args.methods.split(",")
        unknown = sorted(set(args.methods) - set(METHODS))
        if unknown:
            p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        args.fractions = [f for f in floats(args.fractions) if f > 0]
        run_ppl(args)
    else:
        if args.tiny:
            args.models, args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats = "tiny-mha", "1,2", 32, 16, 3
        args.models = args.models.split(",")
        unknown = sorted(set(args.models) - set(THROUGHPUT_CONFIGS))
        if unknown:
            p.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(THROUGHPUT_CONFIGS)}")
        args.fractions, args.paths = floats(args.fractions), args.paths.split(",")
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        run_throughput(args)
    log(f"done in {time.perf_counter() - START:.0f} s")


if __name__ == "__main__":
    main()

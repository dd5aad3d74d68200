"""AutoDeco cost: decoding overhead of the heads and the heads' training step, on random weights.

    python benchmarks/autodeco.py --device cuda --out runs/bench/autodeco.json      # GPU
    python benchmarks/autodeco.py --device cpu --tiny                               # smoke test

The eager (dynamic-cache) path is slow on a GPU machine (~25-40 ms per token): --dynamic-new-tokens
128 keeps a full run of both models within the device's 10-minute call limit when split by model
(--models smollm2-135m, then --models tinyllama-1.1b).

Speed does not depend on the weights, so models are built from configs with random weights (bf16
on GPU). Two configs: SmolLM2-135M's and TinyLlama-1.1B's (Llama, hidden 2048, 22 layers).

Decoding: `autodeco_generate` (heads on) against plain `model.generate` with the same model,
prompts and number of new tokens (EOS disabled, so every run makes exactly --new-tokens tokens),
sampling in both, per batch size and cache path:
- dynamic: the default dynamic cache, eager forward;
- static: `cache_implementation="static"`, which generate compiles on GPU (torch.compile,
  mode reduce-overhead, CUDA graphs).
Methods: `sample` (plain generate, T=1, no top-k/top-p), `sample_top_p` (plain generate, T=0.8,
top-p 0.95: temperature + a sort-based top-p per token, the fixed-setting counterpart of
AutoDeco), `autodeco` (heads inside the forward, the default path), `autodeco_hooks` (the older
hook-based capture, which forces an eager forward). Warm-up runs (which compile) are excluded;
methods are interleaved over --repeats rounds (order reversed every other round); reported: the
median wall time per generated token (a run's time includes its prefill of --prompt-len tokens)
and, as ratios, the median over rounds of the paired ratio to `sample_top_p` (runs of one round
are adjacent in time, so slow drifts of the machine cancel). Eager decoding is CPU-bound and
noisy (+-5-10% run to run): use --repeats 7 or more to resolve a few percent.

Correctness on the device: for the autodeco paths, the T/P recorded during generation are
compared with a teacher-forced AutoDecoModel forward over the generated sequence (eager, full
sequence), max abs difference (bf16 noise of the base expected, ~1e-2).

Training: one step of the heads (frozen base forward under no_grad + heads + `training_losses`
legacy_ce + backward + AdamW) against a frozen forward-only pass of the base over the same batch,
with a breakdown and the temperature-only / top-p-only variants; `both` uses the soft top-p loss's
certified top-256 path (full sort only for rows it cannot certify: `full_sort_fraction`),
`both_full_sort` the sort of the whole vocabulary for every token (the exact formula, as before);
`both_compiled` / `temp_only_compiled` the same steps with `compiled=True` (torch.compile of the
features and the losses: the module's `compile_losses`), whose loss is compared with the eager one
on the same batch (`compiled_loss_abs_diff`).
The final norm is scaled (`--final-norm-scale`, 20) so that the random model's next-token entropy
is a trained model's (~1 nat) and the loss meets realistic tails. Goal: `both` within 1.3x of
the frozen forward.

    python benchmarks/autodeco.py --device cuda --skip-decode --models smollm2-135m,tinyllama-1.1b \
        --out $OUT/autodeco_train.json

Writes the JSON given by --out (and a PNG bar chart of the ratios next to it) and prints
markdown rows for benchmarks/RESULTS.md.
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

import testtime.autodeco as ad  # noqa: E402
from benchmarks.common import LLAMA_CONFIGS as CONFIGS  # noqa: E402
from benchmarks.common import (  # noqa: E402
    compile_counters, default_dtype, dump, environment, finish, log, paired_ratio, raise_recompile_limits, random_llama,
    sync, timed,
)

PLAIN = {
    "sample": dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0),
    "sample_top_p": dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=0),
}


def build(name: str, device, dtype):
    llm = random_llama(name, device, dtype)  # no EOS: every run makes exactly max_new_tokens tokens
    model = ad.AutoDecoModel(llm)  # both heads, enhanced features; float32 heads
    model.to(device)
    with torch.no_grad():  # heads that predict varied T and P (the default init gives T ~ 1, P ~ 0.5)
        for head in model.heads():
            head.mlp[2].bias.normal_(0, 0.5)
    return llm, model


# ------------------------------------------------------------------------------------------------
# decoding


def decode_fns(llm, model, ids, mask, new_tokens, cache):
    common = dict(max_new_tokens=new_tokens)
    if cache == "static":
        common["cache_implementation"] = "static"

    def plain(kw):
        return lambda: llm.generate(input_ids=ids, attention_mask=mask, **kw, **common)

    def autodeco(**kw):
        return lambda: ad.autodeco_generate(llm, model, ids, mask, user_temperature=1.0, user_top_p=1.0, **kw,
                                            **common)

    return {"sample": plain(PLAIN["sample"]), "sample_top_p": plain(PLAIN["sample_top_p"]),
            "autodeco": autodeco(), "autodeco_hooks": autodeco(heads_in_forward=False)}


def consistency(model, gen, prompt_len):
    """Max |T - T_ref|, |P - P_ref| of recorded values vs a teacher-forced eager forward."""
    with torch.no_grad():
        ref = model(gen.sequences)
    t_ref = ref.temperature[:, prompt_len - 1:-1].float()
    p_ref = ref.top_p[:, prompt_len - 1:-1].float()
    return {"max_abs_dT": float((gen.temperature - t_ref).abs().max()),
            "max_abs_dP": float((gen.top_p - p_ref).abs().max()),
            "mean_T": float(gen.temperature.mean()), "mean_P": float(gen.top_p.mean())}


def bench_decode(name, llm, model, args, device, results):
    vocab = llm.config.vocab_size
    for cache in args.paths:
        methods = list(args.methods)
        new_tokens = args.new_tokens if cache == "static" else (args.dynamic_new_tokens or args.new_tokens)
        for batch in args.batch_sizes:
            g = torch.Generator(device="cpu").manual_seed(batch)
            ids = torch.randint(1, vocab, (batch, args.prompt_len), generator=g).to(device)
            mask = torch.ones_like(ids)
            fns = decode_fns(llm, model, ids, mask, new_tokens, cache)
            times = {m: [] for m in methods}
            row = {"model": name, "cache": cache, "batch": batch, "new_tokens": new_tokens,
                   "prompt_len": args.prompt_len}
            for m in methods:  # warm-up (compiles on the static path)
                for _ in range(args.warmup):
                    t, out = timed(fns[m], device)
                    log(f"  warm-up {name} {cache} b{batch} {m}: {t:.2f} s")
                seqs = out if isinstance(out, torch.Tensor) else out.sequences
                assert seqs.shape == (batch, args.prompt_len + new_tokens), seqs.shape
                if m.startswith("autodeco"):
                    row[f"{m}_check"] = consistency(model, out, args.prompt_len)
                    log(f"  {m} consistency: {row[f'{m}_check']}")
            for r in range(args.repeats):
                order = methods if r % 2 == 0 else methods[::-1]
                for m in order:
                    t, _ = timed(fns[m], device)
                    times[m].append(t)
            for m in methods:
                row[f"{m}_ms_per_token"] = 1000 * statistics.median(times[m]) / new_tokens
                row[f"{m}_runs_s"] = times[m]
            # ratios: median over rounds of the paired ratio (same round, adjacent runs), which
            # cancels the slow drifts of the machine that ratios of medians pick up
            for m in methods:
                if "sample_top_p" in times:
                    row[f"{m}_ratio"] = paired_ratio(times[m], times["sample_top_p"])
            if "sample" in times and "autodeco" in times:
                row["autodeco_vs_sample"] = paired_ratio(times["autodeco"], times["sample"])
            log("  " + json.dumps({k: v for k, v in row.items() if not k.endswith("_runs_s")}))
            results["decode"].append(row)
            dump(results, args.out)


# ------------------------------------------------------------------------------------------------
# training


def bench_train(name, llm, args, device, results):
    vocab = llm.config.vocab_size
    # Random weights give near-uniform next-token distributions (entropy ~ln V), unlike a trained LM:
    # scaling the final norm by 20 brings the mean entropy to ~1 nat, SmolLM2-135M's on the
    # arithmetic training data (0.97 nats, measured on the CPU machine), so the soft top-p loss's
    # certified top-k path meets the tails it meets in training.
    with torch.no_grad():
        llm.model.norm.weight.fill_(args.final_norm_scale)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(1, vocab, (args.train_batch, args.train_len), generator=g).to(device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : args.train_len // 8] = -100  # a prompt part, as in completion-only training
    gen = torch.Generator(device=device).manual_seed(0)
    row = {"model": name, "batch": args.train_batch, "seq_len": args.train_len}

    def median_time(fn, n):
        for _ in range(5):  # warm-up (allocator, clocks)
            fn()
        ts = []
        for _ in range(n):
            t, _ = timed(fn, device)
            ts.append(t)
        return 1000 * statistics.median(ts)

    def forward_only():
        with torch.no_grad():
            return llm(input_ids=ids, attention_mask=mask, use_cache=False).logits

    row["base_forward_ms"] = median_time(forward_only, args.train_iters)
    # both: the default soft top-p loss (certified top-256, full sort only where needed);
    # both_full_sort: the exact loss through a sort of the whole vocabulary for every token
    # *_compiled: the same through torch.compile (`compiled=True`, the module's compile_losses)
    variants = {"both": (True, True, 256, False), "both_full_sort": (True, True, None, False),
                "temp_only": (True, False, 256, False), "top_p_only": (False, True, 256, False),
                "both_compiled": (True, True, 256, True), "temp_only_compiled": (True, False, 256, True)}
    for variant, (temp, top_p, top_k, compiled) in variants.items():
        if variant not in args.variants:
            continue
        torch.manual_seed(0)  # the same initial heads for every variant
        model = ad.AutoDecoModel(llm, enable_temperature_head=temp, enable_top_p_head=top_p).to(device)
        if model.top_p_head is not None:
            model.top_p_head.compiled = compiled
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=5e-6)
        # the tokens that need the full sort, at the heads' initial T and P
        if temp and top_p and top_k is not None and "full_sort_fraction" not in row:
            with torch.no_grad():
                out = model(input_ids=ids, attention_mask=mask)
                z, t, p, y = ad.shift_for_next_token(out.logits, out.temperature, out.top_p, labels)
                sel = y != -100
                probs = torch.softmax(z[sel].float() / t[sel].float()[:, None], -1)
                weight = torch.softmax(z[sel].float(), -1).gather(-1, y[sel][:, None]).squeeze(-1)
                _, fallback = ad.soft_top_p_normalizer(probs, p[sel].float(), 30.0, 256, 1e-5 / weight.clamp_min(1e-12))
                row["full_sort_fraction"] = float(fallback.float().mean())
                row["mean_entropy"] = float(-(torch.softmax(z[sel].float(), -1) *
                                              torch.log_softmax(z[sel].float(), -1)).sum(-1).mean())
                del out, probs, weight, z
        if compiled:  # the compiled loss against the eager one, same heads and batch, before any step
            with torch.no_grad():
                # labels drawn from the model's own next-token distribution: on the random tokens the
                # loss is ~0 (it weighs each token by the base probability of its label)
                out = model(input_ids=ids, attention_mask=mask)
                drawn = torch.distributions.Categorical(logits=out.logits[:, :-1].float()).sample()
                own = torch.cat([labels[:, :1], drawn], dim=1).masked_fill(labels == -100, -100)
                values = []
                for c in (False, True):
                    if model.top_p_head is not None:
                        model.top_p_head.compiled = c
                    out = model(input_ids=ids, attention_mask=mask)
                    values.append(ad.training_losses(out, own, generator=torch.Generator(device).manual_seed(0),
                                                     top_k=top_k, compiled=c)["loss"].item())
                row[f"{variant}_loss_abs_diff"] = abs(values[1] - values[0])
                row[f"{variant}_loss_rel_diff"] = abs(values[1] - values[0]) / max(abs(values[0]), 1e-30)
                row[f"{variant}_loss"] = values[0]
                del out
        if device.type == "cuda":  # the peak of this variant's steps alone, not of the probes above
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            out = model(input_ids=ids, attention_mask=mask)
            loss = ad.training_losses(out, labels, objective="legacy_ce", generator=gen, top_k=top_k,
                                      compiled=compiled)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        row[f"{variant}_step_ms"] = median_time(step, args.train_iters)
        if variant in args.profile:  # where the step's GPU time goes, kernel by kernel
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                sync(device)
            table = prof.key_averages().table(sort_by="self_cuda_time_total" if device.type == "cuda"
                                              else "self_cpu_time_total", row_limit=30, max_name_column_width=70)
            log(f"  profile {name} {variant} (3 steps):\n{table}")
            row[f"{variant}_profile"] = table
        row[f"{variant}_ratio"] = row[f"{variant}_step_ms"] / row["base_forward_ms"]
        # breakdown with a sync between phases (sums slightly above the step)
        phases = {"forward_base_and_heads": [], "heads_only": [], "losses": [], "backward_and_adamw": []}
        for i in range(args.train_iters + 2):
            sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask)
            sync(device)
            t1 = time.perf_counter()
            with torch.no_grad():
                ad.predict_heads(model.temp_head, model.top_p_head, out.hidden_states, out.logits)
            sync(device)
            t2 = time.perf_counter()
            losses = ad.training_losses(out, labels, objective="legacy_ce", generator=gen, top_k=top_k,
                                        compiled=compiled)
            sync(device)
            t3 = time.perf_counter()
            losses["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            t4 = time.perf_counter()
            if i >= 2:
                for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    phases[k].append(1000 * dt)
        row[f"{variant}_breakdown_ms"] = {k: statistics.median(v) for k, v in phases.items()}
        if device.type == "cuda":
            row[f"{variant}_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        model = opt = None  # free the memory before the next variant
        log(f"  train {name} {variant}: {row[f'{variant}_step_ms']:.1f} ms/step "
            f"({row[f'{variant}_ratio']:.2f}x forward {row['base_forward_ms']:.1f} ms) "
            f"{row[f'{variant}_breakdown_ms']}")
    results["train"].append(row)
    dump(results, args.out)


# ------------------------------------------------------------------------------------------------
# output


TRAIN_VARIANTS = ("both", "both_full_sort", "temp_only", "top_p_only", "both_compiled", "temp_only_compiled")


def cell(row, variant) -> str:
    """'ms (ratio)', or '-' for a variant that row lacks (a run from before it existed)."""
    if f"{variant}_step_ms" not in row:
        return "-"
    return f"{row[f'{variant}_step_ms']:.1f} ({row[f'{variant}_ratio']:.2f}x)"


def markdown(results) -> str:
    lines = []
    if results["decode"]:
        lines += ["| model | cache | batch | sample ms/tok | sample_top_p ms/tok | autodeco ms/tok | "
                  "autodeco_hooks ms/tok | autodeco / sample_top_p | autodeco / sample | hooks / sample_top_p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["decode"]:
            def f(k, fmt="{:.2f}"):
                return fmt.format(r[k]) if k in r else "-"
            lines.append(f"| {r['model']} | {r['cache']} | {r['batch']} | {f('sample_ms_per_token')} | "
                         f"{f('sample_top_p_ms_per_token')} | {f('autodeco_ms_per_token')} | "
                         f"{f('autodeco_hooks_ms_per_token')} | {f('autodeco_ratio', '{:.3f}x')} | "
                         f"{f('autodeco_vs_sample', '{:.3f}x')} | {f('autodeco_hooks_ratio', '{:.3f}x')} |")
    if results["train"]:
        lines += ["", "| model | batch x len | base forward ms | step both heads ms (ratio) | both, full sort "
                  "(ratio) | temp only | top-p only | both, compiled | temp only, compiled | tokens fully sorted | "
                  "mean entropy |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results["train"]:
            cells = " | ".join(cell(r, v) for v in TRAIN_VARIANTS)
            extra = (f"{r['full_sort_fraction']:.1%} | {r['mean_entropy']:.2f}" if "full_sort_fraction" in r
                     else "- | -")
            lines.append(f"| {r['model']} | {r['batch']}x{r['seq_len']} | {r['base_forward_ms']:.1f} | {cells} | "
                         f"{extra} |")
        lines += ["", "| model | variant | forward (base + heads) | heads alone | losses | backward + AdamW |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in results["train"]:
            for v in TRAIN_VARIANTS:
                if f"{v}_breakdown_ms" not in r:
                    continue
                b = r[f"{v}_breakdown_ms"]
                lines.append(f"| {r['model']} | {v} | {b['forward_base_and_heads']:.1f} | {b['heads_only']:.1f} | "
                             f"{b['losses']:.1f} | {b['backward_and_adamw']:.1f} |")
    return "\n".join(lines)


def plot(results, path: Path):
    from testtime.io import new_figure, save_figure  # the project's figure set-up (Agg, no pyplot)

    labels, values = [], []
    for r in results["decode"]:
        for m in ("autodeco", "autodeco_hooks"):
            if f"{m}_ratio" in r:
                labels.append(f"{r['model']}\n{r['cache']} b{r['batch']}\n{m.replace('autodeco', 'ad')}")
                values.append(r[f"{m}_ratio"])
    for r in results["train"]:
        for v in [v for v in TRAIN_VARIANTS if f"{v}_ratio" in r]:
            labels.append(f"{r['model']}\ntrain\n{v}")
            values.append(r[f"{v}_ratio"])
    if not values:
        return
    fig, (ax,) = new_figure(panel_size=(max(6, 0.7 * len(values)), 4.5))
    colors = ["tab:blue" if "train" not in lab else "tab:orange" for lab in labels]
    ax.bar(range(len(values)), values, color=colors)
    ax.axhline(1.02, color="tab:green", ls="--", lw=1, label="decode goal 1.02x")
    ax.axhline(1.30, color="tab:red", ls="--", lw=1, label="training goal 1.30x")
    ax.set_xticks(range(len(values)), labels, fontsize=6)
    ax.set_ylabel("time ratio (heads on / baseline)")
    ax.set_title("AutoDeco cost: decode vs generate(T=0.8, top-p 0.95); train step vs frozen forward", fontsize=9)
    ax.legend(fontsize=7)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=6)
    save_figure(fig, path, dpi=130)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny config, few tokens: a CPU smoke test")
    p.add_argument("--models", default="smollm2-135m,tinyllama-1.1b", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--paths", default="static,dynamic", help="cache paths: static,dynamic")
    p.add_argument("--methods", default="sample,sample_top_p,autodeco,autodeco_hooks")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dynamic-new-tokens", type=int, default=None,
                   help="new tokens on the (slow, eager) dynamic path; default --new-tokens")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-len", type=int, default=512)
    p.add_argument("--train-iters", type=int, default=10)
    p.add_argument("--final-norm-scale", type=float, default=20.0,
                   help="the training benchmark's final-norm weight (20: a trained LM's ~1-nat entropy)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--variants", default=",".join(TRAIN_VARIANTS), help="training variants to time")
    p.add_argument("--profile", default="", help="comma list of training variants to profile (3 steps, top kernels)")
    p.add_argument("--out", default="runs/bench/autodeco.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.new_tokens, args.prompt_len, args.dynamic_new_tokens = "tiny", 8, 8, 6
        args.train_batch, args.train_len, args.train_iters, args.repeats = 2, 32, 2, 2
    device = torch.device(args.device)
    dtype = default_dtype(device, args.dtype)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.paths = args.paths.split(",")
    args.methods = args.methods.split(",")
    args.profile = [v for v in args.profile.split(",") if v]
    args.variants = args.variants.split(",")
    # plain and autodeco graphs x batch sizes x models share one compiled __call__: room for all
    raise_recompile_limits()
    results = {
        **environment(args, device, dtype),
        "configs": {m: CONFIGS[m] for m in args.models.split(",")}, "plain_settings": PLAIN,
        "decode": [], "train": [],
    }
    for name in args.models.split(","):
        log(f"== {name}")
        llm, model = build(name, device, dtype)
        if not args.skip_train:
            bench_train(name, llm, args, device, results)
        if not args.skip_decode:
            bench_decode(name, llm, model, args, device, results)
        results.setdefault("compile_counters", {})[name] = compile_counters()
        log(f"  counters: {results['compile_counters'][name]}")
        del llm, model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finish(results, args.out, markdown(results), plot)


if __name__ == "__main__":
    main()

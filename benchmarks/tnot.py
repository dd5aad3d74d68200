"""TNOT cost: prompt-stage optimization and entropy-control overhead on generation, the cost of a
retry, and peak memory of the chunked CE.

    python benchmarks/tnot.py --device cpu --tiny --out /tmp/tnot_tiny.json        # smoke test (CPU, every measurement)

On an H100/H200 (each command fits the device's 10-minute call; run from the repository root with
PYTHONPATH=$PWD, $OUT the device's output folder; transformers >= 5.24, whose generate takes
`cache=`):

    # 1-2. static cache (generate compiles the decode step), 512 new tokens, prompts 256 and 4096:
    #      slot at times 1/3/5 and srgen with entropy control at times 3 (no sample stops)
    python benchmarks/tnot.py --device cuda --models smollm2-135m --paths static --skip-memory --out $OUT/tnot_smollm2_static.json
    python benchmarks/tnot.py --device cuda --models llama3.2-1b --paths static --skip-memory --out $OUT/tnot_llama1b_static.json
    # 3. dynamic cache (eager, ~25 ms/token, CPU-bound): 128 new tokens instead of 512
    python benchmarks/tnot.py --device cuda --models smollm2-135m,llama3.2-1b --paths dynamic --dynamic-new-tokens 128 --skip-memory --out $OUT/tnot_dynamic.json
    # 4. peak memory at a 16K-token prompt, chunked (1024) vs unchunked CE
    python benchmarks/tnot.py --device cuda --models smollm2-135m,llama3.2-1b --skip-overhead --out $OUT/tnot_memory.json
    # 5-6. the cost of one retry (srgen, every judged token stops): dynamic cache, KV reuse vs re-prefill;
    #      static cache (re-prefill; each retry pass has new cache shapes: the warm-up compiles them)
    python benchmarks/tnot.py --device cuda --models smollm2-135m,llama3.2-1b --retry-cost --paths dynamic --skip-overhead --skip-memory --skip-prompt-stage --out $OUT/tnot_retry_dynamic.json
    python benchmarks/tnot.py --device cuda --models smollm2-135m,llama3.2-1b --retry-cost --paths static --retries 0,2,4 --skip-overhead --skip-memory --skip-prompt-stage --out $OUT/tnot_retry_static.json
    # optional: dynamic with the full 512 new tokens (~13 s a run on smollm2), one prompt length a call
    python benchmarks/tnot.py --device cuda --models smollm2-135m --paths dynamic --prompt-lens 4096 --skip-memory --out $OUT/tnot_dyn512.json

What to record: the rows' `srgen_t3` ratio on the static path (goal: at most 1.10x of plain, with
`srgen_t3_same_tokens_as_plain` 1.0 and `dynamo_during_timing` 0 graphs and 0 graph breaks), the
`slot_tN` ratios as before, and from commands 5-6 the ms per retry (reuse, re-prefill) beside
plain's ms per token, at both prompt lengths.

Fewer new tokens can only raise the ratio: the prompt-stage cost is paid once per generate, so
128 tokens spread it over 4x fewer tokens than 512 (the per-token part, the delta added before
lm_head in slot mode, is the same). The prompt-stage table gives the fixed cost to rescale.
--deadline-s (default 540) stops starting new runs once exceeded, so a slow command still ends
with its tables and plot; the JSON is rewritten after every run anyway. If a static command
stops at the deadline (compiling took longer than expected), run it again one --prompt-lens value
at a time (inductor's cache on the machine makes the second compile of a graph faster).

Speed does not depend on the weights: models are built from configs with random weights (bf16 on
GPU, float32 on CPU), sdpa attention. `smollm2-135m` is SmolLM2-135M's config, `llama3.2-1b`
Llama-3.2-1B's (without its llama3 rope scaling, which only rescales the RoPE frequencies once
at init and costs nothing per token). The last vocabulary id is the EOS that entropy control
forces; its lm_head row is zeroed (a logit of 0 against the random others' maximum), so greedy
decoding never picks it and every run generates exactly its tokens.

Overhead, per model, cache path, prompt length (random tokens, batch 1 by default): greedy
generation of exactly --new-tokens tokens, methods interleaved over --repeats rounds (order
reversed every other round), after --warmup runs each (on the static path the warm-up compiles;
on the dynamic path it uses 16 new tokens, there is nothing to compile). Methods:
- `plain`: `model.generate_without_tnot`, the original generate of the TNOT-enabled model. Its two
  hooks stay registered but are inert outside TNOT's generate (each returns at its first check),
  against ~1,100 kernel launches per forward.
- `slot_tN`: `TNOTConfig(prompt_only=True, times=N, lr=0.1, mode="slot")`: N AdamW steps on the
  prompt, then the delta is added before lm_head at every generated token (the most work per token).
- `srgen_tN`: `TNOTConfig(prompt_only=True, times=N, lr=0.1, mode="srgen", entropy_control=True,
  entropy_threshold=1e9, adaptive_entropy=True, adaptive_entropy_N=25, adaptive_entropy_K=4.0)`:
  the entropy-control processor at every token with the recommended adaptive threshold, which a
  random model's near-constant entropy never exceeds (no sample stops: its tokens equal plain's,
  `srgen_tN_same_tokens_as_plain`, the fraction of equal new tokens in the warm-up run, is 1.0),
  delta_normal skipped (the default). Goal at times=3: 1.10x.
- `srgen-published_tN` (--published-times): the same with `fit_delta_normal=True`, the published
  code's N never-applied AdamW steps at the prompt.
Reported: median seconds per run, ms per generated token (prefill and optimization included),
and the ratio to plain as the median over rounds of the paired ratio (adjacent runs, so slow
drifts of the machine cancel).

On the static path generate compiles `model.__call__`; dynamo traces the body and lm_head hooks,
so each cache shape gets 2 graphs (hooks inert: plain and srgen, whose entropy control runs outside
the forward; slot: a delta tensor to add), then none per call (each row records the graphs
compiled and the graph breaks during its timed rounds in `dynamo_during_timing`, both should be 0).

Prompt stage alone: the same methods with max_new_tokens=1 (prefill + optimization, one
token), dynamic cache (the prefill is eager on both paths), --prompt-stage-repeats rounds; the
paired difference to plain is the optimization's cost. Run at the start of every command,
also with --skip-overhead (a few seconds; --skip-prompt-stage to leave it out).

Retry cost (--retry-cost), per model, cache path, prompt length: srgen (times 3, lr 0.01) with a
threshold of 0, so every judged token stops; a generate of R + 1 new tokens with max_retries=R
then makes R retries (each reflects on one token and stops at the next) and a last pass of one
token. Timed for R in --retries, with KV reuse (dynamic cache: only the last kept token goes
through the body) and without (`model.tnot.reuse_cache = False`: a full re-prefill, as published;
the only way on the static path), beside plain generating R + 1 tokens. Reported: the least-squares
slope in ms per retry and plain's in ms per token.

Memory (CUDA only): peak allocated during one generate with max_new_tokens=1 at a
--memory-prompt-len prompt: plain, TNOT slot times=1 with ce_chunk=--ce-chunk (chunked) and with
ce_chunk=prompt length (unchunked: all positions x vocab logits at once). OOM is recorded as
"OOM".

Writes the JSON given by --out, a PNG of the ratios and the markdown rows (for
benchmarks/RESULTS.md) next to it, and prints the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    LLAMA_CONFIGS, compile_counters, default_dtype, dump, environment, finish, log, paired_ratio,
    raise_recompile_limits, random_llama, timed,
)
from testtime.tnot import TNOTConfig, enable_tnot_model  # noqa: E402

# max positions raised where prompts go to 16K (RoPE has no learned positions)
CONFIGS = {name: LLAMA_CONFIGS[name] for name in ("smollm2-135m", "llama3.2-1b", "tiny")}
MAX_POSITIONS = {"smollm2-135m": 32768, "tiny": 4096}

START = time.perf_counter()


def out_of_time(args) -> bool:
    return time.perf_counter() - START > args.deadline_s


def build(name: str, device, dtype):
    extra = {"max_position_embeddings": MAX_POSITIONS[name]} if name in MAX_POSITIONS else {}
    model = random_llama(name, device, dtype, attn_implementation="sdpa", **extra)
    # an EOS for entropy control to force that greedy decoding never picks: exact token counts
    eos = model.config.vocab_size - 1
    with torch.no_grad():
        model.get_output_embeddings().weight[eos] = 0
    model.generation_config.eos_token_id = eos
    return enable_tnot_model(model, TNOTConfig(prompt_only=True, times=1, lr=0.1, mode="slot"))


def tnot_config(method: str, **extra) -> TNOTConfig:
    """`slot_tN`, `srgen_tN` (entropy control, no sample stops) or `srgen-published_tN` (and delta_normal)."""
    mode, times = method.split("_t")
    settings = dict(prompt_only=True, times=int(times), lr=0.1, mode="slot" if mode == "slot" else "srgen")
    if mode != "slot":  # the recommended adaptive threshold (N=25, K=4) over a static one no entropy reaches
        settings.update(entropy_control=True, entropy_threshold=1e9, adaptive_entropy=True, adaptive_entropy_N=25,
                        adaptive_entropy_K=4.0, fit_delta_normal=mode == "srgen-published")
    return TNOTConfig(**{**settings, **extra})


def method_fn(model, method, ids, mask, kwargs, **extra):
    if method == "plain":
        return lambda: model.generate_without_tnot(input_ids=ids, attention_mask=mask, **kwargs)
    cfg = tnot_config(method, **extra)

    def run():
        model.tnot_config = cfg
        model.reset_model_parameters()  # a new problem (max_retries 0 would otherwise continue the last one)
        return model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return run


def prompts(vocab, batch, length, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g).to(device)
    return ids, torch.ones_like(ids)


def dynamo_stats():
    from torch._dynamo.utils import counters
    return {"unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def overhead_methods(args) -> list[str]:
    return (["plain"] + [f"slot_t{t}" for t in args.times] + [f"srgen_t{t}" for t in args.srgen_times]
            + [f"srgen-published_t{t}" for t in args.published_times])


# ------------------------------------------------------------------------------------------------
# overhead


def bench_overhead(name, model, args, device, results):
    methods = overhead_methods(args)
    for path in args.paths:
        new_tokens = args.new_tokens if path == "static" else (args.dynamic_new_tokens or args.new_tokens)
        # warm-up: the static path compiles at the first decode step of each cache shape, so it must
        # run the full length; the dynamic path has nothing to compile
        warm_tokens = new_tokens if path == "static" else min(new_tokens, 16)
        for prompt_len in args.prompt_lens:
            for batch in args.batch_sizes:
                row = {"model": name, "path": path, "batch": batch, "prompt_len": prompt_len,
                       "new_tokens": new_tokens, "errors": {}}
                results["overhead"].append(row)
                if out_of_time(args):
                    row["errors"]["all"] = "skipped: --deadline-s reached"
                    continue
                ids, mask = prompts(model.config.vocab_size, batch, prompt_len, device, seed=prompt_len + batch)
                common = dict(do_sample=False, pad_token_id=0)
                if path == "static":
                    common["cache_implementation"] = "static"
                fns = {m: method_fn(model, m, ids, mask, dict(common, max_new_tokens=new_tokens)) for m in methods}
                warm = {m: method_fn(model, m, ids, mask, dict(common, max_new_tokens=warm_tokens)) for m in methods}
                live, outs = [], {}
                for m in methods:
                    try:
                        for _ in range(max(args.warmup, 1)):  # >= 1: its tokens are checked below
                            t, out = timed(warm[m], device)
                            log(f"  warm-up {name} {path} p{prompt_len} b{batch} {m}: {t:.2f} s")
                        assert out.shape == (batch, prompt_len + warm_tokens), out.shape
                        outs[m] = out[:, prompt_len:]
                        live.append(m)
                    except Exception as err:  # e.g. the compiled static path failing
                        row["errors"][m] = f"{type(err).__name__}: {err}"[:2000]
                        log(f"  {m} FAILED: {row['errors'][m][:300]}")
                    dump(results, args.out)
                for m in live:  # same tokens as plain? srgen (no delta applied, no stop) must match exactly
                    if m != "plain" and "plain" in outs:
                        row[f"{m}_same_tokens_as_plain"] = float((outs[m] == outs["plain"]).float().mean())
                times = {m: [] for m in live}
                stats0 = dynamo_stats()
                for r in range(args.repeats):
                    if out_of_time(args):
                        row["errors"]["rounds"] = f"stopped after {r} rounds: --deadline-s reached"
                        break
                    for m in (live if r % 2 == 0 else live[::-1]):
                        t, _ = timed(fns[m], device)
                        times[m].append(t)
                        log(f"  {name} {path} p{prompt_len} b{batch} round {r} {m}: {t:.3f} s "
                            f"({1000 * t / new_tokens:.2f} ms/token)")
                        row[f"{m}_runs_s"] = times[m]
                        dump(results, args.out)
                # graphs compiled during the timed rounds: > 0 means some method recompiles at every call
                stats1 = dynamo_stats()
                row["dynamo_during_timing"] = {k: stats1[k] - stats0[k] for k in stats0}
                n = min((len(v) for v in times.values()), default=0)
                row["rounds"] = n
                for m in live:
                    if n == 0:
                        continue
                    row[f"{m}_median_s"] = statistics.median(times[m][:n])
                    row[f"{m}_ms_per_token"] = 1000 * row[f"{m}_median_s"] / new_tokens
                    if m != "plain" and "plain" in times:
                        row[f"{m}_ratio"] = paired_ratio(times[m][:n], times["plain"][:n])
                log("  " + json.dumps({k: v for k, v in row.items() if not k.endswith("_runs_s")}))
                dump(results, args.out)


def bench_prompt_stage(name, model, args, device, results):
    """Prefill + optimization + one token, dynamic cache: TNOT minus plain is the optimization's cost."""
    methods = ["plain"] + [f"slot_t{t}" for t in args.times] + [f"srgen-published_t{t}" for t in args.published_times]
    for prompt_len in args.prompt_lens:
        if out_of_time(args):
            break
        ids, mask = prompts(model.config.vocab_size, 1, prompt_len, device, seed=prompt_len)
        kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=1)
        fns = {m: method_fn(model, m, ids, mask, kwargs) for m in methods}
        for m in methods:
            for _ in range(max(args.warmup, 1)):
                fns[m]()
        times = {m: [] for m in methods}
        for r in range(args.prompt_stage_repeats):
            for m in (methods if r % 2 == 0 else methods[::-1]):
                times[m].append(timed(fns[m], device)[0])
        row = {"model": name, "batch": 1, "prompt_len": prompt_len,
               "plain_ms": 1000 * statistics.median(times["plain"])}
        for m in methods[1:]:
            row[f"{m}_ms"] = 1000 * statistics.median(times[m])
            row[f"{m}_extra_ms"] = 1000 * statistics.median(a - b for a, b in zip(times[m], times["plain"]))
        log("  prompt stage " + json.dumps(row))
        results["prompt_stage"].append(row)
        dump(results, args.out)


# ------------------------------------------------------------------------------------------------
# retry cost


def slope(xs, ys) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def bench_retry_cost(name, model, args, device, results):
    """srgen with every judged token stopped: R retries in a generate of R + 1 tokens (see the docstring)."""
    retries = args.retries
    for path in args.paths:
        variants = ["reuse", "re-prefill"] if path == "dynamic" else ["re-prefill"]  # static: never reusable
        for prompt_len in args.prompt_lens:
            row = {"model": name, "path": path, "prompt_len": prompt_len, "retries": retries, "errors": {}}
            results["retry_cost"].append(row)
            if out_of_time(args):
                row["errors"]["all"] = "skipped: --deadline-s reached"
                continue
            ids, mask = prompts(model.config.vocab_size, 1, prompt_len, device, seed=prompt_len)
            common = dict(do_sample=False, pad_token_id=0)
            if path == "static":
                common["cache_implementation"] = "static"
            fns = {}
            for r in retries:
                kwargs = dict(common, max_new_tokens=r + 1)
                fns[("plain", r)] = method_fn(model, "plain", ids, mask, kwargs)
                for v in variants:
                    run = method_fn(model, "srgen_t3", ids, mask, kwargs, lr=0.01, entropy_threshold=0.0,
                                    adaptive_entropy=False, max_retries=r)

                    def fn(run=run, reuse=v == "reuse", r=r):
                        model.tnot.reuse_cache = reuse
                        try:
                            out = run()
                        finally:
                            model.tnot.reuse_cache = True
                        assert model.retries == [r] and len(model.stop_positions[0]) == r + 1  # every retry happened
                        return out
                    fns[(v, r)] = fn
            try:
                for key, fn in fns.items():  # warm-up (the static path compiles each pass's shapes)
                    for _ in range(max(args.warmup, 1)):
                        fn()
                times = {key: [] for key in fns}
                for rnd in range(args.repeats):
                    for key in (list(fns) if rnd % 2 == 0 else list(fns)[::-1]):
                        times[key].append(timed(fns[key], device)[0])
            except Exception as err:
                row["errors"]["run"] = f"{type(err).__name__}: {err}"[:2000]
                log(f"  retry cost FAILED: {row['errors']['run'][:300]}")
                dump(results, args.out)
                continue
            for v in ["plain"] + variants:
                medians = [1000 * statistics.median(times[(v, r)]) for r in retries]
                row[f"{v}_ms"] = medians
                row[f"{v}_ms_per_{'token' if v == 'plain' else 'retry'}"] = slope(retries, medians)
            log("  retry cost " + json.dumps(row))
            dump(results, args.out)


# ------------------------------------------------------------------------------------------------
# memory


def bench_memory(name, model, args, device, results):
    prompt_len = args.memory_prompt_len
    ids, mask = prompts(model.config.vocab_size, 1, prompt_len, device, seed=1)
    kwargs = dict(do_sample=False, pad_token_id=0, max_new_tokens=1)
    row = {"model": name, "prompt_len": prompt_len, "ce_chunk": args.ce_chunk}
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        row["weights_gib"] = torch.cuda.memory_allocated(device) / 2**30
    variants = {"plain": method_fn(model, "plain", ids, mask, kwargs),
                "chunked": method_fn(model, f"slot_t{args.memory_times}", ids, mask, kwargs, ce_chunk=args.ce_chunk),
                "unchunked": method_fn(model, f"slot_t{args.memory_times}", ids, mask, kwargs, ce_chunk=prompt_len)}
    for v, fn in variants.items():
        if out_of_time(args):
            row[f"{v}_peak_gib"] = "skipped: --deadline-s reached"
            continue
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            t, _ = timed(fn, device)
            row[f"{v}_s"] = t
            row[f"{v}_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        except torch.OutOfMemoryError:
            row[f"{v}_peak_gib"] = "OOM"
        log(f"  memory {name} p{prompt_len} {v}: peak {row[f'{v}_peak_gib']} GiB")
        if cuda:
            torch.cuda.empty_cache()
    results["memory"].append(row)
    dump(results, args.out)


# ------------------------------------------------------------------------------------------------
# output


def fmt(value, spec="{:.2f}"):
    return spec.format(value) if isinstance(value, (int, float)) else (str(value) if value is not None else "-")


def markdown(results, methods) -> str:
    lines = []
    if results["overhead"]:
        names = [m for m in methods if m != "plain"]
        lines += ["| model | cache | batch | prompt | new tokens | n | plain ms/tok | "
                  + " | ".join(f"{m} ratio (ms/tok)" for m in names) + " |",
                  "| --- " * (7 + len(names)) + "|"]
        for r in results["overhead"]:
            cells = []
            for m in names:
                if m in r["errors"]:
                    cells.append("failed")
                else:
                    cells.append(f"{fmt(r.get(f'{m}_ratio'), '{:.3f}x')} ({fmt(r.get(f'{m}_ms_per_token'))})")
            lines.append(f"| {r['model']} | {r['path']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | "
                         f"{r.get('rounds', 0)} | {fmt(r.get('plain_ms_per_token'))} | " + " | ".join(cells) + " |")
    if results["prompt_stage"]:
        names = [k[:-9] for k in results["prompt_stage"][0] if k.endswith("_extra_ms")]
        lines += ["", "| model | prompt | plain prefill + 1 token ms | "
                  + " | ".join(f"{m} extra ms" for m in names) + " |", "| --- " * (3 + len(names)) + "|"]
        for r in results["prompt_stage"]:
            lines.append(f"| {r['model']} | {r['prompt_len']} | {r['plain_ms']:.1f} | "
                         + " | ".join(f"{r[f'{m}_extra_ms']:.1f}" for m in names) + " |")
    if results["retry_cost"]:
        lines += ["", "| model | cache | prompt | plain ms/token | ms per retry, KV reuse | ms per retry, re-prefill |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in results["retry_cost"]:
            lines.append(f"| {r['model']} | {r['path']} | {r['prompt_len']} | {fmt(r.get('plain_ms_per_token'))} | "
                         f"{fmt(r.get('reuse_ms_per_retry'))} | {fmt(r.get('re-prefill_ms_per_retry'))} |")
    if results["memory"]:
        lines += ["", "| model | prompt | weights GiB | plain peak GiB | chunked CE peak GiB | unchunked CE peak GiB |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in results["memory"]:
            lines.append(f"| {r['model']} | {r['prompt_len']} | {fmt(r.get('weights_gib'))} | "
                         f"{fmt(r.get('plain_peak_gib'))} | {fmt(r.get('chunked_peak_gib'))} (chunk {r['ce_chunk']}) | "
                         f"{fmt(r.get('unchunked_peak_gib'))} |")
    return "\n".join(lines)


def plot(results, path: Path):
    from testtime.io import new_figure, save_figure  # the project's figure set-up (Agg, no pyplot)

    rows = [r for r in results["overhead"] if any(k.endswith("_ratio") for k in r)]
    if not rows:
        return
    fig, (ax,) = new_figure(panel_size=(7, 4.5))
    ticks = set()
    for r in rows:
        label = f"{r['model']} {r['path']} p{r['prompt_len']} b{r['batch']}"
        xs = sorted(int(k[6:-6]) for k in r if k.startswith("slot_t") and k.endswith("_ratio"))
        ticks.update(xs)
        line, = ax.plot(xs, [r[f"slot_t{x}_ratio"] for x in xs], marker="o", label=label)
        for k in r:
            if k.startswith("srgen_t") and k.endswith("_ratio"):
                ax.plot([int(k[7:-6])], [r[k]], marker="x", ms=9, color=line.get_color(), ls="")
                ticks.add(int(k[7:-6]))
    ax.set_xticks(sorted(ticks))
    ax.axhline(1.05, color="tab:green", ls="--", lw=1, label="goal 1.05x at times=5 (slot)")
    ax.axhline(1.10, color="tab:red", ls="--", lw=1, label="goal 1.10x at times=3 (srgen)")
    ax.axhline(1.08, color="tab:gray", ls=":", lw=1, label="SLOT reported ~1.08x (3 steps)")
    ax.set_xlabel("optimization steps (times); o = slot, x = srgen (entropy control, no stops)")
    ax.set_ylabel("time ratio (TNOT generate / plain generate)")
    ax.set_title("TNOT overhead, paired median over rounds", fontsize=9)
    ax.legend(fontsize=6)
    save_figure(fig, path, dpi=130)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny config, short prompts, few tokens: a CPU smoke test")
    p.add_argument("--models", default="smollm2-135m,llama3.2-1b", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    p.add_argument("--paths", default="static,dynamic", help="cache paths: static (compiled on GPU), dynamic")
    p.add_argument("--prompt-lens", default="256,4096")
    p.add_argument("--batch-sizes", default="1")
    p.add_argument("--times", default="1,3,5", help="slot optimization steps to time")
    p.add_argument("--srgen-times", default="3", help="srgen (entropy control, no stops) steps to time; '' for none")
    p.add_argument("--published-times", default="", help="srgen-published (delta_normal fitted too) steps to time")
    p.add_argument("--retry-cost", action="store_true", help="time retries (see the docstring)")
    p.add_argument("--retries", default="0,2,4,8", help="retry counts of --retry-cost")
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--dynamic-new-tokens", type=int, default=None,
                   help="new tokens on the (slow, eager) dynamic path; default --new-tokens")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompt-stage-repeats", type=int, default=7)
    p.add_argument("--memory-prompt-len", type=int, default=16384)
    p.add_argument("--memory-times", type=int, default=1)
    p.add_argument("--ce-chunk", type=int, default=1024, help="chunk of the chunked memory variant")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-prompt-stage", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--deadline-s", type=float, default=540, help="start no new run after this many seconds")
    p.add_argument("--out", default="runs/bench/tnot.json")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.prompt_lens, args.new_tokens, args.repeats = "tiny", "32,64", 8, 2
        args.memory_prompt_len, args.ce_chunk, args.prompt_stage_repeats = 256, 32, 3
        args.retries, args.retry_cost = "0,1,2", True  # the smoke test runs every measurement
    device = torch.device(args.device)
    dtype = default_dtype(device, args.dtype)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    args.prompt_lens, args.batch_sizes = ints(args.prompt_lens), ints(args.batch_sizes)
    args.times, args.srgen_times = ints(args.times), ints(args.srgen_times)
    args.published_times, args.retries = ints(args.published_times), ints(args.retries)
    args.paths = args.paths.split(",")
    # plain/srgen and slot decode graphs x cache shapes share one compiled __call__: room for all
    raise_recompile_limits()
    results = {
        **environment(args, device, dtype),
        "configs": {m: CONFIGS[m] for m in args.models.split(",")},
        "tnot_settings": {m: dataclasses.asdict(tnot_config(m)) for m in overhead_methods(args)[1:]},
        "overhead": [], "prompt_stage": [], "retry_cost": [], "memory": [],
    }
    for name in args.models.split(","):
        log(f"== {name}")
        model = build(name, device, dtype)
        if not args.skip_prompt_stage:
            bench_prompt_stage(name, model, args, device, results)
        if not args.skip_overhead:
            bench_overhead(name, model, args, device, results)
        if args.retry_cost:
            bench_retry_cost(name, model, args, device, results)
        if not args.skip_memory:
            bench_memory(name, model, args, device, results)
        results.setdefault("compile_counters", {})[name] = compile_counters()
        log(f"  counters: {results['compile_counters'][name]}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finish(results, args.out, markdown(results, overhead_methods(args)), plot)


if __name__ == "__main__":
    main()

"""TTT-E2E: speed against full attention and a plain transformer, and quality in miniature.

    python benchmarks/ttt.py --device cpu --tiny --out /tmp/ttt_tiny                 # smoke test (CPU, ~2 min)

On the GPU machine (from the repository root with PYTHONPATH=$PWD, $OUT the output folder):

    python benchmarks/ttt.py --device cuda --part speed --out $OUT/ttt    # check, prefill, profile, decode, train
    python benchmarks/ttt.py --device cuda --part speed --sections decode,train --out $OUT/ttt
    python benchmarks/ttt.py --device cuda --part quality --out $OUT/ttt  # 3 models trained and evaluated

Every model keeps float32 parameters and runs under bf16 autocast, the precision training uses
(the fast weights and their updates stay float32); nothing is cast to bf16.

Speed (random weights: speed does not depend on them), the paper's 125M shape (12 layers, 768
wide, window 8192, chunk 1024, the last 3 blocks TTT; MLP 1664 with TTT, 2048 without),
vocabulary 32,000 (and the official 128,256 at 128K), batch 1. Sections (`--sections`):
- check: before anything is timed, the fast path against the plain one on the same inputs (a
  16K prefill's last logits and final fast weights; a decode across a chunk update; the loss and
  meta-gradient of 8K tokens, first and second order). Beyond bf16 tolerance the run stops.
- prefill: seconds, tokens/s and peak memory of one forward (logits of the last position only,
  as `generate` asks) over 2K-128K tokens: TTT-E2E (fast path), the same TTT model on its plain
  path (up to 32K), the sliding-window model without TTT blocks, and full attention (SDPA's causal
  flash kernel), all the same parameter count. Goals: TTT-E2E >= 2x faster than full attention at
  128K (paper: 2.7x), per-token cost at 128K within 1.2x of 8K, peak memory at most full
  attention's. A PNG of tokens/s against context.
- profile: the share of TTT-E2E's 32K prefill during which a GPU kernel runs (the union of the
  kernels' intervals over the wall time; goal >= 80%).
- decode: ms per token of `generate` (greedy), TTT-E2E against Hugging Face's compiled
  static-cache generate of a Llama of the same shape, after 2K and 32K of context; 1,032 tokens,
  so one chunk update is inside, and the update step's own time. Goal: at most 1.25x.
- train: one meta-training step (forward, meta-gradient, AdamW) over 8K tokens, second and first
  order, against the plain training step of the parameter-matched full-attention model. Goals:
  second order at most 4x, first order at most 3x.

Quality in miniature (`--part quality`): the `small` preset (6 layers, 384 wide, window 512, chunk
128) over the standard library's source, character-level, sequences of 2048 tokens: TTT-E2E, the
sliding-window model without TTT blocks and the full-attention model trained with the same data
order and steps, then the held-out loss by position bucket, and the memory test: a 128-token
passage repeated after a 640-token gap, with its control (the same gap and final passage after an
unrelated passage), so the share of TTT's drop that comes from memory is measured.

Writes `<out>_speed.json` / `<out>_quality.json`, markdown tables and PNGs beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import dump, environment, finish, log, raise_recompile_limits, random_llama, sync, timed  # noqa: E402,E501
from testtime.io import new_figure, save_figure  # noqa: E402
from testtime.ttt import TTTConfig, TTTForCausalLM  # noqa: E402
from testtime.ttt.evaluation import (  # noqa: E402
    bucket_name,
    bucket_sums,
    memory_share,
    position_buckets,
    repeated_passage_documents,
    token_losses,
)
from testtime.ttt.outer import outer_lr_factor, outer_optimizer  # noqa: E402

MODELS = {  # name -> TTTConfig overrides of the preset: TTT-E2E and its two baselines
    "ttt_e2e": {},
    "swa": {"ttt_layer_fraction": 0.0},
    "full": {"ttt_layer_fraction": 0.0, "attention": "full"},
}
SECTIONS = ("check", "prefill", "profile", "decode", "train")
SMALL_TILES = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 64, "BLOCK_N2": 64}
VARIANTS = {  # TTT-E2E on its fast path: name -> the experiments it turns on (`testtime.ttt.fast.FastPath`)
    "ttt_e2e": {},
    "ttt_e2e_skip": {"skip_window_key_grads": True},
    "ttt_e2e_tiles": {"skip_window_key_grads": True, "chunk_kernel_options": SMALL_TILES},
}


def set_variant(model, name: str):
    """The model with the fast-path experiments of VARIANTS[name] on (the others at their defaults)."""
    for field, value in VARIANTS[name].items():
        setattr(model.fast, field, value)
    return model


def build(preset: str, kind: str, device, seed: int = 0, **overrides) -> TTTForCausalLM:
    """A model of `preset` (float32 parameters, eval mode)."""
    torch.manual_seed(seed)
    config = TTTConfig.from_preset(preset, **{**MODELS[kind], **overrides})
    with torch.device(device):
        return TTTForCausalLM(config).eval()


def bf16(device, dtype):
    """The autocast every call runs under (none on a CPU in float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def median_time(fn, device, repeats: int) -> float:
    return statistics.median(timed(fn, device)[0] for _ in range(repeats))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in float32 (norms over every element)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@contextlib.contextmanager
def path(model, mode: str):
    """The model's fast_path set to `mode` inside the block."""
    before, model.config.fast_path = model.config.fast_path, mode
    try:
        yield model
    finally:
        model.config.fast_path = before


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------


def fast_weights(cache) -> list[torch.Tensor]:
    return [w for layer in cache.fast for w in layer]


def check(args, device, dtype) -> list[dict]:
    """The fast path against the plain path on the same inputs, before any timing: rows of
    (what, largest relative difference, tolerance). Each part on a fresh model, so that a failure
    of the fast path (which turns it off for its model) is one row, not a plain-vs-plain pass."""
    rows = []

    def record(what, difference, tolerance):
        rows.append({"what": what, "relative_difference": difference, "tolerance": tolerance,
                     "ok": difference <= tolerance})
        log(f"check {what}: {difference:.2e} (tolerance {tolerance:g}) {'ok' if difference <= tolerance else 'FAILED'}")

    def failed(model, part) -> bool:
        if model.fast.failed:
            rows.append({"what": f"{part}: the fast path failed ({model.fast.failed})",
                         "relative_difference": float("inf"), "tolerance": 0.0, "ok": False})
            log(f"check {part}: the fast path FAILED: {model.fast.failed}\n{model.fast.failure_trace}")
        return bool(model.fast.failed)

    model = build(args.preset, "ttt_e2e", device, vocab_size=args.vocab)
    b = model.config.chunk_size
    length = 2 * model.config.window_size  # past the window: steady chunks too
    parts = args.check_parts
    ids = torch.randint(0, args.vocab, (1, length), device=device)
    outs = {}
    for mode in ("off", args.fast) if "prefill" in parts else ():
        with path(model, mode), torch.no_grad(), bf16(device, dtype):
            outs[mode] = model(ids, use_cache=True, logits_to_keep=b)
    if outs and not failed(model, "prefill"):
        record(f"prefill {length}: last {b} logits", relative(outs[args.fast].logits, outs["off"].logits), 2e-2)
        record(f"prefill {length}: fast weights after the last chunk",
               max(relative(f, p) for f, p in zip(fast_weights(outs[args.fast].cache),
                                                  fast_weights(outs["off"].cache))), 2e-2)
        for variant in list(VARIANTS)[1:]:  # the experiments, each on a fresh model with the same weights
            model = set_variant(build(args.preset, "ttt_e2e", device, vocab_size=args.vocab), variant)
            with path(model, args.fast), torch.no_grad(), bf16(device, dtype):
                other = model(ids, use_cache=True, logits_to_keep=b)
            if not failed(model, f"prefill, {variant}"):
                record(f"prefill {length}, {variant}: last {b} logits", relative(other.logits, outs["off"].logits),
                       2e-2)
                record(f"prefill {length}, {variant}: fast weights",
                       max(relative(f, p) for f, p in zip(fast_weights(other.cache),
                                                          fast_weights(outs["off"].cache))), 2e-2)
    # decoding across an update: a prompt 4 tokens short of a chunk boundary, then 12 tokens
    model = build(args.preset, "ttt_e2e", device, vocab_size=args.vocab)
    prompt, follow = ids[:, : 2 * b - 4], ids[:, 2 * b - 4: 2 * b + 8]
    logits = {}
    for mode in ("off", args.fast) if "decode" in parts else ():
        with path(model, mode), torch.no_grad(), bf16(device, dtype):
            cache = model(prompt, use_cache=True, logits_to_keep=1).cache
            logits[mode] = torch.cat([model(follow[:, j:j + 1], cache=cache).logits for j in range(follow.shape[1])], 1)
    if logits and not failed(model, "decode"):
        record("decode 12 tokens across a chunk update: logits", relative(logits[args.fast], logits["off"]), 2e-2)
    # meta-gradient over the training length, second and first order
    train_ids = torch.randint(0, args.vocab, (1, args.train_len), device=device)
    for first_order in [o for o in (False, True) if f"train-{'first' if o else 'second'}" in parts]:
        order = "first" if first_order else "second"
        model = build(args.preset, "ttt_e2e", device, vocab_size=args.vocab, first_order=first_order).train()
        result = {}
        for mode in ("off", args.fast):
            with path(model, mode):
                with bf16(device, dtype):
                    loss = model(train_ids, labels=train_ids).loss
                grads = torch.autograd.grad(loss, list(model.parameters()))
            result[mode] = (loss.detach(), torch.cat([g.flatten().float() for g in grads]))
        if not failed(model, f"train ({order} order)"):
            record(f"train {args.train_len} ({order} order): loss", relative(result[args.fast][0], result["off"][0]),
                   1e-2)
            record(f"train {args.train_len} ({order} order): meta-gradient",
                   relative(result[args.fast][1], result["off"][1]), 5e-2)
        model = result = None
    return rows


def prefill(args, device, dtype) -> list[dict]:
    rows = []
    fast = args.fast
    kinds = [(name, fast, 10**9, args.vocab) for name in VARIANTS] + [
        ("ttt_e2e", "off", args.plain_max, args.vocab), ("swa", fast, 10**9, args.vocab),
        ("full", fast, 10**9, args.vocab)]
    if not args.tiny:  # the official vocabulary at the longest length
        kinds += [(name, fast, 0, 128256) for name in VARIANTS] + [("full", fast, 0, 128256)]
    for kind, mode, up_to, vocab in kinds:
        model = build(args.preset, "ttt_e2e" if kind in VARIANTS else kind, device, vocab_size=vocab)
        model.config.fast_path = mode
        if kind in VARIANTS:
            set_variant(model, kind)
        lengths = [n for n in args.lengths if n <= up_to] or [args.lengths[-1]]
        for length in lengths:
            ids = torch.randint(0, vocab, (1, length), device=device)
            forward = lambda: model(ids, logits_to_keep=1).logits  # noqa: E731
            with torch.no_grad(), bf16(device, dtype):
                forward()  # warm-up at this length: compiles, block masks, CUDA graphs
                reset_peak(device)
                seconds = median_time(forward, device, args.repeats)
            name = kind if mode != "off" else f"{kind}_plain"
            row = {"model": name, "vocab": vocab, "tokens": length, "seconds": seconds,
                   "tokens_per_s": length / seconds, "us_per_token": 1e6 * seconds / length,
                   "peak_gib": peak_memory(device)}
            rows.append(row)
            log(f"prefill {name:14s} V={vocab:6d} {length:7d} tokens: {seconds:8.3f} s  {row['tokens_per_s']:9.0f} "
                f"tok/s  peak {row['peak_gib']}")
            dump({"prefill": rows}, args.json_partial)
        if model.fast.failed:
            log(f"  fast path FAILED for {kind}: {model.fast.failed}\n{model.fast.failure_trace}")
        model = None
    return rows


def kernel_table(prof, top: int = 15) -> tuple[list[tuple[int, int]], list[dict]]:
    """(the GPU kernels' intervals, the `top` kernel names by total time) of a torch.profiler run."""
    intervals, by_name = [], {}
    for event in prof.profiler.kineto_results.events():
        if event.device_type() == torch.autograd.DeviceType.CUDA and event.name() not in ("Memset", "Memcpy"):
            intervals.append((event.start_ns(), event.start_ns() + event.duration_ns()))
            total, count = by_name.get(event.name(), (0, 0))
            by_name[event.name()] = (total + event.duration_ns(), count + 1)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return intervals, [{"name": name[:120], "seconds": t / 1e9, "launches": n} for name, (t, n) in ranked]


def chunk_profile(model, ids, device, dtype, replays: int = 20) -> dict:
    """One steady chunk step of the prefill (its CUDA graph replayed `replays` times after a
    prefill of `ids`): ms per step by CUDA events, and its kernels per step, the most time first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), bf16(device, dtype):
        model(ids, logits_to_keep=1)
    steppers = [s for s in model.fast._steppers.values() if False in s.graphs]
    if device.type != "cuda" or not steppers:
        return {}
    graph = steppers[-1].graphs[False][0]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        sync(device)
    intervals, top = kernel_table(prof, top=25)
    return {"ms_per_step": start.elapsed_time(end) / replays, "kernels_per_step": len(intervals) / replays,
            "kernel_ms_per_step": sum(e - s for s, e in intervals) / 1e6 / replays,
            "top_kernels": [{**k, "ms_per_step": 1e3 * k["seconds"] / replays} for k in top]}


def busy_share(model, ids, device, dtype) -> dict:
    """The share of one forward's wall time during which some GPU kernel runs (the union of the
    kernels' intervals; each kernel counted once, never the CPU op that launched it)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), bf16(device, dtype):
        model(ids, logits_to_keep=1)
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            sync(device)
            wall = time.perf_counter() - start
    intervals, top = kernel_table(prof)
    intervals.sort()
    busy, end = 0, None
    for s, e in intervals:
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return {"kernels": len(intervals), "kernel_seconds": busy / 1e9, "wall_seconds": wall,
            "busy_share": busy / 1e9 / wall, "top_kernels": top}


def profile_part(args, device, dtype) -> dict:
    model = build(args.preset, "ttt_e2e", device, vocab_size=args.vocab, fast_path=args.fast)
    ids = torch.randint(0, args.vocab, (1, args.profile_len), device=device)
    result = {"tokens": args.profile_len, **busy_share(model, ids, device, dtype)}
    log(f"profile {args.profile_len}: kernels busy {result['kernel_seconds']:.3f} s of {result['wall_seconds']:.3f} s "
        f"wall ({result['busy_share']:.1%}), {result['kernels']} kernels; the most time:")
    for k in result["top_kernels"]:
        log(f"  {k['seconds'] * 1e3:8.2f} ms {k['launches']:6d} x  {k['name']}")
    result["chunk_step"] = {}
    for variant in VARIANTS:  # where a chunk step's time goes, per variant
        model = set_variant(build(args.preset, "ttt_e2e", device, vocab_size=args.vocab, fast_path=args.fast), variant)
        step = result["chunk_step"][variant] = chunk_profile(model, ids, device, dtype)
        if step:
            log(f"chunk step {variant}: {step['ms_per_step']:.3f} ms ({step['kernel_ms_per_step']:.3f} ms of "
                f"{step['kernels_per_step']:.0f} kernels); per step, the most time:")
            for k in step["top_kernels"]:
                log(f"  {k['ms_per_step']:7.3f} ms {k['launches']:5d} x  {k['name']}")
    return result


def decode_part(args, device, dtype) -> list[dict]:
    """ms/token of greedy `generate`: TTT-E2E (fast path) against HF's compiled static-cache
    Llama of the same shape; and TTT-E2E's per-step times around its chunk update."""
    rows = []
    new = args.decode_tokens
    short = 8
    ttt = build(args.preset, "ttt_e2e", device, vocab_size=args.vocab, fast_path=args.fast)
    c = ttt.config
    llama = random_llama("ttt-125m-twin", device, dtype, vocab_size=args.vocab) if device.type == "cuda" else None
    for context in args.contexts:
        ids = torch.randint(1, args.vocab, (1, context), device=device)
        results = {}

        def ttt_generate(n):
            with torch.no_grad(), bf16(device, dtype):
                return ttt.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                    pad_token_id=0)

        candidates = {"ttt_e2e": ttt_generate}
        if llama is not None:
            from transformers import StaticCache

            static = StaticCache(config=llama.config, max_cache_len=context + new + 8)

            def llama_generate(n):
                static.reset()
                with torch.no_grad():
                    return llama.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache=static,
                                          pad_token_id=0)

            candidates["llama_static_compiled"] = llama_generate
        for name, generate in candidates.items():
            generate(short)
            generate(new)  # warm-up: compiles, captures
            t_short = [timed(lambda: generate(short), device)[0] for _ in range(args.repeats)]
            t_long = [timed(lambda: generate(new), device)[0] for _ in range(args.repeats)]
            ms = 1e3 * (statistics.median(t_long) - statistics.median(t_short)) / (new - short)
            results[name] = ms
            rows.append({"model": name, "context": context, "new_tokens": new, "ms_per_token": ms})
            log(f"decode {name:22s} after {context:6d}: {ms:.3f} ms/token (generate, {new} vs {short} tokens)")
        # the update step's own time: step by step around the boundary, through the model's forward
        steps = []
        with torch.no_grad(), bf16(device, dtype):
            state = ttt(ids, use_cache=True, logits_to_keep=1)
            cache, token = state.cache, state.logits[:, -1:].argmax(-1)
            for _ in range(new):
                sync(device)
                start = time.perf_counter()
                token = ttt(token, cache=cache).logits[:, -1:].argmax(-1)
                sync(device)
                steps.append(1e3 * (time.perf_counter() - start))
        # the step whose token opens a new chunk runs the update; not step 0, which also captures the
        # new cache's decode graph
        boundary = (-context) % c.chunk_size or c.chunk_size
        rows[-len(candidates)]["median_step_ms"] = statistics.median(steps)
        rows[-len(candidates)]["update_step_ms"] = steps[boundary]
        log(f"decode ttt_e2e after {context}: median step {statistics.median(steps):.3f} ms, the update step "
            f"{steps[boundary]:.2f} ms (step {boundary})")
        if "llama_static_compiled" in results:
            rows[-len(candidates)]["ratio_to_llama"] = results["ttt_e2e"] / results["llama_static_compiled"]
        dump({"decoding": rows}, args.json_partial)
    return rows


def train_part(args, device, dtype) -> list[dict]:
    rows = []
    ids = torch.randint(0, args.vocab, (1, args.train_len), device=device)
    variants = [("full (plain step)", "full", {}, args.fast), ("TTT-E2E second order", "ttt_e2e", {}, args.fast),
                ("TTT-E2E first order", "ttt_e2e", {"first_order": True}, args.fast),
                ("TTT-E2E second order, plain path", "ttt_e2e", {}, "off")]
    base = None
    for name, kind, overrides, mode in variants:
        model = build(args.preset, kind, device, vocab_size=args.vocab, **overrides).train()
        model.config.fast_path = mode
        optimizer = outer_optimizer(model.parameters(), 1e-4)

        def step():
            with bf16(device, dtype):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        step()
        reset_peak(device)
        seconds = median_time(step, device, args.repeats)
        base = seconds if base is None else base
        row = {"variant": name, "tokens": args.train_len, "seconds": seconds, "tokens_per_s": args.train_len / seconds,
               "peak_gib": peak_memory(device), "ratio_to_full": seconds / base}
        rows.append(row)
        log(f"train {name:34s} {seconds:.4f} s/step  {row['ratio_to_full']:.2f}x  peak {row['peak_gib']}")
        dump({"training": rows}, args.json_partial)
        model = optimizer = None
    return rows


def speed(args, device, dtype) -> dict:
    out = {"preset": args.preset, "vocab": args.vocab}
    parts = {"check": check, "prefill": prefill, "profile": profile_part, "decode": decode_part, "train": train_part}
    for section in args.sections:
        start = time.perf_counter()
        out[section] = parts[section](args, device, dtype)
        out[f"{section}_seconds"] = time.perf_counter() - start
        dump(out, args.json_speed)
        if section == "check" and not all(r["ok"] for r in out["check"]):
            log("the fast path differs from the plain one beyond bf16 tolerance, or failed: the timings of what "
                "failed are not its own (see the check rows)")
    return out


def speed_tables(out: dict) -> str:
    lines = []
    if out.get("check"):
        lines += ["| check: fast path against plain | relative difference | tolerance | |", "|---|---:|---:|---|"]
        lines += [f"| {r['what']} | {r['relative_difference']:.2e} | {r['tolerance']:g} | "
                  f"{'ok' if r['ok'] else 'FAILED'} |" for r in out["check"]]
    rows = out.get("prefill") or []
    if rows:
        by = {(r["model"], r["vocab"], r["tokens"]): r for r in rows}
        vocab = out["vocab"]
        lengths = sorted({r["tokens"] for r in rows if r["vocab"] == vocab})
        # the fastest TTT-E2E variant at the longest length is the one compared with full attention
        longest = max(lengths)
        timed_variants = [m for m in VARIANTS if (m, vocab, longest) in by]
        best = min(timed_variants, key=lambda m: by[(m, vocab, longest)]["seconds"]) if timed_variants else "ttt_e2e"
        names = list(VARIANTS) + ["ttt_e2e_plain", "swa", "full"]
        lines += ["", f"| prefill tokens | {' s | '.join(names)} s | {best} / full speed-up | {best} us/token vs 8K | "
                  f"peak GiB {best} / full |", "|---:" * (len(names) + 4) + "|"]
        ref = by.get((best, vocab, 8192)) or by.get((best, vocab, lengths[0]))
        cell = lambda r: f"{r['seconds']:.3f}" if r else "-"  # noqa: E731
        for n in lengths:
            t, f = by.get((best, vocab, n)), by.get(("full", vocab, n))
            speedup = f"{f['seconds'] / t['seconds']:.2f}x" if t and f else "-"
            per_token = f"{t['us_per_token'] / ref['us_per_token']:.2f}x" if t and ref else "-"
            peak = f"{t['peak_gib']:.2f} / {f['peak_gib']:.2f}" if t and f and t["peak_gib"] else "-"
            lines.append(f"| {n} | {' | '.join(cell(by.get((m, vocab, n))) for m in names)} | {speedup} | "
                         f"{per_token} | {peak} |")
        for r in rows:
            if r["vocab"] != vocab:
                lines.append(f"| {r['tokens']} (vocabulary {r['vocab']}) | {r['model']}: {r['seconds']:.3f} s, "
                             f"peak {r['peak_gib']} GiB | | | | | | | |")
    if out.get("profile"):
        p = out["profile"]
        lines += ["", f"Profile of TTT-E2E's {p['tokens']}-token prefill: GPU kernels busy {p['kernel_seconds']:.3f} s "
                  f"of {p['wall_seconds']:.3f} s wall ({p['busy_share']:.1%}), {p['kernels']} kernels."]
        for variant, step in (p.get("chunk_step") or {}).items():
            if step:
                lines += ["", f"One steady chunk step, {variant}: {step['ms_per_step']:.3f} ms "
                          f"({step['kernel_ms_per_step']:.3f} ms in {step['kernels_per_step']:.0f} kernels)", "",
                          "| kernel | ms per step | launches |", "|---|---:|---:|"]
                lines += [f"| `{k['name'][:80]}` | {k['ms_per_step']:.3f} | {k['launches']} |"
                          for k in step["top_kernels"][:12]]
    if out.get("decode"):
        lines += ["", "| decoding (generate, greedy) | context | ms / token | vs Llama static compiled | "
                  "median step ms | the update step ms |", "|---|---:|---:|---:|---:|---:|"]
        for r in out["decode"]:
            ratio = f"{r['ratio_to_llama']:.2f}x" if "ratio_to_llama" in r else "-"
            step = f"{r['median_step_ms']:.3f}" if "median_step_ms" in r else "-"
            update = f"{r['update_step_ms']:.2f}" if "update_step_ms" in r else "-"
            lines.append(f"| {r['model']} | {r['context']} | {r['ms_per_token']:.3f} | {ratio} | {step} | {update} |")
    if out.get("train"):
        lines += ["", "| meta-training step (8K tokens) | s / step | vs the full-attention step | tokens / s | "
                  "peak GiB |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} | {r['seconds']:.4f} | {r['ratio_to_full']:.2f}x | {r['tokens_per_s']:.0f} | "
                  f"{r['peak_gib']} |" for r in out["train"]]
    return "\n".join(lines)


def speed_figure(out: dict, path: str) -> None:
    rows = [r for r in out.get("prefill") or [] if r["vocab"] == out["vocab"]]
    if not rows:
        return
    fig, (ax,) = new_figure(panel_size=(6.5, 4.5))
    labels = {"ttt_e2e": "TTT-E2E (fast path)", "ttt_e2e_skip": "TTT-E2E (fast, no window key gradients)",
              "ttt_e2e_tiles": "TTT-E2E (fast, no window key gradients, 64-row tiles)",
              "ttt_e2e_plain": "TTT-E2E (plain path)",
              "swa": "sliding window, no TTT", "full": "full attention (flash)"}
    for name, label in labels.items():
        pts = sorted((r["tokens"], r["tokens_per_s"]) for r in rows if r["model"] == name)
        if pts:
            ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prefill length (tokens)")
    ax.set_ylabel("prefill throughput (tokens / s)")
    ax.set_title(f"125M models, one sequence, bf16 autocast ({out.get('device', '')})")
    ax.legend(fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# quality in miniature
# ---------------------------------------------------------------------------------------------


def text_splits(args) -> tuple[dict, object]:
    """Token streams of the standard library's source (train / val by file), character-level."""
    from datamodules.lm_text import LMTextDataModule

    dm = LMTextDataModule("tiny-random-llama", source="stdlib", block_size=args.seq_len, max_files=args.max_files,
                          val_fraction=0.1, test_fraction=0.0, cache=False)
    dm.setup("fit")
    return dm.datasets, dm.tokenizer


def train(model, data, args, device, dtype) -> float:
    """AdamW (3e-3, betas 0.9/0.95, weight decay 0.1 on every parameter: `testtime.ttt.outer`), 10%
    warm-up then cosine to 1e-5, clip 1.0; inner lr warm-up over the same 10%. Returns the seconds."""
    model.train()
    optimizer = outer_optimizer(model.parameters(), args.lr)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                 lambda s: outer_lr_factor(s, warmup, args.steps, 1e-5 / args.lr))
    model.config.inner_lr_warmup_steps = warmup
    generator = torch.Generator().manual_seed(0)  # the same data order for every model
    order = torch.randperm(len(data), generator=generator)
    sync(device)
    start = time.perf_counter()
    for step in range(args.steps):
        index = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(data)]
        ids = torch.stack([data[int(i)]["input_ids"] for i in index]).to(device)
        model.set_inner_lr_step(step)
        with bf16(device, dtype):
            loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            log(f"  step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s")
    sync(device)
    model.set_inner_lr_step(None)
    return time.perf_counter() - start


def evaluate_positions(model, data, buckets, args, device, dtype, **kwargs) -> dict:
    sums = counts = None
    model.eval()
    for start in range(0, min(len(data), args.eval_blocks), args.batch_size):
        ids = torch.stack([data[i]["input_ids"] for i in range(start, min(start + args.batch_size, args.eval_blocks,
                                                                          len(data)))]).to(device)
        with torch.no_grad(), bf16(device, dtype):
            logits = model(ids, **kwargs).logits
        s, c = bucket_sums(*token_losses(logits, ids), buckets)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    return {bucket_name(b): float(s / c) for b, s, c in zip(buckets, sums, counts)} | {"all": float(sums.sum() /
                                                                                                     counts.sum())}


def memory_test(model, tokens, args, device, dtype) -> list[dict]:
    """Loss on the repeated passage and on its control (the same gap and final passage after an
    unrelated one), TTT off ("pre") and on ("post"), over a grid of inner lr and chunk size."""
    def documents(control):
        docs = repeated_passage_documents(tokens, args.memory_docs, args.passage, args.gap, seed=0, control=control)
        stack = lambda key: torch.stack([d[key] for d in docs]).to(device)  # noqa: E731
        return stack("input_ids"), stack("labels")

    sets = {"repeat": documents(False), "control": documents(True)}

    def loss(kind, **kwargs):
        ids, labels = sets[kind]
        total = count = 0.0
        for i in range(0, len(ids), args.batch_size):
            with torch.no_grad(), bf16(device, dtype):
                logits = model(ids[i:i + args.batch_size], **kwargs).logits
            per_token, counted = token_losses(logits, labels[i:i + args.batch_size])
            total += float(per_token[counted].double().sum())
            count += float(counted.sum())
        return total / count

    pre = {kind: loss(kind, ttt=False) for kind in sets}
    rows = []
    for lr in args.memory_lrs:
        for b in args.memory_chunks:
            post = {kind: loss(kind, ttt=True, inner_lr=lr, chunk_size=b) for kind in sets}
            share = memory_share(pre["repeat"], post["repeat"], pre["control"], post["control"])
            rows.append({"inner_lr": lr, "chunk_size": b, "pre": pre["repeat"], "post": post["repeat"],
                         "reduction": (pre["repeat"] - post["repeat"]) / pre["repeat"], "pre_control": pre["control"],
                         "post_control": post["control"], "memory_share": share})
            log(f"  memory lr {lr:g} b {b}: repeat {pre['repeat']:.4f} -> {post['repeat']:.4f}, control "
                f"{pre['control']:.4f} -> {post['control']:.4f}: {share:.1%} of the drop from memory")
    return rows


def adapter_memory_test(model, splits, args, device, dtype) -> dict:
    """The seed's memory test with a TinyLoRA adapter (PEFT; u=64 per module, untied) trained on
    the trained TTT-E2E model's static layers for --adapter-steps of next-token loss on training text
    the model has not seen (the end of the train split): pre/post TTT on the repeated passages, as
    for the model alone."""
    from testtime.tinylora import adapter_config, apply_adapter, trainable_parameters

    adapted = apply_adapter(model, adapter_config("tinylora", r=2, u=64, weight_tying=0.0))
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    train = splits["train"]
    adapted.train()
    for step in range(args.adapter_steps):
        index = [len(train) - 1 - (step * args.batch_size + i) % len(train) for i in range(args.batch_size)]
        ids = torch.stack([train[i]["input_ids"] for i in index]).to(device)
        with bf16(device, dtype):
            loss = adapted(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    adapted.eval()
    rows = memory_test(adapted, splits["val"].tokens, args, device, dtype)
    with adapted.disable_adapter():
        base = memory_test(adapted, splits["val"].tokens, args, device, dtype)
    log(f"  adapter: {trainable_parameters(adapted)} parameters, {args.adapter_steps} steps")
    return {"parameters": trainable_parameters(adapted), "steps": args.adapter_steps, "memory": rows,
            "memory_without": base}


def quality(args, device, dtype) -> dict:
    splits, tokenizer = text_splits(args)
    preset = "tiny" if args.tiny else "small"
    vocab = len(tokenizer)
    out = {"preset": preset, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "train_tokens": args.steps * args.batch_size * args.seq_len, "models": {}}
    for kind in args.models:
        model = build(preset, kind, device, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
        c = model.config
        log(f"{kind}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, window {c.window_size}, "
            f"chunk {c.chunk_size}, {c.attention}, {c.num_ttt_layers} TTT blocks")
        seconds = train(model, splits["train"], args, device, dtype)
        buckets = position_buckets(c.window_size, c.chunk_size)
        row = {"parameters": sum(p.numel() for p in model.parameters()), "train_seconds": seconds,
               "loss": evaluate_positions(model, splits["val"], buckets, args, device, dtype)}
        if kind == "ttt_e2e":
            row["loss_ttt_off"] = evaluate_positions(model, splits["val"], buckets, args, device, dtype, ttt=False)
            row["memory"] = memory_test(model, splits["val"].tokens, args, device, dtype)
            row["adapter"] = adapter_memory_test(model, splits, args, device, dtype)
        out["models"][kind] = row
        out["buckets"] = [bucket_name(b) for b in buckets]
        log(f"{kind}: {row['loss']}")
        dump(out, args.json_quality)
        model = None
    return out


def quality_tables(out: dict) -> str:
    models = out["models"]
    names = [n for n in ("ttt_e2e", "swa", "full") if n in models]
    lines = ["| positions | " + " | ".join(names) + " | TTT-E2E, TTT off |", "|---" * (len(names) + 2) + "|"]
    for b in out["buckets"] + ["all"]:
        cells = [f"{models[n]['loss'][b]:.4f}" for n in names]
        off = models.get("ttt_e2e", {}).get("loss_ttt_off", {}).get(b)
        lines.append(f"| {b} | " + " | ".join(cells) + (f" | {off:.4f} |" if off is not None else " | |"))
    lines += ["", "| model | parameters | train seconds |", "|---|---:|---:|"]
    lines += [f"| {n} | {models[n]['parameters']} | {models[n]['train_seconds']:.0f} |" for n in names]
    if "memory" in models.get("ttt_e2e", {}):
        ttt = models["ttt_e2e"]
        sets = [("TTT-E2E", ttt["memory"])]
        if "adapter" in ttt:
            sets.append((f"TTT-E2E + TinyLoRA ({ttt['adapter']['parameters']} parameters)", ttt["adapter"]["memory"]))
        lines += ["", "| memory test: model | inner lr | chunk | repeat: TTT off | TTT on | reduction | "
                  "control: TTT off | TTT on | share of the drop from memory |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['inner_lr']:g} | {r['chunk_size']} | {r['pre']:.4f} | {r['post']:.4f} | "
                  f"{r['reduction']:+.2%} | {r['pre_control']:.4f} | {r['post_control']:.4f} | "
                  f"{r['memory_share']:.1%} |" for name, rows in sets for r in rows]
    return "\n".join(lines)


def quality_figure(out: dict):
    fig, (ax,) = new_figure(panel_size=(6.5, 4.5))
    x = range(len(out["buckets"]))
    labels = {"ttt_e2e": "TTT-E2E", "swa": "sliding window, no TTT", "full": "full attention"}
    for name, row in out["models"].items():
        ax.plot(x, [row["loss"][b] for b in out["buckets"]], "o-", label=labels[name])
    if "loss_ttt_off" in out["models"].get("ttt_e2e", {}):
        ax.plot(x, [out["models"]["ttt_e2e"]["loss_ttt_off"][b] for b in out["buckets"]], "x:", color="gray",
                label="TTT-E2E weights, TTT off")
    ax.set_xticks(list(x), out["buckets"], rotation=30, fontsize=8)
    ax.set_xlabel("position in the 2048-token sequence (tokens; the last bucket is beyond the window)")
    ax.set_ylabel("held-out next-token loss (nats per character)")
    ax.set_title(f"Same data and {out['steps']} steps each ({out['train_tokens'] / 1e6:.0f}M tokens)")
    ax.legend(fontsize=8)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="autocast dtype: bfloat16 on a GPU, float32 (none) on a CPU")
    parser.add_argument("--part", choices=["speed", "quality", "both"], default="both")
    parser.add_argument("--tiny", action="store_true", help="tiny models and lengths: a smoke test on the CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"speed: a comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--check-parts", default="prefill,decode,train-second,train-first",
                        help="check: what to compare (prefill, decode, train-second, train-first)")
    parser.add_argument("--lengths", default=None, help="prefill lengths (comma list; default 2K,8K,32K,128K)")
    parser.add_argument("--plain-max", type=int, default=None, help="the longest prefill of the plain path")
    parser.add_argument("--contexts", default=None, help="decoding contexts (comma list; default 2K,32K)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens per timed generate")
    parser.add_argument("--train-len", type=int, default=None, help="tokens of a meta-training step")
    parser.add_argument("--profile-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (quality)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--eval-blocks", type=int, default=None)
    parser.add_argument("--memory-docs", type=int, default=None)
    parser.add_argument("--adapter-steps", type=int, default=None, help="TinyLoRA steps before its memory test")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"quality: the models to train and evaluate, a comma list of {', '.join(MODELS)}")
    parser.add_argument("--out", default="ttt", help="prefix of the files written")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    if not args.models or set(args.models) - set(MODELS):
        parser.error(f"--models: choose from {', '.join(MODELS)}, got {args.models}")
    args.sections = [s for s in args.sections.split(",") if s]
    args.check_parts = [s for s in args.check_parts.split(",") if s]
    if not args.sections or set(args.sections) - set(SECTIONS):
        parser.error(f"--sections: choose from {', '.join(SECTIONS)}, got {args.sections}")
    tiny = args.tiny
    defaults = dict(steps=4 if tiny else 300, batch_size=4 if tiny else 16, seq_len=64 if tiny else 2048,
                    max_files=8 if tiny else 800, eval_blocks=8 if tiny else 96, memory_docs=4 if tiny else 64,
                    adapter_steps=2 if tiny else 100, lengths="16,48" if tiny else "2048,8192,32768,131072",
                    plain_max=48 if tiny else 32768, contexts="16,40" if tiny else "2048,32768",
                    decode_tokens=12 if tiny else 1032, train_len=24 if tiny else 8192,
                    profile_len=48 if tiny else 32768)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.lengths = [int(n) for n in str(args.lengths).split(",")]
    args.contexts = [int(n) for n in str(args.contexts).split(",")]
    args.preset, args.vocab = ("tiny", 128) if tiny else ("125m", 32000)
    args.passage, args.gap = (8, 12) if tiny else (128, 640)
    args.memory_lrs, args.memory_chunks = ([0.3, 1.0], [4]) if tiny else ([0.3, 1.0, 3.0], [64, 128])
    args.json_speed, args.json_quality = f"{args.out}_speed.json", f"{args.out}_quality.json"
    args.json_partial = f"{args.out}_speed_partial.json"
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.fast = "auto" if device.type == "cuda" else "on"  # a CPU smoke test runs the fast path's code too
    raise_recompile_limits(64)  # a compiled graph per chunk size, batch and path
    head = environment(args, device, dtype)
    if args.part in ("quality", "both"):
        out = {**head, **quality(args, device, dtype)}
        finish(out, args.json_quality, quality_tables(out), lambda r, path: save_figure(quality_figure(r), path))
    if args.part in ("speed", "both"):
        out = {**head, **speed(args, device, dtype)}
        finish(out, args.json_speed, speed_tables(out), speed_figure)
        if out.get("check") and not all(r["ok"] for r in out["check"]):
            sys.exit(1)


if __name__ == "__main__":
    main()

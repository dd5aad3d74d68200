"""TTT-E2E: long-context speed against full attention, and quality in miniature against its baselines.

    python benchmarks/ttt.py --device cpu --tiny --out /tmp/ttt_tiny                 # smoke test (CPU, ~1 min)

On the GPU machine (bf16; from the repository root with PYTHONPATH=$PWD, $OUT the output folder):

    python benchmarks/ttt.py --device cuda --part quality --out $OUT/ttt      # ~6 min: 3 models trained + evaluated
    python benchmarks/ttt.py --device cuda --part speed --out $OUT/ttt        # ~3 min: prefill, decoding, meta-training

Speed (random weights: speed does not depend on them), the paper's 125M configuration (12 layers,
768 wide, window 8192, chunk 1024; MLP 1664 with TTT, 2048 for the full-attention model of the
same parameter count), batch 1:
- prefill: tokens/s and peak memory of one forward over 2K, 8K, 32K and 128K tokens (the inner
  loop runs inside TTT-E2E's) against full attention (SDPA's causal kernel). Goals: TTT-E2E's
  per-token cost at 128K within 1.2x of 2K, and at least 3x faster than full attention at 128K
  (the paper: 2.7x for its 3B model on an H100).
- decoding: ms per token after a 2K and a 32K prompt (rolling cache of k positions, one update per
  b tokens). Goal: within 1.1x of each other.
- meta-training: tokens/s and peak memory of a training step (forward, meta-gradient, AdamW) over
  8K tokens, second order against first order.

Quality in miniature: the `small` preset (6 layers, 384 wide, window 512, chunk 128) over the
standard library's source, character-level, sequences of 2048 tokens: TTT-E2E, the sliding-window
model without TTT blocks and the full-attention model (both with MLP widths matched) trained with
the same data order and number of steps, then evaluated on held-out files: the loss by position
bucket (TTT-E2E also with TTT off), and the memory test (a 128-token passage repeated after a
640-token gap, so sliding attention cannot see the first copy), for the model and for the model
with a TinyLoRA adapter trained for --adapter-steps on unseen training text (the seed's base vs
adapter). Goals: TTT-E2E below the sliding
window beyond the window and at or below full attention in the last bucket; on the repeated
passage, a loss reduction from TTT of at least 5%.

Writes `<out>_speed.json` / `<out>_quality.json`, markdown tables and PNGs beside them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import default_dtype, dump, environment, log, sync, timed  # noqa: E402
from testtime.io import new_figure, save_figure  # noqa: E402
from testtime.ttt import TTTConfig, TTTForCausalLM  # noqa: E402
from testtime.ttt.evaluation import (  # noqa: E402
    bucket_name,
    bucket_sums,
    position_buckets,
    repeated_passage_documents,
    token_losses,
)

MODELS = {  # name -> TTTConfig overrides of the preset: TTT-E2E and its two baselines
    "ttt_e2e": {},
    "swa": {"ttt_layer_fraction": 0.0},
    "full": {"ttt_layer_fraction": 0.0, "attention": "full"},
}


def build(preset: str, kind: str, device, dtype, seed: int = 0, **overrides) -> TTTForCausalLM:
    torch.manual_seed(seed)
    config = TTTConfig.from_preset(preset, **{**MODELS[kind], **overrides})
    with torch.device(device):
        return TTTForCausalLM(config).to(dtype)


def peak_memory(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------


def speed(args, device, dtype) -> dict:
    preset = "tiny" if args.tiny else "125m"
    lengths = [64, 128] if args.tiny else [2048, 8192, 32768, 131072]
    vocab = 128 if args.tiny else 32000
    out = {"preset": preset, "prefill": [], "decoding": [], "training": []}
    for kind in ("ttt_e2e", "full"):
        model = build(preset, kind, device, dtype, vocab_size=vocab).eval()
        for length in ([] if args.decode_only else lengths):
            ids = torch.randint(0, vocab, (1, length), device=device)
            with torch.no_grad():
                model(ids[:, : min(length, 4096)])  # warm-up: kernels, allocator
                reset_peak(device)
                runs = [timed(lambda: model(ids).logits[:, -1], device)[0] for _ in range(args.repeats)]
            seconds = sorted(runs)[len(runs) // 2]
            row = {"model": kind, "tokens": length, "seconds": seconds, "tokens_per_s": length / seconds,
                   "us_per_token": 1e6 * seconds / length, "peak_gib": peak_memory(device)}
            out["prefill"].append(row)
            log(f"prefill {kind:8s} {length:7d} tokens: {seconds:8.3f} s  {row['tokens_per_s']:9.0f} tok/s  "
                f"peak {row['peak_gib']}")
            dump(out, args.json_speed)
        for context in ([64, 128] if args.tiny else [2048, 32768]):
            ids = torch.randint(0, vocab, (1, context), device=device)
            # a chunk's worth of tokens and a few more, so the run crosses a chunk boundary: the
            # TTT model's inner-loop update (once per chunk) is in the mean, and its step is the max
            chunk = model.config.chunk_size
            steps = chunk + 8 if kind == "ttt_e2e" else (16 if args.tiny else 256)
            # the step that runs the update: the one at the first position of a new chunk (the
            # token there is the last label of the chunk before; prompt and warm-up tokens counted)
            boundary = (-(context + 8)) % chunk if kind == "ttt_e2e" else None
            with torch.no_grad():
                state = model(ids, use_cache=True)
                token = state.logits[:, -1:].argmax(-1)
                cache = state.cache
                for _ in range(8):  # warm-up
                    token = model(token, cache=cache).logits[:, -1:].argmax(-1)
                step_ms = []
                for _ in range(steps):
                    sync(device)
                    start = time.perf_counter()
                    token = model(token, cache=cache).logits[:, -1:].argmax(-1)
                    sync(device)
                    step_ms.append(1e3 * (time.perf_counter() - start))
            ms = sum(step_ms) / steps
            median = sorted(step_ms)[steps // 2]
            boundary_ms = step_ms[boundary] if boundary is not None else None
            out["decoding"].append({"model": kind, "context": context, "new_tokens": steps, "ms_per_token": ms,
                                    "median_ms": median, "max_ms": max(step_ms), "boundary_ms": boundary_ms})
            log(f"decode  {kind:8s} after {context:6d}: {ms:.2f} ms/token over {steps} tokens "
                f"(median {median:.2f}, slowest {max(step_ms):.1f}, the update step "
                f"{'-' if boundary_ms is None else f'{boundary_ms:.1f}'})")
            dump(out, args.json_speed)
        model = None
    train_len = 128 if args.tiny else 8192
    for first_order in (() if args.decode_only else (False, True)):
        model = build(preset, "ttt_e2e", device, torch.float32, vocab_size=vocab, first_order=first_order).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, vocab, (1, train_len), device=device)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        reset_peak(device)
        runs = [timed(step, device)[0] for _ in range(args.repeats)]
        seconds = sorted(runs)[len(runs) // 2]
        row = {"order": "first" if first_order else "second", "tokens": train_len, "seconds": seconds,
               "tokens_per_s": train_len / seconds, "peak_gib": peak_memory(device)}
        out["training"].append(row)
        log(f"train {row['order']:6s} order: {seconds:.3f} s/step  {row['tokens_per_s']:.0f} tok/s  "
            f"peak {row['peak_gib']}")
        dump(out, args.json_speed)
        model = optimizer = None  # free the memory before the next measurement
    return out


def speed_tables(out: dict) -> str:
    by = {(r["model"], r["tokens"]): r for r in out["prefill"]}
    lengths = sorted({r["tokens"] for r in out["prefill"]})
    lines = []
    if lengths:
        lines = ["| prefill tokens | TTT-E2E tok/s | full attention tok/s | TTT-E2E / full speed-up | "
                 f"TTT-E2E us/token vs {lengths[0]} | peak GiB TTT / full |", "|---:|---:|---:|---:|---:|---:|"]
        first = by[("ttt_e2e", lengths[0])]["us_per_token"]
        for n in lengths:
            t, f = by.get(("ttt_e2e", n)), by.get(("full", n))
            if not t or not f:
                continue
            lines.append(f"| {n} | {t['tokens_per_s']:.0f} | {f['tokens_per_s']:.0f} | "
                         f"{f['seconds'] / t['seconds']:.2f}x | {t['us_per_token'] / first:.2f}x | "
                         f"{t['peak_gib']} / {f['peak_gib']} |")
    lines += ["", "| decoding | context | tokens | ms / token (mean) | median | slowest | the update step |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['context']} | {r['new_tokens']} | {r['ms_per_token']:.2f} | "
              f"{r.get('median_ms', float('nan')):.2f} | {r.get('max_ms', float('nan')):.1f} | "
              f"{'-' if r.get('boundary_ms') is None else format(r['boundary_ms'], '.1f')} |" for r in out["decoding"]]
    lines += ["", "| meta-gradient | tokens | s / step | tokens / s | peak GiB |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['order']} order | {r['tokens']} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {r['peak_gib']} |"
              for r in out["training"]]
    return "\n".join(lines)


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
    """AdamW (3e-3, betas 0.9/0.95, wd 0.1), 10% warm-up then cosine to 1e-5, clip 1.0; inner lr warm-up
    over the same 10%. Returns the seconds spent."""
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 1e-5 / args.lr + (1 - 1e-5 / args.lr) * 0.5 *
                                                 (1 + math.cos(math.pi * (s - warmup) / max(1, args.steps - warmup))))
    model.config.inner_lr_warmup_steps = warmup
    generator = torch.Generator().manual_seed(0)  # the same data order for every model
    order = torch.randperm(len(data), generator=generator)
    sync(device)
    start = time.perf_counter()
    for step in range(args.steps):
        index = order[(step * args.batch_size + torch.arange(args.batch_size)) % len(data)]
        ids = torch.stack([data[int(i)]["input_ids"] for i in index]).to(device)
        model.set_inner_lr_step(step)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
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
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            logits = model(ids, **kwargs).logits
        s, c = bucket_sums(*token_losses(logits, ids), buckets)
        sums, counts = (s, c) if sums is None else (sums + s, counts + c)
    return {bucket_name(b): float(s / c) for b, s, c in zip(buckets, sums, counts)} | {"all": float(sums.sum() /
                                                                                                     counts.sum())}


def memory_test(model, tokens, args, device, dtype) -> list[dict]:
    docs = repeated_passage_documents(tokens, args.memory_docs, args.passage, args.gap, seed=0)
    ids = torch.stack([d["input_ids"] for d in docs]).to(device)
    labels = torch.stack([d["labels"] for d in docs]).to(device)

    def loss(**kwargs):
        total = count = 0.0
        for i in range(0, len(ids), args.batch_size):
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
                logits = model(ids[i:i + args.batch_size], **kwargs).logits
            per_token, counted = token_losses(logits, labels[i:i + args.batch_size])
            total += float(per_token[counted].double().sum())
            count += float(counted.sum())
        return total / count

    pre = loss(ttt=False)
    rows = []
    for lr in args.memory_lrs:
        for b in args.memory_chunks:
            post = loss(ttt=True, inner_lr=lr, chunk_size=b)
            rows.append({"inner_lr": lr, "chunk_size": b, "pre": pre, "post": post, "reduction": (pre - post) / pre})
            log(f"  memory lr {lr:g} b {b}: pre {pre:.4f} post {post:.4f} ({(pre - post) / pre:+.2%})")
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
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
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
        model = build(preset, kind, device, torch.float32, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
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
        lines += ["", "| memory test: model | inner lr | chunk | pre (TTT off) | post (TTT on) | reduction |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['inner_lr']:g} | {r['chunk_size']} | {r['pre']:.4f} | {r['post']:.4f} | "
                  f"{r['reduction']:+.2%} |" for name, rows in sets for r in rows]
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
    parser.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU by default")
    parser.add_argument("--part", choices=["speed", "quality", "both"], default="both")
    parser.add_argument("--tiny", action="store_true", help="tiny models and lengths: a smoke test on the CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="training steps per model (quality)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-files", type=int, default=None)
    parser.add_argument("--eval-blocks", type=int, default=None)
    parser.add_argument("--memory-docs", type=int, default=None)
    parser.add_argument("--adapter-steps", type=int, default=None, help="TinyLoRA steps before its memory test")
    parser.add_argument("--decode-only", action="store_true", help="speed: only the decoding rows")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"quality: the models to train and evaluate, a comma list of {', '.join(MODELS)}")
    parser.add_argument("--out", default="ttt", help="prefix of the files written")
    args = parser.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    if not args.models or set(args.models) - set(MODELS):
        parser.error(f"--models: choose from {', '.join(MODELS)}, got {args.models}")
    tiny = args.tiny
    defaults = dict(steps=4 if tiny else 300, batch_size=4 if tiny else 16, seq_len=64 if tiny else 2048,
                    max_files=8 if tiny else 800, eval_blocks=8 if tiny else 96, memory_docs=4 if tiny else 64,
                    adapter_steps=2 if tiny else 100)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.passage, args.gap = (8, 12) if tiny else (128, 640)
    args.memory_lrs, args.memory_chunks = ([0.3, 1.0], [4]) if tiny else ([0.3, 1.0, 3.0], [64, 128])
    args.json_speed, args.json_quality = f"{args.out}_speed.json", f"{args.out}_quality.json"
    device = torch.device(args.device)
    dtype = default_dtype(device, args.dtype)
    head = environment(args, device, dtype)
    if args.part in ("quality", "both"):
        out = {**head, **quality(args, device, dtype)}
        dump(out, args.json_quality)
        table = quality_tables(out)
        with open(f"{args.out}_quality.md", "w") as f:
            f.write(table + "\n")
        save_figure(quality_figure(out), f"{args.out}_quality.png")
        log(table)
    if args.part in ("speed", "both"):
        out = {**head, **speed(args, device, dtype)}
        dump(out, args.json_speed)
        table = speed_tables(out)
        with open(f"{args.out}_speed.md", "w") as f:
            f.write(table + "\n")
        log(table)


if __name__ == "__main__":
    main()

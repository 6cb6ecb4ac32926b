"""`python -m ggserve.bench.engine -m MODEL`: the model's forward pass speed, as llama-bench measures it.

Owns: timing `Model.forward` directly (no server, no sampler beyond argmax) for
- prefill: one 512-token prompt in one batch (llama-bench pp512),
- decode: one slot generating 128 tokens one at a time (tg128),
- batched decode: 4 and 8 slots each adding one token per step, stepping together,
reporting the median of several runs, tokens per second, and the weight bytes streamed per
second on the decode paths (every quantized matrix but the embedding table is read once per
step, whatever the number of slots), against the machine's measured read bandwidth as the
decode ceiling (bench/bandwidth.py). Compare with PERFORMANCE.md's llama.cpp numbers; timings
on a shared 2-core machine drift, so compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

from ggserve.bench.bandwidth import read_bandwidth_gbs
from ggserve.engine.model.gguf import GGUFFile
from ggserve.engine.model.model import load_model


def _tokens(rng: np.random.Generator, n_vocab: int, n: int) -> np.ndarray:
    # ordinary (non-special) ids from the first part of the vocabulary
    return rng.integers(100, min(n_vocab, 30000), n).astype(np.int32)


def bench_prefill(model, n_tokens: int, runs: int, rng) -> list[float]:
    times = []
    for _ in range(runs):
        model.kv_cache.clear(0)
        tokens = _tokens(rng, model.n_vocab, n_tokens)
        t = time.perf_counter()
        model.forward(tokens, np.arange(n_tokens, dtype=np.int32), np.zeros(n_tokens, np.int32), np.array([n_tokens - 1], np.int32))
        times.append(time.perf_counter() - t)
    return times


def bench_decode(model, n_slots: int, n_steps: int, runs: int, rng, prompt_len: int = 16) -> list[float]:
    """Seconds for n_steps steps of n_slots tokens each (after a short prompt per slot)."""
    times = []
    slots = np.arange(n_slots, dtype=np.int32)
    for _ in range(runs):
        for slot in range(n_slots):
            model.kv_cache.clear(slot)
        prompts = _tokens(rng, model.n_vocab, n_slots * prompt_len)
        logits = model.forward(prompts, np.tile(np.arange(prompt_len, dtype=np.int32), n_slots),
                               np.repeat(slots, prompt_len), (slots + 1) * prompt_len - 1)
        t = time.perf_counter()
        for step in range(n_steps):
            picks = logits.argmax(1).astype(np.int32)
            logits = model.forward(picks, np.full(n_slots, prompt_len + step, np.int32), slots, slots)
        times.append(time.perf_counter() - t)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ggserve.bench.engine", description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", help="GGUF file (default: the bundled Qwen2.5-Coder-0.5B)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--batched-steps", type=int, default=32, help="steps per batched-decode run")
    p.add_argument("--slots", default="4,8", help="comma-separated slot counts for batched decode")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--kv", default="f16", choices=["f16", "f32"])
    p.add_argument("--no-repack", action="store_true", help="weights stay in the mapped file (see kernels/repack.py)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    slot_counts = [int(s) for s in args.slots.split(",") if s.strip()]

    path = args.model
    if not path:
        from ggserve.server.model_store import ensure_model

        path = str(ensure_model())
    n_slots = max([1, *slot_counts])
    n_ctx = max(args.prompt_tokens, 16 + max(args.gen_tokens, args.batched_steps)) + 1
    model = load_model(GGUFFile(path), n_slots=n_slots, n_ctx=n_ctx, kv_dtype=args.kv, repack=not args.no_repack)
    weight_bytes = model.weights.nbytes()
    rng = np.random.default_rng(0)
    bench_prefill(model, 64, 1, rng)  # warm-up: compile / load every kernel variant once
    bench_decode(model, min(2, n_slots), 2, 1, rng)

    bandwidth = read_bandwidth_gbs()
    results = {"model": path, "architecture": model.config.architecture, "weight_bytes_per_step": weight_bytes,
               "runs": args.runs, "read_bandwidth_GB_s": bandwidth,
               "decode_ceiling_tok_s": bandwidth * 1e9 / weight_bytes}
    t = statistics.median(bench_prefill(model, args.prompt_tokens, args.runs, rng))
    results[f"pp{args.prompt_tokens}"] = {"tok_s": args.prompt_tokens / t, "seconds": t}
    t = statistics.median(bench_decode(model, 1, args.gen_tokens, args.runs, rng))
    results[f"tg{args.gen_tokens}"] = {"tok_s": args.gen_tokens / t, "GB_s": weight_bytes * args.gen_tokens / t / 1e9}
    for slots in slot_counts:
        t = statistics.median(bench_decode(model, slots, args.batched_steps, args.runs, rng))
        results[f"batched_{slots}"] = {"tok_s": slots * args.batched_steps / t,
                                       "steps_s": args.batched_steps / t,
                                       "GB_s": weight_bytes * args.batched_steps / t / 1e9}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"model {path} ({results['architecture']}), {weight_bytes / 1e6:.0f} MB of weights read per step, "
          f"median of {args.runs} runs")
    print(f"memory read bandwidth {bandwidth:.1f} GB/s: single-stream decode ceiling "
          f"{results['decode_ceiling_tok_s']:.1f} tok/s")
    for name, r in results.items():
        if isinstance(r, dict):
            extra = f"   {r['GB_s']:6.2f} GB/s of weights" if "GB_s" in r else ""
            print(f"  {name:>12}: {r['tok_s']:8.2f} tok/s{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

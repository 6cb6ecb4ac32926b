"""`ggserve generate -m MODEL -p PROMPT -n N [--temp T --seed S ...]`: one completion on the terminal.

Owns: the llama-cli-like command: load the model with one slot, echo the prompt, evaluate it in
batches, stream each sampled token's text as soon as it is complete UTF-8, stop at an
end-of-generation token, N tokens or the context size, and end with llama.cpp-style timings
(prompt and generation tokens per second) on stderr. It drives `Model.forward` directly: no
server, no scheduler.
"""
from __future__ import annotations

import argparse
import sys
import time


import numpy as np

from ggserve import engine  # names resolve lazily: a header-only command never imports numba



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ggserve generate", description="Generate a completion for a prompt (like llama-cli).")
    p.add_argument("-m", "--model", help="GGUF model file (default: the bundled Qwen2.5-Coder-0.5B)")
    p.add_argument("-p", "--prompt", default="", help="prompt text (special tokens are parsed)")
    p.add_argument("-n", "--n-predict", type=int, default=128, help="tokens to generate (-1: until end or context full)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size (0: the model's training context)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per forward pass")
    p.add_argument("--temp", type=float, default=0.8, help="temperature (<= 0: greedy)")
    p.add_argument("--seed", type=int, default=-1, help="RNG seed (-1: random)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    p.add_argument("--no-display-prompt", action="store_true", help="do not echo the prompt")
    p.add_argument("-nr", "--no-repack", action="store_true", help="keep every weight in the memory-mapped file")
    return p


def _model_path(arg: str | None) -> str:
    if arg:
        return arg
    from ggserve.server.model_store import ensure_model

    return str(ensure_model())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        print("error: --batch-size must be > 0", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    try:
        g = engine.GGUFFile(_model_path(args.model))
        tokenizer = engine.Tokenizer.from_gguf(g)
        n_ctx_train = int(g.get(f"{g.architecture}.context_length", 0) or 0)
        n_ctx = args.ctx_size or n_ctx_train or 4096
        model = engine.load_model(g, n_slots=1, n_ctx=n_ctx, repack=not args.no_repack)
        sampling_params = engine.SamplingParams
        params = sampling_params(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                 repeat_penalty=args.repeat_penalty, seed=args.seed, ignore_eos=args.ignore_eos)
        sampler = engine.Sampler(params, model.n_vocab, eog_ids=tokenizer.eog_ids)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    prompt_ids = tokenizer.encode(args.prompt, add_special=True, parse_special=True)
    if not prompt_ids:
        print("error: the prompt is empty after tokenization", file=sys.stderr)
        return 1
    if len(prompt_ids) >= n_ctx:
        print(f"error: prompt is {len(prompt_ids)} tokens, context size is {n_ctx}", file=sys.stderr)
        return 1
    for token_id in prompt_ids:
        sampler.accept(token_id)
    if not args.no_display_prompt:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()

    # prompt evaluation, in batches; only the last token's logits are needed
    t_prompt = time.perf_counter()
    logits = None
    for start in range(0, len(prompt_ids), args.batch_size):
        chunk = prompt_ids[start:start + args.batch_size]
        n = len(chunk)
        last = start + n == len(prompt_ids)
        out = model.forward(np.array(chunk, np.int32), np.arange(start, start + n, dtype=np.int32),
                            np.zeros(n, np.int32), np.array([n - 1] if last else [], np.int32))
        if last:
            logits = out[0]
    t_first = time.perf_counter()

    detok = engine.IncrementalDetokenizer(tokenizer, special=False)
    n_limit = args.n_predict if args.n_predict >= 0 else n_ctx
    n_generated = 0
    pos = len(prompt_ids)
    while n_generated < n_limit and pos < n_ctx:
        token_id = sampler.sample(logits)
        n_generated += 1
        if tokenizer.is_eog(token_id) and not args.ignore_eos:
            break
        sys.stdout.write(detok.add(token_id))
        sys.stdout.flush()
        if n_generated >= n_limit or pos + 1 > n_ctx - 1:
            break
        logits = model.forward(np.array([token_id], np.int32), np.array([pos], np.int32),
                               np.zeros(1, np.int32), np.zeros(1, np.int32))[0]
        pos += 1
    sys.stdout.write(detok.flush() + "\n")
    sys.stdout.flush()
    t_end = time.perf_counter()
    _print_timings(len(prompt_ids), t_first - t_prompt, n_generated, t_end - t_first, t_first - t_start)
    return 0


def _print_timings(n_prompt: int, prompt_s: float, n_gen: int, gen_s: float, first_token_s: float) -> None:
    def line(label: str, n: int, seconds: float) -> str:
        ms = seconds * 1000
        per_token = ms / n if n else 0.0
        rate = n / seconds if seconds > 0 else 0.0
        return f"{label} = {ms:10.2f} ms / {n:5d} tokens ({per_token:8.2f} ms per token, {rate:8.2f} tokens per second)"

    print(file=sys.stderr)
    print(line("prompt eval time", n_prompt, prompt_s), file=sys.stderr)
    print(line("       eval time", n_gen, gen_s), file=sys.stderr)
    print(f"time to first token = {first_token_s * 1000:10.2f} ms (process start excluded)", file=sys.stderr)

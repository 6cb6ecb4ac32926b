"""Benchmarks the sampler chain and grammar masks (python -m ggserve.bench.sampling [model.gguf]).

Measures, with medians over repeated calls:
- `Sampler.sample` at a 150k vocabulary with default params, greedy, and a few heavier chains;
- grammar mask cost per step (CPU time) on a real vocabulary (Qwen2.5's, from the GGUF), for a JSON
  schema grammar driven through a JSON document, with cold (first visit of a state) and warm
  (cached) masks, plus the cheap path where the sampled token already fits the grammar.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from ggserve.engine.sampling.sampler import Sampler, SamplingParams

N_VOCAB = 151_936


def _median_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE token text -> raw bytes)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def vocab_token_bytes(path: str) -> tuple[list[bytes], frozenset[int]]:
    """Token pieces of a BPE GGUF vocabulary, via ggserve.engine.tokenizer when available."""
    from ggserve.engine.model.gguf import GGUFFile

    gguf = GGUFFile(path)
    try:
        from ggserve.engine.tokenizer import Tokenizer

        tok = Tokenizer.from_gguf(gguf)
        return [tok.token_to_piece(i) for i in range(tok.n_vocab)], frozenset(tok.eog_ids)
    except ImportError:
        decoder = gpt2_byte_decoder()
        tokens = gguf.metadata["tokenizer.ggml.tokens"]
        types = gguf.metadata.get("tokenizer.ggml.token_type")
        pieces = []
        for i, text in enumerate(tokens):
            if types is not None and int(types[i]) in (3, 4):  # control / user-defined: literal text
                pieces.append(text.encode("utf-8"))
            else:
                pieces.append(bytes(decoder.get(ch, 0x3F) for ch in text))
        eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
        return pieces, frozenset([int(eos)] if eos is not None else [])


def bench_chain(repeat: int) -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(N_VOCAB) * 3).astype(np.float32)
    history = rng.integers(0, N_VOCAB, 256).tolist()
    configs = {
        "default": SamplingParams(seed=1),
        "greedy": SamplingParams(temperature=0.0, seed=1),
        "penalties": SamplingParams(repeat_penalty=1.1, frequency_penalty=0.1, presence_penalty=0.1, seed=1),
        "dry": SamplingParams(dry_multiplier=0.8, seed=1),
        "top_k=0 (full vocab top_p/min_p)": SamplingParams(top_k=0, seed=1),
        "n_probs=10": SamplingParams(n_probs=10, seed=1),
        "mirostat 2": SamplingParams(mirostat=2, seed=1),
    }
    print(f"sampler chain, vocab {N_VOCAB} (median of {repeat}):")
    for name, params in configs.items():
        sampler = Sampler(params, N_VOCAB)
        for t in history:
            sampler.accept(t)

        def call():
            sampler.sample(logits)
            if params.n_probs:
                sampler.last_logprobs(params.n_probs)

        call()
        print(f"  {name:36s} {_median_ms(call, repeat):7.3f} ms")


def bench_grammar(path: str) -> None:
    from ggserve.engine.grammar.matcher import GrammarMatcher
    from ggserve.engine.grammar.vocab import GrammarVocab
    from ggserve.engine.grammar.json_schema import json_schema_to_grammar

    t0 = time.perf_counter()
    pieces, eog = vocab_token_bytes(path)
    vocab = GrammarVocab(pieces, eog)
    print(f"grammar vocab: {vocab.n_vocab} tokens, {vocab.n_nodes} trie nodes, "
          f"built in {time.perf_counter() - t0:.2f} s")
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city"]}}, "required": ["name", "age"]}
    grammar = json_schema_to_grammar(schema)
    document = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "address": {"city": "London"}}'
    # greedy tokenisation of the document with the vocabulary (longest piece first)
    by_piece = {p: i for i, p in enumerate(pieces) if p}
    data, ids, pos = document.encode(), [], 0
    while pos < len(data):
        for end in range(min(len(data), pos + 16), pos, -1):
            if data[pos:end] in by_piece:
                ids.append(by_piece[data[pos:end]])
                pos = end
                break
    matcher = GrammarMatcher(grammar, vocab)
    for label in ("cold", "warm"):
        times, checks = [], []
        for token_id in ids:
            t0 = time.process_time()
            mask = matcher.allowed_mask()
            times.append((time.process_time() - t0) * 1e3)
            t0 = time.perf_counter()
            assert mask[token_id] and matcher.token_allowed(token_id)
            checks.append((time.perf_counter() - t0) * 1e3)
            matcher.accept_token(token_id)
        assert matcher.is_complete
        print(f"  mask per step ({label}, {len(ids)} steps): median {statistics.median(times):.2f} ms, "
              f"max {max(times):.2f} ms, mean {statistics.mean(times):.2f} ms; "
              f"single-token check median {statistics.median(checks) * 1e3:.1f} us")
        if label == "cold":  # replay the same document: every state's mask is now cached
            matcher = GrammarMatcher(matcher.tables, vocab)
    bench_grammar_sampler(vocab, grammar, ids)


def bench_grammar_sampler(vocab, grammar: str, ids: list[int]) -> None:
    """Per-step Sampler cost with a grammar when the model's favourite token fits (common case)
    and when it never fits (every step needs a mask: the worst case)."""
    base = np.random.default_rng(0).standard_normal(vocab.n_vocab).astype(np.float32)
    bad_id = next(i for i, p in enumerate(vocab.token_bytes) if p == b"\x01")  # never valid in JSON
    for label, favour_bad in (("model agrees with grammar", False), ("model always disagrees", True),
                              ("model always disagrees, same grammar again (shared masks)", True)):
        sampler = Sampler(SamplingParams(temperature=0.0, grammar=grammar), vocab.n_vocab, vocab.eog_ids, vocab)
        plain = Sampler(SamplingParams(temperature=0.0), vocab.n_vocab)
        times, plain_times = [], []
        for token_id in ids:
            logits = base.copy()
            logits[token_id] = 20.0
            if favour_bad:
                logits[bad_id] = 30.0
            t0 = time.process_time()
            got = sampler.sample(logits)
            times.append((time.process_time() - t0) * 1e3)
            t0 = time.process_time()
            plain.sample(logits)
            plain_times.append((time.process_time() - t0) * 1e3)
            assert got == token_id, (got, token_id)
        print(f"  Sampler.sample with grammar, {label}: mean {statistics.mean(times):.2f} ms/step "
              f"(median {statistics.median(times):.2f}, max {max(times):.2f}); "
              f"without grammar {statistics.mean(plain_times):.2f} ms/step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="GGUF with a BPE vocabulary (default: bundled Qwen)")
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    bench_chain(args.repeat)
    path = args.model
    if path is None:
        from ggserve.server.model_store import ensure_model

        path = str(ensure_model(show_progress=False))
    bench_grammar(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

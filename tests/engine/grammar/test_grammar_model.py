"""Structured output with the real Qwen model: greedy decoding under a JSON-schema grammar.

Slow: loads Qwen2.5-Coder-0.5B and decodes a few dozen tokens on the CPU.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer"},
                                           "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
          "required": ["name", "age", "languages"]}
PROMPT = ("<|im_start|>user\nDescribe Ada Lovelace (age 36, languages English and French) as JSON."
          "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def qwen(qwen_path):
    from ggserve.engine.model.gguf import GGUFFile
    from ggserve.engine.grammar.vocab import GrammarVocab
    from ggserve.engine.model.model import load_model
    from ggserve.engine.tokenizer import Tokenizer

    g = GGUFFile(qwen_path)
    tokenizer = Tokenizer.from_gguf(g)
    model = load_model(g, n_slots=1, n_ctx=512)
    pieces = [tokenizer.token_to_piece(i, special=True) for i in range(tokenizer.n_vocab)]
    pieces += [b""] * (model.n_vocab - len(pieces))
    vocab = GrammarVocab(pieces, tokenizer.eog_ids)
    return model, tokenizer, vocab


def decode(model, tokenizer, sampler, max_tokens: int) -> tuple[list[int], float]:
    """Greedy loop through the model; returns (generated ids, mean sampling ms per step)."""
    model.kv_cache.clear(0)
    ids = tokenizer.encode(PROMPT, add_special=True, parse_special=True)
    for t in ids:
        sampler.accept(t)
    batch, pos, out, sample_ms = ids, 0, [], []
    for _ in range(max_tokens):
        n = len(batch)
        logits = model.forward(np.asarray(batch, np.int32), np.arange(pos, pos + n, dtype=np.int32),
                               np.zeros(n, np.int32), np.array([n - 1], np.int32))[0]
        pos += n
        t0 = time.perf_counter()
        token = sampler.sample(logits)
        sample_ms.append((time.perf_counter() - t0) * 1e3)
        if token in tokenizer.eog_ids:
            break
        out.append(token)
        batch = [token]
    return out, float(np.mean(sample_ms))


def test_json_schema_grammar_constrains_real_model(qwen):
    from ggserve.engine.grammar.json_schema import json_schema_to_grammar
    from ggserve.engine.sampling.sampler import Sampler, SamplingParams

    model, tokenizer, vocab = qwen
    params = SamplingParams(temperature=0.0, grammar=json_schema_to_grammar(SCHEMA))
    sampler = Sampler(params, model.n_vocab, tokenizer.eog_ids, vocab)
    out, ms = decode(model, tokenizer, sampler, max_tokens=60)
    text = tokenizer.decode(out)
    doc = json.loads(text)  # the grammar guarantees a complete document
    assert set(doc) == {"name", "age", "languages"}
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 20
    assert isinstance(doc["age"], int) and len(doc["languages"]) <= 3
    assert sampler.grammar.is_complete
    print(f"\ngrammar-constrained output: {text!r}; sampling {ms:.2f} ms/step")


def test_yes_no_grammar_on_real_model(qwen):
    from ggserve.engine.sampling.sampler import Sampler, SamplingParams

    model, tokenizer, vocab = qwen
    params = SamplingParams(temperature=0.0, grammar='root ::= ("yes" | "no") "."')
    sampler = Sampler(params, model.n_vocab, tokenizer.eog_ids, vocab)
    out, _ = decode(model, tokenizer, sampler, max_tokens=10)
    assert tokenizer.decode(out) in ("yes.", "no.")

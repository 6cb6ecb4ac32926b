"""Tokenizer parity with llama.cpp's own test vectors (testdata/vocab: 13 vocab-only GGUFs with the
ids llama.cpp produces), decode round trips, streaming detokenization and speed."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from ggserve.engine.model.gguf import GGUFFile
from ggserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

VOCABS = ["bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gpt-2", "llama-bpe",
          "llama-spm", "mpt", "phi-3", "qwen2", "refact", "starcoder"]
# BPE vocabs whose pre-tokenizer keeps llama.cpp's clean_up_tokenization_spaces on: their decode
# removes the space in " ?", " !", " .", " ,", " ' " (both), " 's", " 'm", " 're", " 've".
CLEANUP_VOCABS = {"gpt-2", "llama-bpe", "falcon", "mpt", "starcoder", "refact"}
CLEANUP_PATTERNS = (" ?", " !", " .", " ,", " ' ", " 's", " 'm", " 're", " 've")
_MARKER = "\n__ggml_vocab_test__\n"

@pytest.fixture(scope="module")
def vocab_tokenizer(testdata_dir: Path):
    """name -> Tokenizer of testdata/vocab/ggml-vocab-<name>.gguf, built once per module."""
    built: dict[str, Tokenizer] = {}

    def get(name: str) -> Tokenizer:
        if name not in built:
            built[name] = Tokenizer.from_gguf(GGUFFile(testdata_dir / "vocab" / f"ggml-vocab-{name}.gguf"))
        return built[name]

    return get


def vocab_cases(testdata_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    base = testdata_dir / "vocab" / f"ggml-vocab-{name}.gguf"
    texts = base.with_name(base.name + ".inp").read_text(encoding="utf-8").split(_MARKER)
    assert texts[-1] == "", "the .inp file ends with a marker line"
    texts = texts[:-1]
    lines = base.with_name(base.name + ".out").read_text(encoding="utf-8").split("\n")[: len(texts)]
    assert len(lines) == len(texts)
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


@pytest.mark.parametrize("name", VOCABS)
def test_matches_llama_cpp_vectors(testdata_dir, vocab_tokenizer, name):
    tok = vocab_tokenizer(name)
    cases = vocab_cases(testdata_dir, name)
    failures = [(text, want, got) for text, want in cases
                if (got := tok.encode(text, add_special=False, parse_special=False)) != want]
    assert not failures, f"{len(cases) - len(failures)}/{len(cases)} pass; first: {failures[0]!r}"


@pytest.mark.parametrize("name", [v for v in VOCABS if v != "bert-bge"])  # WordPiece lowercases: lossy
def test_decode_round_trips_like_llama_cpp(testdata_dir, vocab_tokenizer, name):
    tok = vocab_tokenizer(name)
    for text, _ in vocab_cases(testdata_dir, name):
        decoded = tok.decode(tok.encode(text, add_special=False))
        if name in CLEANUP_VOCABS and any(p in text for p in CLEANUP_PATTERNS):
            assert decoded != text  # llama.cpp's clean-up changes these (exact values tested below)
        else:
            assert decoded == text


def test_clean_up_spaces_as_llama_cpp(vocab_tokenizer):
    gpt2 = vocab_tokenizer("gpt-2")
    assert gpt2.decode(gpt2.encode("Hello , world ! It ' s")) == "Hello, world! It's"
    assert gpt2.decode(gpt2.encode("I 'm here , they 'll go 're 've 'd")) == "I'm here, they 'll go're've 'd"
    assert gpt2.decode(gpt2.encode("you 😁 ?")) == "you 😁?"
    qwen2 = vocab_tokenizer("qwen2")  # qwen2 turns the clean-up off
    assert qwen2.decode(qwen2.encode("Hello , world ! It ' s")) == "Hello , world ! It ' s"


def test_spm_space_prefix_and_bos_in_decode(vocab_tokenizer):
    tok = vocab_tokenizer("llama-spm")
    ids = tok.encode("Hello world", add_special=True)
    assert ids[0] == tok.bos_id == 1 and tok.token_text(ids[1]) == "▁Hello"
    assert tok.decode(ids[1:]) == "Hello world"  # the added prefix space is removed again
    assert tok.decode(ids, special=True) == "<s> Hello world"
    # llama.cpp quirk: the (hidden) BOS uses up the one leading-space removal
    assert tok.decode(ids, special=False) == " Hello world"
    assert tok.token_to_piece(ids[1]) == b" Hello"
    assert tok.token_to_piece(tok.bos_id, special=False) == b""


def test_phi3_special_tokens_swallow_following_whitespace(vocab_tokenizer):
    tok = vocab_tokenizer("phi-3")
    user = tok.find_token("<|user|>")
    assert user == 32010
    got = tok.encode("<|user|>\nHello", add_special=False, parse_special=True)
    assert got == [user] + tok.encode("Hello", add_special=False)
    assert got != [user] + tok.encode("\nHello", add_special=False)
    # without parse_special the control token is ordinary text
    assert user not in tok.encode("<|user|>\nHello", add_special=False)


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    det = IncrementalDetokenizer(tok)
    return [det.add(i) for i in ids] + [det.flush()]


def test_incremental_detokenizer_holds_back_split_characters(vocab_tokenizer):
    tok = vocab_tokenizer("llama-spm")
    text = "🦙 龘 ok"  # neither the emoji nor this CJK character is in the llama vocab
    ids = tok.encode(text, add_special=False)
    pieces = [tok.token_to_piece(i) for i in ids]
    assert sum(len(p) == 1 and p[0] >= 0x80 for p in pieces) == 7  # 4 + 3 byte-fallback tokens
    out = _stream(tok, ids)
    assert "".join(out) == " " + text  # streamed pieces keep SPM's prefix space
    assert all("\ufffd" not in s for s in out)
    f0 = pieces.index(b"\xf0")  # 🦙 = F0 9F A6 99: nothing comes out until its last byte
    assert pieces[f0:f0 + 4] == [b"\xf0", b"\x9f", b"\xa6", b"\x99"]
    assert out[f0:f0 + 4] == ["", "", "", "🦙"]
    e9 = pieces.index(b"\xe9")  # 龘 = E9 BE 98
    assert out[e9:e9 + 3] == ["", "", "龘"]


def test_incremental_detokenizer_on_byte_level_bpe(vocab_tokenizer):
    tok = vocab_tokenizer("qwen2")
    text = "Emoji 🦙 and 中文字符 👨‍👩‍👧"
    ids = tok.encode(text, add_special=False)
    out = _stream(tok, ids)
    assert "".join(out) == text
    assert all("\ufffd" not in s for s in out)
    split = [s for i, s in zip(ids, out) if s == "" and tok.token_to_piece(i)]
    assert split, "some tokens carry only part of a UTF-8 character"


def test_incremental_detokenizer_flush_replaces_incomplete_tail(vocab_tokenizer):
    tok = vocab_tokenizer("llama-spm")
    det = IncrementalDetokenizer(tok)
    assert det.add(tok.find_token("<0xF0>")) == ""
    assert det.add(tok.find_token("<0x9F>")) == ""
    assert det.flush() == "\ufffd"
    assert det.add(tok.find_token("▁ok")) == " ok"


def _mixed_text(n_bytes: int, seed: int = 0) -> str:
    """English prose, random CJK runs and code, so that word caches do not make it trivial."""
    rng = random.Random(seed)
    words = ("the of and to in is was that for on with as by at from this be are have it an which or not "
             "tokenizer model server request inference quantized matrix kernel attention cache").split()
    code = ["def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }\n",
            "if err != nil {\n\treturn err\n}\n", '    self.value = {"key": [1, 2, 3]}\n']
    parts, size = [], 0
    while size < n_bytes:
        kind = rng.random()
        if kind < 0.5:
            s = " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + ". "
        elif kind < 0.75:
            s = "".join(chr(rng.randint(0x4E00, 0x9FA5)) for _ in range(rng.randint(5, 30))) + "。"
        else:
            s = rng.choice(code).replace("x", rng.choice(words))
        parts.append(s)
        size += len(s.encode())
    return "".join(parts)


@pytest.mark.parametrize("name", ["qwen2", "llama-spm", "command-r"])
def test_tokenizes_100kb_of_mixed_text_under_a_second(testdata_dir, name):
    tok = Tokenizer.from_gguf(GGUFFile(testdata_dir / "vocab" / f"ggml-vocab-{name}.gguf"))  # cold caches
    text = _mixed_text(100_000)
    start = time.perf_counter()
    ids = tok.encode(text, add_special=False, parse_special=True)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{elapsed:.2f}s for 100 KB"
    assert tok.decode(ids) == text  # and the ids are right


def test_builds_a_256k_vocab_well_under_a_second(testdata_dir):
    g = GGUFFile(testdata_dir / "vocab" / "ggml-vocab-command-r.gguf")
    start = time.perf_counter()
    tok = Tokenizer.from_gguf(g)
    elapsed = time.perf_counter() - start
    assert tok.n_vocab == 256000
    assert elapsed < 1.0, f"{elapsed:.2f}s to build"

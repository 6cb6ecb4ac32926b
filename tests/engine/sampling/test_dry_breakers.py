"""DRY sequence breakers: the lazy `DryBreakers` against the old eager, llama.cpp-shaped scan.

The oracle `eager_dry_breakers` is the previous implementation (a port of llama.cpp's
get_overlapping_token_sequences): every breaker against every vocabulary token at setup, which
took minutes for thousands of breakers on a 152k vocabulary. `oracle_penalties` is the previous
`DryState.penalties` (with its `_repeat_limit`) over such an eager dict.
"""
from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from ggserve.engine.sampling.penalty_history import FLOAT_MAX_LOG, DryBreakers, DryState, z_array
from ggserve.engine.sampling.sampler import Sampler, SamplingParams
from tests.testdata import reference_data_dir


# -- the oracle: the previous eager implementation -------------------------------------------
def eager_dry_breakers(breakers: list[str], token_bytes: list[bytes], encode=None,
                       max_chars: int = 40, max_tail: int = 20) -> dict[int, list[tuple[int, ...]]]:
    result: dict[int, list[tuple[int, ...]]] = {}
    for text in breakers:
        if not text:
            continue
        needle = text.encode("utf-8")[:max_chars]
        for token_id, piece in enumerate(token_bytes):
            if needle in piece:
                result.setdefault(token_id, []).append(())
                continue
            if encode is None or needle[:1] not in piece:
                continue
            start = piece.find(needle[:1])
            while start != -1:
                overlap = len(piece) - start
                if overlap < len(needle) and piece[start:] == needle[:overlap]:
                    rest = needle[overlap:].decode("utf-8", errors="ignore")
                    tail = tuple(encode(rest)[:max_tail])
                    if tail not in result.setdefault(token_id, []):
                        result[token_id].append(tail)
                start = piece.find(needle[:1], start + 1)
    return result


def oracle_repeat_limit(breakers: dict, recent: list[int]) -> int:
    n = len(recent)
    for i in range(n):
        tails = breakers.get(recent[i])
        if not tails:
            continue
        longest = -1
        for tail in tails:
            if longest < len(tail) <= i and all(tail[o] == recent[i - o - 1] for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            return i - longest
    return n


def oracle_penalties(dry: DryState, breakers: dict) -> tuple[list[int], list[float]]:
    if not dry.enabled:
        return [], []
    n = min(len(dry.tokens), dry.last_n, dry.context_size)
    if n <= dry.allowed_length:
        return [], []
    recent = [dry.tokens[-1 - i] for i in range(n)]
    rep_limit = oracle_repeat_limit(breakers, recent)
    if rep_limit < dry.allowed_length:
        return [], []
    z = z_array(recent)
    best: dict[int, int] = {}
    for k in range(1, n):
        repeat_len = min(z[k], rep_limit)
        if repeat_len >= dry.allowed_length:
            follower = recent[k - 1]
            if best.get(follower, -1) < repeat_len:
                best[follower] = repeat_len
    max_exponent = int(FLOAT_MAX_LOG / math.log(dry.base)) if dry.base > 1.000001 else 0
    ids, values = [], []
    for token, repeat_len in best.items():
        if any(len(t) == 0 for t in breakers.get(token, ())):
            continue
        exponent = repeat_len - dry.allowed_length
        if max_exponent > 0:
            exponent = min(exponent, max_exponent)
        ids.append(token)
        values.append(dry.multiplier * dry.base ** exponent)
    return ids, np.asarray(values, np.float32).tolist()


# -- random small vocabularies ----------------------------------------------------------------
FRAGMENTS = ["a", "b", "ab", "ba", ":", "\n", " ", "é", "中", "文", "😀", "ß", "x", "*", '"']


def greedy_encoder(pieces: list[bytes]):
    """Longest-match tokenization over the vocabulary's bytes; an unmatched byte becomes token
    0 (the empty piece, standing in for <unk>). The empty text tokenizes to nothing: a breaker's
    rest that is only a cut character decodes to "" and makes an empty tail."""
    index = {piece: token_id for token_id, piece in enumerate(pieces) if piece}
    longest = max(map(len, pieces))

    def encode(text: str) -> list[int]:
        data, out, at = text.encode("utf-8"), [], 0
        while at < len(data):
            for size in range(min(longest, len(data) - at), 0, -1):
                token_id = index.get(data[at:at + size])
                if token_id is not None:
                    out.append(token_id)
                    at += size
                    break
            else:
                out.append(0)
                at += 1
        return out

    return encode


def random_case(rng: random.Random) -> tuple[list[str], list[bytes]]:
    def text(lo: int, hi: int) -> str:
        return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(lo, hi)))

    breakers = [text(1, 4) for _ in range(rng.randint(1, 5))]
    breakers += [text(12, 20) for _ in range(rng.randint(0, 2))]  # > 40 bytes: cut, maybe mid-character
    breakers += rng.choice([[], [""], [breakers[0]]])             # empty and duplicate breakers
    pieces: set[bytes] = {f.encode() for f in FRAGMENTS}
    pieces |= {f.encode()[:1] for f in FRAGMENTS}                 # partial UTF-8 characters
    for _ in range(rng.randint(20, 60)):
        pieces.add(text(1, 4).encode())
    for breaker in breakers:
        needle = breaker.encode()[:40]
        for _ in range(3):
            cut = rng.randint(1, max(len(needle), 1))
            pieces.add(text(0, 2).encode() + needle[:cut])                    # ends with a prefix
            pieces.add(text(0, 2).encode() + needle + text(0, 2).encode())    # contains it
            pieces.add(needle[:cut] + needle[:rng.randint(1, max(len(needle), 1))])
    tokens = sorted(pieces)
    rng.shuffle(tokens)
    return breakers, [b""] + tokens  # an empty piece, as control tokens have


def random_history(rng: random.Random, breakers: list[str], encode, n_vocab: int) -> list[int]:
    words = [b for b in breakers if b] + FRAGMENTS
    history: list[int] = []
    while len(history) < rng.randint(30, 120):
        choice = rng.random()
        if choice < 0.4:
            history += encode("".join(rng.choice(words) for _ in range(rng.randint(1, 4))))
        elif choice < 0.7 and history:
            start = rng.randrange(len(history))  # a repeat, which DRY penalises
            history += history[start:start + rng.randint(2, 8)]
        else:
            history.append(rng.randrange(n_vocab + 2))  # ids beyond the vocabulary too
    return history


@pytest.mark.parametrize("with_encoder", [True, False])
def test_lazy_breakers_match_the_eager_scan(with_encoder):
    rng = random.Random(1234 + with_encoder)
    for _ in range(150):
        breakers, pieces = random_case(rng)
        encode = greedy_encoder(pieces) if with_encoder else None
        eager = eager_dry_breakers(breakers, pieces, encode)
        lazy = DryBreakers(breakers, pieces, encode)
        # every token's entries, as sets (order and duplicates never matter to DRY)
        for token_id in range(len(pieces) + 2):
            assert set(lazy.get(token_id) or ()) == set(eager.get(token_id, ())), (breakers, pieces[token_id:token_id + 1])
        history = random_history(rng, breakers, encode or greedy_encoder(pieces), len(pieces))
        allowed = rng.choice([0, 1, 2, 3])
        last_n = rng.choice([-1, 16, 64])
        new = DryState(0.8, rng.choice([1.0, 1.75, 3.0]), allowed, last_n, 4096,
                       DryBreakers(breakers, pieces, encode))
        old = DryState(new.multiplier, new.base, allowed, last_n, 4096, eager)
        for token in history:
            new.accept(token)
            old.accept(token)
            ids, values = new.penalties()
            assert (ids.tolist(), values.tolist()) == oracle_penalties(old, eager)
            recent = list(reversed(new.tokens))
            assert new._repeat_limit(recent) == oracle_repeat_limit(eager, recent)


def test_longest_matching_tail_sets_the_repeat_limit():
    # token 7 is a head with tails (1,) and (1, 2), and a single-token breaker too
    dry = DryState(1.0, 2.0, 0, 64, 4096, {7: [(1,), (), (1, 2)]})
    recent = [2, 1, 7, 5, 5]  # most recent first: ... 5 5 7 1 2
    assert dry._repeat_limit(recent) == 0  # 7 at i=2 with its full tail (1, 2): 2 - 2
    assert dry._repeat_limit([1, 7, 5]) == 0  # only (1,) fits: 1 - 1
    assert dry._repeat_limit([7, 5]) == 0  # the empty tail
    dry.breakers = {7: [(1, 2)]}  # reassigning drops the memoised entries
    assert dry._repeat_limit([1, 7, 5]) == 3


def test_lazy_breakers_pick_the_longest_tail_of_a_prefix():
    # "a" ends with a prefix of both breakers: tails (b,) and (b, c), both starting with b
    pieces = [b"", b"a", b"b", b"c", b"x"]
    encode = greedy_encoder(pieces)
    lazy = DryBreakers(["ab", "abc"], pieces, encode)
    assert set(lazy.get(1)) == {(2,), (2, 3)} and lazy.get(2) is None and lazy.get(99) is None
    dry = DryState(1.0, 2.0, 0, 64, 4096, lazy)
    recent = [3, 2, 1, 4]  # most recent first: x a b c
    assert dry._repeat_limit(recent) == 0 == oracle_repeat_limit(eager_dry_breakers(["ab", "abc"], pieces, encode),
                                                                 recent)
    assert dry._repeat_limit([4, 2, 1, 4]) == 1  # x a b x: only (b,) fits


# -- a real vocabulary ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen2():
    path = reference_data_dir() / "vocab" / "ggml-vocab-qwen2.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found (llama.cpp's vocab test data; set GGSERVE_TESTDATA)")
    from ggserve.engine import GGUFFile, Tokenizer

    tokenizer = Tokenizer.from_gguf(GGUFFile(str(path)))
    pieces = [tokenizer.token_to_piece(i, special=True) for i in range(tokenizer.n_vocab)]
    return tokenizer, pieces


def test_real_vocab_matches_the_eager_scan(qwen2):
    tokenizer, pieces = qwen2
    breakers = ["\n", ":", '"', "*", "ing the", " the", "中文", "😀x", "é" * 30]
    encode = lambda text: tokenizer.encode(text, add_special=False)  # noqa: E731
    eager = eager_dry_breakers(breakers, pieces, encode)
    lazy = DryBreakers(breakers, pieces, encode)
    rng = random.Random(5)
    sample = set(eager) | {rng.randrange(len(pieces)) for _ in range(3000)}
    for token_id in sorted(sample):
        assert set(lazy.get(token_id) or ()) == set(eager.get(token_id, ())), token_id


def test_many_long_breakers_are_cheap(qwen2):
    tokenizer, pieces = qwen2
    rng = random.Random(7)
    alphabet = "abcdefghijklmnopqrstuvwxyz     ,.:é中"
    breakers = ["".join(rng.choice(alphabet) for _ in range(100)) for _ in range(1000)]
    params = SamplingParams(temperature=1.0, seed=3, dry_multiplier=0.8, dry_sequence_breakers=breakers,
                            dry_penalty_last_n=-1)
    prompt = tokenizer.encode(" ".join(b[:30] for b in breakers[:40]) * 2, add_special=False)
    logits = np.random.default_rng(0).standard_normal(len(pieces)).astype(np.float32)
    start = time.perf_counter()
    sampler = Sampler(params, len(pieces), token_bytes=pieces, n_ctx=8192, tokenizer=tokenizer)
    for token in prompt:
        sampler.accept(token)
    assert sampler.dry.penalties()[0].size  # the prompt repeats itself: DRY is at work
    picked = [sampler.sample(logits) for _ in range(20)]
    elapsed = time.perf_counter() - start
    assert len(picked) == 20
    assert elapsed < 20.0, f"1000 DRY breakers took {elapsed:.1f} s (the eager scan took minutes)"

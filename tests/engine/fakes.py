"""Test doubles for the engine loop: a KV cache, a model, a tokenizer, a detokenizer and a sampler.

The fake model is deterministic: the next token is a hash of the slot's whole cached context
(so wrong prefix reuse, wrong positions or a wrong context shift change the output), unless a
test scripts it with `next_token_fn(slot_id, context) -> token_id`. It checks the batch
contract (per slot, positions contiguous from num_cached) and records every forward call.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

EOS_ID = 0
# Fake vocabulary: bytes per token id. Token 0 is the only end-of-generation (control) token.
VOCAB: list[bytes] = (
    [b"</s>"]
    + [bytes([c]) for c in range(ord("a"), ord("z") + 1)]  # 1..26
    + [b" ", b"\n", b"STOP", b"ST", b"OP", b"\xe2\x82", b"\xac", b"<", b"/a>"]  # 27..35
    + [f"w{i}".encode() for i in range(36, 64)]
)
N_VOCAB = len(VOCAB)
TOKEN = {piece.decode("utf-8", errors="replace"): i for i, piece in enumerate(VOCAB)}


class FakeKVCache:
    def __init__(self, n_slots: int, n_ctx: int):
        self.n_slots, self.n_ctx = n_slots, n_ctx
        self.tokens: list[list[int]] = [[] for _ in range(n_slots)]
        self.shifts: list[tuple[int, int, int]] = []

    def num_cached(self, slot_id: int) -> int:
        return len(self.tokens[slot_id])

    def cached_tokens(self, slot_id: int) -> list[int]:
        return list(self.tokens[slot_id])

    def truncate(self, slot_id: int, n_tokens: int) -> None:
        del self.tokens[slot_id][n_tokens:]

    def clear(self, slot_id: int) -> None:
        self.tokens[slot_id] = []

    def copy_prefix(self, src_slot: int, dst_slot: int, n_tokens: int) -> None:
        self.tokens[dst_slot] = self.tokens[src_slot][:n_tokens]

    def shift(self, slot_id: int, n_keep: int, n_discard: int) -> None:
        self.shifts.append((slot_id, n_keep, n_discard))
        del self.tokens[slot_id][n_keep : n_keep + n_discard]

    def usage(self) -> tuple[int, int]:
        return sum(len(t) for t in self.tokens), self.n_slots * self.n_ctx

    def save_slot(self, slot_id: int, file) -> int:
        if self.fail_save:  # a disk that fills up half way through
            file.write(b"partial")
            raise OSError(28, "No space left on device")
        file.write(",".join(map(str, self.tokens[slot_id])).encode())
        return len(self.tokens[slot_id])

    fail_save = False


@dataclass
class ForwardCall:
    token_ids: list[int]
    positions: list[int]
    slot_ids: list[int]
    logits_rows: list[int]
    output: str


def hashed_next_token(slot_id: int, context: list[int]) -> int:
    """Never EOS; a deterministic function of the whole context (not of the slot)."""
    h = zlib.crc32(np.asarray(context, dtype=np.int32).tobytes())
    return 1 + h % (N_VOCAB - 1)


class FakeModel:
    def __init__(self, n_slots: int, n_ctx: int, next_token_fn=hashed_next_token, n_embd: int = 8):
        self.kv_cache = FakeKVCache(n_slots, n_ctx)
        self.n_vocab = N_VOCAB
        self.n_embd = n_embd
        self.next_token_fn = next_token_fn
        self.calls: list[ForwardCall] = []

    def forward(self, token_ids, positions, slot_ids, logits_rows, output: str = "logits",
                batch_spans=None) -> np.ndarray:
        for arr in (token_ids, positions, slot_ids, logits_rows):
            assert isinstance(arr, np.ndarray) and arr.dtype == np.int32
        if batch_spans is not None:  # the real model's contract: [first, last] around each position
            assert batch_spans.shape == (positions.size, 2)
            assert (batch_spans[:, 0] <= positions).all() and (positions <= batch_spans[:, 1]).all()
        self.calls.append(
            ForwardCall(token_ids.tolist(), positions.tolist(), slot_ids.tolist(), logits_rows.tolist(), output)
        )
        contexts = []
        for i, (tok, pos, slot) in enumerate(zip(token_ids.tolist(), positions.tolist(), slot_ids.tolist())):
            cache = self.kv_cache.tokens[slot]
            if pos != len(cache):
                raise AssertionError(f"slot {slot}: token at position {pos} but {len(cache)} cached")
            if pos >= self.kv_cache.n_ctx:
                raise AssertionError(f"slot {slot}: position {pos} beyond n_ctx {self.kv_cache.n_ctx}")
            cache.append(tok)
            contexts.append((slot, list(cache)))
        rows = logits_rows.tolist()
        if output == "embeddings":
            out = np.zeros((len(rows), self.n_embd), np.float32)
            for j, r in enumerate(rows):
                out[j, token_ids[r] % self.n_embd] = 1.0
                out[j, (positions[r] + 1) % self.n_embd] += 0.5
            return out
        logits = np.zeros((len(rows), self.n_vocab), np.float32)  # (r, n_vocab)
        for j, r in enumerate(rows):
            slot, ctx = contexts[r]
            logits[j] = np.linspace(0.0, 1.0, self.n_vocab, dtype=np.float32)[::-1]  # runner-up: low ids
            logits[j, self.next_token_fn(slot, ctx)] = 10.0
        return logits


class FakeTokenizer:
    def __init__(self, add_bos: bool = False):
        self.n_vocab = N_VOCAB
        self.eos_id = EOS_ID
        self.bos_id = None
        self.eog_ids = frozenset({EOS_ID})
        self.add_bos = add_bos

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        if token_id in self.eog_ids and not special:
            return b""
        return VOCAB[token_id]

    def decode(self, ids, special: bool = True) -> str:
        return b"".join(self.token_to_piece(t, special) for t in ids).decode("utf-8", errors="replace")

    def encode_text(self, text: str) -> list[int]:
        """Greedy longest-match over the fake vocab (tests only)."""
        ids, i = [], 0
        pieces = sorted(((p.decode("utf-8", "replace"), t) for t, p in enumerate(VOCAB) if t), key=lambda x: -len(x[0]))
        while i < len(text):
            for piece, t in pieces:
                if text.startswith(piece, i):
                    ids.append(t)
                    i += len(piece)
                    break
            else:
                raise ValueError(f"cannot encode {text[i:]!r}")
        return ids


class FakeDetokenizer:
    """Emits only complete UTF-8 (like ggserve.engine.tokenizer.IncrementalDetokenizer)."""

    def __init__(self, tokenizer: FakeTokenizer, special: bool = False):
        self.tokenizer, self.special = tokenizer, special
        self.buffer = b""

    def add(self, token_id: int) -> str:
        self.buffer += self.tokenizer.token_to_piece(token_id, self.special)
        for cut in range(len(self.buffer), max(-1, len(self.buffer) - 4), -1):
            try:
                text = self.buffer[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.buffer = self.buffer[cut:]
            return text
        return ""

    def flush(self) -> str:
        text = self.buffer.decode("utf-8", errors="replace")
        self.buffer = b""
        return text


@dataclass(frozen=True)
class FakeLogprob:
    token_id: int
    logprob: float


@dataclass
class GreedySampler:
    """argmax; records accepted/sampled history so tests can check the prompt replay."""

    n_vocab: int = N_VOCAB
    history: list[int] = field(default_factory=list)
    last_logits: np.ndarray | None = None
    ignore_eos: bool = False  # like the real Sampler: EOS banned by a -inf bias

    def sample(self, logits: np.ndarray) -> int:
        self.last_logits = np.asarray(logits, dtype=np.float64)
        biased = self.last_logits.copy()
        if self.ignore_eos:
            biased[EOS_ID] = -np.inf
        token = int(np.argmax(biased))
        self.history.append(token)
        return token

    def accept(self, token_id: int) -> None:
        self.history.append(token_id)

    def last_logprobs(self, n: int):
        x = self.last_logits
        logp = x - (np.log(np.sum(np.exp(x - x.max()))) + x.max())
        order = np.argsort(-logp, kind="stable")[:n]
        chosen = int(np.argmax(x))
        return FakeLogprob(chosen, float(logp[chosen])), [FakeLogprob(int(i), float(logp[i])) for i in order]


def make_core(n_slots=2, n_ctx=64, batch_size=16, next_token_fn=hashed_next_token, add_bos=False, **config):
    """An EngineCore over the fakes (greedy sampling, fake detokenizer)."""
    from ggserve.engine.core import EngineConfig, EngineCore

    model = FakeModel(n_slots, n_ctx, next_token_fn)
    tokenizer = FakeTokenizer(add_bos=add_bos)
    cfg = EngineConfig(n_slots=n_slots, n_ctx=n_ctx, batch_size=batch_size, **config)
    return EngineCore(
        model,
        tokenizer,
        cfg,
        sampler_factory=lambda params: GreedySampler(ignore_eos=params.sampling.ignore_eos),
        detokenizer_factory=lambda: FakeDetokenizer(tokenizer),
    )


def run_to_completion(core, max_steps: int = 10_000) -> dict[str, list]:
    """Step until idle; return every request's outputs in order."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not core.has_work():
            return outputs
        for out in core.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not become idle")

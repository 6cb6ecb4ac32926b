"""A model-free stand-in for the engine, implementing what the server sees of it.

`FakeTokenizer` is byte-level (ids 0..255 are bytes) plus a few special tokens (BOS, EOS,
ChatML markers, FIM tokens). `FakeEngine.generate` replies with a fixed text, one token per
output, honouring max_tokens, stop strings, ignore_eos, n_probs and abort, and records every
request and abort so tests can assert on them.
"""
from __future__ import annotations

import asyncio
import math
import re
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from ggserve.engine import EngineStats, Request, RequestOutput, SlotStats, Timings, TokenLogprob, TokenProbs
from ggserve.server.engine_api import EngineBusyError

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_suffix|>",
            "<|fim_middle|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
BOS, EOS, IM_START, IM_END, FIM_PRE, FIM_SUF, FIM_MID, FIM_PAD, FIM_REP, FIM_SEP = range(256, 266)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class FakeTokenizer:
    n_vocab = 256 + len(SPECIALS)
    bos_id, eos_id = BOS, EOS
    eog_ids = frozenset({EOS, IM_END})
    add_bos, add_eos = True, False
    fim_prefix_id, fim_suffix_id, fim_middle_id = FIM_PRE, FIM_SUF, FIM_MID
    fim_pad_id, fim_repo_id, fim_sep_id = FIM_PAD, FIM_REP, FIM_SEP
    vocab_type = "fake-bytes"
    _special_re = re.compile("|".join(re.escape(s) for s in SPECIALS))

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        ids = [BOS] if add_special and self.add_bos else []
        pos = 0
        if parse_special:
            for m in self._special_re.finditer(text):
                ids += list(text[pos:m.start()].encode("utf-8"))
                ids.append(256 + SPECIALS.index(m.group()))
                pos = m.end()
        ids += list(text[pos:].encode("utf-8"))
        return ids

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        return SPECIALS[token_id - 256].encode() if special else b""

    def decode(self, ids, special: bool = True) -> str:
        return b"".join(self.token_to_piece(t, special) for t in ids).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self.token_to_piece(token_id).decode("utf-8", errors="replace")

    def find_token(self, text: str) -> int | None:
        return 256 + SPECIALS.index(text) if text in SPECIALS else None

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids


@dataclass
class FakeRequest:
    prompt_ids: list[int]
    params: Any
    request_id: str


@dataclass
class FakeEngine:
    reply: str = "Hello world! I am a fake model."
    n_slots: int = 2
    n_ctx: int = 512  # per slot
    token_delay: float = 0.0  # seconds between tokens (to test streaming / disconnects)
    busy: bool = False  # every generate() raises EngineBusyError
    repeat_reply: bool = False  # keep generating the reply until max_tokens (never EOS)
    requests: list[FakeRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    saved_slots: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokenizer = FakeTokenizer()
        self.config = SimpleNamespace(n_slots=self.n_slots, n_ctx=self.n_ctx, batch_size=64)
        self.model_info = SimpleNamespace(
            path="/models/fake-model.gguf", architecture="fake", n_vocab=self.tokenizer.n_vocab,
            n_ctx_train=4096, n_embd=8, n_params=1234, size_bytes=5678,
            metadata={"general.architecture": "fake", "tokenizer.chat_template": CHATML},
            chat_template_source=CHATML,
        )
        self._active: dict[str, int] = {}
        self.n_decode_total = 0
        self.n_prompt_total = 0
        self.n_finished = 0
        self.n_deferred = 0  # tests set these to see them in /metrics and /slots
        self.n_cached = 0

    # ---- the interface the server uses -------------------------------------------------------

    def prepare(self, prompt_ids, params, request_id=None) -> Request:
        # like the real AsyncEngine: a request that can never run is refused here
        if not prompt_ids or len(prompt_ids) >= self.n_ctx:
            raise ValueError("the prompt does not fit")
        return Request(request_id or f"fake-{len(self.requests)}", list(prompt_ids), params)

    def generate(self, prompt_ids, params, request_id=None, prepared: Request | None = None):
        # like the real AsyncEngine: refusals are raised here, not on the first iteration
        request = prepared if prepared is not None else self.prepare(prompt_ids, params, request_id)
        if self.busy:
            raise EngineBusyError("queue is full")
        return self._generate(request.prompt_ids, request.params, request.request_id)

    async def _generate(self, prompt_ids, params, request_id):
        self.requests.append(FakeRequest(prompt_ids, params, request_id))
        self.n_prompt_total += len(prompt_ids)
        slot_id = params.id_slot if params.id_slot >= 0 else len(self._active) % self.n_slots
        self._active[request_id] = slot_id
        try:
            async for out in self._outputs(prompt_ids, params, request_id, slot_id):
                yield out
        finally:
            self._active.pop(request_id, None)
            self.n_finished += 1

    async def _outputs(self, prompt_ids, params, request_id, slot_id):
        reply_ids = list(self.reply.encode("utf-8"))
        n_probs = params.n_probs or 0
        max_tokens = params.max_tokens if params.max_tokens >= 0 else math.inf
        generated: list[int] = []
        text, emitted = "", 0  # text held back while it could still become a stop string
        i = 0

        def final(reason, stop_type, word="", ids=(), end=None):
            visible = text[emitted:end if end is not None else len(text)]
            return self._final(request_id, list(ids), visible, reason, stop_type, word, len(prompt_ids),
                               generated, slot_id)

        while True:
            if request_id in self.aborted:
                yield final("abort", "none")
                return
            if len(generated) >= max_tokens or len(prompt_ids) + len(generated) >= self.n_ctx:
                yield final("length", "limit")
                return
            if i >= len(reply_ids):
                if not self.repeat_reply and not params.ignore_eos:
                    yield final("stop", "eos")
                    return
                i = 0
            token = reply_ids[i]
            i += 1
            await asyncio.sleep(self.token_delay)
            self.n_decode_total += 1
            generated.append(token)
            text += bytes([token]).decode("latin-1")
            hits = [(text.find(w), w) for w in params.stop if text.find(w) >= 0]
            if hits:
                at, word = min(hits)
                yield final("stop", "word", word, [token], end=at)
                return
            held = max((k for w in params.stop for k in range(1, len(w)) if text.endswith(w[:k])), default=0)
            visible = text[emitted:len(text) - held]
            emitted += len(visible)
            logprobs = None
            if n_probs > 0:
                top = [TokenLogprob(t, -0.1 * (k + 1)) for k, t in enumerate([token] + list(range(n_probs - 1)))]
                logprobs = [TokenProbs(token, -0.1, tuple(top[:n_probs]))]
            yield RequestOutput(request_id, [token], visible, logprobs=logprobs, slot_id=slot_id,
                                n_prompt_tokens=len(prompt_ids))

    def _final(self, request_id, ids, text, reason, stop_type, word, n_prompt, generated, slot_id):
        timings = Timings(prompt_n=n_prompt, prompt_ms=2.0 * n_prompt, predicted_n=len(generated),
                          predicted_ms=5.0 * len(generated), cache_n=0)
        return RequestOutput(request_id, ids, text, reason, stop_type, word, None, timings, slot_id, n_prompt)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        """The real engine's snapshot type: a renamed field breaks here and in the server alike."""
        busy = set(self._active.values())
        slots = tuple(
            SlotStats(id=i, n_ctx=self.n_ctx, is_processing=i in busy, state="generating" if i in busy else "idle",
                      id_task="", n_past=self.n_cached, n_prompt_tokens=0, n_decoded=0, n_remaining=-1,
                      has_next_token=i in busy, stopping_word="")
            for i in range(self.n_slots))
        return EngineStats(
            slots=slots, n_slots=self.n_slots, n_processing=len(busy), n_deferred=self.n_deferred,
            kv_used_cells=10, kv_total_cells=self.n_slots * self.n_ctx,
            n_prompt_tokens_processed_total=self.n_prompt_total, t_prompt_processing_total_ms=2.0 * self.n_prompt_total,
            n_tokens_predicted_total=self.n_decode_total, t_tokens_generation_total_ms=5.0 * self.n_decode_total,
            n_decode_total=self.n_decode_total, n_busy_slots_total=self.n_decode_total,
            n_requests_finished_total=self.n_finished, n_tokens_max=self.n_ctx,
        )

    async def embed(self, prompt_ids) -> np.ndarray:
        vec = np.zeros(8, dtype=np.float32)
        for k, t in enumerate(prompt_ids):
            vec[(t + k) % 8] += 1.0
        return vec / np.linalg.norm(vec)

    def save_slot(self, slot_id: int, path) -> int:
        ids = [1, 2, 3]
        with open(path, "w") as f:
            f.write(",".join(map(str, ids)))
        self.saved_slots[slot_id] = ids
        return len(ids)

    def restore_slot(self, slot_id: int, path) -> int:
        with open(path) as f:
            return len(f.read().split(","))

    def erase_slot(self, slot_id: int) -> int:
        return len(self.saved_slots.pop(slot_id, []))

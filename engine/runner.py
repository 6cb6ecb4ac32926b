"""Runs one scheduled batch on the model: flatten, forward, sample.

`ModelRunner.execute()` turns a SchedulerOutput into the flat arrays `model.forward` takes
(token_ids / positions / slot_ids for every token, logits_rows for the chunks that end at a
request's last token) and samples one token per such row with the request's own Sampler.
`embed()` computes a mean-pooled, L2-normalised embedding of a prompt in one slot.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ggserve.engine.request import Request, TokenProbs
from ggserve.engine.scheduler import SampledToken, SchedulerOutput


def _batch_span(chunk, n_prompt: int) -> tuple[int, int]:
    # A prompt's rows are summed as llama.cpp sums a prompt fed in one batch, however it was
    # chunked or however much of it a prompt-cache hit skipped (same bits every time); a
    # generated token as llama.cpp's one-token decode batch.
    end = chunk.start_pos + len(chunk.token_ids) - 1
    return (0, n_prompt - 1) if end < n_prompt else (chunk.start_pos, end)


class ModelRunner:
    def __init__(self, model: Any, batch_size: int = 2048):
        self.model = model
        self.kv_cache = model.kv_cache
        self.batch_size = batch_size

    def execute(self, sched: SchedulerOutput) -> dict[str, SampledToken]:
        n = sched.num_tokens
        token_ids = np.empty(n, dtype=np.int32)  # (n,)
        positions = np.empty(n, dtype=np.int32)  # (n,)
        slot_ids = np.empty(n, dtype=np.int32)  # (n,)
        spans = np.empty((n, 2), dtype=np.int32)  # (n, 2) the batch llama.cpp would sum each row in
        logits_rows: list[int] = []  # (r,) batch index of each chunk's last token when sampling
        sampling: list[Request] = []
        offset = 0
        for chunk in sched.chunks:
            k = len(chunk.token_ids)
            if self.kv_cache.num_cached(chunk.slot_id) != chunk.start_pos:
                raise RuntimeError(
                    f"slot {chunk.slot_id}: chunk starts at {chunk.start_pos} but the cache holds "
                    f"{self.kv_cache.num_cached(chunk.slot_id)} tokens"
                )
            token_ids[offset : offset + k] = chunk.token_ids
            positions[offset : offset + k] = np.arange(chunk.start_pos, chunk.start_pos + k)
            slot_ids[offset : offset + k] = chunk.slot_id
            spans[offset : offset + k] = _batch_span(chunk, len(chunk.request.prompt_ids))
            offset += k
            if chunk.sample:
                logits_rows.append(offset - 1)
                sampling.append(chunk.request)
        rows = np.asarray(logits_rows, dtype=np.int32)
        logits = self.model.forward(token_ids, positions, slot_ids, rows, batch_spans=spans)  # (r, n_vocab)
        results = {}
        for i, request in enumerate(sampling):
            try:
                results[request.request_id] = self._sample(request, logits[i])
            except Exception as exc:  # one request's sampler failing must not fail the batch
                results[request.request_id] = SampledToken(-1, None, f"sampling failed: {exc}")
        return results

    def _sample(self, request: Request, logits: np.ndarray) -> SampledToken:
        sampler = request.sampler
        if not request.prompt_accepted:
            # llama-server replays the whole prompt into the sampler (penalty history) once the
            # prompt is done, cached prefix included.
            for token_id in request.prompt_ids:
                sampler.accept(token_id)
            request.prompt_accepted = True
        token_id = int(sampler.sample(logits))
        n_probs = request.params.logprobs_n
        probs = None
        if n_probs > 0:
            chosen, top = sampler.last_logprobs(n_probs)
            probs = TokenProbs(int(chosen.token_id), float(chosen.logprob), tuple(top))
        return SampledToken(token_id, probs)

    def embed(self, slot_id: int, prompt_ids: list[int]) -> np.ndarray:
        """Mean of the final-norm hidden states over all prompt tokens, L2-normalised -> (n_embd,)."""
        self.kv_cache.clear(slot_id)  # every token needs its hidden state: no prefix reuse
        total = None
        for start in range(0, len(prompt_ids), self.batch_size):
            chunk = prompt_ids[start : start + self.batch_size]
            k = len(chunk)
            hidden = self.model.forward(
                np.asarray(chunk, dtype=np.int32),
                np.arange(start, start + k, dtype=np.int32),
                np.full(k, slot_id, dtype=np.int32),
                np.arange(k, dtype=np.int32),
                output="embeddings",
            )  # (k, n_embd)
            part = np.asarray(hidden, dtype=np.float64).sum(axis=0)  # (n_embd,)
            total = part if total is None else total + part
        mean = total / len(prompt_ids)
        norm = np.linalg.norm(mean)
        return (mean / norm if norm > 0 else mean).astype(np.float32)

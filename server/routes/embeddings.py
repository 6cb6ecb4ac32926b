"""POST /embedding(s) (llama.cpp native) and POST /v1/embeddings (OpenAI), with --embeddings.

Owns: the input shapes (string, list of strings, token ids, list of token-id lists), calling
`engine.embed` (mean-pooled, L2-normalised) per input, and both response shapes — native
`[{"index", "embedding": [[...]]}]`, OpenAI `{"object": "list", "data": [...], "usage"}` with
optional base64 encoding (little-endian float32, as OpenAI).
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ggserve.server.chat import prompts
from ggserve.server.state import ServerState, ready_state
from ggserve.server.errors import APIError, bad_request
from ggserve.server.protocol import EmbeddingRequest, parse_body

router = APIRouter()


def _inputs(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [value]
    if isinstance(value, list) and value:
        return list(value)
    raise bad_request("input must be a non-empty string, list of strings or list of token ids", "input")


async def _embed_all(request: Request, state: ServerState) -> tuple[EmbeddingRequest, list[np.ndarray], int]:
    if not state.settings.embeddings:
        raise APIError(501, "This server does not support embeddings. Start it with `--embeddings`")
    req = await parse_body(request, EmbeddingRequest)
    tokenizer = state.engine.tokenizer
    items = _inputs(req.input if req.input is not None else req.content)

    def work() -> list[list[int]]:
        result = []
        for item in items:
            if isinstance(item, str):
                ids = tokenizer.encode(item, add_special=True, parse_special=True)
            else:
                ids = list(item)
                prompts.validate_token_ids(ids, tokenizer.n_vocab, param="input")
            prompts.check_fits(ids, state.n_ctx_slot)
            result.append(ids)
        return result

    id_lists = await run_in_threadpool(work)
    vectors = [np.asarray(await state.engine.embed(ids), dtype=np.float32) for ids in id_lists]
    return req, vectors, sum(len(ids) for ids in id_lists)


@router.post("/embedding")
@router.post("/embeddings")
async def embedding_native(request: Request, state: ServerState = Depends(ready_state)):
    _, vectors, _ = await _embed_all(request, state)
    return [{"index": i, "embedding": [v.tolist()]} for i, v in enumerate(vectors)]


@router.post("/v1/embeddings")
async def embedding_openai(request: Request, state: ServerState = Depends(ready_state)):
    req, vectors, n_tokens = await _embed_all(request, state)

    def encode(v: np.ndarray):
        if req.encoding_format == "base64":
            return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
        return v.tolist()

    return {
        "object": "list",
        "model": state.model_name,
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }

"""llama.cpp's native generation endpoints: POST /completion (+ /completions) and POST /infill.

Owns: prompt handling for the native API (string, token ids, mixed, several prompts), and the
native response shape, streamed (`data: {content, stop: false}` ... final `stop: true` object)
or whole (one object, or a list for several prompts).
"""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ggserve.server import formatting
from ggserve.server.chat import prompts
from ggserve.server.state import ServerState, ready_state
from ggserve.server.errors import bad_request
from ggserve.server.generation import Generation, collect, start_many
from ggserve.server.params import PreparedParams, build_params, resolve_n_predict
from ggserve.server.protocol import CompletionRequest, InfillRequest, parse_body
from ggserve.server.streaming import sse_response

router = APIRouter()


async def prepare(state: ServerState, req: Any, n_probs: int | None = None) -> PreparedParams:
    """The request's sampling / generation parameters, built on a worker thread: a grammar, a
    JSON schema or a long logit_bias costs real time, which the event loop must not spend."""
    return await run_in_threadpool(
        build_params, req, state.settings, state.engine.tokenizer, state.n_slots, n_probs, state.default_sampling
    )


def check_prompt_count(state: ServerState, count: int) -> None:
    """Each prompt x choice takes a place in the engine's queue: one request may not take them
    all (--max-prompts), so nobody else is starved by a single client."""
    if count > state.settings.max_prompts:
        raise bad_request(f"the request asks for {count} generations (prompts x n); this server allows at most "
                          f"{state.settings.max_prompts} per request (--max-prompts)", "prompt")


async def tokenize_prompts(state: ServerState, prompt: Any, n: int = 1) -> list[list[int]]:
    """Every prompt of the request as checked token ids (tokenizing runs off the event loop);
    `n` choices of each."""
    pieces_list = prompts.split_prompts(prompt)
    check_prompt_count(state, len(pieces_list) * n)
    tokenizer = state.engine.tokenizer

    def work() -> list[list[int]]:
        result = []
        for pieces in pieces_list:
            ids = prompts.tokenize_pieces(tokenizer, pieces)
            prompts.check_fits(ids, state.n_ctx_slot)
            result.append(ids)
        return result

    return await run_in_threadpool(work)


async def start_all(state: ServerState, prompt_ids: list[list[int]], params: Any) -> list[Generation]:
    return await start_many(state.engine, [(ids, params) for ids in prompt_ids], state.metrics)


def check_single_choice(req: Any) -> None:
    """The native endpoints answer one completion per prompt (as llama-server); `n` is an
    OpenAI-endpoint feature here, so n > 1 is refused rather than silently ignored."""
    if req.n != 1:
        raise bad_request("n > 1 is supported on /v1/completions and /v1/chat/completions only", "n")


async def native_response(
    request: Request, state: ServerState, prompt_ids: list[list[int]], prepared: PreparedParams, return_tokens: bool
):
    tokenizer = state.engine.tokenizer
    if prepared.stream and len(prompt_ids) > 1:
        raise bad_request("streaming supports one prompt per request", "prompt")
    gens = await start_all(state, prompt_ids, prepared.generation)
    if not prepared.stream:
        completions = await asyncio.gather(*(collect(g, request) for g in gens))
        results = [
            formatting.native_final(
                c, state.model_name, prepared.settings_json, tokenizer,
                stream=False, return_tokens=return_tokens, n_probs=prepared.n_probs, index=i,
            )
            for i, c in enumerate(completions)
        ]
        return JSONResponse(results[0] if len(results) == 1 else results)

    gen = gens[0]

    async def events():
        async for out in gen:
            if out.new_text or out.new_token_ids:
                yield formatting.native_partial(
                    out, gen.completion, tokenizer, return_tokens=return_tokens, n_probs=prepared.n_probs
                )
        yield formatting.native_final(
            gen.completion, state.model_name, prepared.settings_json, tokenizer,
            stream=True, return_tokens=return_tokens, n_probs=prepared.n_probs,
        )

    return sse_response(
        events(), gen, ping_seconds=state.settings.sse_ping_seconds,
        send_timeout=state.settings.timeout, done_marker=False,
    )


@router.post("/completion")
@router.post("/completions")
async def completion(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, CompletionRequest)
    check_single_choice(req)
    prepared = await prepare(state, req)
    prompt_ids = await tokenize_prompts(state, req.prompt)
    return await native_response(request, state, prompt_ids, prepared, req.return_tokens)


@router.post("/infill")
async def infill(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, InfillRequest)
    check_single_choice(req)
    prepared = await prepare(state, req)
    tokenizer = state.engine.tokenizer
    settings = state.settings

    def work() -> list[int]:
        prompt_pieces = prompts.split_prompts(req.prompt) if req.prompt not in ("", None) else [[]]
        if len(prompt_pieces) != 1:
            raise bad_request("/infill takes one prompt", "prompt")
        prompt_ids = prompts.tokenize_pieces(tokenizer, prompt_pieces[0], add_special=False)
        ids = prompts.infill_tokens(
            tokenizer, req.input_prefix, req.input_suffix, req.input_extra, prompt_ids,
            n_batch=settings.batch_size, n_ctx=state.n_ctx_slot, n_predict=resolve_n_predict(req, settings),
        )
        prompts.check_fits(ids, state.n_ctx_slot)
        return ids

    ids = await run_in_threadpool(work)
    return await native_response(request, state, [ids], prepared, req.return_tokens)

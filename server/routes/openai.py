"""OpenAI-compatible generation: POST /v1/chat/completions (+ /chat/completions) and
POST /v1/completions.

Owns: chat message rendering through the chat template (tools passed to it), OpenAI logprobs
options, and the OpenAI objects: `chat.completion` / `text_completion`, and their streams —
first delta carries the role, content deltas, a final chunk with finish_reason, a usage chunk
with empty choices only when stream_options.include_usage, then `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from server import engine_api, formatting, prompts, tool_calls
from server.app import ServerState, ready_state
from server.errors import bad_request
from server.generation import Generation, collect
from server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from server.routes.completion import prepare, start_all, tokenize_prompts
from server.streaming import sse_response

router = APIRouter()
DEFAULT_TOP_LOGPROBS = 20  # llama-server's n_probs when logprobs is true and top_logprobs absent


def _trim_top(entries: list[dict], top_n: int) -> list[dict]:
    for e in entries:
        e["top_logprobs"] = e["top_logprobs"][:top_n]
    return entries


def _stream_args(state: ServerState) -> dict:
    return {"ping_seconds": state.settings.sse_ping_seconds, "send_timeout": state.settings.timeout}


@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat_completions(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, ChatCompletionRequest)
    if req.logprobs:
        top_n = req.top_logprobs if req.top_logprobs is not None else DEFAULT_TOP_LOGPROBS
        # the engine reports the chosen token's logprob only with n_probs >= 1
        prepared = prepare(state, req, n_probs=max(top_n, 1))
    else:  # llama.cpp's own n_probs field works here too
        prepared = prepare(state, req)
        top_n = prepared.n_probs
    want_logprobs = prepared.n_probs > 0
    tokenizer = state.engine.tokenizer
    extra = dict(req.chat_template_kwargs or {})

    def work() -> list[int]:
        text = prompts.render_chat(state.chat_template, req.messages, req.tools, req.add_generation_prompt, extra)
        ids = prompts.tokenize_chat_prompt(tokenizer, text)
        prompts.check_fits(ids, state.n_ctx_slot)
        return ids

    ids = await run_in_threadpool(work)
    gen = await Generation.start(state.engine, ids, prepared.generation, state.metrics)
    oai_id = formatting.new_oai_id("chatcmpl")
    model = state.model_name

    if not prepared.stream:
        c = await collect(gen, request)
        message = tool_calls.parse_reply(c.content, req.tools)
        body = formatting.chat_final(c, oai_id, model, tokenizer, prepared.n_probs, message)
        if want_logprobs:
            _trim_top(body["choices"][0]["logprobs"]["content"], top_n)
        return JSONResponse(body)

    created = int(time.time())
    parser = tool_calls.StreamingReplyParser(req.tools)

    async def events():
        yield formatting.chat_chunk(oai_id, model, created, {"role": "assistant", "content": ""})
        async for out in gen:
            deltas = parser.feed(out.new_text or "")
            logprobs = None
            if want_logprobs and out.new_token_ids:
                logprobs = _trim_top(
                    formatting.probs_json(tokenizer, engine_api.read_logprobs(out.logprobs)), top_n
                )
                if not deltas:
                    deltas = [{"content": ""}]
            for i, delta in enumerate(deltas):
                last = i == len(deltas) - 1
                yield formatting.chat_chunk(oai_id, model, created, delta, logprobs=logprobs if last else None)
        for delta in parser.finish():
            yield formatting.chat_chunk(oai_id, model, created, delta)
        c = gen.completion
        finish_reason = c.oai_finish_reason
        final = formatting.chat_chunk(oai_id, model, created, {}, finish_reason=finish_reason)
        if not prepared.include_usage:
            final["timings"] = formatting.timings_json(c.timings)
            yield final
            return
        yield final
        usage_chunk = formatting.chat_chunk(oai_id, model, created, None)
        usage_chunk["usage"] = formatting.usage_json(c)
        usage_chunk["timings"] = formatting.timings_json(c.timings)
        yield usage_chunk

    return sse_response(events(), gen, done_marker=True, **_stream_args(state))


@router.post("/v1/completions")
async def legacy_completions(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, CompletionRequest)
    n_probs = req.logprobs if req.logprobs is not None else None
    prepared = prepare(state, req, n_probs=n_probs)
    prompt_ids = await tokenize_prompts(state, req.prompt)
    tokenizer = state.engine.tokenizer
    oai_id = formatting.new_oai_id("cmpl")
    model = state.model_name
    created = int(time.time())

    if prepared.stream and len(prompt_ids) > 1:
        raise bad_request("streaming supports one prompt per request", "prompt")
    gens = await start_all(state, prompt_ids, prepared.generation)

    if not prepared.stream:
        completions = await asyncio.gather(*(collect(g, request) for g in gens))
        choices = [
            formatting.text_choice(
                i, c.content, c.oai_finish_reason,
                formatting.legacy_logprobs_json(tokenizer, c.logprobs) if prepared.n_probs > 0 else None,
            )
            for i, c in enumerate(completions)
        ]
        usage = {
            "completion_tokens": sum(len(c.token_ids) for c in completions),
            "prompt_tokens": sum(c.n_prompt_tokens for c in completions),
            "prompt_tokens_details": {"cached_tokens": sum(c.n_cached_prompt_tokens for c in completions)},
        }
        usage["total_tokens"] = usage["completion_tokens"] + usage["prompt_tokens"]
        timings = formatting.timings_json(completions[0].timings) if len(completions) == 1 else None
        return JSONResponse(formatting.text_completion(oai_id, model, created, choices, usage, timings))

    gen: Generation = gens[0]

    async def events():
        text_offset = 0
        async for out in gen:
            if not (out.new_text or out.new_token_ids):
                continue
            logprobs = None
            if prepared.n_probs > 0:
                logprobs = formatting.legacy_logprobs_json(
                    tokenizer, engine_api.read_logprobs(out.logprobs), text_offset
                )
            text_offset += len(out.new_text or "")
            yield formatting.text_completion(
                oai_id, model, created, [formatting.text_choice(0, out.new_text or "", None, logprobs)]
            )
        c = gen.completion
        timings = formatting.timings_json(c.timings)
        final_choice = formatting.text_choice(0, "", c.oai_finish_reason)
        if prepared.include_usage:
            yield formatting.text_completion(oai_id, model, created, [final_choice])
            yield formatting.text_completion(oai_id, model, created, [], formatting.usage_json(c), timings)
        else:
            yield formatting.text_completion(oai_id, model, created, [final_choice], None, timings)

    return sse_response(events(), gen, done_marker=True, **_stream_args(state))

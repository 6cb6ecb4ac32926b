"""OpenAI-compatible generation: POST /v1/chat/completions (+ /chat/completions) and
POST /v1/completions.

Owns: chat message rendering through the chat template (tools passed to it unless
tool_choice is "none"), tool calls in the reply (server/chat/tool_calls.py, tool_choice.py), OpenAI
logprobs options, `n` choices (n engine requests with the same prompt, choice i seeded with
seed + i), and the OpenAI objects: `chat.completion` / `text_completion`, and their streams —
a role delta per choice, content / tool_call deltas carrying their choice's `index` as they
arrive, a finish chunk per choice, a usage chunk with empty choices only when
stream_options.include_usage (all choices' completion tokens, the prompt counted once), then
`data: [DONE]`.
"""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ggserve.server import engine_api, formatting
from ggserve.server.chat import prompts, tool_calls, tool_choice
from ggserve.server.state import ServerState, ready_state
from ggserve.server.errors import bad_request
from ggserve.server.generation import Generation, collect_all, merge, start_many
from ggserve.server.params import PreparedParams, choice_params, grammar_limits, resolve_grammar, with_grammar
from ggserve.server.protocol import ChatCompletionRequest, CompletionRequest, parse_body
from ggserve.server.routes.completion import check_prompt_count, prepare, tokenize_prompts
from ggserve.server.streaming import sse_response

router = APIRouter()
DEFAULT_TOP_LOGPROBS = 20  # llama-server's n_probs when logprobs is true and top_logprobs absent


def _trim_top(entries: list[dict], top_n: int) -> list[dict]:
    for e in entries:
        e["top_logprobs"] = e["top_logprobs"][:top_n]
    return entries


def _stream_args(state: ServerState) -> dict:
    return {"ping_seconds": state.settings.sse_ping_seconds, "send_timeout": state.settings.timeout}


async def start_choices(
    state: ServerState, prompt_ids: list[list[int]], prepared: PreparedParams, n: int
) -> list[Generation]:
    """n generations per prompt, prompt-major (choice index = prompt * n + j)."""
    jobs = [(ids, choice_params(prepared.generation, j)) for ids in prompt_ids for j in range(n)]
    return await start_many(state.engine, jobs, state.metrics)


def _chat_plan(state: ServerState, req: ChatCompletionRequest) -> tool_choice.ToolPlan:
    grammar, schema = resolve_grammar(req)
    return tool_choice.resolve_tools(
        req.tools, req.tool_choice, req.parallel_tool_calls, getattr(state.chat_template, "source", None),
        has_user_constraint=grammar is not None or schema is not None, limits=grammar_limits(state.settings),
    )


@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat_completions(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, ChatCompletionRequest)
    check_prompt_count(state, req.n)
    if req.logprobs:
        top_n = req.top_logprobs if req.top_logprobs is not None else DEFAULT_TOP_LOGPROBS
        # the engine reports the chosen token's logprob only with n_probs >= 1
        prepared = await prepare(state, req, n_probs=max(top_n, 1))
    else:  # llama.cpp's own n_probs field works here too
        prepared = await prepare(state, req)
        top_n = prepared.n_probs

    def constrain() -> tuple[tool_choice.ToolPlan, PreparedParams]:  # tool schemas -> a grammar: not on the loop
        plan = _chat_plan(state, req)
        return plan, with_grammar(prepared, plan.grammar) if plan.grammar is not None else prepared

    plan, prepared = await run_in_threadpool(constrain)
    tokenizer = state.engine.tokenizer
    extra = dict(req.chat_template_kwargs or {})

    def work() -> list[int]:
        text = prompts.render_chat(
            state.chat_template, req.messages, plan.template_tools, req.add_generation_prompt, extra
        )
        ids = prompts.tokenize_chat_prompt(tokenizer, text)
        prompts.check_fits(ids, state.n_ctx_slot)
        return ids

    ids = await run_in_threadpool(work)
    gens = await start_choices(state, [ids], prepared, req.n)
    oai_id = formatting.new_oai_id("chatcmpl")

    if not prepared.stream:
        completions = await collect_all(gens, request)
        choices = []
        for i, c in enumerate(completions):
            message = tool_calls.parse_reply(c.content, plan.parsing)
            choice = formatting.chat_choice(i, c, message, tokenizer, prepared.n_probs)
            if choice["logprobs"] is not None:
                _trim_top(choice["logprobs"]["content"], top_n)
            choices.append(choice)
        return JSONResponse(formatting.chat_completion(oai_id, state.model_name, choices, completions))

    events = _chat_events(state, gens, prepared, plan.parsing, oai_id, top_n)
    return sse_response(events, gens, done_marker=True, **_stream_args(state))


async def _chat_events(
    state: ServerState, gens: list[Generation], prepared: PreparedParams, parsing: tool_calls.ToolParsing,
    oai_id: str, top_n: int,
):
    model, tokenizer = state.model_name, state.engine.tokenizer
    created = int(time.time())
    want_logprobs = prepared.n_probs > 0
    parsers = [tool_calls.StreamingReplyParser(parsing) for _ in gens]

    def chunk(index: int, delta: dict | None, **kwargs) -> dict:
        return formatting.chat_chunk(oai_id, model, created, delta, index=index, **kwargs)

    for index in range(len(gens)):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for index, out in merge(gens):
        parser = parsers[index]
        if out is None:  # this choice is done: flush held-back text, then its finish chunk
            for delta in parser.finish():
                yield chunk(index, delta)
            c = gens[index].completion
            final = chunk(index, {}, finish_reason=formatting.chat_finish_reason(c, parser.has_tool_calls))
            if not prepared.include_usage:
                final["timings"] = formatting.timings_json(c.timings)
            yield final
            continue
        deltas = parser.feed(out.new_text or "")
        logprobs = None
        if want_logprobs and out.new_token_ids:
            logprobs = _trim_top(formatting.probs_json(tokenizer, engine_api.read_logprobs(out.logprobs)), top_n)
            if not deltas:
                deltas = [{"content": ""}]
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            yield chunk(index, delta, logprobs=logprobs if last else None)
    if prepared.include_usage:
        completions = [g.completion for g in gens]
        usage_chunk = chunk(0, None)
        usage_chunk["usage"] = formatting.usage_json_many(completions, len(completions))
        usage_chunk["timings"] = formatting.timings_json(completions[0].timings)
        yield usage_chunk


@router.post("/v1/completions")
async def legacy_completions(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, CompletionRequest)
    n_probs = req.logprobs if req.logprobs is not None else None
    prepared = await prepare(state, req, n_probs=n_probs)
    prompt_ids = await tokenize_prompts(state, req.prompt, req.n)
    tokenizer = state.engine.tokenizer
    oai_id = formatting.new_oai_id("cmpl")
    model = state.model_name
    created = int(time.time())

    if prepared.stream and len(prompt_ids) > 1:
        raise bad_request("streaming supports one prompt per request", "prompt")
    gens = await start_choices(state, prompt_ids, prepared, req.n)

    if not prepared.stream:
        completions = await collect_all(gens, request)
        choices = [
            formatting.text_choice(
                i, c.content, c.oai_finish_reason,
                formatting.legacy_logprobs_json(tokenizer, c.logprobs) if prepared.n_probs > 0 else None,
            )
            for i, c in enumerate(completions)
        ]
        usage = formatting.usage_json_many(completions, req.n)
        timings = formatting.timings_json(completions[0].timings) if len(completions) == 1 else None
        return JSONResponse(formatting.text_completion(oai_id, model, created, choices, usage, timings))

    async def events():
        text_offsets = [0] * len(gens)
        async for index, out in merge(gens):
            if out is None:  # this choice is done
                c = gens[index].completion
                final = [formatting.text_choice(index, "", c.oai_finish_reason)]
                timings = None if prepared.include_usage else formatting.timings_json(c.timings)
                yield formatting.text_completion(oai_id, model, created, final, None, timings)
                continue
            if not (out.new_text or out.new_token_ids):
                continue
            logprobs = None
            if prepared.n_probs > 0:
                logprobs = formatting.legacy_logprobs_json(
                    tokenizer, engine_api.read_logprobs(out.logprobs), text_offsets[index]
                )
            text_offsets[index] += len(out.new_text or "")
            yield formatting.text_completion(
                oai_id, model, created, [formatting.text_choice(index, out.new_text or "", None, logprobs)]
            )
        if prepared.include_usage:
            completions = [g.completion for g in gens]
            usage = formatting.usage_json_many(completions, len(completions))
            yield formatting.text_completion(
                oai_id, model, created, [], usage, formatting.timings_json(completions[0].timings)
            )

    return sse_response(events(), gens, done_marker=True, **_stream_args(state))

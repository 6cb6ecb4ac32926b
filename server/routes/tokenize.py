"""POST /tokenize, /detokenize and /apply-template (llama-server's tokenizer utilities).

Owns: their request defaults (tokenize: add_special=false, parse_special=true) and response
shapes: {"tokens": [ids]} or, with_pieces, [{"id", "piece"}] where a piece that is not valid
UTF-8 on its own is given as a list of byte values; {"content": text}; {"prompt": text}.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ggserve.server.chat import prompts
from ggserve.server.state import ServerState, ready_state
from ggserve.server.protocol import ApplyTemplateRequest, DetokenizeRequest, TokenizeRequest, parse_body

router = APIRouter()


def _piece(tokenizer, token_id: int):
    raw = tokenizer.token_to_piece(token_id, special=True)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


@router.post("/tokenize")
async def tokenize(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, TokenizeRequest)
    tokenizer = state.engine.tokenizer
    ids = await run_in_threadpool(
        tokenizer.encode, req.content, add_special=req.add_special, parse_special=req.parse_special
    )
    if req.with_pieces:
        return {"tokens": [{"id": t, "piece": _piece(tokenizer, t)} for t in ids]}
    return {"tokens": ids}


@router.post("/detokenize")
async def detokenize(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, DetokenizeRequest)
    tokenizer = state.engine.tokenizer
    prompts.validate_token_ids(req.tokens, tokenizer.n_vocab, param="tokens")
    return {"content": tokenizer.decode(req.tokens, special=True)}


@router.post("/apply-template")
async def apply_template(request: Request, state: ServerState = Depends(ready_state)):
    req = await parse_body(request, ApplyTemplateRequest)
    extra = dict(req.chat_template_kwargs or {})
    text = await run_in_threadpool(
        prompts.render_chat, state.chat_template, req.messages, req.tools, req.add_generation_prompt, extra
    )
    return {"prompt": text}

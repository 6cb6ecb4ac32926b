"""Server information: GET /health, GET /v1/models (+ /models), GET/POST /props, GET /slots,
GET /metrics.

Owns: readiness reporting (503 "Loading model" until the engine is up), the model list, the
properties llama.cpp's web UI and tools read (default_generation_settings, total_slots,
chat_template, model_path, n_ctx, build_info), per-slot status, and Prometheus exposition.
/health and /v1/models are public; the rest require the API key when one is set.
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from ggserve.server import engine_api, formatting
from ggserve.server.state import ServerState, ready_state
from ggserve.server.errors import APIError
from ggserve.server.metrics import CONTENT_TYPE
from ggserve.server.protocol import PropsUpdate, SamplingFields, parse_body, validate_model

public = APIRouter()
protected = APIRouter()

BUILD_INFO = formatting.SYSTEM_FINGERPRINT
WRITABLE_DEFAULTS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")


@public.get("/health")
@public.get("/v1/health")
async def health(request: Request):
    ready_state(request)  # raises 503 "Loading model" / 500 load failure
    return {"status": "ok"}


@public.get("/v1/models")
@public.get("/models")
async def models(request: Request):
    state: ServerState = request.app.state.ggserve
    meta = None
    if state.ready:
        info = state.engine.model_info
        meta = {
            "vocab_type": getattr(state.engine.tokenizer, "vocab_type", None),
            "n_vocab": info.n_vocab,
            "n_ctx_train": info.n_ctx_train,
            "n_embd": info.n_embd,
            "n_params": info.n_params,
            "size": info.size_bytes,
        }
    name = state.model_name if state.ready else state.settings.model_name()
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": int(state.started_at), "owned_by": "ggserve", "meta": meta}
        ],
    }


def default_generation_settings(state: ServerState) -> dict:
    s = state.settings
    params = {
        "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p,
        "repeat_penalty": s.repeat_penalty, "seed": s.seed, "n_predict": s.n_predict,
        "max_tokens": s.n_predict, "stop": [], "n_probs": 0, "stream": False, "cache_prompt": True,
    }
    params.update(state.default_sampling)
    return {"id": 0, "id_task": -1, "n_ctx": state.n_ctx_slot, "is_processing": False, "params": params}


@protected.get("/props")
async def props(state: ServerState = Depends(ready_state)):
    tokenizer = state.engine.tokenizer
    info = state.engine.model_info

    def token_text(token_id):
        return tokenizer.token_text(token_id) if token_id is not None else ""

    return {
        "default_generation_settings": default_generation_settings(state),
        "total_slots": state.n_slots,
        "model_alias": state.model_name,
        "model_path": str(info.path),
        "n_ctx": state.n_ctx_slot,
        "n_ctx_train": info.n_ctx_train,
        "chat_template": getattr(state.chat_template, "source", None) or info.chat_template_source or "",
        "bos_token": token_text(tokenizer.bos_id),
        "eos_token": token_text(tokenizer.eos_id),
        "modalities": {"vision": False, "audio": False},
        "build_info": BUILD_INFO,
        "webui": state.settings.webui,
        "endpoint_slots": state.settings.endpoint_slots,
        "endpoint_metrics": state.settings.endpoint_metrics,
        "endpoint_props": state.settings.endpoint_props,
        "embeddings": state.settings.embeddings,
    }


@protected.post("/props")
async def set_props(request: Request, state: ServerState = Depends(ready_state)):
    """llama-server's POST /props, off unless --props: it changes every later request's defaults,
    so its values pass the same bounds as a request's own fields, and the engine's checks."""
    if not state.settings.endpoint_props:
        raise APIError(501, "This server does not support changing global properties. Start it with `--props`")
    req = await parse_body(request, PropsUpdate)
    updates = req.default_generation_settings or {}
    params = updates.get("params", updates) if isinstance(updates, dict) else {}
    if not isinstance(params, dict):
        raise APIError(400, "default_generation_settings.params must be an object", param="default_generation_settings")
    given = {key: params[key] for key in WRITABLE_DEFAULTS if key in params}
    checked = validate_model(SamplingFields, given, prefix="default_generation_settings.params")
    values = {key: getattr(checked, key) for key in given}
    try:
        engine_api.make_sampling_params(**values)
    except ValueError as exc:
        raise APIError(400, f"default_generation_settings.params: {exc}", param="default_generation_settings") from None
    state.default_sampling.update(values)
    return {"success": True}


@protected.get("/slots")
async def slots(request: Request, state: ServerState = Depends(ready_state)):
    if not state.settings.endpoint_slots:
        raise APIError(501, "This server does not support slots endpoint. Start it with `--slots`")
    stats = engine_api.read_stats(state.engine)
    base = default_generation_settings(state)["params"]
    by_id = {s.id: s for s in stats.slots}
    result = []
    for slot_id in range(state.n_slots):
        s = by_id.get(slot_id)
        result.append({
            "id": slot_id,
            "id_task": (s.id_task if s is not None else "") or -1,
            "n_ctx": state.n_ctx_slot,
            "speculative": False,
            "is_processing": s.is_processing if s is not None else False,
            "n_cached_tokens": s.n_past if s is not None else 0,
            "params": base,
        })
    fail_on_no_slot = request.query_params.get("fail_on_no_slot", "").lower() in ("1", "true")
    if fail_on_no_slot and all(s["is_processing"] for s in result):
        raise APIError(503, "no slot available", headers={"Retry-After": "1"})
    return result


@protected.get("/metrics")
async def metrics(request: Request):
    state: ServerState = request.app.state.ggserve
    if not state.settings.endpoint_metrics:
        raise APIError(501, "This server does not support metrics endpoint. Start it with `--metrics`")
    # llama-server's header: when the counters started (its clients compute rates from it)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE,
                    headers={"Process-Start-Time-Unix": str(int(state.started_at))})

"""API-key check for every non-public endpoint (llama-server's --api-key).

Owns: reading the key from `Authorization: Bearer KEY` or `X-Api-Key: KEY`, and comparing it
with every configured key in constant time (hmac.compare_digest). Public endpoints (/health,
/v1/models, the web UI) simply do not depend on `require_api_key`.
"""
from __future__ import annotations

import hmac

from fastapi import Request

from ggserve.server.errors import APIError


def supplied_key(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


def key_matches(supplied: str, keys: tuple[str, ...]) -> bool:
    supplied_bytes = supplied.encode("utf-8")
    matched = False
    for key in keys:  # no early exit: the time taken does not depend on which key matched
        matched |= hmac.compare_digest(supplied_bytes, key.encode("utf-8"))
    return matched


async def require_api_key(request: Request) -> None:
    keys = request.app.state.ggserve.settings.api_keys
    if not keys:
        return
    supplied = supplied_key(request)
    if supplied is None or not key_matches(supplied, keys):
        raise APIError(
            401, "Invalid API Key", type="authentication_error", headers={"WWW-Authenticate": "Bearer"}
        )

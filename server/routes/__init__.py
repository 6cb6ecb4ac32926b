"""HTTP routes, one module per API family; `register_routes` mounts them with the right auth."""
from __future__ import annotations

from fastapi import Depends, FastAPI

from ggserve.server.auth import require_api_key
from ggserve.server.routes import completion, embeddings, info, openai, slot_files, tokenize, webui
from ggserve.server.settings import ServerSettings


def register_routes(app: FastAPI, settings: ServerSettings) -> None:
    app.include_router(info.public)
    if settings.webui:
        app.include_router(webui.router)
    auth = [Depends(require_api_key)]
    for router in (info.protected, completion.router, openai.router, tokenize.router, embeddings.router,
                   slot_files.router):
        app.include_router(router, dependencies=auth)

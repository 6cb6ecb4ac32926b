"""GET / : the self-contained chat page (server/static/index.html), unless --no-webui."""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@router.get("/", include_in_schema=False)
@router.get("/index.html", include_in_schema=False)
async def index() -> HTMLResponse:
    page = resources.files("ggserve.server").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

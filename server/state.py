"""What every route shares: `ServerState` (settings, the engine once loaded, chat template,
per-slot context, metrics, drain state) and `ready_state`, the dependency every model-backed
route uses to get the loaded state (or a 503 while loading, a 500 if loading failed).

It sits below both `app.py` (which fills it in) and `routes/` (which read it), so neither
imports the other.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from ggserve.server.errors import APIError
from ggserve.server.metrics import ServerMetrics
from ggserve.server.settings import ServerSettings
from ggserve.server.shutdown import DrainState


@dataclass
class ServerState:
    settings: ServerSettings
    engine: Any = None
    chat_template: Any = None
    n_ctx_slot: int = 0
    model_name: str = "ggserve"
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)
    default_sampling: dict[str, Any] = field(default_factory=dict)  # POST /props can change these
    metrics: ServerMetrics | None = None
    drain: DrainState = field(default_factory=DrainState)  # SIGTERM handling (server/shutdown.py)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.chat_template is not None

    def abort_running(self) -> int:
        """Abort every running generation (a shutdown out of time); returns how many."""
        return self.engine.abort_running() if self.engine is not None else 0

    @property
    def n_slots(self) -> int:
        return int(getattr(self.engine.config, "n_slots", self.settings.n_parallel))


def ready_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.ggserve
    if state.load_error is not None:
        raise APIError(500, f"model failed to load: {state.load_error}")
    if state.engine is not None and getattr(state.engine, "is_dead", False):
        reason = getattr(state.engine, "failure", None) or "unknown error"
        raise APIError(503, f"the engine stopped: {reason}", type="unavailable_error")
    if not state.ready:
        raise APIError(503, "Loading model", type="unavailable_error", headers={"Retry-After": "1"})
    return state

"""POST /slots/{id_slot}?action=save|restore|erase: a slot's KV cache to / from a file.

Owns: the confinement of file names to --slot-save-path (no absolute paths, no `..`, no
symlink that resolves outside the directory -> 400) and llama-server's response shapes.
The engine does the work: `engine.save_slot(slot_id, path) -> n_tokens`,
`engine.restore_slot(slot_id, path) -> n_tokens`, `engine.erase_slot(slot_id) -> n_tokens`.
"""
from __future__ import annotations

import time
from pathlib import Path, PurePosixPath, PureWindowsPath

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from ggserve.server.state import ServerState, ready_state
from ggserve.server.errors import APIError, bad_request
from ggserve.server.protocol import SlotActionRequest, parse_body

router = APIRouter()


def confined_path(base_dir: str, filename: str | None) -> Path:
    """`filename` inside `base_dir`, or a 400 if it could point anywhere else."""
    if not filename or "\x00" in filename:
        raise bad_request("filename is required", "filename")
    if PurePosixPath(filename).is_absolute() or PureWindowsPath(filename).is_absolute() or PureWindowsPath(filename).drive:
        raise bad_request("filename must be relative to the slot save directory", "filename")
    parts = PurePosixPath(filename.replace("\\", "/")).parts
    if any(p == ".." for p in parts):
        raise bad_request("filename must not contain '..'", "filename")
    base = Path(base_dir).resolve()
    try:
        target = (base / filename).resolve()  # follows symlinks, so a link out of base is caught
    except (OSError, RuntimeError) as exc:  # a name too long for the file system, a symlink loop
        raise bad_request(f"filename is not usable: {exc}", "filename") from None
    if target != base and base not in target.parents:
        raise bad_request("filename resolves outside the slot save directory", "filename")
    if target == base:
        raise bad_request("filename must name a file", "filename")
    return target


def _engine_method(state: ServerState, name: str):
    method = getattr(state.engine, name, None)
    if method is None:
        raise APIError(501, f"this engine build does not support slot {name.split('_')[0]}")

    def call(*args):
        try:
            return method(*args)
        except ValueError as exc:  # busy slot, unreadable or mismatched file: the client's to fix
            raise bad_request(str(exc), "id_slot") from None
        except OSError as exc:  # the name or the directory is not writable / readable as asked
            raise bad_request(f"slot file: {exc.strerror or exc}", "filename") from None

    return call


@router.post("/slots/{id_slot}")
async def slot_action(id_slot: int, request: Request, state: ServerState = Depends(ready_state)):
    action = request.query_params.get("action", "")
    if action not in ("save", "restore", "erase"):
        raise bad_request("action must be one of save, restore, erase", "action")
    if not 0 <= id_slot < state.n_slots:
        raise bad_request(f"slot {id_slot} does not exist (the server has {state.n_slots} slots)", "id_slot")
    if action == "erase":
        n_erased = await run_in_threadpool(_engine_method(state, "erase_slot"), id_slot)
        return {"id_slot": id_slot, "n_erased": int(n_erased or 0)}

    save_dir = state.settings.slot_save_path
    if not save_dir:
        raise APIError(501, "This server does not support slots action. Start it with `--slot-save-path`")
    req = await parse_body(request, SlotActionRequest)
    path = confined_path(save_dir, req.filename)
    t0 = time.perf_counter()
    if action == "save":
        n_saved = await run_in_threadpool(_engine_method(state, "save_slot"), id_slot, path)
        return {
            "id_slot": id_slot, "filename": req.filename, "n_saved": int(n_saved or 0),
            "n_written": path.stat().st_size if path.exists() else 0,
            "timings": {"save_ms": (time.perf_counter() - t0) * 1e3},
        }
    if not path.is_file():
        raise bad_request(f"no saved slot file named {req.filename!r}", "filename")
    n_restored = await run_in_threadpool(_engine_method(state, "restore_slot"), id_slot, path)
    return {
        "id_slot": id_slot, "filename": req.filename, "n_restored": int(n_restored or 0),
        "n_read": path.stat().st_size, "timings": {"restore_ms": (time.perf_counter() - t0) * 1e3},
    }

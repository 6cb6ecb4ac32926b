"""`python -m tests.server.fake_server [ggserve flags]`: the real `ggserve` process over the fake engine.

Runs `ggserve.server.cli.serve.main(argv)` (flag parsing, logging setup, uvicorn, signal handling, the
lifespan that loads, warms up and shuts down the engine) with `build_engine` replaced by a
FakeEngine, so tests can exercise the whole process (SIGTERM, logs, a browser) in a second.
`-m` must still name an existing file (its contents are not read). Environment:
FAKE_TOKEN_DELAY (seconds per token, default 0.02), FAKE_REPLY (the reply text),
FAKE_LOAD_SECONDS (how long "loading the model" takes, default 0).
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx

from ggserve.server import app as server_app
from ggserve.server.cli import serve as cli_serve
from tests.server.fake_engine import FakeEngine
from tests.testdata import REPO_ROOT as REPO

log = logging.getLogger("ggserve.fake")


class FakeServingEngine(FakeEngine):
    """FakeEngine with the lifecycle the lifespan drives (start / shutdown), logged so tests
    can see the shutdown happen."""

    def start(self) -> None:
        log.info("fake engine started")
        self.died_at = time.monotonic() + float(os.environ.get("FAKE_DIE_AFTER_SECONDS", "inf"))

    @property
    def is_dead(self) -> bool:  # the real AsyncEngine's: its thread stopped on its own
        return time.monotonic() >= self.died_at

    @property
    def failure(self) -> str | None:
        return "fake engine thread crashed" if self.is_dead else None

    def prepare(self, prompt_ids, params, request_id=None):
        trigger = os.environ.get("FAKE_RAISE_ON_PROMPT")  # an engine bug, on demand
        if trigger and trigger in self.tokenizer.decode(prompt_ids):
            raise RuntimeError("fake engine bug")
        return super().prepare(prompt_ids, params, request_id)

    def shutdown(self, drain: bool = False, timeout: float | None = None) -> bool:
        log.info("fake engine shut down")
        return True


def build_fake_engine(settings) -> FakeServingEngine:
    time.sleep(float(os.environ.get("FAKE_LOAD_SECONDS", "0")))  # runs in the loader's thread
    kwargs = {"token_delay": float(os.environ.get("FAKE_TOKEN_DELAY", "0.02")), "n_slots": settings.n_parallel}
    if "FAKE_REPLY" in os.environ:
        kwargs["reply"] = os.environ["FAKE_REPLY"]
    return FakeServingEngine(**kwargs)


# ---- for tests: start one as a subprocess --------------------------------------------------------



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextmanager
def fake_server_process(tmp_path: Path, *flags: str, env: dict[str, str] | None = None,
                        startup_timeout: float = 60.0, wait_ready: bool = True) -> Iterator[ServerProcess]:
    """Start `python -m tests.server.fake_server` on a free port, wait until /health is 200 (or, without
    `wait_ready`, until it answers at all), and kill it at the end if the test has not stopped
    it. stdout+stderr go to tmp_path/server.log."""
    model = tmp_path / "fake-model.gguf"
    model.write_bytes(b"not read")
    port = free_port()
    log_path = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "tests.server.fake_server", "-m", str(model), "--port", str(port), *flags]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"fake server exited with {proc.returncode}:\n{server.log_text()[-3000:]}")
            try:
                status = httpx.get(f"{server.url}/health", timeout=2).status_code
                if status == 200 or not wait_ready:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake server not ready after {startup_timeout}s:\n{server.log_text()[-3000:]}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


if __name__ == "__main__":
    server_app.build_engine = build_fake_engine
    sys.exit(cli_serve.main(sys.argv[1:]))

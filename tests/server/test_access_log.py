"""The access log (one line per request, with token counts, logged when a stream ends) and the
log formats: concise text by default, one JSON object per line with --log-format json, DEBUG
lines only with --verbose."""
from __future__ import annotations

import io
import json
import logging
import signal

import pytest

from ggserve.server.logging_setup import configure_logging
from tests.server.fake_engine import FakeEngine
from tests.server.fake_server import fake_server_process
from tests.server.helpers import CHAT, fake_client, sse_json

REPLY = "Hello world! I am a fake model."  # FakeEngine's default: one token per byte


def _access(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ggserve.access"]


@pytest.fixture
def restore_logging():
    """configure_logging rewires the root logger; put it back for the next tests."""
    names = ["", "numba", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"]
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    yield
    for n, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(n)
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate
    logging.captureWarnings(False)


# ---- in process: the fields of each access line -------------------------------------------------


def test_generation_request_logs_status_tokens_and_duration(caplog):
    caplog.set_level(logging.DEBUG, logger="ggserve.access")
    with fake_client() as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT})
        n_prompt = len(client.engine.requests[0].prompt_ids)
    assert r.status_code == 200
    (record,) = _access(caplog)
    fields = record.fields
    assert (fields["method"], fields["path"], fields["status"]) == ("POST", "/v1/chat/completions", 200)
    assert fields["prompt_tokens"] == n_prompt and fields["predicted_tokens"] == len(REPLY)
    assert r.json()["usage"]["completion_tokens"] == fields["predicted_tokens"]
    assert fields["duration_ms"] > 0 and fields["client"] == "testclient"
    assert record.levelno == logging.INFO
    msg = record.getMessage()
    assert msg.startswith("POST /v1/chat/completions 200 ") and f"prompt={n_prompt} predicted={len(REPLY)}" in msg


def test_client_errors_are_logged_without_token_counts(caplog):
    caplog.set_level(logging.DEBUG, logger="ggserve.access")
    with fake_client() as client:
        bad = client.post("/v1/chat/completions", json={"messages": "not a list"})
        missing = client.get("/no/such/path")
        engine_requests = client.engine.requests
    assert bad.status_code == 400 and missing.status_code == 404 and not engine_requests
    lines = {r.fields["path"]: r for r in _access(caplog)}
    assert lines["/v1/chat/completions"].fields["status"] == 400
    assert lines["/no/such/path"].fields["status"] == 404
    for record in lines.values():
        assert "prompt_tokens" not in record.fields and "prompt=" not in record.getMessage()
        assert record.levelno == logging.INFO


def test_auth_failure_is_logged_as_401(caplog):
    caplog.set_level(logging.DEBUG, logger="ggserve.access")
    with fake_client(api_keys=("sekrit",)) as client:
        assert client.post("/completion", json={"prompt": "x"}).status_code == 401
    (record,) = _access(caplog)
    assert record.fields["status"] == 401 and record.fields["path"] == "/completion"


def test_stream_is_logged_when_it_ends_with_its_whole_duration(caplog):
    caplog.set_level(logging.DEBUG, logger="ggserve.access")
    engine = FakeEngine(token_delay=0.01)
    with fake_client(engine) as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    chunks = sse_json(r.text)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    (record,) = _access(caplog)
    assert record.fields["status"] == 200 and record.fields["predicted_tokens"] == len(REPLY)
    assert record.fields["prompt_tokens"] == len(engine.requests[0].prompt_ids)
    # 31 tokens x 10 ms: the line was written after the last token, not when the headers went out
    assert record.fields["duration_ms"] >= len(REPLY) * 10 * 0.9


def test_native_completion_counts_each_prompt(caplog):
    caplog.set_level(logging.DEBUG, logger="ggserve.access")
    with fake_client() as client:
        r = client.post("/completion", json={"prompt": ["ab", "cde"], "n_predict": 4})
    assert r.status_code == 200
    (record,) = _access(caplog)
    # two prompts -> two generations: BOS + bytes each, 4 tokens each
    assert record.fields["prompt_tokens"] == 3 + 4 and record.fields["predicted_tokens"] == 8


def test_health_probes_are_debug_only(caplog):
    caplog.set_level(logging.DEBUG, logger="ggserve.access")
    with fake_client() as client:
        assert client.get("/health").status_code == 200
    (record,) = _access(caplog)
    assert record.levelno == logging.DEBUG and record.fields["path"] == "/health"


# ---- formatters ---------------------------------------------------------------------------------


def test_json_format_every_logger_one_object_per_line(restore_logging):
    out = io.StringIO()
    configure_logging(verbose=False, log_format="json", stream=out)
    logging.getLogger("ggserve.access").info("GET / 200", extra={"fields": {"status": 200, "path": "/"}})
    logging.getLogger("uvicorn.error").warning("uvicorn says %s", "hi")
    logging.getLogger("ggserve.access").debug("hidden without --verbose")
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        logging.getLogger("ggserve.server").exception("failed")
    lines = out.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 3
    assert all({"ts", "level", "msg", "logger"} <= e.keys() for e in entries)
    assert entries[0]["status"] == 200 and entries[0]["path"] == "/" and entries[0]["level"] == "info"
    assert entries[1] == {**entries[1], "logger": "uvicorn.error", "msg": "uvicorn says hi", "level": "warning"}
    assert "RuntimeError: boom" in entries[2]["exc"] and entries[2]["ts"].endswith("Z")


def test_text_format_is_one_concise_line(restore_logging):
    out = io.StringIO()
    configure_logging(verbose=True, log_format="text", stream=out)
    logging.getLogger("ggserve.access").debug("GET /health 200 0.4ms client=1.2.3.4", extra={"fields": {"x": 1}})
    (line,) = out.getvalue().splitlines()
    assert line.endswith(" DEBUG ggserve.access: GET /health 200 0.4ms client=1.2.3.4")
    assert "{" not in line  # fields are in the message already


# ---- the real process (fake engine): what an operator sees on stderr ------------------------------


def _exercise(url: str) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5}).status_code == 200
        assert client.post("/v1/chat/completions", json={"messages": CHAT, "temperature": -3}).status_code == 400
        with client.stream("POST", "/v1/chat/completions", json={"messages": CHAT, "stream": True}) as r:
            body = "".join(r.iter_text())
        assert body.rstrip().endswith("data: [DONE]")


def _stop(server) -> str:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(20) == 0
    return server.log_text()


def test_process_json_logs_parse_and_carry_access_fields(tmp_path):
    with fake_server_process(tmp_path, "--log-format", "json", "-v", env={"FAKE_TOKEN_DELAY": "0"}) as server:
        _exercise(server.url)
        text = _stop(server)
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    loggers = {e["logger"] for e in entries}
    assert {"ggserve.server", "ggserve.access", "uvicorn.error"} <= loggers
    access = [e for e in entries if e["logger"] == "ggserve.access" and e["path"] == "/v1/chat/completions"]
    assert [e["status"] for e in access] == [200, 400, 200]
    assert access[0]["predicted_tokens"] == 5 and access[0]["prompt_tokens"] > 0
    assert "predicted_tokens" not in access[1]
    assert access[2]["predicted_tokens"] == len(REPLY)
    assert all(isinstance(e["duration_ms"], float) for e in access)
    assert any(e["logger"] == "ggserve.access" and e["path"] == "/health" and e["level"] == "debug" for e in entries)


def test_process_text_logs_are_concise_without_verbose(tmp_path):
    with fake_server_process(tmp_path, env={"FAKE_TOKEN_DELAY": "0"}) as server:
        _exercise(server.url)
        text = _stop(server)
    lines = text.splitlines()
    access = [line for line in lines if " ggserve.access: " in line]
    assert len(access) == 3  # the start-up /health polls are DEBUG: not shown
    assert " INFO ggserve.access: POST /v1/chat/completions 200 " in access[0] and "predicted=5" in access[0]
    assert " POST /v1/chat/completions 400 " in access[1] and "predicted=" not in access[1]
    assert f"predicted={len(REPLY)}" in access[2]
    assert not any(" DEBUG " in line for line in lines)
    assert not any(line.lstrip().startswith("{") for line in lines)

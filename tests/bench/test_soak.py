"""bench/soak.py: its client loop for a few seconds against the real server over the fake engine
(tests/server/fake_server.py), and its detectors (LOST, HUNG, STUCK) against a broken fake.

No wall-clock assertions: only that the outcome counts add up and name the right failures.
"""
from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time

import pytest

from ggserve.bench.soak import format_summary, main, passed, soak
from tests.server.fake_server import fake_server_process


def accounted(summary: dict) -> int:
    return (summary["requests_completed"] + summary["disconnected"] + summary["lost"] + summary["hung"]
            + summary["busy_503"] + sum(summary["errors_by_status"].values()))


def test_soak_on_a_healthy_server(tmp_path):
    with fake_server_process(tmp_path, "-np", "4", env={"FAKE_TOKEN_DELAY": "0.01"}) as server:
        summary = asyncio.run(soak(server.url, pid=server.proc.pid, clients=4, duration_s=3, disconnect=0.4,
                                   max_tokens=8, seed=1, request_timeout=30, slot_wait_s=10))
    assert summary["requests_started"] > 0
    assert accounted(summary) == summary["requests_started"]
    assert summary["errors_by_status"] == {} and summary["busy_503"] == 0, summary["problems"]
    assert summary["requests_completed"] + summary["disconnected"] == summary["requests_started"]
    assert summary["lost"] == summary["hung"] == 0, summary["problems"]
    assert summary["slots_stuck"] == 0
    assert summary["requests_completed"] > 0 and summary["disconnected"] > 0
    assert summary["rss_start_mib"] > 0 and summary["rss_end_mib"] > 0
    assert passed(summary) and format_summary(summary).endswith("PASS")


def test_cli_json(tmp_path, capsys):
    with fake_server_process(tmp_path, "-np", "2") as server:
        code = main(["--url", server.url, "--clients", "2", "--minutes", "0.02", "--max-tokens", "4",
                     "--disconnect", "0.5", "--json"])
    out = capsys.readouterr().out
    summary = json.loads(out)
    assert code == 0, summary
    for key in ("requests_completed", "disconnected", "lost", "hung", "errors_by_status", "busy_503",
                "slots_stuck", "rss_start_mib", "rss_end_mib", "rss_growth_pct", "duration_s", "clients"):
        assert key in summary
    assert summary["clients"] == 2 and summary["rss_start_mib"] is None, "no --pid: RSS skipped"
    assert accounted(summary) == summary["requests_started"] > 0


class BrokenServer(http.server.BaseHTTPRequestHandler):
    """Native streams end without `stop: true`, chat streams without `[DONE]`, non-stream
    completions never answer in time, and slot 0 never goes idle."""

    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def _send(self, content_type: str, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._send("application/json", json.dumps([{"id": 0, "is_processing": True}]).encode())

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/completion" and body.get("stream"):
            self._send("text/event-stream", b'data: {"content": "a", "stop": false}\n\n' * 2)
        elif self.path == "/completion":  # the warm-up
            self._send("application/json", b'{"content": "a", "stop": true}')
        elif self.path == "/v1/chat/completions":
            self._send("text/event-stream", b'data: {"choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n')
        else:
            time.sleep(2)
            try:
                self._send("application/json", b'{"choices": [{"text": "a", "finish_reason": "stop"}]}')
            except OSError:
                pass  # the client gave up

    def log_message(self, *args):
        pass


@pytest.fixture()
def broken_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BrokenServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_lost_hung_and_stuck_are_reported(broken_url):
    summary = asyncio.run(soak(broken_url, clients=2, duration_s=1.5, disconnect=0.0, max_tokens=4, seed=3,
                               request_timeout=0.5, slot_wait_s=0.2))
    assert accounted(summary) == summary["requests_started"]
    assert summary["requests_completed"] == 0
    assert summary["lost"] > 0 and summary["hung"] > 0 and summary["slots_stuck"] == 1
    assert any("LOST" in p and "[DONE] False" in p for p in summary["problems"])
    assert any("LOST" in p and "final event False" in p for p in summary["problems"])
    assert not passed(summary) and format_summary(summary).endswith("FAIL")


def test_pass_rules():
    ok = {"lost": 0, "hung": 0, "slots_stuck": 0, "errors_by_status": {"400": 2}}
    assert passed(ok) and passed({**ok, "slots_stuck": None}), "4xx and an unavailable /slots do not fail"
    assert not passed({**ok, "errors_by_status": {"500": 1}})
    assert not passed({**ok, "errors_by_status": {"ReadError": 1}}), "dropped connections fail"
    assert not passed({**ok, "server_exit_code": -9})

"""Hostile input against a real server process (uvicorn, over the fake engine): every bad request
gets a 4xx / 5xx with the OpenAI envelope, the server stays healthy, and the same keep-alive
connection serves the next request (an unhandled exception used to make uvicorn drop it).
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import pytest

from tests.server.fake_server import fake_server_process, free_port
from tests.testdata import REPO_ROOT

CHAT = [{"role": "user", "content": "Say hello"}]
GOOD = ("POST", "/completion", {"prompt": "Hi", "n_predict": 2})


def _nested_json(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


# (name, method, path, raw body bytes or a JSON-able object, expected status)
CASES = [
    ("10k-deep JSON", "POST", "/completion", _nested_json(10_000), 400),
    ("lone surrogate in stop", "POST", "/completion",
     b'{"prompt": "hi", "n_predict": 1, "stop": ["\\ud800"]}', 400),
    ("lone surrogate in a chat message", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}', 400),
    ("1,000 prompts", "POST", "/completion", {"prompt": [f"p{i}" for i in range(1000)], "n_predict": 1}, 400),
    ("n = 100 choices", "POST", "/v1/chat/completions", {"messages": CHAT, "n": 100}, 400),
    ("1e6 logit_bias entries (13 MB)", "POST", "/completion",
     {"prompt": "hi", "logit_bias": {str(i): 1.0 for i in range(1_000_000)}}, 413),
    ("100k logit_bias entries", "POST", "/completion",
     {"prompt": "hi", "logit_bias": [[i, 1.0] for i in range(100_000)]}, 400),
    ("10k DRY breakers", "POST", "/completion",
     {"prompt": "hi", "n_predict": 4, "dry_multiplier": 0.8, "dry_sequence_breakers": ["x" * 100] * 10_000}, 400),
    ("a 300 KiB grammar", "POST", "/completion", {"prompt": "hi", "grammar": "root ::= " + " | ".join(
        f'"w{i}"' for i in range(40_000))}, 400),
    ("5,000 nested parentheses in GBNF", "POST", "/completion",
     {"prompt": "hi", "grammar": "root ::= " + "(" * 5000 + '"a"' + ")" * 5000}, 400),
    ("a JSON schema nested 450 levels", "POST", "/completion",
     {"prompt": "hi", "json_schema": json.loads('{"type": "array", "items": ' * 450 + '{"type": "string"}'
                                                 + "}" * 450)}, 400),
    ("a 9 MB prompt", "POST", "/completion", {"prompt": "x" * (9 << 20)}, 413),
    ("POST /props without --props", "POST", "/props",
     {"default_generation_settings": {"params": {"temperature": 0.5}}}, 501),
    ("a 5,000-character slot file name", "POST", "/slots/0?action=save", {"filename": "a" * 5000}, 400),
]


class Connection:
    """One keep-alive HTTP/1.1 connection; `same_socket` tells whether it was ever reopened."""

    def __init__(self, url: str):
        parsed = urlparse(url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        self.conn.connect()
        self.sock = self.conn.sock

    def request(self, method: str, path: str, body) -> tuple[int, dict, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.conn.request(method, path, body=raw, headers={"Content-Type": "application/json"})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else {}

    @property
    def same_socket(self) -> bool:
        return self.conn.sock is self.sock


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    slots = directory / "slots"
    slots.mkdir()
    with fake_server_process(directory, "-np", "2", "--slot-save-path", str(slots)) as server:
        yield server


@pytest.mark.parametrize("name, method, path, body, status", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_an_envelope_and_the_connection_keeps_serving(server, name, method, path, body, status):
    conn = Connection(server.url)
    got, headers, payload = conn.request(method, path, body)
    assert got == status, payload
    error = payload["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == status
    assert "Traceback" not in error["message"] and "ggserve." not in error["message"]
    if status == 413:  # refused before the body was read: the rest of it cannot be skipped
        return
    assert headers.get("connection", "").lower() != "close"
    good_status, _, good = conn.request(*GOOD)
    assert good_status == 200 and good["content"], good
    assert conn.same_socket, "the server dropped the keep-alive connection"
    health, _, _ = Connection(server.url).request("GET", "/health", b"")
    assert health == 200


def test_an_unexpected_exception_is_a_500_envelope_on_a_connection_that_stays_open(tmp_path):
    with fake_server_process(tmp_path, env={"FAKE_RAISE_ON_PROMPT": "boom"}) as server:
        conn = Connection(server.url)
        status, headers, payload = conn.request("POST", "/completion", {"prompt": "boom", "n_predict": 1})
        assert status == 500 and payload["error"]["message"] == "internal server error"
        good_status, _, _ = conn.request(*GOOD)
        assert good_status == 200 and conn.same_socket
        assert "unhandled error on POST /completion" in server.log_text()


def test_a_megabyte_header_is_a_431_envelope_not_a_reset(server):
    parsed = urlparse(server.url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        reply = b""
        while b"}}" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431")
    assert json.loads(body)["error"]["code"] == 431


def test_a_dead_engine_turns_health_503_and_the_process_exits_non_zero(tmp_path):
    with fake_server_process(tmp_path, env={"FAKE_DIE_AFTER_SECONDS": "3"}) as server:
        status = 200
        for _ in range(300):  # the engine "dies" 3 s after start; /health is 503 for 2 s, then the exit
            status, _, payload = Connection(server.url).request("GET", "/health", b"")
            if status != 200:
                break
            time.sleep(0.05)
        assert status == 503 and payload["error"]["message"] == "the engine stopped: fake engine thread crashed"
        assert server.proc.wait(30) == 1
        assert "the engine stopped and cannot recover" in server.log_text()


CHATML_TAIL = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_template_that_spins_on_some_input_is_stopped_and_the_server_goes_on(tmp_path):
    template = tmp_path / "spin.jinja"
    template.write_text("{% if messages[-1].content == 'spin' %}{% for i in range(100000) %}"
                        "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}" + CHATML_TAIL)
    with fake_server_process(tmp_path, "--chat-template-file", str(template), "--template-seconds", "1") as server:
        conn = Connection(server.url)
        status, _, payload = conn.request("POST", "/v1/chat/completions",
                                          {"messages": [{"role": "user", "content": "spin"}]})
        assert status == 400 and "took longer than 1 s" in payload["error"]["message"], payload
        assert "ggserve." not in payload["error"]["message"]
        status, _, payload = conn.request("POST", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2})
        assert status == 200 and conn.same_socket, payload


def test_a_template_that_cannot_render_fails_the_start_with_one_line(tmp_path):
    template = tmp_path / "broken.jinja"
    template.write_text("{{ raise_exception('this template is broken') }}")
    model = tmp_path / "fake-model.gguf"
    model.write_bytes(b"not read")
    done = subprocess.run([sys.executable, "-m", "tests.server.fake_server", "-m", str(model), "--port",
                           str(free_port()), "--chat-template-file", str(template)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "this template is broken" in done.stderr and "Traceback" not in done.stderr

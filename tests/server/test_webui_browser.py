"""The web chat page in a real browser: headless Chromium loads `/`, a message is typed and sent,
the reply streams in token by token, and the Stop button ends a generation (server side too).

Chromium is driven over the Chrome DevTools Protocol (its websocket, via the small pure-Python
`websocket-client` package); the server is the real `ggserve` process over the fake engine
(tests/server/fake_server.py), so the streamed text is known and nothing needs the real model.
Skips when Chromium is not installed (Debian: `apt-get install -y chromium`).
"""
from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import time

import httpx
import pytest

from tests.server.fake_server import fake_server_process
from tests.server.helpers import stop_process

websocket = pytest.importorskip("websocket", reason="needs websocket-client (pip install websocket-client)")

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed (apt-get install -y chromium) - web UI browser test skipped"
)

# long enough to watch it stream and to stop it half way: 25 ms per byte-token -> ~3 s
REPLY = "Streaming works: " + " ".join(f"word{i}" for i in range(20)) + ". The end."
TOKEN_DELAY = 0.025
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-dev-shm-usage", "--remote-debugging-port=0"]


class DevTools:
    """A minimal CDP session on one page target: send commands, keep events we care about."""

    def __init__(self, ws_url: str):
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)
        self.exceptions: list[dict] = []

    def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Runtime.exceptionThrown":
                self.exceptions.append(msg["params"]["exceptionDetails"])
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            time.sleep(0.02)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                      windowsVirtualKeyCode=13, nativeVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def server(tmp_path):
    env = {"FAKE_TOKEN_DELAY": str(TOKEN_DELAY), "FAKE_REPLY": REPLY}
    with fake_server_process(tmp_path, env=env) as srv:
        yield srv


@pytest.fixture
def browser(tmp_path):
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its chosen port here
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Runtime.enable")
        yield tools
        tools.close()
    finally:
        stop_process(proc, 10)


def _open_page(browser: DevTools, url: str) -> None:
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{url}/")
    browser.wait_for("document.readyState === 'complete' && !!document.getElementById('input')", what="page load")
    # the page asks /v1/models for the model name once loaded
    browser.wait_for("document.getElementById('info').textContent === 'fake-model.gguf'", what="model name")


def _type_and_send(browser: DevTools, text: str) -> None:
    browser.js("document.getElementById('input').focus()")
    browser.call("Input.insertText", text=text)
    assert browser.js("document.getElementById('input').value") == text
    browser.press_enter()  # Enter sends (the page's keydown handler)


def _reply_text(browser: DevTools) -> str:
    return browser.js(
        "(() => { const b = document.querySelectorAll('.msg.assistant'); if (!b.length) return '';"
        " const last = b[b.length - 1]; return last.firstChild && last.firstChild.nodeType === 3"
        " ? last.firstChild.textContent : ''; })()"
    )


def test_message_streams_into_the_page(server, browser):
    _open_page(browser, server.url)
    _type_and_send(browser, "Hello there")
    browser.wait_for("document.querySelector('.msg.user') !== null", what="the user bubble")
    assert browser.js("document.querySelector('.msg.user').textContent") == "Hello there"
    assert browser.js("document.getElementById('stop').disabled") is False  # generating
    seen = []
    deadline = time.monotonic() + 20
    while True:
        text = _reply_text(browser)
        if not seen or text != seen[-1]:
            seen.append(text)
        if text == REPLY and browser.js("document.getElementById('send').disabled") is False:
            break
        assert time.monotonic() < deadline, f"reply incomplete: {seen[-1]!r}"
        time.sleep(0.02)
    partial = [t for t in seen if t and t != REPLY]
    assert len(partial) >= 5, f"the reply did not stream in: {seen}"
    assert all(REPLY.startswith(t) for t in partial)  # each state is a prefix of the reply
    stats = browser.wait_for("(document.querySelector('.msg.assistant .stats') || {}).textContent", what="stats")
    assert stats.startswith(f"{len(REPLY)} tokens")
    assert browser.js("document.getElementById('stop').disabled") is True
    assert browser.js("document.getElementById('input').value") == ""
    assert browser.exceptions == []


def test_stop_button_ends_the_generation(server, browser):
    _open_page(browser, server.url)
    _type_and_send(browser, "Tell me a long story")
    browser.wait_for(f"(() => {{ const b = document.querySelector('.msg.assistant');"
                     f" return b && b.textContent.length >= 10; }})()", what="some streamed text")
    browser.js("document.getElementById('stop').click()")
    browser.wait_for("document.getElementById('send').disabled === false", timeout=5, what="Send re-enabled")
    assert browser.js("document.getElementById('stop').disabled") is True
    stopped_at = _reply_text(browser)
    time.sleep(10 * TOKEN_DELAY)
    assert _reply_text(browser) == stopped_at  # nothing more arrives
    assert 10 <= len(stopped_at) < len(REPLY) and REPLY.startswith(stopped_at)
    assert browser.js("document.querySelectorAll('.msg.error').length") == 0  # a stop is not an error
    # the server saw the client go away and ended the request early (its access line says so)
    deadline = time.monotonic() + 5
    while True:
        lines = [ln for ln in server.log_text().splitlines() if "POST /v1/chat/completions" in ln]
        if lines:
            break
        assert time.monotonic() < deadline, server.log_text()[-2000:]
        time.sleep(0.05)
    predicted = int(lines[0].split("predicted=")[1].split()[0])
    assert predicted < len(REPLY)
    assert browser.exceptions == []

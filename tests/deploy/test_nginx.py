"""deploy/nginx.conf: the balancer of the compose `scale` profile.

Owns: a tiny nginx-config parser and checks of what operators rely on (least_conn with
keepalive, streaming-safe proxying, writes only under /tmp), plus, when an nginx binary is
installed, a real SSE stream through the config: events must arrive as they are produced, with
the Authorization header reaching the replica and X-Accel-Buffering passed on.
"""
from __future__ import annotations

import http.server
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest
from tests.testdata import REPO_ROOT as REPO

CONTAINER_PORT = 8080
REPLICA_SERVICE = "ggserve-replica"  # docker-compose.yml's scaled service (checked there)


def parse_nginx(text: str) -> list:
    """Nested [name, [args], children|None] from nginx config text (quotes, comments, blocks)."""
    tokens = re.findall(r"#[^\n]*|\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|[{};]|[^\s{};]+", text)
    root: list = []
    stack, current = [root], []
    for tok in tokens:
        if tok.startswith("#"):
            continue
        if tok in (";", "{"):
            node = [current[0], current[1:], [] if tok == "{" else None]
            stack[-1].append(node)
            if tok == "{":
                stack.append(node[2])
            current = []
        elif tok == "}":
            stack.pop()
        else:
            current.append(tok[1:-1] if tok[0] in "\"'" else tok)
    assert len(stack) == 1 and not current, "unbalanced nginx config"
    return root


def find(block: list, name: str) -> list:
    return [node for node in block if node[0] == name]


def one(block: list, name: str, *args: str) -> list:
    hits = [n for n in find(block, name) if list(n[1][: len(args)]) == list(args)]
    assert len(hits) == 1, f"expected one `{name} {' '.join(args)}`, found {len(hits)}"
    return hits[0]



@pytest.fixture(scope="module")
def nginx_http():
    return one(parse_nginx((REPO / "deploy" / "nginx.conf").read_text()), "http")[2]



# ---- deploy/nginx.conf -----------------------------------------------------------------------


def test_upstream_is_least_conn_with_keepalive(nginx_http):
    upstream = one(nginx_http, "upstream", "ggserve")[2]
    names = [node[0] for node in upstream]
    assert "least_conn" in names and "keepalive" in names
    assert names.index("least_conn") < names.index("keepalive"), "nginx: keepalive after the method"
    (server,) = find(upstream, "server")
    assert server[1][0] == f"{REPLICA_SERVICE}:{CONTAINER_PORT}"
    assert "resolve" in server[1] and find(upstream, "zone"), "re-resolve replicas on --scale"


def test_proxy_location_is_streaming_safe(nginx_http):
    (server,) = find(nginx_http, "server")
    assert one(server[2], "listen")[1][0] == str(CONTAINER_PORT)
    location = one(server[2], "location", "/")[2]
    settings = {node[0]: node[1] for node in location if node[0] != "proxy_set_header"}
    headers = {node[1][0].lower(): node[1][1] for node in find(location, "proxy_set_header")}
    assert settings["proxy_pass"] == ["http://ggserve"]
    assert settings["proxy_buffering"] == ["off"] and settings["proxy_cache"] == ["off"]
    assert settings["proxy_http_version"] == ["1.1"]
    assert headers["connection"] != "close", "keepalive to the replicas"
    assert int(settings["proxy_read_timeout"][0].rstrip("s")) >= 600
    assert headers.get("authorization", "$http_authorization") == "$http_authorization"
    assert settings["proxy_pass_header"] == ["X-Accel-Buffering"]
    assert "proxy_ignore_headers" not in settings
    assert one(nginx_http, "gzip")[1] == ["off"]


def test_nginx_writes_only_under_tmp(nginx_http):
    config = parse_nginx((REPO / "deploy" / "nginx.conf").read_text())
    paths = [one(config, "pid")[1][0]] + [n[1][0] for n in nginx_http if n[0].endswith("_temp_path")]
    assert len(paths) == 6 and all(p.startswith("/tmp/") for p in paths), paths


# ---- nginx, for real (skipped without an nginx binary) ----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def sse_upstream():
    """A fake replica: streams 5 SSE events 0.3 s apart and echoes the Authorization header;
    sends `X-Accel-Buffering: no` only when asked (`?xab=1`), so that without it the test sees
    what nginx's own proxy_buffering setting does."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            if self.path.endswith("?xab=1"):
                self.send_header("X-Accel-Buffering", "no")
            self.send_header("X-Auth-Seen", self.headers.get("Authorization", ""))
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                data = f"data: {i}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture()
def nginx_proxy(tmp_path, sse_upstream):
    nginx = shutil.which("nginx")
    if nginx is None:
        pytest.skip("nginx not installed (apt-get install nginx-light)")
    version = subprocess.run([nginx, "-v"], capture_output=True, text=True).stderr.split("/")[-1].strip()
    port = free_port()
    text = (REPO / "deploy" / "nginx.conf").read_text()
    text = text.replace("/tmp/", f"{tmp_path}/").replace("listen 8080;", f"listen 127.0.0.1:{port};")
    text = text.replace("127.0.0.11", "127.0.0.1")
    text = text.replace(f"{REPLICA_SERVICE}:{CONTAINER_PORT}", f"127.0.0.1:{sse_upstream}")
    if tuple(int(x) for x in version.split(".")) < (1, 27, 3):
        text = text.replace(" resolve ", " ")  # the `resolve` parameter is nginx >= 1.27.3
    text = text.replace("worker_processes auto;", "worker_processes 1;")
    (tmp_path / "nginx.conf").write_text(text)
    tmp_path.chmod(0o755)  # root's workers run as nobody
    proc = subprocess.Popen(
        [nginx, "-e", "stderr", "-p", f"{tmp_path}/", "-c", f"{tmp_path}/nginx.conf", "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.fail(f"nginx exited: {proc.stderr.read().decode()}")
    yield port
    proc.terminate()
    proc.wait(timeout=10)


@pytest.mark.parametrize("query", ["", "?xab=1"])
def test_sse_streams_through_nginx_unbuffered_with_auth(nginx_proxy, query):
    import httpx

    arrivals = []
    with httpx.Client(timeout=10) as client:
        with client.stream(
            "POST", f"http://127.0.0.1:{nginx_proxy}/v1/chat/completions{query}",
            json={"stream": True}, headers={"Authorization": "Bearer sekrit"},
        ) as response:
            start = time.monotonic()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    arrivals.append((time.monotonic() - start, line))
            assert response.headers["x-auth-seen"] == "Bearer sekrit"
            if query:  # passed on for proxies in front of this one
                assert response.headers["x-accel-buffering"] == "no"
    assert [line for _, line in arrivals] == [f"data: {i}" for i in range(5)]
    assert arrivals[0][0] < 0.6 < arrivals[-1][0], f"events were buffered: {arrivals}"

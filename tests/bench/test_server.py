"""bench/server.py: its statistics and table helpers, and one dry run against a fake server.

The fake speaks just enough of llama-server's API (/health, /tokenize, /completion with
`timings`, streaming /v1/completions with usage) that the numbers in the table are known.
"""
from __future__ import annotations

import http.server
import json
import math
import os
import threading

import pytest

from ggserve.bench.server import METRICS, format_table, main, median, peak_rss_mib, percentile


def test_percentile_and_median_by_hand():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert percentile(range(11), 90) == 9
    assert percentile([10, 20], 25) == 12.5
    assert median([1, math.nan, 3, None]) == 2, "failed samples (NaN/None) are ignored"
    assert math.isnan(median([])) and math.isnan(median([math.nan]))
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_format_table_ratio_column():
    a = {"prefill_tps": 200.0, "ttft_ms": 50.0}
    b = {"prefill_tps": 100.0, "ttft_ms": 100.0}
    table = format_table([("A", a), ("B", b)])
    lines = table.splitlines()
    assert lines[0] == "| metric | A | B | A / B |"
    assert len(lines) == 2 + len(METRICS)
    assert "| prefill tok/s (512-token prompt) | 200 | 100 | 2.00x (A better) |" in lines
    assert "| TTFT ms, 1 stream | 50.0 | 100 | 0.50x (A better) |" in lines, "lower TTFT is better"
    assert "| peak RSS MiB | n/a | n/a | n/a |" in lines
    assert "A / B" not in format_table([("A", a)])


def test_peak_rss_of_this_process():
    if not os.path.exists(f"/proc/{os.getpid()}/status"):
        pytest.skip("no /proc")
    rss = peak_rss_mib(os.getpid())
    assert 5 < rss < 100_000


class FakeLlamaServer(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stops_early_by = 0  # streams end this many tokens before max_tokens (an EOS ignore_eos missed)

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        self._json({"status": "ok"})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            self._json({"tokens": list(range(len(body["content"].split())))})
        elif self.path == "/completion":
            prompt_n = len(body["prompt"]) if isinstance(body["prompt"], list) else 5
            self._json({"content": "x", "tokens_predicted": body["n_predict"], "timings": {
                "prompt_n": prompt_n, "prompt_ms": prompt_n / 2.0,  # 2000 tok/s
                "predicted_n": body["n_predict"], "predicted_ms": body["n_predict"] * 10.0,  # 100 tok/s
            }})
        else:
            assert self.path == "/v1/completions" and body["stream"] and body["ignore_eos"]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            n_tokens = body["max_tokens"] - self.stops_early_by
            for _ in range(n_tokens):
                self.wfile.write(b'data: {"choices": [{"text": "a", "index": 0}]}\n\n')
            self.wfile.write(b'data: {"choices": [], "usage": {"completion_tokens": %d}}\n\n' % n_tokens)
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_url():
    def start(handler=FakeLlamaServer):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    servers: list = []
    yield start
    for server in servers:
        server.shutdown()


def test_dry_run_against_fake_server(capsys, tmp_path, fake_url):
    url = fake_url()
    code = main(["--url", url, "--compare-url", url, "--pid", str(os.getpid()), "--runs", "2",
                 "--warmup", "0", "--prompt-tokens", "32", "--predict-tokens", "8", "--streams", "2",
                 "--json", str(tmp_path / "samples.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert rows["prefill tok/s (32-token prompt)"].split(" | ")[1:3] == ["2,000", "2,000"]
    assert rows["decode tok/s, 1 stream (server timings)"].endswith("| 100 | 100 | 1.00x |")
    assert "aggregate tok/s, 2 streams" in rows and "TTFT ms, 2 streams (median)" in rows
    assert rows["peak RSS MiB"].split(" | ")[2] == "n/a", "no pid given for B"
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert samples[f"A: {url}"]["samples"]["prefill_tps"] == [2000.0, 2000.0]


def test_streams_that_stop_early_are_reported(capsys, fake_url):
    url = fake_url(type("EarlyEOS", (FakeLlamaServer,), {"stops_early_by": 3}))
    code = main(["--url", url, "--runs", "1", "--warmup", "0", "--prompt-tokens", "16",
                 "--predict-tokens", "8", "--streams", "2"])
    assert code == 1, "rates from short streams are not comparable"
    assert "stream generated 5 < 8 tokens" in capsys.readouterr().err


def test_read_bandwidth_is_measured():
    from ggserve.bench.bandwidth import read_bandwidth_gbs
    assert 0.5 < read_bandwidth_gbs(32 << 20, runs=3) < 10_000

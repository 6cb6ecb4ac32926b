"""HTTP benchmark of a running server: prefill, decode, concurrent streams, TTFT, peak RSS.

Owns: starting `python -m ggserve.server` on a free port (unless --url is given) and stopping it, the
measurement requests, medians over runs, and the markdown report (with an A/B ratio column
against --compare-url, e.g. llama.cpp's llama-server on the same model). Only httpx + stdlib;
psutil is used for RSS when /proc is not available.

    python -m ggserve.bench.server -m model.gguf --runs 3
    python -m ggserve.bench.server --url http://127.0.0.1:8080 --compare-url http://127.0.0.1:8081

Per run, against each server (runs alternate between the servers so drift hits both alike):
  prefill    native /completion, a ~512-token prompt, n_predict 1, cache_prompt false:
             timings.prompt_n / timings.prompt_ms (the server's own clock)
  decode     native /completion, short prompt, n_predict 128, ignore_eos: timings.predicted_*
  stream     OpenAI /v1/completions, stream, 128 tokens: TTFT and client-side decode rate
  N streams  N concurrent OpenAI streams of 128 tokens: total tokens / wall time, median TTFT
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

FILLER = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly "
    "report on renewable energy, supply chains, river ecology and the history of printing. "
)
SHORT_PROMPT = "Write a long story about a lighthouse keeper and the sea."


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool


def metrics_for(prompt_tokens: int = 512, stream_counts: tuple[int, ...] = (4, 8)) -> list[Metric]:
    """The table's rows, in order, for a given prompt length and set of stream counts."""
    rows = [
        Metric("prefill_tps", f"prefill tok/s ({prompt_tokens}-token prompt)", True),
        Metric("decode_tps", "decode tok/s, 1 stream (server timings)", True),
        Metric("stream_tps", "decode tok/s, 1 stream (client, SSE)", True),
        Metric("ttft_ms", "TTFT ms, 1 stream", False),
    ]
    rows += [Metric(f"agg{n}_tps", f"aggregate tok/s, {n} streams", True) for n in stream_counts]
    if stream_counts:
        n = max(stream_counts)
        rows.append(Metric(f"ttft{n}_ms", f"TTFT ms, {n} streams (median)", False))
    rows.append(Metric("peak_rss_mib", "peak RSS MiB", False))
    return rows


METRICS = tuple(metrics_for())


# ---- statistics and formatting (pure) ----------------------------------------------------------


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def percentile(values, q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of the finite values; NaN if none."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    data = sorted(_finite(values))
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values) -> float:
    return percentile(values, 50)


def format_value(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def format_table(columns: list[tuple[str, dict[str, float]]], metrics=METRICS) -> str:
    """Markdown table: one row per metric, one column per server, plus `A / B` for two servers."""
    header = ["metric"] + [name for name, _ in columns]
    with_ratio = len(columns) == 2
    if with_ratio:
        header.append("A / B")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for metric in metrics:
        cells = [metric.label] + [format_value(values.get(metric.key, math.nan)) for _, values in columns]
        if with_ratio:
            a, b = (values.get(metric.key, math.nan) for _, values in columns)
            ratio = a / b if math.isfinite(a) and math.isfinite(b) and b != 0 else math.nan
            better = "" if not math.isfinite(ratio) else (
                " (A better)" if (ratio > 1) == metric.higher_is_better and ratio != 1 else ""
            )
            cells.append(("n/a" if not math.isfinite(ratio) else f"{ratio:.2f}x") + better)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- one server ---------------------------------------------------------------------------------


@dataclass
class Target:
    """A server under test: its URL, optional process id (for RSS) and the samples so far."""

    name: str
    url: str
    pid: int | None = None
    api_key: str | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def add(self, key: str, value: float | None) -> None:
        self.samples.setdefault(key, []).append(math.nan if value is None else float(value))

    def medians(self) -> dict[str, float]:
        return {key: median(values) for key, values in self.samples.items()}


def peak_rss_mib(pid: int | None) -> float | None:
    """Peak resident set of a process: /proc VmHWM (the kernel's high-water mark), else psutil's
    current RSS (a lower bound, sampled at the end of the run)."""
    return _rss_mib(pid, "VmHWM")


def current_rss_mib(pid: int | None) -> float | None:
    """Current resident set of a process: /proc VmRSS, else psutil's RSS."""
    return _rss_mib(pid, "VmRSS")


def _rss_mib(pid: int | None, key: str) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    except OSError:
        pass
    try:
        import psutil  # optional

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - psutil missing or process gone: RSS is just unknown
        return None


@dataclass
class StreamResult:
    start: float
    first_token: float | None
    end: float
    n_tokens: int
    counted_by_server: bool  # usage.completion_tokens (exact) rather than a chunk count


def _timing_rate(timings: dict | None, prefix: str) -> float | None:
    """tokens/s from llama.cpp-style `timings` ({prefix}_n, {prefix}_ms)."""
    if not timings:
        return None
    n, ms = timings.get(f"{prefix}_n"), timings.get(f"{prefix}_ms")
    if n and ms:
        return n / (ms / 1000)
    return timings.get(f"{prefix}_per_second")


class Bench:
    """The measurement requests, against one Target, on one AsyncClient."""

    def __init__(self, client: httpx.AsyncClient, n_prompt: int, n_predict: int):
        self.client, self.n_prompt, self.n_predict = client, n_prompt, n_predict

    def _headers(self, target: Target) -> dict[str, str]:
        return {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}

    async def _post(self, target: Target, path: str, body: dict) -> dict:
        response = await self.client.post(target.url + path, json=body, headers=self._headers(target))
        response.raise_for_status()
        return response.json()

    async def long_prompt(self, target: Target, nonce: int) -> list[int] | str:
        """~n_prompt tokens: exact token ids via /tokenize, else text of about that length.
        A per-run nonce at the very start keeps any prefix cache from helping."""
        text = f"Document {nonce}. " + FILLER * (self.n_prompt // 20 + 2)
        try:
            data = await self._post(target, "/tokenize", {"content": text, "add_special": False})
            ids = [t if isinstance(t, int) else t["id"] for t in data["tokens"]]
            if len(ids) >= self.n_prompt:
                return ids[: self.n_prompt]
        except (httpx.HTTPError, KeyError, TypeError, ValueError):
            pass
        return text[: self.n_prompt * 4]  # ~4 characters per token of English

    async def prefill(self, target: Target, nonce: int) -> float | None:
        prompt = await self.long_prompt(target, nonce)
        start = time.perf_counter()
        data = await self._post(target, "/completion", {
            "prompt": prompt, "n_predict": 1, "cache_prompt": False, "temperature": 0,
        })
        wall = time.perf_counter() - start
        rate = _timing_rate(data.get("timings"), "prompt")
        n = len(prompt) if isinstance(prompt, list) else data.get("tokens_evaluated")
        return rate if rate is not None else (n / wall if n else None)

    async def decode(self, target: Target) -> float | None:
        start = time.perf_counter()
        data = await self._post(target, "/completion", {
            "prompt": SHORT_PROMPT, "n_predict": self.n_predict, "ignore_eos": True,
            "cache_prompt": False, "temperature": 0,
        })
        wall = time.perf_counter() - start
        rate = _timing_rate(data.get("timings"), "predicted")
        return rate if rate is not None else data.get("tokens_predicted", self.n_predict) / wall

    async def stream(self, target: Target, nonce: int) -> StreamResult:
        """One OpenAI streaming completion; tokens = usage.completion_tokens, else chunk count."""
        body = {
            "model": "bench", "prompt": f"{nonce}. {SHORT_PROMPT}", "max_tokens": self.n_predict,
            "stream": True, "temperature": 0, "ignore_eos": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        first, chunks, usage_tokens = None, 0, None
        async with self.client.stream(
            "POST", target.url + "/v1/completions", json=body, headers=self._headers(target)
        ) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                if any(choice.get("text") for choice in event.get("choices") or []):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
        return StreamResult(start, first, time.perf_counter(), usage_tokens or chunks, usage_tokens is not None)

    async def run_once(self, target: Target, nonce: int, stream_counts: tuple[int, ...]) -> None:
        """One sample of every metric; a failing measurement records NaN and the error."""

        async def attempt(name, coro):
            try:
                return await coro
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                target.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                return None

        def check_length(result: StreamResult) -> None:
            # A stream that stopped early (EOS despite ignore_eos) would inflate its rates.
            if result.counted_by_server and result.n_tokens < self.n_predict:
                target.errors.append(f"stream generated {result.n_tokens} < {self.n_predict} tokens")

        target.add("prefill_tps", await attempt("prefill", self.prefill(target, nonce)))
        target.add("decode_tps", await attempt("decode", self.decode(target)))
        single = await attempt("stream", self.stream(target, nonce))
        if single is not None:
            check_length(single)
        if single is not None and single.first_token is not None:
            target.add("ttft_ms", (single.first_token - single.start) * 1000)
            span = single.end - single.first_token
            target.add("stream_tps", (single.n_tokens - 1) / span if span > 0 and single.n_tokens > 1 else None)
        for n in stream_counts:
            results = await attempt(f"{n} streams", asyncio.gather(
                *(self.stream(target, nonce * 100 + i) for i in range(n))
            ))
            if results is None:
                continue
            for result in results:
                check_length(result)
            wall = max(r.end for r in results) - min(r.start for r in results)
            target.add(f"agg{n}_tps", sum(r.n_tokens for r in results) / wall)
            target.add(f"ttft{n}_ms", median(
                (r.first_token - r.start) * 1000 for r in results if r.first_token is not None
            ))


# ---- server process -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, n_parallel: int, ctx_per_slot: int, extra: list[str], log_path: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "ggserve.server", "-np", str(n_parallel), "-c", str(n_parallel * ctx_per_slot),
           "--host", "127.0.0.1", "--port", str(port), *extra]
    if model:
        cmd[3:3] = ["-m", model]
    log = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    print(f"started: {' '.join(cmd)} (pid {proc.pid}, log {log_path})", file=sys.stderr)
    return proc, f"http://127.0.0.1:{port}"


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_healthy(client: httpx.AsyncClient, url: str, timeout: float, proc=None, log_path=None) -> None:
    """Poll /health until 200 (model loaded, kernels compiled); fail fast if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path else ""
            raise RuntimeError(f"server exited with status {proc.returncode} before becoming healthy:\n{tail}")
        try:
            if (await client.get(url + "/health", timeout=5)).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{url}/health did not answer 200 within {timeout:.0f} s")


# ---- command line -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ggserve.bench.server", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", help="GGUF file for the started server (default: the bundled model)")
    p.add_argument("--url", help="benchmark this running server instead of starting one")
    p.add_argument("--pid", type=int, help="process id of --url's server, for peak RSS")
    p.add_argument("--compare-url", help="second running server (e.g. llama-server) for an A/B column")
    p.add_argument("--compare-pid", type=int, help="process id of --compare-url's server, for peak RSS")
    p.add_argument("--api-key", default=os.environ.get("LLAMA_API_KEY"), help="Bearer key for both servers")
    p.add_argument("--runs", type=int, default=3, help="samples per metric; the table shows medians")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--predict-tokens", type=int, default=128)
    p.add_argument("--streams", default="4,8", help="concurrent stream counts (comma-separated)")
    p.add_argument("-np", "--parallel", type=int, default=8, help="slots of the started server")
    p.add_argument("--server-args", default="", help='extra flags for the started server, e.g. "-t 2 -b 512"')
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for /health")
    p.add_argument("--request-timeout", type=float, default=600)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (JIT compilation)")
    p.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    return p


async def run(args: argparse.Namespace) -> int:
    streams = tuple(int(s) for s in args.streams.split(",") if s.strip())
    if args.runs < 1 or any(n < 1 for n in streams):
        raise SystemExit("--runs and --streams must be >= 1")
    proc = log_path = None
    timeout = httpx.Timeout(args.request_timeout, connect=10)
    limits = httpx.Limits(max_connections=max(streams, default=1) + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        try:
            if args.url:
                targets = [Target("A: " + args.url, args.url.rstrip("/"), args.pid, args.api_key)]
            else:
                log_path = Path(tempfile.mkdtemp(prefix="ggserve-bench-")) / "server.log"
                ctx = args.prompt_tokens + args.predict_tokens + 64
                proc, url = start_server(args.model, args.parallel, ctx, shlex.split(args.server_args), log_path)
                targets = [Target("A: ggserve", url, proc.pid, args.api_key)]
            if args.compare_url:
                targets.append(Target("B: " + args.compare_url, args.compare_url.rstrip("/"),
                                      args.compare_pid, args.api_key))
            for target in targets:
                started = time.monotonic()
                await wait_healthy(client, target.url, args.startup_timeout,
                                   proc if target.pid == getattr(proc, "pid", None) else None, log_path)
                print(f"{target.name}: healthy after {time.monotonic() - started:.1f} s", file=sys.stderr)
            bench = Bench(client, args.prompt_tokens, args.predict_tokens)
            for i in range(args.warmup):
                for target in targets:
                    await bench.run_once(Target("warmup", target.url, api_key=target.api_key), -1 - i, streams[:1])
            for run_index in range(args.runs):
                for target in targets:  # alternate servers within each run
                    t0 = time.monotonic()
                    await bench.run_once(target, run_index, streams)
                    print(f"{target.name}: run {run_index + 1}/{args.runs} in {time.monotonic() - t0:.1f} s",
                          file=sys.stderr)
            for target in targets:
                target.add("peak_rss_mib", peak_rss_mib(target.pid))
        finally:
            if proc is not None:
                stop_server(proc)
    metrics = metrics_for(args.prompt_tokens, streams)
    print(f"\nmedians of {args.runs} run(s); prompt {args.prompt_tokens} tokens, {args.predict_tokens} "
          f"generated per stream\n")
    print(format_table([(t.name, t.medians()) for t in targets], metrics))
    for target in targets:
        for error in dict.fromkeys(target.errors):
            print(f"warning: {target.name}: {error}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {t.name: {"url": t.url, "samples": t.samples, "errors": t.errors} for t in targets}, indent=2
        ))
    return 1 if any(t.errors for t in targets) else 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

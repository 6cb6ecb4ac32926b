"""Soak test of a running server: N streaming clients for M minutes with random disconnects.

Owns: the client loops (a random request kind each time, some closed early on purpose), the
outcome of every request (completed, disconnected, lost, hung, busy, an error by status), the end
checks (slots left processing, RSS growth) and the summary. Starting and stopping the server,
/health polling and RSS come from bench/server.py.

    python -m ggserve.bench.soak --clients 16 --minutes 10 --n-parallel 4
    python -m ggserve.bench.soak --url http://127.0.0.1:8080 --pid 1234 --json

Outcomes: COMPLETED (the final event arrived: `stop: true`, or a finish_reason and `[DONE]`);
DISCONNECTED (we closed it on purpose); LOST (the response ended without its final event);
HUNG (no end within --request-timeout); BUSY (503 with Retry-After: backs off, not a failure);
errors by HTTP status (in-band `{"error"}` events by their code, transport failures by name).
Exit 0 only if nothing was lost or hung, no slot stayed processing, there was no 5xx (a busy 503
aside) and no transport failure, and the server we started is still alive. With --json the
human summary goes to stderr and stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ggserve.bench.server import current_rss_mib, start_server, stop_server, wait_healthy

PROMPTS = (
    "Write a long story about a lighthouse keeper and the sea.",
    "Explain how a bicycle gear works, step by step.",
    "List ten facts about the moon.",
    "Write a Python function that reverses a linked list.",
    "Describe the water cycle to a child.",
    "What is the history of the printing press?",
)
KINDS = ("completion_stream", "chat_stream", "oai_completion")


class Lost(Exception):
    """The response ended (or broke) without its final event."""


class Failed(Exception):
    def __init__(self, status: str, detail: str, retry_after: float | None = None):
        super().__init__(f"{status}: {detail}")
        self.status, self.retry_after = status, retry_after


@dataclass
class Tally:
    started: int = 0
    completed: int = 0
    disconnected: int = 0
    lost: int = 0
    hung: int = 0
    busy_503: int = 0
    errors_by_status: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def note(self, kind: str, what: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(f"{kind}: {what}"[:300])


def build_request(kind: str, rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    prompt, probs = rng.choice(PROMPTS), rng.random() < 0.15
    common = {"temperature": rng.choice((0.0, 0.8)), "seed": rng.randrange(1 << 30)}
    if kind == "completion_stream":
        body = {"prompt": prompt, "n_predict": max_tokens, "stream": True, "cache_prompt": rng.random() < 0.5}
        return "/completion", {**body, **common, **({"n_probs": 3} if probs else {})}
    if kind == "chat_stream":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True}
        return "/v1/chat/completions", {**body, **common, **({"logprobs": True, "top_logprobs": 2} if probs else {})}
    body = {"prompt": prompt, "max_tokens": max_tokens}
    return "/v1/completions", {**body, **common, **({"logprobs": 2} if probs else {})}


def _failure(response: httpx.Response) -> Failed:
    retry = response.headers.get("retry-after")
    if response.status_code == 503 and retry is not None:
        return Failed("503", "busy", float(retry) if retry.strip().isdigit() else 1.0)
    return Failed(str(response.status_code), response.text[:200])


async def send_stream(client: httpx.AsyncClient, url: str, path: str, body: dict, cut: int | None) -> str:
    """One SSE request; `cut` = close after that many events (a client that goes away)."""
    events, done, finished = 0, False, False
    async with client.stream("POST", url + path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise _failure(response)
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and `: ping` comments
                if cut is not None and events >= cut:
                    return "disconnected"  # leaving the block closes the connection mid-body
                events += 1
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    continue
                event = json.loads(payload)
                if isinstance(event, dict) and "error" in event:
                    raise Failed(str(event["error"].get("code", "in-band")), str(event["error"].get("message")))
                if event.get("stop") is True or any(c.get("finish_reason") for c in event.get("choices") or []):
                    finished = True
        except httpx.TransportError as exc:
            if isinstance(exc, httpx.TimeoutException):
                raise
            raise Lost(f"stream broke after {events} events: {exc!r}") from None
    native = path == "/completion"
    if finished and (native or done):
        return "completed"
    raise Lost(f"stream ended after {events} events, final event {finished}, [DONE] {done}")


async def send_plain(client: httpx.AsyncClient, url: str, path: str, body: dict, cut_s: float | None) -> str:
    """One non-streaming request; `cut_s` = give up (close the connection) after that many seconds."""
    try:
        response = await asyncio.wait_for(client.post(url + path, json=body), cut_s)
    except asyncio.TimeoutError:  # only `cut_s` can time out here (HUNG is the caller's wait_for)
        return "disconnected"
    if response.status_code != 200:
        raise _failure(response)
    data = response.json()
    if "error" in data:
        raise Failed(str(data["error"].get("code", "in-band")), str(data["error"].get("message")))
    if not all(c.get("finish_reason") for c in data.get("choices") or [{}]):
        raise Lost(f"response without finish_reason: {str(data)[:200]}")
    return "completed"


async def client_loop(index: int, client: httpx.AsyncClient, url: str, deadline: float, tally: Tally, *,
                      disconnect: float, max_tokens: int, seed: int, request_timeout: float) -> None:
    rng = random.Random(seed * 100_003 + index)
    while time.monotonic() < deadline:
        kind = rng.choice(KINDS)
        path, body = build_request(kind, rng, max_tokens)
        cut = rng.random() < disconnect
        if kind == "oai_completion":
            send = send_plain(client, url, path, body, rng.uniform(0.05, 3.0) if cut else None)
        else:
            send = send_stream(client, url, path, body, rng.randint(0, max_tokens) if cut else None)
        tally.started += 1
        try:
            outcome = await asyncio.wait_for(send, request_timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException) as exc:
            tally.hung += 1
            tally.note(kind, f"HUNG (no end within {request_timeout:.0f} s): {exc!r}")
        except Lost as exc:
            tally.lost += 1
            tally.note(kind, f"LOST: {exc}")
        except Failed as exc:
            if exc.retry_after is not None:
                tally.busy_503 += 1
                await asyncio.sleep(max(0.0, min(exc.retry_after, deadline - time.monotonic())))
            else:
                tally.errors_by_status[exc.status] += 1
                tally.note(kind, f"HTTP {exc}")
        except (httpx.TransportError, ValueError, KeyError, AttributeError) as exc:  # refused, reset, bad JSON
            tally.errors_by_status[type(exc).__name__] += 1
            tally.note(kind, repr(exc))
            await asyncio.sleep(0.5)  # the server may be gone: do not spin
        else:
            setattr(tally, outcome, getattr(tally, outcome) + 1)


async def stuck_slots(client: httpx.AsyncClient, url: str, wait_s: float = 30.0) -> int | None:
    """Slots still processing after up to `wait_s` s of polling /slots; None if /slots is unavailable."""
    deadline, busy = time.monotonic() + wait_s, None
    while True:
        try:
            response = await client.get(url + "/slots", timeout=10)
            if response.status_code in (404, 501):
                return None
            if response.status_code == 200:
                busy = [s.get("id") for s in response.json() if s.get("is_processing")]
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        if busy == [] or time.monotonic() >= deadline:
            return None if busy is None else len(busy)
        await asyncio.sleep(0.5)


async def soak(url: str, *, pid: int | None = None, clients: int = 16, duration_s: float = 600.0,
               disconnect: float = 0.2, max_tokens: int = 64, seed: int = 0, request_timeout: float = 120.0,
               api_key: str | None = None, slot_wait_s: float = 30.0, progress: bool = False,
               warmup_s: float = 0.0) -> dict:
    """Run the clients against `url` for `duration_s` s and return the summary dict.

    With `warmup_s`, the same workload runs that long first and is not counted: the baseline RSS
    is then taken after every request kind has run at full concurrency (kernels compiled for each
    batch shape, allocator pools grown), so the growth measured is what a long run adds."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout, connect=10), headers=headers,
                                 limits=httpx.Limits(max_connections=clients + 4)) as client:
        try:  # warm-up (kernels compiled, first allocations done) before the baseline RSS
            (await client.post(url + "/completion", json={"prompt": "Hello", "n_predict": 4})).raise_for_status()
        except httpx.HTTPError as exc:
            print(f"warning: warm-up request failed: {exc!r}", file=sys.stderr)
        if warmup_s > 0:
            warmup_end = time.monotonic() + warmup_s
            await asyncio.gather(*(client_loop(
                i, client, url, warmup_end, Tally(), disconnect=disconnect, max_tokens=max_tokens,
                seed=seed + 1, request_timeout=request_timeout) for i in range(clients)))
            await stuck_slots(client, url, slot_wait_s)  # every warm-up request over
        rss_start, tally = current_rss_mib(pid), Tally()
        rss_trend: list[float] = []
        started = time.monotonic()
        deadline = started + duration_s
        tasks = [asyncio.create_task(client_loop(
            i, client, url, deadline, tally, disconnect=disconnect, max_tokens=max_tokens, seed=seed,
            request_timeout=request_timeout)) for i in range(clients)]
        while progress and not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=30)
            rss = current_rss_mib(pid)
            if rss is not None:
                rss_trend.append(rss)
            print(f"  {time.monotonic() - started:5.0f} s: {tally.started} started, {tally.completed} completed, "
                  f"{tally.disconnected} disconnected, {tally.lost} lost, {tally.hung} hung, "
                  f"{sum(tally.errors_by_status.values())} errors, {tally.busy_503} busy, "
                  f"RSS {mib(rss)}", file=sys.stderr)
        await asyncio.gather(*tasks)
        duration = time.monotonic() - started
        slots = await stuck_slots(client, url, slot_wait_s)
    rss_end = current_rss_mib(pid)
    growth = (rss_end - rss_start) / rss_start * 100 if rss_start and rss_end is not None else None
    return {
        "requests_started": tally.started, "requests_completed": tally.completed,
        "disconnected": tally.disconnected, "lost": tally.lost, "hung": tally.hung,
        "errors_by_status": dict(tally.errors_by_status), "busy_503": tally.busy_503, "slots_stuck": slots,
        "rss_start_mib": rss_start, "rss_end_mib": rss_end, "rss_growth_pct": growth, "rss_trend_mib": rss_trend,
        "warmup_s": warmup_s,
        "duration_s": round(duration, 1), "clients": clients, "problems": tally.problems,
    }


def passed(summary: dict) -> bool:
    bad_errors = [s for s in summary["errors_by_status"] if not s.isdigit() or int(s) >= 500]
    return (summary["lost"] == summary["hung"] == 0 and not summary["slots_stuck"] and not bad_errors
            and summary.get("server_exit_code") is None)


def mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MiB"


def format_summary(s: dict) -> str:
    growth = "n/a" if s["rss_growth_pct"] is None else f"{s['rss_growth_pct']:+.1f}%"
    rows = {
        "requests started": s["requests_started"], "completed": s["requests_completed"],
        "disconnected": f"{s['disconnected']} (on purpose)", "busy (503)": s["busy_503"],
        "errors by status": ", ".join(f"{k}: {v}" for k, v in sorted(s["errors_by_status"].items())) or "none",
        "LOST": s["lost"], "HUNG": s["hung"],
        "slots STUCK": "n/a (/slots unavailable)" if s["slots_stuck"] is None else s["slots_stuck"],
        "RSS": f"{mib(s['rss_start_mib'])} -> {mib(s['rss_end_mib'])} ({growth})",
    }
    lines = [f"soak: {s['clients']} clients for {s['duration_s']:.0f} s"]
    lines += [f"  {name:<20}{value}" for name, value in rows.items()]
    if s.get("server_exit_code") is not None:
        lines.append(f"  SERVER EXITED with status {s['server_exit_code']} during the soak")
    lines += [f"  ! {p}" for p in s["problems"]]
    lines.append("PASS" if passed(s) else "FAIL")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ggserve.bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", help="GGUF file for the started server (default: the bundled model)")
    p.add_argument("--url", help="soak this running server instead of starting one")
    p.add_argument("--pid", type=int, help="process id of --url's server, for RSS (else RSS is skipped)")
    p.add_argument("--api-key", default=os.environ.get("LLAMA_API_KEY"), help="Bearer key")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--disconnect", type=float, default=0.2, help="probability a client closes a request early")
    p.add_argument("--n-parallel", type=int, default=4, help="slots of the started server (-np)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=120, help="seconds before a request counts as HUNG")
    p.add_argument("--server-args", default="", help='extra flags for the started server, e.g. "-t 2"')
    p.add_argument("--startup-timeout", type=float, default=900, help="seconds to wait for /health")
    p.add_argument("--warmup-minutes", type=float, default=1.0,
                   help="run the workload this long first, uncounted, before the baseline RSS")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    return p


async def run(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.minutes <= 0 or not 0 <= args.disconnect <= 1:
        raise SystemExit("--clients must be >= 1, --minutes > 0, --disconnect in [0, 1]")
    proc = log_path = None
    try:
        if args.url:
            url, pid = args.url.rstrip("/"), args.pid
        else:
            log_path = Path(tempfile.mkdtemp(prefix="ggserve-soak-")) / "server.log"
            proc, url = start_server(args.model, args.n_parallel, args.max_tokens + 256,
                                     shlex.split(args.server_args), log_path)
            pid = proc.pid
        async with httpx.AsyncClient() as client:
            await wait_healthy(client, url, args.startup_timeout, proc, log_path)
        summary = await soak(url, pid=pid, clients=args.clients, duration_s=args.minutes * 60,
                             disconnect=args.disconnect, max_tokens=args.max_tokens, seed=args.seed,
                             request_timeout=args.request_timeout, api_key=args.api_key, progress=True,
                             warmup_s=args.warmup_minutes * 60)
        summary["server_exit_code"] = proc.poll() if proc is not None else None
    finally:
        if proc is not None:
            stop_server(proc)
    print(format_summary(summary), file=sys.stderr if args.json else sys.stdout)
    if log_path is not None:
        print(f"server log: {log_path}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary))
    return 0 if passed(summary) else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

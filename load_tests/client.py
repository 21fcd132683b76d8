"""A light closed-loop load client: N workers, each posting one image and waiting for the answer.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length or chunked responses) over asyncio
streams. On a 2-core box the client shares the CPU with the server, so an httpx-based client
(several times the CPU per request) would cap the very throughput it is measuring.
Loopback only: :func:`run_load` refuses any other host.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def require_loopback(url: str) -> None:
    """Load generators here drive this machine only; refuse any other target."""
    host = urlsplit(url).hostname or "127.0.0.1"
    if host not in LOOPBACK:
        raise ValueError(f"refusing to load {url}: only loopback targets are allowed")


@dataclass
class LoadResult:
    """What one closed-loop run saw inside its measured window."""

    concurrency: int
    window_s: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    first_error: str = ""

    @property
    def completed(self) -> int:
        return len(self.latencies_ms) + self.errors

    def summary(self) -> dict:
        """req/s counts successful responses only; errors are reported next to it."""
        lat = sorted(self.latencies_ms)
        return {
            "concurrency": self.concurrency,
            "rps": round(len(lat) / self.window_s, 2) if self.window_s > 0 else 0.0,
            "p50_ms": round(percentile(lat, 50), 2),
            "p95_ms": round(percentile(lat, 95), 2),
            "p99_ms": round(percentile(lat, 99), 2),
            "errors": self.errors,
            "requests": self.completed,
            "window_s": round(self.window_s, 3),
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of already sorted values; nan if none."""
    if not sorted_values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class HTTPError(Exception):
    """A response the client could not parse, or a connection that broke mid-request."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool, dict]:
    """(status, body, keep_alive, headers) of one HTTP/1.1 response (header names lowered)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HTTPError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent by uvicorn
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        body = await reader.read()
        return status, body, False, headers
    keep_alive = headers.get("connection", "").lower() != "close"
    return status, body, keep_alive, headers


class _Connection:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        try:
            self.writer.write(head)
            self.writer.write(body)
            await self.writer.drain()
            status, payload, keep_alive, headers = await _read_response(self.reader)
        except BaseException:
            self.close()
            raise
        if not keep_alive:
            self.close()
        return status, payload, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def error_code(payload: bytes) -> str:
    """serve_app's ``{"error": {"code": ...}}``, or "-" for a body that is not one."""
    try:
        return str(json.loads(payload)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "-"


def error_key(status: int, payload: bytes) -> str:
    """``"503 overloaded"``: the status and serve_app's error code; ``"... (HAProxy)"`` for
    one of serve_app's pages that HAProxy answered itself (no ``request_id``: the ingress
    never saw it; serve_app/haproxy_shedding.py, serve_app/haproxy_errors.py)."""
    code = error_code(payload)
    if code != "-" and b'"request_id"' not in payload:
        return f"{status} {code} (HAProxy)"
    return f"{status} {code}"


def request_head(host: str, port: int, path: str, content_type: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nAccept: application/json\r\n\r\n").encode("latin-1")


async def closed_loop(url: str, bodies: Sequence[bytes], concurrency: int, duration_s: float,
                      *, warmup_s: float = 2.0, max_requests: int = 100_000,
                      timeout_s: float = 30.0, content_type: str = "image/jpeg",
                      on_window: Optional[Callable[[str], None]] = None) -> LoadResult:
    """``concurrency`` workers post ``bodies`` round-robin to ``url`` for warmup + duration.

    Only requests that start and finish inside the measured window count, so the ramp-up and
    the drain at the end are left out. ``on_window("start"|"end")`` is called at the window's
    edges (for CPU snapshots). Stops early after ``max_requests`` in all.
    """
    require_loopback(url)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    heads = [request_head(host, port, path, content_type, len(b)) for b in bodies]
    result = LoadResult(concurrency=concurrency, window_s=0.0)
    loop_start = time.perf_counter()
    window_start = loop_start + warmup_s
    window_end = window_start + duration_s
    issued = 0

    async def worker(index: int) -> None:
        nonlocal issued
        conn = _Connection(host, port)
        i = index
        try:
            while issued < max_requests:
                start = time.perf_counter()
                if start >= window_end:
                    return
                issued += 1
                j = i % len(bodies)
                i += concurrency
                try:
                    status, payload, _ = await asyncio.wait_for(conn.request(heads[j], bodies[j]),
                                                             timeout_s)
                    err = "" if status == 200 else f"HTTP {status}: {payload[:200]!r}"
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                        asyncio.LimitOverrunError, HTTPError, ValueError) as exc:
                    status, err = 0, f"{type(exc).__name__}: {exc}"
                end = time.perf_counter()
                if start >= window_start and end <= window_end:
                    result.statuses[status] = result.statuses.get(status, 0) + 1
                    if err:
                        result.errors += 1
                        result.first_error = result.first_error or err
                    else:
                        result.latencies_ms.append((end - start) * 1000)
                elif err and start < window_end:  # errors outside the window still count
                    result.errors += 1
                    result.first_error = result.first_error or err
        finally:
            conn.close()

    async def edges() -> None:
        await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
        if on_window:
            on_window("start")
        await asyncio.sleep(max(0.0, window_end - time.perf_counter()))
        if on_window:
            on_window("end")

    edge_task = asyncio.create_task(edges())
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    stopped = time.perf_counter()
    if not edge_task.done():  # stopped early by max_requests
        edge_task.cancel()
        if on_window and stopped > window_start:
            on_window("end")
    result.window_s = max(0.0, min(stopped, window_end) - window_start)
    return result


def run_load(url: str, bodies: Sequence[bytes], concurrency: int, duration_s: float,
             **kwargs) -> LoadResult:
    """Synchronous wrapper around :func:`closed_loop`."""
    return asyncio.run(closed_loop(url, bodies, concurrency, duration_s, **kwargs))


@dataclass
class OpenLoopResult:
    """What an open-loop run saw: every response by status with its latency, transport
    failures (resets, timeouts), and arrivals dropped because every connection was busy."""

    rate: float
    duration_s: float
    sent: int = 0
    latencies_by_status: dict[int, list[float]] = field(default_factory=dict)
    transport_errors: int = 0
    dropped: int = 0
    first_error: str = ""
    #: (seconds into the run it was sent, status, ms) per answer: when slow answers happened.
    answers: list[tuple[float, int, float]] = field(default_factory=list)
    #: "503 overloaded": how many answers of each status carried each JSON error code.
    error_codes: dict[str, int] = field(default_factory=dict)
    #: The first answer of each of those keys, looked at whole: Retry-After, Content-Type, body.
    examples: dict[str, dict] = field(default_factory=dict)
    #: How many answers of each key came without a Retry-After.
    without_retry_after: dict[str, int] = field(default_factory=dict)

    def count(self, status: int) -> int:
        return len(self.latencies_by_status.get(status, []))

    def by_window(self, status: int, window_s: float = 5.0, q: float = 95) -> dict[str, float]:
        """``status``'s ``q``-th percentile ms per ``window_s`` of send time ("0-5": ...)."""
        windows: dict[int, list[float]] = {}
        for sent_s, code, ms in self.answers:
            if code == status:
                windows.setdefault(int(sent_s // window_s), []).append(ms)
        return {f"{w * window_s:g}-{(w + 1) * window_s:g}": round(percentile(
            sorted(v), q), 1) for w, v in sorted(windows.items())}

    def percentile_ms(self, status: int, q: float) -> float:
        return percentile(sorted(self.latencies_by_status.get(status, [])), q)

    def summary(self) -> dict:
        out = {"rate": self.rate, "duration_s": self.duration_s, "sent": self.sent,
               "transport_errors": self.transport_errors, "dropped": self.dropped,
               "error_codes": dict(self.error_codes), "examples": dict(self.examples),
               "without_retry_after": dict(self.without_retry_after)}
        for status in sorted(self.latencies_by_status):
            out[str(status)] = {"count": self.count(status),
                                "p50_ms": round(self.percentile_ms(status, 50), 1),
                                "p95_ms": round(self.percentile_ms(status, 95), 1),
                                "p99_ms": round(self.percentile_ms(status, 99), 1)}
        return out


async def open_loop(url: str, bodies: Sequence[bytes], rate: float, duration_s: float, *,
                    max_connections: int = 256, timeout_s: float = 30.0,
                    content_type: str = "image/jpeg") -> OpenLoopResult:
    """Requests arrive at ``rate`` per second for ``duration_s``, whatever the answers: past
    capacity the offered load does not fall as a closed loop's does, which is what overload
    is. An arrival that finds all ``max_connections`` busy is dropped and counted."""
    require_loopback(url)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    heads = [request_head(host, port, path, content_type, len(b)) for b in bodies]
    result = OpenLoopResult(rate=rate, duration_s=duration_s)
    idle: list[_Connection] = []
    busy = 0
    tasks: set[asyncio.Task] = set()

    async def one(j: int) -> None:
        nonlocal busy
        conn = idle.pop() if idle else _Connection(host, port)
        busy += 1
        start = time.perf_counter()
        try:
            status, payload, headers = await asyncio.wait_for(
                conn.request(heads[j], bodies[j]), timeout_s)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, HTTPError, ValueError) as exc:
            conn.close()
            result.transport_errors += 1
            result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
        else:
            ms = (time.perf_counter() - start) * 1000
            result.latencies_by_status.setdefault(status, []).append(ms)
            result.answers.append((start - began, status, ms))
            if status != 200:
                key = error_key(status, payload)
                result.error_codes[key] = result.error_codes.get(key, 0) + 1
                result.examples.setdefault(key, {
                    "retry_after": headers.get("retry-after"),
                    "content_type": headers.get("content-type"),
                    "body": payload[:2000].decode("utf-8", "replace")})
                if "retry-after" not in headers:
                    result.without_retry_after[key] = result.without_retry_after.get(key, 0) + 1
            idle.append(conn)
        finally:
            busy -= 1

    began = time.perf_counter()
    total = int(rate * duration_s)
    for i in range(total):
        delay = began + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if busy >= max_connections:
            result.dropped += 1
            continue
        result.sent += 1
        task = asyncio.ensure_future(one(i % len(bodies)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return result


def run_open_loop(url: str, bodies: Sequence[bytes], rate: float, duration_s: float,
                  **kwargs) -> OpenLoopResult:
    """Synchronous wrapper around :func:`open_loop`."""
    return asyncio.run(open_loop(url, bodies, rate, duration_s, **kwargs))

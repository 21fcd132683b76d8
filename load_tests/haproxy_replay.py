"""What serve_app's HAProxy replay settings buy and cost, measured on HAProxy alone (no Ray).

serve_app runs HAProxy with ``retry-on conn-failure empty-response``, a 1 MiB buffer and
``http-request wait-for-body`` (serve_app/haproxy_replay.py): a request whose ingress closed
without answering is sent again, if it fits one buffer. This starts Ray's HAProxy binary in
front of a small backend that closes the connection, after reading it, on the first attempt of
every request (what a killed ingress does to the requests it has read), and for each set of
settings reports what each upload size got (a 200 is a replay that worked), and HAProxy's RSS
after that many concurrent uploads.

    python -m load_tests.haproxy_replay [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve_app import haproxy_replay

_OURS = (int(haproxy_replay.REPLAY_ENV["RAY_SERVE_HAPROXY_TUNE_BUFSIZE"]),
         haproxy_replay.REPLAY_ENV["RAY_SERVE_HAPROXY_RETRY_ON"])
#: (label, tune.bufsize, retry-on, wait-for-body): Ray's defaults, then each of
#: serve_app's settings added in turn, then a buffer as large as serve_app's max body.
VARIANTS = [
    ("Ray's defaults (16 KiB, conn-failure)", 16 << 10, "conn-failure", False),
    ("+ empty-response", 16 << 10, _OURS[1], False),
    ("+ 1 MiB buffer", *_OURS, False),
    ("+ wait-for-body (serve_app)", *_OURS, True),
    ("10 MiB buffer, wait-for-body", 10 << 20, _OURS[1], True),
]
UPLOADS = [100_000, 900_000, 3_000_000]  # a photo, a large photo, a phone camera's

#: ``python -c BACKEND PORT HOLD_S CLOSE_FIRST``: an HTTP/1.1 server that answers 200 after
#: HOLD_S seconds, and with CLOSE_FIRST "1" first closes each request's first attempt (by its
#: X-Request-Id) unanswered, as a killed ingress does to what it had read.
BACKEND = r'''
import asyncio, sys
hold_s, close_first = float(sys.argv[2]), sys.argv[3] == "1"
seen = set()
async def handle(r, w):
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            fields = dict(l.split(b": ", 1) for l in head.split(b"\r\n")[1:] if b": " in l)
            fields = {k.lower(): v for k, v in fields.items()}
            await r.readexactly(int(fields.get(b"content-length", b"0")))
            rid = fields.get(b"x-request-id")
            if close_first and rid not in seen:  # its first attempt
                seen.add(rid)
                w.close()
                return
            await asyncio.sleep(hold_s)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        w.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    await server.serve_forever()
asyncio.run(main())
'''


def haproxy_config(bufsize: int, retry_on: str, wait_for_body: bool, front: int,
                   back: int) -> str:
    """The settings of Ray's template that matter here, with the retry policy compared;
    ``wait_for_body``: rewritten as serve_app's HAProxy wrapper rewrites Ray's config (its
    backend named as Ray names an application's)."""
    text = f"""global
    maxconn 4096
    tune.bufsize {bufsize}
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option abortonclose
    option splice-request
    option splice-response
    option redispatch 1
    retry-on {retry_on}
frontend front
    bind 127.0.0.1:{front}
    default_backend http-bench
backend http-bench
    http-reuse always
    server ingress 127.0.0.1:{back}
"""
    return haproxy_replay.buffer_requests(text) if wait_for_body else text


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def uploads(port: int, size: int, n: int, concurrency: int, tag: str) -> dict[str, int]:
    """``n`` POSTs of ``size`` bytes, ``concurrency`` at a time, each on its own connection
    (so every one is the first on its connection: a failure is a 502, never a silent close)."""
    import httpx

    body, sem, statuses = b"x" * size, asyncio.Semaphore(concurrency), []

    async def one(i: int) -> None:
        async with sem, httpx.AsyncClient(timeout=60) as client:
            try:
                r = await client.post(f"http://127.0.0.1:{port}/", content=body,
                                      headers={"X-Request-Id": f"{tag}-{i}"})
                statuses.append(str(r.status_code))
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

    await asyncio.gather(*(one(i) for i in range(n)))
    return {s: statuses.count(s) for s in sorted(set(statuses))}


def measure(variant: tuple, binary: str, requests: int, concurrency: int) -> dict:
    from serve_app.launch import free_ports

    label, bufsize, retry_on, wait_for_body = variant
    front, back = free_ports(2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(haproxy_config(bufsize, retry_on, wait_for_body, front, back))
        backend = subprocess.Popen([sys.executable, "-c", BACKEND, str(back), "0.05", "1"])
        proxy = subprocess.Popen([binary, "-f", str(cfg)])
        try:
            time.sleep(1.0)
            row = {"label": label, "bufsize": bufsize, "retry_on": retry_on,
                   "wait_for_body": wait_for_body,
                   "rss_idle_mib": round(rss_mib(proxy.pid), 1)}
            for size in UPLOADS:
                statuses = asyncio.run(uploads(front, size, requests, concurrency, str(size)))
                row[f"{size}"] = statuses
                row[f"rss_after_{size}_mib"] = round(rss_mib(proxy.pid), 1)
            return row
        finally:
            for proc in (proxy, backend):
                proc.terminate()
                proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="uploads per size")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    from ray.serve._private.haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    rows = [measure(variant, binary, args.requests, args.concurrency) for variant in VARIANTS]
    print(f"{args.requests} uploads per size, {args.concurrency} at a time; the backend closes "
          "each request's first attempt unanswered, so a 200 is a replay that worked")
    print(f"| settings | {' | '.join(f'{s // 1000} KB' for s in UPLOADS)} | HAProxy RSS, idle "
          f"-> after each size (MiB) |")
    print("| --- " * (len(UPLOADS) + 2) + "|")
    for row in rows:
        got = " | ".join(", ".join(f"{n} {status}" for status, n in row[f"{s}"].items())
                         for s in UPLOADS)
        rss = " / ".join(str(row[f"rss_after_{s}_mib"]) for s in UPLOADS)
        print(f"| {row['label']} | {got} | {row['rss_idle_mib']} -> {rss} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

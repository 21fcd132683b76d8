"""One refusal looked at whole during an overload, from a process of its own.

Light on purpose: a spawned process imports the module its target lives in, and the test
module's imports (torch, Ray) cost ~3.7 CPU-seconds, which, taken in the overload's first
seconds, made refusals 5-10 s in wait 0.4-0.6 s for the CPU (p95, against 2-6 ms in every
other window). Nothing here imports more than httpx.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

SENDERS = 8


def probe_a_503(url: str, body: bytes, results: Any, stop: Any, ready: Any,
                delay_s: float = 5.0) -> None:
    """Set ``ready``, wait ``delay_s`` (into the overload), then put one JSON 503's status,
    ``Retry-After``, Content-Type and body on ``results``.

    Several senders, each on its own (none waits for another's slow 200), so some arrive
    while the queue is full; a failed send is kept, not fatal (a silent end here once left
    nothing to look at); Ray's plain-text 503 is counted, not taken for the one."""
    found: dict = {}
    lock = threading.Lock()

    def sender(_):
        with httpx.Client(timeout=30) as c:
            while not stop.is_set() and "status" not in found:
                try:
                    r = c.post(url, content=body, headers={"Content-Type": "image/jpeg"})
                except httpx.HTTPError as exc:
                    with lock:
                        found.setdefault("errors", []).append(repr(exc))
                    continue
                if r.status_code != 503:
                    continue
                try:
                    parsed = r.json()
                except ValueError:
                    with lock:
                        found["plain_503"] = found.get("plain_503", 0) + 1
                    continue
                with lock:
                    if "status" not in found:
                        found.update(status=503, retry_after=r.headers.get("retry-after"),
                                     body=parsed, content_type=r.headers.get("content-type"))

    ready.set()
    if stop.wait(delay_s):
        results.put({"error": "stopped before probing"})
        return
    with ThreadPoolExecutor(SENDERS) as pool:
        list(pool.map(sender, range(SENDERS)))
    results.put(found)

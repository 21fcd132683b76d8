"""Per-request timing and counting for the ingress's FastAPI app, as ASGI middleware.

Pure ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware runs each
request in an extra task with its own streams, a cost on every request. This only wraps
``send`` to see the status. Routes are labelled by template (serve_app.metrics.route_label).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Optional

from serve_app.metrics import IngressMetrics, route_label

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = b"x-request-id"
CLIENT_CLOSED = 499  # nginx's code for "the client closed the request": no answer was sent


class _State:
    recorder: Optional[IngressMetrics] = None
    log_requests = False


_state = _State()


def configure(recorder: Optional[IngressMetrics], log_requests: bool) -> None:
    """Called by the Ingress replica once its metrics exist (the app object is module-level)."""
    _state.recorder = recorder
    _state.log_requests = log_requests


def recorder() -> Optional[IngressMetrics]:
    """This replica's ingress metrics (None outside a replica, e.g. under a test client)."""
    return _state.recorder


def request_id(scope: dict) -> str:
    """Ray's proxy puts the client's X-Request-ID (or a fresh id) on every request and echoes
    it on every response. Outside Serve's proxy (the app under a test client) one is made and
    kept in the request's state, so every reader of this request sees the same one."""
    for key, value in scope.get("headers") or ():
        if key == REQUEST_ID_HEADER:
            return value.decode("latin-1")
    return scope.setdefault("state", {}).setdefault("request_id", uuid.uuid4().hex)


class RequestMetrics:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        recorder = _state.recorder
        if scope["type"] != "http" or (recorder is None and not _state.log_requests):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises past its handlers

        async def send_and_watch(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client went away before an answer (or a shutdown)
            raise
        finally:
            duration_ms = (time.perf_counter() - started) * 1000
            route = route_label(scope)
            if recorder is not None:
                recorder.request(route, status, duration_ms)
            if _state.log_requests:
                rid = request_id(scope)
                logger.info("request_id=%s %s %s -> %d in %.1f ms", rid, scope.get("method"),
                            route, status, duration_ms,
                            extra={"request_ids": [rid], "serve_app_stage": "ingress"})

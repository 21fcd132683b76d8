"""What the protocol routers share: JSON responses, the error mapping, body reading, and the
:class:`~serve_app.gateway.Gateway` they call.

Every failure gets the JSON error of the protocol it came in on, counted by its code:
``{"error": {"code", "message"}, "request_id"}`` under /v1 and elsewhere, the Open Inference
Protocol's ``{"error": "..."}`` under /v2.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import request_metrics
from serve_app.errors import ClientError, PayloadTooLarge, Unavailable
from serve_app.gateway import Gateway
from serve_app.metrics import route_label

logger = logging.getLogger("ray.serve")


def json_response(payload: Any, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json",
                    headers=headers)


def request_id_of(request: Request) -> str:
    """The request's id (serve_app.request_metrics.request_id), repeated in JSON bodies."""
    return request_metrics.request_id(request.scope)


def relative_path(scope: dict) -> str:
    """The request's path below the application's route prefix (Serve's ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def is_v2(scope: dict) -> bool:
    """Whether a request came in on the Open Inference Protocol (under /v2)."""
    path = relative_path(scope)
    return path == "/v2" or path.startswith("/v2/")


def error_response(request: Request, code: str, message: str, status: int,
                   headers: Optional[dict] = None) -> Response:
    """The JSON error every failure gets, in its protocol's shape, counted by its code."""
    recorder = request_metrics.recorder()
    if recorder is not None:
        recorder.rejected(route_label(request.scope), code)
    if is_v2(request.scope):
        return json_response({"error": message}, status, headers)
    payload = {"error": {"code": code, "message": message}, "request_id": request_id_of(request)}
    return json_response(payload, status, headers)


def retry_after(seconds: Optional[float]) -> Optional[dict]:
    """A ``Retry-After`` header (whole seconds, rounded up), or none."""
    return None if seconds is None else {"Retry-After": str(max(0, math.ceil(seconds)))}


def gateway(request: Request) -> Gateway:
    """The routers' dependency: the Gateway the ingress replica built."""
    return request.app.state.gateway


#: How much of a refused body is read and dropped before the 413 goes out. A server that
#: answers while the client is still sending and then closes makes the client's kernel see
#: a reset instead of the answer (Ray's proxy forwards the close); HAProxy hid it.
DRAIN_LIMIT = 64 * 1024 * 1024


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing anything over ``limit`` bytes without keeping it.

    A declared Content-Length over the limit, or a chunked body that passes it, is refused
    with 413; what is left of the body is read and dropped first (up to :data:`DRAIN_LIMIT`),
    so the client reads the JSON 413 instead of a connection reset.
    """
    declared = request.headers.get("content-length")
    refused = declared is not None and declared.isdigit() and int(declared) > limit
    if refused and int(declared) > DRAIN_LIMIT:
        raise PayloadTooLarge(f"The body is {declared} bytes; the limit is {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():  # Starlette's stream can be read only once
        size += len(chunk)
        if size > limit:
            refused = True
            if size > DRAIN_LIMIT:
                break
        elif not refused:
            chunks.append(chunk)
    if refused:
        if declared is not None and declared.isdigit():
            raise PayloadTooLarge(f"The body is {declared} bytes; the limit is {limit}.")
        raise PayloadTooLarge(f"The body is over the limit of {limit} bytes.")
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was already read
    return body


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to its protocol's JSON error. Overload and timeouts are handled
    here (by class), so the request metrics see their 503/504."""

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError):
        return error_response(request, exc.code, exc.message, exc.status)

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable):
        return error_response(request, exc.code, exc.message, exc.status,
                              retry_after(exc.retry_after_s))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                            for e in exc.errors())
        return error_response(request, "invalid_parameter", details, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request, code, str(exc.detail), exc.status_code)

    @app.exception_handler(BackPressureError)
    async def _overloaded(request: Request, exc: BackPressureError):
        return error_response(request, "overloaded", "The service is at capacity; retry later.",
                              getattr(exc, "status_code", None) or 503,
                              retry_after(getattr(exc, "retry_after_s", None) or 1.0))

    @app.exception_handler(TimeoutError)
    async def _timed_out(request: Request, exc: TimeoutError):
        return error_response(request, "timeout", "Classification did not finish in time.", 504)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        """Faults on our side keep the JSON error shape."""
        logger.exception("unhandled error", exc_info=exc)
        return error_response(request, "internal_error", "Internal error; see the server logs.",
                              500)

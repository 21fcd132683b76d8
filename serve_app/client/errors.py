"""The one exception family the client raises, built from the service's error responses.

``ServeAppError`` carries the HTTP status, the service's stable error code and message, the
request id (to find the request in the server logs) and how many attempts were made. Its
subclasses say whose fault it was, which is what decides whether to retry:

- :class:`RequestRejected`: a 4xx; the request itself is wrong, sending it again cannot help.
- :class:`ServerError`: a 5xx; 502/503/504 were retried before this was raised, 500 was not.
- :class:`ServeAppConnectionError`: no HTTP answer at all (``status`` is None), after retries.
"""

from __future__ import annotations

import httpx

_MAX_MESSAGE_CHARS = 500  # a proxy's HTML error page is not worth more in an exception


class ServeAppError(Exception):
    """A request to the service failed; see the attributes for why."""

    def __init__(self, message: str, *, status: int | None, code: str,
                 request_id: str | None = None, attempts: int = 1):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.attempts = attempts

    @property
    def is_client_error(self) -> bool:
        """True for a 4xx: fix the request (image, parameters, model name) instead of retrying."""
        return self.status is not None and 400 <= self.status < 500

    def __str__(self) -> str:
        status = "no response" if self.status is None else f"HTTP {self.status}"
        tries = f", {self.attempts} attempts" if self.attempts > 1 else ""
        rid = f", request_id={self.request_id}" if self.request_id else ""
        return f"{self.code}: {self.message} ({status}{tries}{rid})"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
                f"message={self.message!r}, request_id={self.request_id!r}, "
                f"attempts={self.attempts!r})")


class RequestRejected(ServeAppError):
    """The service refused the request (4xx). Never retried."""


class ServerError(ServeAppError):
    """The service or a proxy in front of it failed (5xx)."""


class ServeAppConnectionError(ServeAppError):
    """No HTTP response: connection refused or reset, DNS failure, or a timeout.

    ``code`` is ``"timeout"`` when the client's own timeout expired and ``"connection_error"``
    otherwise; the httpx exception is chained as ``__cause__``.
    """


def error_from_response(response: httpx.Response, request_id: str,
                        attempts: int = 1) -> ServeAppError:
    """The exception for a non-2xx ``response``.

    The service answers ``{"error": {"code", "message"}, "request_id"}``; a proxy may answer
    with any text (or HTML), which becomes the message under code ``http_<status>``.
    """
    status = response.status_code
    code, message, rid = f"http_{status}", "", None
    try:
        body = response.json()
    except ValueError:  # not JSON (a proxy's text or HTML page), or not UTF-8
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code, message = error["code"], str(error.get("message", ""))
        rid = body.get("request_id") if isinstance(body.get("request_id"), str) else None
    else:
        message = response.text.strip()[:_MAX_MESSAGE_CHARS]
    message = message or response.reason_phrase or f"HTTP {status}"
    rid = rid or response.headers.get("x-request-id") or request_id
    cls = RequestRejected if 400 <= status < 500 else ServerError if status >= 500 \
        else ServeAppError
    return cls(message, status=status, code=code, request_id=rid, attempts=attempts)


def error_from_transport(exc: httpx.TransportError, request_id: str,
                         attempts: int = 1) -> ServeAppConnectionError:
    """The exception for a request that got no response (raise it ``from exc``)."""
    code = "timeout" if isinstance(exc, httpx.TimeoutException) else "connection_error"
    message = str(exc) or type(exc).__name__
    return ServeAppConnectionError(message, status=None, code=code, request_id=request_id,
                                   attempts=attempts)

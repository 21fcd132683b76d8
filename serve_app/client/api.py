"""``Client`` and ``AsyncClient``: the service's HTTP API as typed calls, with retries.

Both prepare each call once (:class:`_Call`: body bytes, headers, request id) and send it as
is on every attempt, so the server sees identical requests under one ``X-Request-ID`` and a
retried request can be traced in its logs. The retry decisions live in :class:`_Attempts`,
shared by both; the two loops differ only in how they send and sleep.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, TypeVar
from urllib.parse import quote

import httpx

from serve_app.client.errors import (
    ServeAppError,
    error_from_response,
    error_from_transport,
)
from serve_app.client.images import ImageInput, to_upload
from serve_app.client.multipart import encode_multipart
from serve_app.client.results import BatchClassification, Classification
from serve_app.client.retry import RetryPolicy, next_delay, parse_retry_after

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "serve_app-client/0.1"

T = TypeVar("T")


@dataclass(frozen=True)
class _Call:
    """One API call, built once: every attempt sends exactly this."""

    method: str
    path: str
    headers: dict[str, str]
    params: dict[str, str] | None = None
    content: bytes | None = None

    @property
    def request_id(self) -> str:
        return self.headers["X-Request-ID"]


def _headers(request_id: str | None, **extra: str) -> dict[str, str]:
    """Headers for one call; a fresh uuid4 id when the caller gave none, so that every call
    (and all of its attempts) can be found in the server logs."""
    return {"X-Request-ID": request_id or uuid.uuid4().hex, **extra}


def _classify_path(model: str | None, suffix: str = "") -> str:
    if model is None:  # the default model
        return f"/v1/classify{suffix}"
    return f"/v1/models/{quote(model, safe='')}/classify{suffix}"


def _classify_call(image: ImageInput, top_k: int, model: str | None,
                   request_id: str | None) -> _Call:
    upload = to_upload(image)
    return _Call("POST", _classify_path(model), params={"top_k": str(top_k)},
                 headers=_headers(request_id, **{"Content-Type": upload.content_type}),
                 content=upload.data)


def _batch_call(images: Iterable[ImageInput], top_k: int, model: str | None,
                request_id: str | None) -> _Call:
    uploads = [to_upload(image, i) for i, image in enumerate(images)]
    if not uploads:
        raise ValueError("classify_batch needs at least one image")
    content_type, body = encode_multipart("files", uploads)
    return _Call("POST", _classify_path(model, "/batch"), params={"top_k": str(top_k)},
                 headers=_headers(request_id, **{"Content-Type": content_type}), content=body)


def _parse(response: httpx.Response, call: _Call, attempts: int,
           parse: Callable[[Any], T]) -> T:
    """The typed result of a 2xx response; a body of the wrong shape (say, ``url`` points at
    some other service) is a ServeAppError ``invalid_response``, not a KeyError."""
    try:
        return parse(response.json())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServeAppError(f"Unexpected response body: {response.text[:200]!r}",
                            status=response.status_code, code="invalid_response",
                            request_id=call.request_id, attempts=attempts) from exc


def _models_list(body: Any) -> list[dict]:
    models = body["models"]
    if not isinstance(models, list):
        raise TypeError("'models' is not a list")
    return models


class _Attempts:
    """The retry bookkeeping of one call: counts attempts, watches the time budget, and says
    how long to wait before the next attempt, or raises the error to give up with."""

    def __init__(self, policy: RetryPolicy, rng: random.Random, call: _Call):
        self.policy, self.rng, self.call = policy, rng, call
        self.started = time.monotonic()
        self.count = 0

    def begin(self) -> None:
        self.count += 1

    def after_response(self, response: httpx.Response) -> float:
        """The wait before retrying a non-2xx response; raises when it is not retried."""
        error = error_from_response(response, self.call.request_id, self.count)
        if response.status_code not in self.policy.retry_statuses:
            raise error
        delay = self._next_delay(parse_retry_after(response.headers.get("retry-after")))
        if delay is None:
            raise error
        return delay

    def after_transport_error(self, exc: httpx.TransportError) -> float:
        """The wait before retrying after no response at all; raises when giving up."""
        error = error_from_transport(exc, self.call.request_id, self.count)
        # A malformed URL or unknown scheme fails the same way every time.
        delay = None if isinstance(exc, httpx.UnsupportedProtocol) else self._next_delay(None)
        if delay is None:
            raise error from exc
        return delay

    def _next_delay(self, retry_after: float | None) -> float | None:
        remaining = self.policy.max_elapsed_s - (time.monotonic() - self.started)
        return next_delay(self.policy, self.count, retry_after=retry_after,
                          remaining_s=remaining, rng=self.rng)


def _policy(retries: RetryPolicy | None) -> RetryPolicy:
    return RetryPolicy(max_attempts=1) if retries is None else retries


def _default_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    return {"User-Agent": USER_AGENT, **(headers or {})}


class Client:
    """A synchronous client. Thread-safe (one connection pool); close it, or use ``with``.

    ``timeout`` applies to each attempt; ``retries`` bounds the retrying (``None``: a single
    attempt). ``transport`` replaces httpx's network transport, e.g. ``httpx.MockTransport``.
    """

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float | None = 30.0,
                 retries: RetryPolicy | None = RetryPolicy(),
                 headers: Mapping[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.url = url
        self.retries = _policy(retries)
        self._rng = random.Random()
        self._http = httpx.Client(base_url=url, timeout=timeout,
                                  headers=_default_headers(headers), transport=transport)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def classify(self, image: ImageInput, *, top_k: int = 5, model: str | None = None,
                 request_id: str | None = None) -> Classification:
        """Classify one image (a path, bytes, a PIL image or a uint8 array)."""
        return self._send(_classify_call(image, top_k, model, request_id),
                          Classification.from_json)

    def classify_batch(self, images: Iterable[ImageInput], *, top_k: int = 5,
                       model: str | None = None,
                       request_id: str | None = None) -> BatchClassification:
        """Classify several images in one request; each succeeds or fails on its own, so
        check ``item.ok`` (a bad image is a BatchItem error, not an exception)."""
        return self._send(_batch_call(images, top_k, model, request_id),
                          BatchClassification.from_json)

    def models(self) -> list[dict]:
        """The served models, as the service describes them (name, input_size, ...)."""
        return self._send(_Call("GET", "/v1/models", _headers(None)), _models_list)

    def ready(self) -> bool:
        """Whether the service is ready to classify: one probe, never retried."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def _send(self, call: _Call, parse: Callable[[Any], T]) -> T:
        attempts = _Attempts(self.retries, self._rng, call)
        while True:
            attempts.begin()
            try:
                response = self._http.request(call.method, call.path, params=call.params,
                                              headers=call.headers, content=call.content)
            except httpx.TransportError as exc:
                delay = attempts.after_transport_error(exc)
            else:
                if response.is_success:
                    return _parse(response, call, attempts.count, parse)
                delay = attempts.after_response(response)
            time.sleep(delay)


class AsyncClient:
    """The asyncio twin of :class:`Client`: same constructor, ``await`` each method, and
    ``async with`` (or ``await aclose()``)."""

    def __init__(self, url: str = DEFAULT_URL, *, timeout: float | None = 30.0,
                 retries: RetryPolicy | None = RetryPolicy(),
                 headers: Mapping[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.url = url
        self.retries = _policy(retries)
        self._rng = random.Random()
        self._http = httpx.AsyncClient(base_url=url, timeout=timeout,
                                       headers=_default_headers(headers), transport=transport)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    close = aclose  # the same name as Client's, awaited

    async def classify(self, image: ImageInput, *, top_k: int = 5, model: str | None = None,
                       request_id: str | None = None) -> Classification:
        """Classify one image (a path, bytes, a PIL image or a uint8 array)."""
        return await self._send(_classify_call(image, top_k, model, request_id),
                                Classification.from_json)

    async def classify_batch(self, images: Iterable[ImageInput], *, top_k: int = 5,
                             model: str | None = None,
                             request_id: str | None = None) -> BatchClassification:
        """Classify several images in one request; check each ``item.ok``."""
        return await self._send(_batch_call(images, top_k, model, request_id),
                                BatchClassification.from_json)

    async def models(self) -> list[dict]:
        """The served models, as the service describes them."""
        return await self._send(_Call("GET", "/v1/models", _headers(None)), _models_list)

    async def ready(self) -> bool:
        """Whether the service is ready to classify: one probe, never retried."""
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def _send(self, call: _Call, parse: Callable[[Any], T]) -> T:
        attempts = _Attempts(self.retries, self._rng, call)
        while True:
            attempts.begin()
            try:
                response = await self._http.request(call.method, call.path, params=call.params,
                                                    headers=call.headers, content=call.content)
            except httpx.TransportError as exc:
                delay = attempts.after_transport_error(exc)
            else:
                if response.is_success:
                    return _parse(response, call, attempts.count, parse)
                delay = attempts.after_response(response)
            await asyncio.sleep(delay)

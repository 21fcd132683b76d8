"""The HTTP ingress: validation, error mapping and response shaping.

It never decodes an image or touches the model. The images of concurrent requests go out in
groups (serve_app/batching.py): one preprocessor call per group, whose ``DeploymentResponse``
is passed straight into one classifier call, so crops go replica to replica without passing
through here.
"""

import asyncio
import logging
import time
from typing import Any, Optional

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import request_metrics
from serve_app.batching import CallBatcher
from serve_app.config import AppConfig
from serve_app.errors import (
    ClientError,
    InvalidImage,
    PayloadTooLarge,
    UnsupportedMediaType,
    find_client_error,
)
from serve_app.metrics import IngressMetrics, route_label

logger = logging.getLogger("ray.serve")

# ---- response schemas (for /docs; the hot path writes JSON bytes directly) ----
class Prediction(BaseModel):
    label: str
    class_id: int
    score: float


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]
    request_id: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str


class BatchItem(BaseModel):
    filename: Optional[str] = None
    predictions: Optional[list[Prediction]] = None
    error: Optional[ErrorBody] = None


class BatchResponse(BaseModel):
    model: str
    results: list[BatchItem]
    request_id: str


_ERRORS = {400: {"model": ErrorResponse}, 413: {"model": ErrorResponse},
           415: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
           503: {"model": ErrorResponse}}
_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}


def json_response(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json")


def error_payload(code: str, message: str, request_id: str) -> dict:
    return {"error": {"code": code, "message": message}, "request_id": request_id}


def error_response(request: Request, code: str, message: str, status: int) -> Response:
    """The JSON error every failure gets, counted by its code."""
    recorder = request_metrics.recorder()
    if recorder is not None:
        recorder.rejected(route_label(request.scope), code)
    return json_response(error_payload(code, message, request_id_of(request)), status)


def request_id_of(request: Request) -> str:
    """The request's id (serve_app.request_metrics.request_id), repeated in JSON bodies."""
    return request_metrics.request_id(request.scope)


app = FastAPI(
    title="serve_app",
    version="0.1.0",
    description="Image classification on Ray Serve. Send image bytes, get ImageNet labels.",
)
app.add_middleware(request_metrics.RequestMetrics)


@app.exception_handler(ClientError)
async def _client_error(request: Request, exc: ClientError):
    return error_response(request, exc.code, exc.message, exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(request, "invalid_parameter", details, 422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(request, code, str(exc.detail), exc.status_code)


# Overload and timeouts are handled inside the app (by class), so the request metrics see
# their 503/504; anything else reaches Starlette's outermost handler as a 500.
@app.exception_handler(BackPressureError)
async def _overloaded(request: Request, exc: BackPressureError):
    return error_response(request, "overloaded", "The service is at capacity; retry later.",
                          getattr(exc, "status_code", None) or 503)


@app.exception_handler(TimeoutError)
async def _timed_out(request: Request, exc: TimeoutError):
    return error_response(request, "timeout", "Classification did not finish in time.", 504)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception):
    """Faults on our side keep the JSON error shape."""
    logger.exception("unhandled error", exc_info=exc)
    return error_response(request, "internal_error", "Internal error; see the server logs.", 500)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing anything over ``limit`` bytes without buffering it all.

    A declared Content-Length over the limit is refused before a byte is read; a chunked body
    is counted as it arrives and dropped as soon as it passes the limit.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The body is {declared} bytes; the limit is {limit}.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # lets request.form() parse what was already read
    return body


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Ingress:
    def __init__(self, preprocessor: DeploymentHandle, classifier: DeploymentHandle,
                 settings: AppConfig, model_info: dict):
        self.preprocessor = preprocessor
        self.classifier = classifier
        self.settings = settings
        self.model_info = model_info
        self.model_name = model_info["name"]
        self.metrics = IngressMetrics()
        request_metrics.configure(self.metrics, settings.log_requests)
        self.batcher = CallBatcher(self._classify_group, settings.dispatch.max_batch_size,
                                   settings.dispatch.max_in_flight, self._dispatched)
        self.metrics.watch_queue(lambda: self.batcher.queued, lambda: self.batcher.in_flight_items)

    def _dispatched(self, waits_s: list[float]) -> None:
        self.metrics.group(len(waits_s), [w * 1000 for w in waits_s])

    async def _classify_group(self, items: list[tuple[bytes, int, str]]) -> list:
        """One preprocessor and one classifier call for a group. The request ids travel with
        the images: Ray's request context names one request per call, a group has several."""
        started = time.perf_counter()
        request_ids = [rid for _, _, rid in items]
        crops = self.preprocessor.remote([data for data, _, _ in items], request_ids)  # not awaited
        try:
            return await self.classifier.classify.remote(crops, [k for _, k, _ in items],
                                                         request_ids)
        finally:
            call_ms = (time.perf_counter() - started) * 1000
            self.metrics.group_done(call_ms)
            if self.settings.log_requests:
                logger.info("request_ids=%s group of %d images: preprocess + classify calls "
                            "%.1f ms", ",".join(request_ids), len(items), call_ms,
                            extra={"request_ids": request_ids, "serve_app_stage": "dispatch"})

    async def _classify_bytes(self, data: bytes, top_k: int, request_id: str) -> list[dict]:
        try:
            return await asyncio.wait_for(self.batcher.submit((data, top_k, request_id)),
                                          self.settings.request_timeout_s)
        except Exception as exc:
            client_error = find_client_error(exc)
            if client_error is not None:
                raise client_error from None
            raise

    def _top_k(self, top_k: Optional[int]) -> int:
        return self.settings.top_k_default if top_k is None else top_k

    @app.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS,
              openapi_extra=_IMAGE_BODY, summary="Classify one image")
    async def classify(self, request: Request,
                       top_k: Optional[int] = Query(None, ge=1, le=20,
                                                    description="How many labels (default 5).")):
        """Body: raw image bytes with an ``image/*`` Content-Type, or multipart field ``file``."""
        content_type = request.headers.get("content-type", "").lower()
        if content_type.startswith("image/"):
            data = await read_body(request, self.settings.max_body_bytes)
        elif content_type.startswith("multipart/form-data"):
            await read_body(request, self.settings.max_body_bytes)
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise InvalidImage("The multipart body has no file field named 'file'.")
            data = await upload.read()
        else:
            raise UnsupportedMediaType(
                f"Content-Type {content_type or '(none)'} is not supported; send image/* bytes "
                "or multipart/form-data with a field named 'file'.")
        rid = request_id_of(request)
        self.metrics.received(route_label(request.scope), 1, len(data))
        predictions = await self._classify_bytes(data, self._top_k(top_k), rid)
        return json_response({"model": self.model_name, "predictions": predictions,
                              "request_id": rid})

    @app.post("/v1/classify/batch", response_model=BatchResponse, responses=_ERRORS,
              openapi_extra=_BATCH_BODY, summary="Classify several images")
    async def classify_batch(self, request: Request,
                             top_k: Optional[int] = Query(None, ge=1, le=20)):
        """Multipart with repeated field ``files``. Each image succeeds or fails on its own."""
        content_type = request.headers.get("content-type", "").lower()
        if not content_type.startswith("multipart/form-data"):
            raise UnsupportedMediaType("Send multipart/form-data with repeated field 'files'.")
        await read_body(request, self.settings.max_body_bytes)
        limit = self.settings.max_batch_files
        try:
            form = await request.form(max_files=limit, max_fields=limit + 8)
        except StarletteHTTPException as exc:  # Starlette refuses too many files this way
            raise ClientError(f"{exc.detail} (at most {limit} files per request)") from None
        uploads = [u for u in form.getlist("files") if not isinstance(u, str)]
        if not uploads:
            raise InvalidImage("The multipart body has no file fields named 'files'.")
        k, rid = self._top_k(top_k), request_id_of(request)
        payloads = [await u.read() for u in uploads]
        self.metrics.received(route_label(request.scope), len(payloads), sum(map(len, payloads)))
        outcomes = await asyncio.gather(*(self._classify_bytes(p, k, rid) for p in payloads),
                                        return_exceptions=True)
        results = []
        for upload, outcome in zip(uploads, outcomes):
            item: dict[str, Any] = {"filename": upload.filename}
            if isinstance(outcome, ClientError):
                item["error"] = {"code": outcome.code, "message": outcome.message}
            elif isinstance(outcome, BaseException):
                logger.error("batch item %s failed: %r", upload.filename, outcome)
                item["error"] = {"code": "internal_error", "message": "Classification failed."}
            else:
                item["predictions"] = outcome
            results.append(item)
        return json_response({"model": self.model_name, "results": results,
                              "request_id": rid})

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Images waiting here for a free call slot: load the Classifier's own request count
        cannot see (serve_app.autoscaling adds it)."""
        return {"images_queued": float(self.batcher.queued)}

    @app.get("/v1/models", summary="The served model")
    async def models(self) -> dict:
        return {"models": [self.model_info]}

    @app.get("/healthz", summary="Liveness: the ingress is up")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the classifier has loaded and warmed up",
             responses={503: {"model": ErrorResponse}})
    async def readyz(self, request: Request):
        try:
            await asyncio.wait_for(self.classifier.ready.remote(),
                                   self.settings.readiness_timeout_s)
        except Exception as exc:
            reason = ("the classifier did not answer in time" if isinstance(exc, TimeoutError)
                      else f"the classifier is unavailable ({type(exc).__name__})")
            return error_response(request, "not_ready", reason, 503)
        return json_response({"status": "ready", "model": self.model_name})

"""The HTTP ingress: validation, error mapping and response shaping.

It never decodes an image or touches the model. The images of concurrent requests go out in
groups (serve_app/batching.py): one preprocessor call per group, whose ``DeploymentResponse``
is passed straight into one classifier call, so crops go replica to replica without passing
through here.
"""

import asyncio
import logging
import uuid
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

from serve_app.batching import CallBatcher
from serve_app.config import AppConfig
from serve_app.errors import (
    ClientError,
    InvalidImage,
    PayloadTooLarge,
    UnsupportedMediaType,
    find_client_error,
)

logger = logging.getLogger("ray.serve")

REQUEST_ID_HEADER = "x-request-id"


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


def request_id_of(request: Request) -> str:
    """Ray's proxy puts the client's X-Request-ID (or a fresh id) on every request and echoes
    it on every response; we only repeat it in JSON bodies."""
    rid = request.headers.get(REQUEST_ID_HEADER)
    if rid is None:  # outside Serve's proxy (e.g. the app under a test client)
        rid = request.scope.setdefault("state", {}).setdefault("request_id", uuid.uuid4().hex)
    return rid


app = FastAPI(
    title="serve_app",
    version="0.1.0",
    description="Image classification on Ray Serve. Send image bytes, get ImageNet labels.",
)


@app.exception_handler(ClientError)
async def _client_error(request: Request, exc: ClientError):
    return json_response(error_payload(exc.code, exc.message, request_id_of(request)), exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    details = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return json_response(error_payload("invalid_parameter", details, request_id_of(request)), 422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return json_response(error_payload(code, str(exc.detail), request_id_of(request)),
                         exc.status_code)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception):
    """Faults on our side keep the JSON error shape; overload and timeouts say so."""
    if isinstance(exc, BackPressureError):
        status, code, message = 503, "overloaded", "The service is at capacity; retry later."
    elif isinstance(exc, TimeoutError):
        status, code, message = 504, "timeout", "Classification did not finish in time."
    else:
        logger.exception("unhandled error", exc_info=exc)
        status, code, message = 500, "internal_error", "Internal error; see the server logs."
    return json_response(error_payload(code, message, request_id_of(request)), status)


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
        self.batcher = CallBatcher(self._classify_group, settings.dispatch.max_batch_size,
                                   settings.dispatch.max_in_flight)

    async def _classify_group(self, items: list[tuple[bytes, int]]) -> list:
        crops = self.preprocessor.remote([data for data, _ in items])  # not awaited here
        return await self.classifier.classify.remote(crops, [k for _, k in items])

    async def _classify_bytes(self, data: bytes, top_k: int) -> list[dict]:
        try:
            return await asyncio.wait_for(self.batcher.submit((data, top_k)),
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
        predictions = await self._classify_bytes(data, self._top_k(top_k))
        return json_response({"model": self.model_name, "predictions": predictions,
                              "request_id": request_id_of(request)})

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
        k = self._top_k(top_k)
        payloads = [await u.read() for u in uploads]
        outcomes = await asyncio.gather(*(self._classify_bytes(p, k) for p in payloads),
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
                              "request_id": request_id_of(request)})

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
            return json_response(error_payload("not_ready", reason, request_id_of(request)), 503)
        return json_response({"status": "ready", "model": self.model_name})

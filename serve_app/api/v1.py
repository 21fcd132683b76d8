"""serve_app's own HTTP API: /v1 classification, model listing, health and readiness.

``/v1/classify`` serves the default model; ``/v1/models/{model}/classify`` a named one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.api.common import gateway, json_response, read_body, request_id_of
from serve_app.errors import ClientError, InvalidImage, Unavailable, UnsupportedMediaType
from serve_app.gateway import Gateway
from serve_app.metrics import route_label

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


_ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503, 504)}
_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}},
}}}
_BATCH_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["files"], "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}
TopK = Query(None, ge=1, le=20, description="How many labels (default: args.top_k_default).")

router = APIRouter()


def _top_k(gw: Gateway, top_k: Optional[int]) -> int:
    return gw.settings.top_k_default if top_k is None else top_k


async def _form(request: Request, max_files: int):
    """The multipart form of a body already read; one that cannot be parsed (no boundary, a
    broken part, too many files or fields) is a 400 ``bad_request`` on every route."""
    try:
        return await request.form(max_files=max_files, max_fields=max_files + 8)
    except StarletteHTTPException as exc:  # how Starlette refuses a form
        raise ClientError(f"The multipart body was refused: {exc.detail} (at most {max_files} "
                          f"file{'s' if max_files > 1 else ''} per request)") from None


async def _classify(request: Request, gw: Gateway, model: Optional[str],
                    top_k: Optional[int]):
    """Body: raw image bytes with an ``image/*`` Content-Type, or multipart field ``file``."""
    name = gw.info(model)["name"]  # an unknown model is a 404 before the body is read
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("image/"):
        data = await read_body(request, gw.settings.max_body_bytes)
    elif content_type.startswith("multipart/form-data"):
        await read_body(request, gw.settings.max_body_bytes)
        form = await _form(request, max_files=1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidImage("The multipart body has no file field named 'file'.")
        data = await upload.read()
    else:
        raise UnsupportedMediaType(
            f"Content-Type {content_type or '(none)'} is not supported; send image/* bytes "
            "or multipart/form-data with a field named 'file'.")
    rid = request_id_of(request)
    gw.metrics.received(route_label(request.scope), 1, len(data))
    predictions = await gw.classify(name, data, _top_k(gw, top_k), rid)
    return json_response({"model": name, "predictions": predictions, "request_id": rid})


async def _classify_batch(request: Request, gw: Gateway, model: Optional[str],
                          top_k: Optional[int]):
    """Multipart with repeated field ``files``. Each image succeeds or fails on its own."""
    name = gw.info(model)["name"]
    content_type = request.headers.get("content-type", "").lower()
    if not content_type.startswith("multipart/form-data"):
        raise UnsupportedMediaType("Send multipart/form-data with repeated field 'files'.")
    await read_body(request, gw.settings.max_body_bytes)
    form = await _form(request, max_files=gw.settings.max_batch_files)
    uploads = [u for u in form.getlist("files") if not isinstance(u, str)]
    if not uploads:
        raise InvalidImage("The multipart body has no file fields named 'files'.")
    k, rid = _top_k(gw, top_k), request_id_of(request)
    payloads = [await u.read() for u in uploads]
    gw.metrics.received(route_label(request.scope), len(payloads), sum(map(len, payloads)))
    outcomes = await asyncio.gather(*(gw.classify(name, p, k, rid) for p in payloads),
                                    return_exceptions=True)
    results = []
    for upload, outcome in zip(uploads, outcomes):
        item: dict[str, Any] = {"filename": upload.filename}
        if isinstance(outcome, (ClientError, Unavailable)):  # a bad image; a full queue
            item["error"] = {"code": outcome.code, "message": outcome.message}
        elif isinstance(outcome, BaseException):
            logger.error("batch item %s failed: %r", upload.filename, outcome)
            item["error"] = {"code": "internal_error", "message": "Classification failed."}
        else:
            item["predictions"] = outcome
        results.append(item)
    return json_response({"model": name, "results": results, "request_id": rid})


@router.post("/v1/classify", response_model=ClassifyResponse, responses=_ERRORS,
             openapi_extra=_IMAGE_BODY, summary="Classify one image with the default model")
async def classify(request: Request, top_k: Optional[int] = TopK,
                   gw: Gateway = Depends(gateway)):
    """Body: raw image bytes with an ``image/*`` Content-Type, or multipart field ``file``."""
    return await _classify(request, gw, None, top_k)


@router.post("/v1/models/{model}/classify", response_model=ClassifyResponse, responses=_ERRORS,
             openapi_extra=_IMAGE_BODY, summary="Classify one image with a named model")
async def classify_with(request: Request, model: str, top_k: Optional[int] = TopK,
                        gw: Gateway = Depends(gateway)):
    return await _classify(request, gw, model, top_k)


@router.post("/v1/classify/batch", response_model=BatchResponse, responses=_ERRORS,
             openapi_extra=_BATCH_BODY, summary="Classify several images with the default model")
async def classify_batch(request: Request, top_k: Optional[int] = TopK,
                         gw: Gateway = Depends(gateway)):
    """Multipart with repeated field ``files``. Each image succeeds or fails on its own."""
    return await _classify_batch(request, gw, None, top_k)


@router.post("/v1/models/{model}/classify/batch", response_model=BatchResponse,
             responses=_ERRORS, openapi_extra=_BATCH_BODY,
             summary="Classify several images with a named model")
async def classify_batch_with(request: Request, model: str, top_k: Optional[int] = TopK,
                              gw: Gateway = Depends(gateway)):
    return await _classify_batch(request, gw, model, top_k)


@router.get("/v1/models", summary="The served models, the default first")
async def models(gw: Gateway = Depends(gateway)) -> dict:
    names = sorted(gw.names, key=lambda n: n != gw.default)
    return {"models": [gw.info(n) for n in names]}


@router.get("/v1/models/{model}", summary="One served model", responses=_ERRORS)
async def model_info(model: str, gw: Gateway = Depends(gateway)) -> dict:
    return gw.info(model)


@router.get("/healthz", summary="Liveness: the ingress is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: every model has loaded and warmed up",
            responses={503: {"model": ErrorResponse}})
async def readyz(gw: Gateway = Depends(gateway)):
    await gw.ready(every=True)
    return json_response({"status": "ready", "model": gw.default, "models": gw.names})


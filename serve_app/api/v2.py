"""The Open Inference Protocol (KServe V2 / Triton HTTP) routes under /v2.

The wire format is serve_app/inference_protocol.py; the models are reached through the same
:class:`~serve_app.gateway.Gateway` as /v1 (same grouping, preprocessor and classifier calls).
Errors are ``{"error": "..."}`` (serve_app/api/common.py picks the shape by path).
"""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serve_app import inference_protocol as oip
from serve_app.api.common import error_response, gateway, read_body, request_id_of
from serve_app.errors import ClientError, UnknownModel, UnsupportedMediaType
from serve_app.gateway import Gateway
from serve_app.metrics import route_label

router = APIRouter(prefix="/v2")
_VERSION = "/versions/{version}"


def _model(gw: Gateway, model: str, version: Optional[str]) -> dict:
    info = gw.info(model)
    if version is not None and version != oip.VERSION:
        raise UnknownModel(f"Model {model!r} has no version {version!r}; its versions are "
                           f"[{oip.VERSION!r}].")
    return info


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict:
    return oip.server_metadata(request.app.version)


@router.get("/health/live", summary="Liveness")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: every model can infer")
async def ready(gw: Gateway = Depends(gateway)) -> dict:
    await gw.ready(every=True)
    return {"ready": True}


@router.get("/models/{model}", summary="Model metadata")
@router.get("/models/{model}" + _VERSION, summary="Model metadata (a version)")
async def model_metadata(model: str, version: Optional[str] = None,
                         gw: Gateway = Depends(gateway)) -> dict:
    return oip.model_metadata(_model(gw, model, version))


@router.get("/models/{model}/ready", summary="Model readiness")
@router.get("/models/{model}" + _VERSION + "/ready", summary="Model readiness (a version)")
async def model_ready(model: str, version: Optional[str] = None,
                      gw: Gateway = Depends(gateway)) -> dict:
    name = _model(gw, model, version)["name"]
    await gw.ready(name)
    return {"name": name, "ready": True}


@router.post("/models/{model}/infer", summary="Inference")
@router.post("/models/{model}" + _VERSION + "/infer", summary="Inference (a version)")
async def infer(request: Request, model: str, version: Optional[str] = None,
                gw: Gateway = Depends(gateway)) -> Response:
    """A JSON inference request, optionally followed by binary tensor data
    (``Inference-Header-Content-Length``)."""
    info = _model(gw, model, version)
    name = info["name"]
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding} is not supported; send the "
                                   "request uncompressed.")
    body = await read_body(request, gw.settings.max_body_bytes)
    try:
        parsed = oip.parse_infer_request(
            body, request.headers.get(oip.HEADER_LENGTH), input_size=info["input_size"][-1],
            max_rows=gw.settings.max_batch_files, num_classes=info["num_classes"])
    except oip.ProtocolError as exc:
        code = "too_many_files" if exc.status == 413 else "invalid_tensor"
        return error_response(request, code, exc.message, exc.status)
    rid = request_id_of(request)
    top_k = parsed.top_k or gw.settings.top_k_default
    needed = parsed.labels_needed(gw.settings.top_k_default)
    gw.metrics.received(route_label(request.scope), parsed.rows, len(body))
    if parsed.images is not None:
        outcomes = await asyncio.gather(*(gw.classify(name, image, needed, rid)
                                          for image in parsed.images), return_exceptions=True)
    else:
        outcomes = await gw.classify_pixels(name, parsed.pixels, needed, rid)
    for row, outcome in enumerate(outcomes):  # a client's mistake first, naming its row
        if isinstance(outcome, ClientError):
            return error_response(request, outcome.code, f"row {row}: {outcome.message}",
                                  outcome.status)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    payload, json_size = oip.infer_response(name, parsed, outcomes, top_k, rid)
    if json_size is None:
        return Response(payload, media_type="application/json")
    return Response(payload, media_type="application/octet-stream",
                    headers={oip.HEADER_LENGTH: str(json_size)})


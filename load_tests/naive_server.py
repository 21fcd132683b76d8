"""The naive baseline: one process, FastAPI + uvicorn, a sync endpoint, no batching.

What a user would write in an afternoon instead of a Serve app: decode, preprocess and run the
same model (same transform, same torch threads) per request in FastAPI's threadpool. The
benchmark's ``--naive`` rows compare against it.

    python -m load_tests.naive_server --model '{"name": "resnet18", "weights": null}' --port 8001
"""

from __future__ import annotations

import argparse
import json

import orjson
import torch
from fastapi import Body, FastAPI
from fastapi.responses import Response

from serve_app import imaging
from serve_app.classifier import Predictor
from serve_app.config import ModelConfig
from serve_app.errors import ClientError


def build(model: ModelConfig, threads: int, max_image_pixels: int = 40_000_000) -> FastAPI:
    torch.set_num_threads(threads)
    predictor = Predictor(model, build=True)
    predictor.warm_up([1])
    info = predictor.info
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/classify")
    def classify(data: bytes = Body(..., media_type="image/jpeg"), top_k: int = 5) -> Response:
        try:
            image = imaging.preprocess(data, info.transform, max_image_pixels)
        except ClientError as exc:
            return Response(orjson.dumps({"error": {"code": exc.code, "message": exc.message}}),
                            status_code=exc.status, media_type="application/json")
        probs = predictor.predict(image.unsqueeze(0))[0]
        return Response(orjson.dumps({"model": info.name,
                                      "predictions": imaging.top_k(probs, top_k, info.categories)}),
                        media_type="application/json")

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="{}", help="ModelConfig as JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the CPU share)")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    app = build(ModelConfig.model_validate(json.loads(args.model)), args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()

"""The HTTP surface of the ingress: one router per protocol, composed into one app.

* serve_app/api/v1.py: serve_app's own API (/v1, /healthz, /readyz);
* serve_app/api/v2.py: the Open Inference Protocol (KServe V2 / Triton HTTP) under /v2;
* serve_app/api/common.py: the error mapping, body reading and the Gateway they share;
* serve_app/api/auth.py: optional bearer-token authentication (``args.auth``).
"""

from __future__ import annotations

from fastapi import FastAPI

from serve_app import request_metrics
from serve_app.api import v1, v2
from serve_app.api.auth import BearerAuth, load_token
from serve_app.api.common import install_error_handlers
from serve_app.gateway import Gateway

VERSION = "0.1.0"


def build_app(gw: Gateway) -> FastAPI:
    """The ingress's ASGI app, calling ``gw``."""
    app = FastAPI(
        title="serve_app",
        version=VERSION,
        description="Image classification on Ray Serve. Send image bytes, get ImageNet labels; "
                    "/v1 is serve_app's API, /v2 the Open Inference Protocol (KServe V2, "
                    "Triton HTTP).",
    )
    app.state.gateway = gw
    auth = gw.settings.auth
    if auth is not None:  # inside the metrics middleware, so refusals are counted
        app.add_middleware(BearerAuth, token=load_token(auth.token_env),
                           open_paths=frozenset(auth.open_paths))
    app.add_middleware(request_metrics.RequestMetrics)
    install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    return app

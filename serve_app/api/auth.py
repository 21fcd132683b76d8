"""Optional bearer-token authentication for the ingress (``args.auth``).

The token comes from an environment variable of the ingress replica (a Kubernetes secret via
``valueFrom.secretKeyRef``, or the config's ``runtime_env``), never from the config file.
Requests without ``Authorization: Bearer <token>`` get a 401 in their protocol's JSON shape;
the health endpoints can stay open for probes. Compared in constant time.
"""

from __future__ import annotations

import hmac
import os

from starlette.requests import Request

from serve_app.api.common import error_response, relative_path


def load_token(env_var: str) -> bytes:
    """The token the replica must check, or a start-up failure naming the setting."""
    token = os.environ.get(env_var, "").strip()
    if not token:
        raise RuntimeError(f"args.auth.token_env names {env_var!r}, which is not set (or empty) "
                           "in the ingress replica's environment; set it (a Kubernetes secret, "
                           "or ray_actor_options.runtime_env.env_vars) or remove args.auth")
    return token.encode()


class BearerAuth:
    """Pure ASGI middleware: 401 unless the request carries the token (or its path is open)."""

    def __init__(self, app, token: bytes, open_paths: frozenset[str]):
        self.app = app
        self.expected = b"Bearer " + token
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or relative_path(scope) in self.open_paths:
            return await self.app(scope, receive, send)
        given = b""
        for key, value in scope.get("headers") or ():
            if key == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        why = ("no bearer token; send Authorization: Bearer <token>" if not given
               else "the bearer token is not valid")
        request = Request(scope, receive)
        response = error_response(request, "unauthorized", f"Unauthorized: {why}.", 401,
                                  {"WWW-Authenticate": 'Bearer realm="serve_app"'})
        await response(scope, receive, send)  # /v1 or /v2 shape, chosen by path

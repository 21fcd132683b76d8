"""HAProxy resends a request whose ingress closed without answering, instead of failing it.

When an ingress replica dies, the requests it had read get no response. HAProxy's default
answer is a 502 on a new client connection and, on a kept-alive one whose server connection
was reused (Ray's template: ``http-reuse always``), a close with no answer at all: by its
design "the client is required to retry". A classification has no side effect to repeat, so
serve_app has HAProxy repeat it, on another ingress (``option redispatch 1``, Ray's) or Ray's
fallback proxy while none is up. Three settings together, each useless without the others:

- ``retry-on conn-failure empty-response`` (:data:`REPLAY_ENV`, Ray's own setting): replay a
  request whose server closed the connection before any response;
- ``tune.bufsize`` 1 MiB instead of 16 KiB (:data:`REPLAY_ENV`): HAProxy replays only what it
  still holds, one buffer; 1 MiB is a large photo;
- ``http-request wait-for-body`` in each application's backend (:func:`buffer_requests`,
  through serve_app's HAProxy wrapper, serve_app/haproxy_errors.py, as Ray has no setting for
  it): HAProxy keeps a request for replay only if the whole of it was in its buffer when it
  picked the server; otherwise it picks the server once the headers are in, and a body that
  follows makes the request unreplayable. Only for a declared ``Content-Length`` that fits the
  buffer: a larger one goes through at once, so the ingress can refuse it from its header
  (413) before the body, and a chunked one is not replayed. A body that stalls gets HAProxy's
  408 after :data:`BODY_WAIT_S`. Measured: ``python -m load_tests.haproxy_replay``.

Still not replayed: a request the killed ingress had not read (the kernel resets the
connection, and HAProxy 2.8 retries no read error) and a body over 1 MiB; serve_app.client
resends those.
"""

from __future__ import annotations

from serve_app import haproxy_config

#: Ray's HAProxy settings (ray/serve/_private/constants.py), set for serve_app's clusters unless
#: the caller chose them (serve_app/runner.py, and the pods' env in k8s/).
REPLAY_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
              "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(1 << 20)}
#: How long HAProxy waits for a body it will keep for replay before it answers 408.
BODY_WAIT_S = 30
MARK = "serve_app: whole requests, for replay (serve_app/haproxy_replay.py)"


def wait_for_body(bufsize: int) -> str:
    return (f"http-request wait-for-body time {BODY_WAIT_S}s if "
            f"{{ req.hdr_val(content-length) le {bufsize} }}")


def buffer_requests(text: str) -> str:
    """``text`` (Ray's HAProxy config) with :func:`wait_for_body` in every application's
    backend, for a body that fits the config's ``tune.bufsize``."""
    rule = wait_for_body(haproxy_config.bufsize(text))
    return haproxy_config.add_to_app_backends(text, MARK, lambda name: [rule])

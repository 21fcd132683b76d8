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
- ``option http-buffer-request`` (:func:`buffer_requests`, through serve_app's HAProxy wrapper,
  serve_app/haproxy_errors.py, since Ray has no setting for it): HAProxy keeps a request for
  replay only if the whole of it was in its buffer when it picked the server; without this
  option it picks the server as soon as the headers arrive, and a body that follows a moment
  later makes the request unreplayable. Measured: ``python -m load_tests.haproxy_replay``.

Still not replayed: a request the killed ingress had not read (the kernel resets the
connection, and HAProxy 2.8 retries no read error) and a body over 1 MiB; serve_app.client
resends those.
"""

from __future__ import annotations

import re

#: Ray's HAProxy settings (ray/serve/_private/constants.py), set for serve_app's clusters unless
#: the caller chose them (serve_app/runner.py, and the pods' env in k8s/).
REPLAY_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
              "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(1 << 20)}
BUFFER_REQUEST = "option http-buffer-request"
_SECTION = re.compile(r"^(?=\S)", re.MULTILINE)  # a section starts at column 0
_DEFAULTS = re.compile(r"defaults\b[^\n]*\n")
_HAS_OPTION = re.compile(rf"^\s+{re.escape(BUFFER_REQUEST)}\s*$", re.MULTILINE)


def buffer_requests(text: str) -> str:
    """``text`` (an HAProxy config) with ``option http-buffer-request`` in each ``defaults``
    section that lacks it; a config already rewritten comes back unchanged."""
    def with_option(section: str) -> str:
        head = _DEFAULTS.match(section)
        if head is None or _HAS_OPTION.search(section):
            return section
        return f"{head.group(0)}    {BUFFER_REQUEST}\n{section[head.end():]}"

    return "".join(with_option(section) for section in _SECTION.split(text))

"""HAProxy refuses, at once, what the ingress replicas would refuse: shedding at the edge.

Past capacity most requests are refused (at 3x, two of three). Each refusal cost an ingress
replica a request to parse and answer, on the CPU the forward passes share, so on 2 cores the
refusals' p95 reached 4.6 s at 3x (p50 231 ms); refused here, 91% of them took 0.3-0.4 ms
(p50) and the p95 was 0.10-0.28 s (load_tests/RESULTS.md, "Past capacity"). HAProxy answers in C,
before any Python runs: each ``backend http-<app>`` section of Ray's config gets rules
that return serve_app's JSON 503 ``overloaded`` (with ``Retry-After``) to a POST arriving
while the backend already holds ``admit`` requests per usable ingress replica (HAProxy's
``nbsrv``). ``admit`` is what an ingress replica lets in (:func:`admitted_per_ingress`), so
the ingress's own bound stays the backstop (a batch request carries several images) and the
two agree on what "full" means. GETs (health, metadata) are never shed.

The limits reach the wrapper (serve_app/haproxy_errors.py) in :data:`LIMITS_ENV`, computed
from the config the cluster starts with (serve_app/runner.py; the pods' env in k8s/). A later
``serve deploy`` that changes ``args.dispatch`` keeps the limits of the start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from serve_app import haproxy_config

LIMITS_ENV = "SERVE_APP_HAPROXY_SHED"
#: The body the ingress sends with 503 ``overloaded`` (serve_app/api/common.py), per protocol.
MESSAGE = "The service is at capacity; retry later."
MARK = "serve_app: shed at the edge (serve_app/haproxy_shedding.py)"


def admitted_per_ingress(settings) -> int:
    """The requests one ingress replica admits before it refuses: per model, ``max_queued``
    images waiting plus ``max_in_flight`` calls of up to ``max_batch_size`` (one image each
    for /v1/classify)."""
    d = settings.dispatch
    return len(settings.served) * (d.max_queued + d.max_in_flight * d.max_batch_size)


def limits(data: dict[str, Any], source: str = "config") -> dict[str, dict[str, int]]:
    """``{backend: {"admit": requests per ingress replica, "retry_after_s": ...}}`` for each
    serve_app application of a Serve config, by the name of its backend in Ray's config."""
    from serve_app import configfile

    return {haproxy_config.backend_name(name): {"admit": admitted_per_ingress(settings),
                   "retry_after_s": math.ceil(settings.dispatch.retry_after_s)}
            for name, settings, _ in configfile.check(data, source)}


def pages(directory: Path) -> dict[str, Path]:
    return {"v1": directory / "overloaded-v1.json", "v2": directory / "overloaded-v2.json"}


def page_bodies() -> dict[str, bytes]:
    """The JSON bodies, as the ingress writes them for each protocol (no request id: HAProxy
    has none of the ingress's)."""
    return {"v1": json.dumps({"error": {"code": "overloaded", "message": MESSAGE}}).encode(),
            "v2": json.dumps({"error": MESSAGE}).encode()}


def _rules(admit: int, retry_after_s: int, paths: dict[str, Path]) -> list[str]:
    full = "METH_POST { be_conn,sub(txn.serve_app_admit) gt 0 }"

    def reply(protocol: str) -> str:
        return (f"http-request return status 503 content-type application/json file "
                f"{paths[protocol]} hdr Retry-After {retry_after_s} hdr Cache-Control no-cache "
                f"if {full}")

    return [f"http-request set-var(txn.serve_app_admit) nbsrv,mul({admit})",
            f"{reply('v2')} {{ path_sub /v2/ }}", reply("v1")]


def shed_requests(text: str, app_limits: dict[str, dict[str, int]],
                  paths: dict[str, Path]) -> str:
    """``text`` (Ray's HAProxy config) with the rules first in the backend of each app in
    ``app_limits`` (by its backend name, :func:`limits`)."""
    def rules(name: str) -> list[str] | None:
        limit = app_limits.get(name)
        return limit and _rules(limit["admit"], limit["retry_after_s"], paths)

    return haproxy_config.add_to_app_backends(text, MARK, rules)

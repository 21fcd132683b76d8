"""What HAProxy's stats page counts for one app's backend: its replays
(serve_app/haproxy_replay.py) and the 503s it answered itself (serve_app/haproxy_shedding.py)."""

from __future__ import annotations

import httpx

from serve_app import haproxy_config


def backend_counters(svc, app: str = "serve_app") -> dict:
    """``retries``, ``redispatches`` and ``own_5xx`` (5xx HAProxy answered itself, no server:
    its error pages and the edge shedding) of the app's backend; {} when HAProxy does not run.
    The counters restart when Ray reloads HAProxy (a replica added or removed)."""
    port = svc.cluster_env.get("RAY_SERVE_HAPROXY_STATS_PORT")
    if svc.cluster_env.get("RAY_SERVE_ENABLE_HA_PROXY") != "1" or not port:
        return {}
    rows = httpx.get(f"http://127.0.0.1:{port}/stats;csv", timeout=5).text.splitlines()
    header = rows[0].lstrip("# ").split(",")
    backend, servers_5xx = None, 0
    for row in rows[1:]:
        fields = dict(zip(header, row.split(",")))
        if fields.get("pxname") != haproxy_config.backend_name(app):
            continue
        if fields.get("svname") == "BACKEND":
            backend = fields
        else:
            servers_5xx += int(fields.get("hrsp_5xx") or 0)
    if backend is None:
        return {}
    return {"retries": int(backend["wretr"] or 0), "redispatches": int(backend["wredis"] or 0),
            "own_5xx": int(backend["hrsp_5xx"] or 0) - servers_5xx}

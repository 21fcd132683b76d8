"""Replica counts per deployment from Serve's REST API on the Ray dashboard.

``serve run`` starts its own local Ray cluster in a child process, so the experiment cannot use
``serve.status()`` without joining that cluster as a driver. The dashboard's
``GET /api/serve/applications/`` answers the same question over HTTP with no Ray client at all;
with token auth on (Ray 2.60's default) it needs the cluster's token as a bearer header.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

APPLICATIONS_PATH = "/api/serve/applications/"
_DASHBOARD_RE = re.compile(r"dashboard at \S*?(http://[0-9.]+:\d+)")
_ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class DeploymentReplicas:
    target: int
    running: int
    starting: int
    stopping: int


def auth_token() -> Optional[str]:
    """Ray's token the way Ray finds it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if token:
        return token.strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def dashboard_url_from_log(text: str) -> Optional[str]:
    """The dashboard address ``serve run`` prints when it starts a local Ray instance."""
    match = _DASHBOARD_RE.search(_ANSI_RE.sub("", text))
    return match.group(1) if match else None


def parse_applications(payload: dict[str, Any], app: Optional[str] = None
                       ) -> dict[str, DeploymentReplicas]:
    """{deployment: replica counts} from a ServeInstanceDetails payload (all apps, or ``app``)."""
    out: dict[str, DeploymentReplicas] = {}
    for app_name, details in (payload.get("applications") or {}).items():
        if app is not None and app_name != app:
            continue
        for name, dep in (details.get("deployments") or {}).items():
            states = [r.get("state") for r in dep.get("replicas") or []]
            out[name] = DeploymentReplicas(
                target=int(dep.get("target_num_replicas") or 0),
                running=states.count("RUNNING"),
                starting=sum(s in ("STARTING", "PENDING_MIGRATION", "RECOVERING") for s in states),
                stopping=states.count("STOPPING"),
            )
    return out


class ServeStatusClient:
    """Polls the dashboard for replica counts; one GET per call, a few ms on loopback."""

    def __init__(self, dashboard_url: str, app: Optional[str] = None, timeout_s: float = 2.0):
        self.url = dashboard_url.rstrip("/") + APPLICATIONS_PATH
        self.app = app
        self.timeout_s = timeout_s
        token = auth_token()
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _get(self) -> Optional[dict[str, Any]]:
        request = urllib.request.Request(self.url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except (OSError, urllib.error.HTTPError, ValueError):
            return None

    def replicas(self) -> dict[str, DeploymentReplicas]:
        """Counts per deployment; {} when the dashboard does not answer (the row is left blank)."""
        payload = self._get()
        return parse_applications(payload, self.app) if payload else {}

    def application(self) -> dict[str, Any]:
        """The application's details (status, last_deployed_time_s, deployments); {} when the
        dashboard does not answer."""
        payload = self._get() or {}
        return (payload.get("applications") or {}).get(self.app or "", {})


class Sampler(threading.Thread):
    """Replica counts once a second, in the background, until stopped."""

    def __init__(self, client: ServeStatusClient, period_s: float = 1.0):
        super().__init__(daemon=True)
        self.client = client
        self.period_s = period_s
        self.samples: list[tuple[float, dict]] = []  # (epoch, counts)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            started = time.time()
            self.samples.append((started, self.client.replicas()))
            self._done.wait(max(0.0, self.period_s - (time.time() - started)))

    def stop(self) -> None:
        self._done.set()
        if self.ident is not None:  # started
            self.join(timeout=5)

    def latest(self) -> dict:
        return self.samples[-1][1] if self.samples else {}

    def running_range(self) -> dict[str, list[int]]:
        """[min, max] running replicas per deployment over the samples so far."""
        seen: dict[str, list[int]] = {}
        for _, counts in self.samples:
            for name, c in counts.items():
                low, high = seen.get(name, [c.running, c.running])
                seen[name] = [min(low, c.running), max(high, c.running)]
        return seen

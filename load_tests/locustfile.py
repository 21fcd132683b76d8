"""Locust load for serve_app: real photos to /v1/classify (sometimes /v1/classify/batch).

    locust -f load_tests/locustfile.py --headless --host http://127.0.0.1:8000 \
        --shape step --shape-duration 240 --base-users 2 --peak-users 32

The shape options (also $LOAD_SHAPE, $LOAD_SHAPE_DURATION, $LOAD_BASE_USERS, $LOAD_PEAK_USERS,
$LOAD_WAIT_S) select a profile from ``load_tests/shapes.py``; without ``--shape`` Locust's own
``--users``/``--run-time`` apply. Failures are named by status code ("HTTP 503", "HTTP 0" for a
connection error, "bad body" for a 200 with the wrong shape), so Locust's failure table groups
them that way. ``--request-log FILE`` (``$LOAD_REQUEST_LOG``) appends one CSV row per request
for the autoscaling experiment: start time, latency in ms, status, endpoint. ``--max-requests``
(default 20000) bounds any run.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from typing import Any, Optional

from locust import FastHttpUser, LoadTestShape, events, task

from load_tests import shapes
from load_tests.photos import parse_size, photos_jpeg

SPAWN_RATE = 100.0  # users per second: steps are steps, not ramps


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--shape", choices=shapes.SHAPES, default=None, env_var="LOAD_SHAPE",
                        help="load profile (load_tests/shapes.py); default: Locust's --users")
    parser.add_argument("--shape-duration", type=float, default=240.0,
                        env_var="LOAD_SHAPE_DURATION", help="seconds the profile runs")
    parser.add_argument("--base-users", type=int, default=2, env_var="LOAD_BASE_USERS")
    parser.add_argument("--peak-users", type=int, default=32, env_var="LOAD_PEAK_USERS")
    parser.add_argument("--wait-s", type=float, default=0.1, env_var="LOAD_WAIT_S",
                        help="think time between a user's requests")
    parser.add_argument("--batch-fraction", type=float, default=0.1, env_var="LOAD_BATCH_FRACTION",
                        help="share of requests sent to /v1/classify/batch (2-4 photos each)")
    parser.add_argument("--photo-size", default="640x480", env_var="LOAD_PHOTO_SIZE",
                        help="WIDTHxHEIGHT of the photos sent (smaller: cheaper to decode)")
    parser.add_argument("--request-log", default="", env_var="LOAD_REQUEST_LOG",
                        help="append one CSV row per request to this file")
    parser.add_argument("--max-requests", type=int, default=20000, env_var="LOAD_MAX_REQUESTS",
                        help="stop the run after this many requests (0: no limit)")


_log: dict[str, Any] = {"file": None, "env": None, "count": 0}


@events.test_start.add_listener
def _open_log(environment: Any, **_: Any) -> None:
    _log["env"] = environment
    path = environment.parsed_options.request_log if environment.parsed_options else ""
    if path and _log["file"] is None:
        _log["file"] = open(path, "a", buffering=1)
        _log["file"].write(f"# start {time.time():.4f}\n")  # the shape's t=0


@events.request.add_listener
def _record(request_type: str, name: str, response_time: float, response: Any = None,
            exception: Optional[BaseException] = None, start_time: Optional[float] = None,
            **_: Any) -> None:
    env = _log["env"]
    _log["count"] += 1
    limit = env.parsed_options.max_requests if env and env.parsed_options else 0
    if limit and _log["count"] == limit and env.runner is not None:
        env.runner.quit()  # the hard bound on requests, whatever the shape says
    f = _log["file"]
    if f is None:
        return
    status = getattr(response, "status_code", 0) or 0
    started = start_time if start_time is not None else time.time() - response_time / 1000
    f.write(f"{started:.4f},{response_time:.1f},{status},{name}\n")


@events.quitting.add_listener
def _close_log(**_: Any) -> None:
    if _log["file"] is not None:
        _log["file"].close()
        _log["file"] = None


def check_predictions(predictions: Any) -> bool:
    return (isinstance(predictions, list) and len(predictions) > 0 and all(
        isinstance(p, dict) and {"label", "class_id", "score"} <= p.keys() for p in predictions))


class ClassifyUser(FastHttpUser):
    """One client: posts a photo, checks the answer, waits ``--wait-s``, repeats."""

    def wait_time(self) -> float:
        return self.wait_s

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.wait_s = options.wait_s if options else 0.1
        self.batch_fraction = options.batch_fraction if options else 0.1
        photos = photos_jpeg(parse_size(options.photo_size) if options else (640, 480))
        self.photos = itertools.cycle(random.sample(photos, len(photos)))
        # A service with args.auth (k8s/): the token from the same variable the ingress reads.
        token = os.environ.get("SERVE_APP_API_TOKEN")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def _fail(self, response: Any) -> None:
        code = response.status_code or 0
        response.failure(f"HTTP {code}" if code != 200 else "bad body")

    @task
    def classify(self) -> None:
        if random.random() < self.batch_fraction:
            self._batch()
        else:
            self._single()

    def _single(self) -> None:
        _, data = next(self.photos)
        with self.client.post("/v1/classify", data=data,
                              headers={"Content-Type": "image/jpeg", **self.auth},
                              name="/v1/classify", catch_response=True) as response:
            body = _json(response)
            if body is None or not check_predictions(body.get("predictions")):
                self._fail(response)

    def _batch(self) -> None:
        files = [next(self.photos) for _ in range(random.randint(2, 4))]
        request = _multipart(files)
        request["headers"].update(self.auth)
        with self.client.post("/v1/classify/batch", name="/v1/classify/batch",
                              catch_response=True, **request) as response:
            body = _json(response)
            results = body.get("results") if body else None
            if not (isinstance(results, list) and len(results) == len(files)
                    and all(check_predictions(r.get("predictions")) for r in results)):
                self._fail(response)


def _json(response: Any) -> Optional[dict]:
    """The JSON body of a 200, else None (a 200 that is not JSON counts as a bad body)."""
    if response.status_code != 200:
        return None
    try:
        body = response.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _multipart(files: list[tuple[str, bytes]]) -> dict[str, Any]:
    """A multipart body with repeated field ``files`` (FastHttpUser has no ``files=``)."""
    boundary = f"serveapp{random.getrandbits(64):016x}"
    parts = []
    for name, data in files:
        parts.append((f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
                      f"filename=\"{name}.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
                     + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return {"data": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


class ConfiguredShape(LoadTestShape):
    """The profile named by ``--shape``; without it, Locust runs its plain --users test."""

    def __init__(self) -> None:
        super().__init__()
        self._profile: Optional[shapes.Profile] = None

    def _build(self) -> Optional[shapes.Profile]:
        options = self.runner.environment.parsed_options if self.runner else None
        if options is None or not options.shape:
            return None
        return shapes.build(options.shape, options.shape_duration, options.base_users,
                            options.peak_users)

    def tick(self) -> Optional[tuple[int, float]]:
        if self._profile is None:
            self._profile = self._build()
            if self._profile is None:  # no --shape: behave like a plain run
                options = self.runner.environment.parsed_options
                if options.run_time and self.get_run_time() >= options.run_time:
                    return None
                return options.num_users or 1, options.spawn_rate or 1
        users = self._profile.users_at(self.get_run_time())
        return None if users is None else (users, SPAWN_RATE)

"""/readyz says 503 while the classifier loads and warms up, 200 once it can serve."""

import time

import httpx
import pytest

from serve_app.launch import ServeProcess
from tests.conftest import CONFIGS

pytestmark = pytest.mark.integration


def _slow_to_warm(config: dict) -> None:
    # resnet18 (random weights) with 100 warm-up passes at batch sizes 1 and 8 takes ~17 s on
    # one thread here (150: ~25 s): long enough to see the ingress up and the classifier not
    # yet ready, also with HAProxy, which routes to the ingress a few seconds after it is up.
    args = config["applications"][0]["args"]
    args["model"] = {"name": "resnet18", "weights": None}
    args["warmup_iterations"] = 100
    args["readiness_timeout_s"] = 0.5


def test_readyz_is_503_until_the_classifier_is_warm():
    with ServeProcess(CONFIGS / "local.yaml", edit=_slow_to_warm, ready_path="/healthz") as svc:
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            first = client.get("/readyz")
            assert first.status_code == 503, first.text
            assert first.json()["error"]["code"] == "not_ready"
            assert client.get("/healthz").status_code == 200  # alive, just not ready

            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                ready = client.get("/readyz")
                if ready.status_code == 200:
                    break
                assert ready.status_code == 503
                time.sleep(0.5)
            assert ready.status_code == 200 and ready.json()["status"] == "ready"

"""The simulated accelerator's deployment: a classifier replica that holds each batch for the
latency profile's service time instead of running a network.

Everything around it is real (HAProxy, the ingress's grouping, image decoding in the
preprocessor, ``@serve.batch``, the autoscaling reports), so N replicas are N times the
capacity on a laptop and an autoscaling experiment measures the policy, not CPU contention.
It imports no torch: a replica costs a Ray worker and little else, and starts in
``simulated.start_s`` (slept, as a GPU replica's model load and warm-up would take).
"""

from __future__ import annotations

import logging
import time

from ray import serve

from serve_app import fault_injection, simulated
from serve_app.classifier_base import DEFAULTS, ClassifierBase
from serve_app.config import ModelConfig
from serve_app.crops import Crops

logger = logging.getLogger("ray.serve")


@serve.deployment(max_ongoing_requests=32, user_config=DEFAULTS.model_dump())
class SimulatedClassifier(ClassifierBase):
    """A stand-in accelerator (``model.name: simulated``); see the module docstring."""

    def __init__(self, model: ModelConfig, warmup_iterations: int = 1, info: object = None,
                 log_requests: bool = False, nice: int = 0):
        """The same arguments as serve_app.classifier.Classifier, so the app binds either;
        ``warmup_iterations``, ``info`` and ``nice`` mean nothing here."""
        started = time.perf_counter()
        self._init_counters(model.id, log_requests)
        self.metrics.starting(True)
        self.profile = model.simulated
        self.seed = model.seed
        self.labels = simulated.categories(self.profile.num_classes)
        time.sleep(self.profile.start_s)
        self.init_s = time.perf_counter() - started
        self.metrics.start_phase("load", self.init_s)
        self.metrics.starting(False)
        logger.info("SimulatedClassifier %s ready in %.2fs (start_s %.1f)", model.id,
                    self.init_s, self.profile.start_s)

    def reconfigure(self, user_config: dict) -> None:
        self._apply_batch_settings(user_config)

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size,
                 batch_wait_timeout_s=DEFAULTS.batch_wait_timeout_s)
    async def _predict_batch(self, images: list[tuple[bytes, str, float]]) -> list[bytes]:
        """Holds the replica for the profile's time, on the event loop as the real forward
        pass does (serve_app/classifier.py says why), sleeping so it costs no CPU."""
        started = time.perf_counter()
        fault_injection.block_while_wedged()  # inert unless a test wedges this process
        time.sleep(simulated.service_time_s(self.profile, len(images)))
        self._record_batch(images, started, time.perf_counter() - started)
        return [key for key, _, _ in images]

    def _batch_inputs(self, crops: Crops) -> list[bytes]:
        # A short digest of each crop's pixels: the same image gets the same labels.
        return [bytes(row.reshape(-1)[::97]) for row in crops.pixels]

    def _answer(self, key: bytes, k: int) -> list[dict]:
        return simulated.top_k(key, k, self.labels, self.seed)

    def _mode(self) -> str:
        return "simulated"

    async def check_health(self) -> None:
        """Nothing to run; a wedged event loop still fails Ray's ``health_check_timeout_s``."""

    def stats(self) -> dict:
        return {**self._stats(), "simulated": True, "threads": 0, "compiled": False,
                "device": "simulated"}

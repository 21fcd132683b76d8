"""What every classifier replica does around its batches, whatever runs them: the group call
the ingress makes, the counters the autoscaling policy and the benchmarks read, and the
first-batch record. No torch here: the simulated accelerator's replica
(serve_app/simulated_classifier.py) shares it and stays light.

A subclass provides ``_predict_batch`` (a ``@serve.batch`` method taking
``(image, request id, queued at)`` tuples), :meth:`_batch_inputs` and :meth:`_answer`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Sequence

from ray import serve

from serve_app import crops as crops_module
from serve_app.batch_stats import BatchCounter
from serve_app.config import ClassifierSettings, parse_classifier_settings
from serve_app.metrics import ClassifierMetrics
from serve_app.runtime import process_started_at

logger = logging.getLogger("ray.serve")

DEFAULTS = ClassifierSettings()


class ClassifierBase:
    """Counters and the group call of a classifier replica (see the module docstring)."""

    def _init_counters(self, model_id: str, log_requests: bool) -> None:
        self.metrics = ClassifierMetrics(model_id)
        self.log_requests = log_requests
        self.settings = DEFAULTS
        self.load = BatchCounter()
        self._calls = 0
        self._first_batch: dict[str, float] = {}
        self.init_s = 0.0

    # ---- subclass hooks
    def _batch_inputs(self, crops: crops_module.Crops) -> Sequence[Any]:
        """The decoded images of a group, in crop order, as ``_predict_batch`` takes them."""
        raise NotImplementedError

    def _answer(self, result: Any, k: int) -> list[dict]:
        """One image's ``_predict_batch`` result to its top-``k`` labels."""
        raise NotImplementedError

    def _mode(self) -> str:
        """How this replica computes, for its logs and ``stats``."""
        raise NotImplementedError

    # ---- shared
    def _apply_batch_settings(self, user_config: dict) -> ClassifierSettings:
        self.settings = parse_classifier_settings(user_config)
        self._predict_batch.set_max_batch_size(self.settings.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        return self.settings

    def _record_batch(self, images: list[tuple], started: float, forward_s: float) -> None:
        """Count a batch that ran ``forward_s`` from ``started`` (perf_counter)."""
        self.load.batch(len(images), forward_s)
        waits = [started - queued_at for _, _, queued_at in images]
        self.metrics.batch(len(images), forward_s, waits)
        if self.log_requests:
            ids = list(dict.fromkeys(rid for _, rid, _ in images))
            logger.info("request_ids=%s batch of %d images: forward %.1f ms, waited up to "
                        "%.1f ms", ",".join(ids), len(images), forward_s * 1000,
                        max(waits) * 1000,
                        extra={"request_ids": ids, "serve_app_stage": "classifier"})
        if not self._first_batch:
            # When this replica began serving, and what its start cost in CPU (the process's
            # own user + system time: Ray's worker start, imports, load, warm-up).
            times = os.times()
            self._first_batch = {"first_batch_at": time.time(),
                                 "cpu_s_before_serving": round(times.user + times.system, 2),
                                 "process_started_at": process_started_at() or 0.0}
            logger.info("Classifier first batch: at %.3f (epoch), %.2f CPU-s spent before it, "
                        "init %.2fs, %s, process started at %.3f",
                        self._first_batch["first_batch_at"],
                        self._first_batch["cpu_s_before_serving"], self.init_s, self._mode(),
                        self._first_batch["process_started_at"])

    async def classify(self, crops: crops_module.Crops, top_ks: list[int],
                       request_ids: list[str] | None = None) -> list:
        """Top-k labels for each image of a group (a preprocessor's output), in input order; an
        image that failed preprocessing gets its error back in its place.

        Every image joins the ``@serve.batch`` queue on its own, so images of concurrent groups
        share forward passes up to ``max_batch_size``.
        """
        images = self._batch_inputs(crops)
        # The ids of the images that decoded (a failed image has no crop), in crop order.
        ids = [rid for rid, error in zip(request_ids or [""] * len(top_ks), crops.errors)
               if error is None]
        self._calls += 1
        self.load.images_in_flight += len(images)
        now = time.perf_counter()
        try:
            results = iter(await asyncio.gather(*(self._predict_batch((image, rid, now))
                                                  for image, rid in zip(images, ids))))
        finally:
            self.load.images_in_flight -= len(images)
        return [self._answer(next(results), k) if error is None else error
                for error, k in zip(crops.errors, top_ks)]

    def ready(self) -> bool:
        """Answers only once __init__ (load + warm-up) has finished."""
        return True

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray's custom autoscaling metrics hook, read by serve_app.autoscaling
        (serve_app/batch_stats.py says what it holds)."""
        return self.load.report(self.settings.max_batch_size)

    def _stats(self) -> dict:
        """Counters since start, for benchmarks: calls received, batches run and images
        classified. ``replica`` tells replicas apart, so a benchmark can sum over them."""
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "calls": self._calls, "batches": self.load.batches, "images": self.load.images,
                "init_s": round(self.init_s, 3), **self._first_batch,
                **self.settings.model_dump()}

"""The ingress's way into the model graph, the same for every protocol.

Per served model: a grouping queue (serve_app/batching.py) whose groups make one preprocessor
call and one classifier call, the preprocessor's ``DeploymentResponse`` passed straight into
the classifier so crops go replica to replica without passing through the ingress. The /v1 and
/v2 routers (serve_app/api/) both call :class:`Gateway`: one code path to the models.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from serve_app.autoscaling import IMAGES_QUEUED, images_offered_key, images_queued_key
from serve_app.batch_stats import RateMeter
from serve_app.availability import Availability
from serve_app.batching import CallBatcher, QueueFull
from serve_app.config import AppConfig
from serve_app.errors import (NotReady, Overloaded, ReplicaLost, UnknownModel, find_client_error,
                              is_replica_loss)
from serve_app.crops import Crops
from serve_app.metrics import IngressMetrics
from serve_app.replica_counts import running_replicas

logger = logging.getLogger("ray.serve")


@dataclass
class ModelHandles:
    """What the ingress holds for one model: its description (``ModelInfo.as_dict()``) and
    the handles of the two deployments its images go through."""

    info: dict
    preprocessor: Any  # DeploymentHandle
    classifier: Any  # DeploymentHandle
    classifier_deployment: str  # its name, for the autoscaling report


class _Model:
    def __init__(self, handles: ModelHandles, settings: AppConfig, metrics: IngressMetrics):
        self.handles = handles
        self.settings = settings
        self.metrics = metrics
        self.offered = RateMeter()  # images/s asked of this model (serve_app.autoscaling)
        self.batcher = CallBatcher(self._classify_group, settings.dispatch.max_batch_size,
                                   settings.dispatch.max_in_flight, self._dispatched,
                                   settings.dispatch.max_queued)
        self.availability = Availability(handles.info["name"], self._probe,
                                         settings.readiness_timeout_s,
                                         settings.replica_probe_interval_s, self._went_down,
                                         self._none_running)
        self._calls: set[asyncio.Future] = set()  # in flight into the replicas

    async def _probe(self) -> None:
        """One empty preprocessor call and a classifier ``ready``: both deployments answer."""
        await self.handles.preprocessor.remote([], [])
        await self.handles.classifier.ready.remote()

    async def _none_running(self) -> bool:
        """Whether this model's preprocessor or classifier has no replica that can answer
        (serve_app/replica_counts.py; asked only when a probe failed)."""
        names = (self.handles.preprocessor.deployment_name, self.handles.classifier_deployment)
        counts = await asyncio.to_thread(running_replicas, names)
        return any(counts.get(name) == 0 for name in names)

    async def warm(self) -> None:
        """One probe, so this replica's handles have learned the model's replicas before it
        takes traffic; a model that is not up yet is left to /readyz."""
        try:
            async with asyncio.timeout(self.settings.readiness_timeout_s):
                await self._probe()
        except Exception:
            return
        self.availability.answered()

    def _not_ready(self) -> NotReady:
        return NotReady(f"No replica of {self.handles.info['name']} answers now (one was lost; "
                        "a replacement is starting); retry later.",
                        self.settings.dispatch.retry_after_s)

    def _went_down(self) -> None:
        """No replica answers: fail what waits for one, queued here or held in Ray's router."""
        self.batcher.fail_pending(self._not_ready())
        for call in list(self._calls):
            call.cancel()

    def check_up(self) -> None:
        """Refuse at once while no replica answers, rather than queue for the replacement."""
        if self.availability.down:
            raise self._not_ready()

    async def call(self, awaitable):
        """A call into the model's replicas. A lost replica is a retryable 503 that makes the
        model check whether any other is up; so does a call with no answer after
        ``stall_probe_after_s``, and if none is up the call is failed with 503 ``not_ready``."""
        call = asyncio.ensure_future(awaitable)
        self._calls.add(call)
        try:
            done, _ = await asyncio.wait({call}, timeout=self.settings.stall_probe_after_s)
            if not done:
                self.availability.check()
            result = await call
            self.availability.answered()
            return result
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the request gave up or timed out
                call.cancel()
                raise
            if call.cancelled() and self.availability.down:  # _went_down cancelled it
                raise self._not_ready() from None
            raise
        except Exception as exc:
            if find_client_error(exc) is None and is_replica_loss(exc):
                self.availability.lost()
                raise ReplicaLost(f"A replica serving {self.handles.info['name']} stopped "
                                  f"while it held this request ({type(exc).__name__}); retry.",
                                  self.settings.dispatch.retry_after_s) from None
            raise
        finally:
            self._calls.discard(call)

    def _dispatched(self, waits_s: list[float]) -> None:
        self.metrics.group(len(waits_s), [w * 1000 for w in waits_s])

    async def _classify_group(self, items: list[tuple[bytes, int, str]]) -> list:
        """One preprocessor and one classifier call for a group. The request ids travel with
        the images: Ray's request context names one request per call, a group has several."""
        started = time.perf_counter()
        request_ids = [rid for _, _, rid in items]
        crops = self.handles.preprocessor.remote([data for data, _, _ in items],
                                                 request_ids)  # not awaited
        try:
            return await self.call(self.handles.classifier.classify.remote(
                crops, [k for _, k, _ in items], request_ids))
        finally:
            call_ms = (time.perf_counter() - started) * 1000
            self.metrics.group_done(call_ms)
            if self.settings.log_requests:
                logger.info("request_ids=%s group of %d images for %s: preprocess + classify "
                            "calls %.1f ms", ",".join(request_ids), len(items),
                            self.handles.info["name"], call_ms,
                            extra={"request_ids": request_ids, "serve_app_stage": "dispatch"})


class Gateway:
    """Classify encoded images or ready pixels with a named model; readiness per model."""

    def __init__(self, models: dict[str, ModelHandles], settings: AppConfig,
                 metrics: IngressMetrics):
        self.settings = settings
        self.metrics = metrics
        self._models = {name: _Model(h, settings, metrics) for name, h in models.items()}
        self.default = settings.primary.id
        metrics.watch_queue(lambda: self.queued,
                            lambda: sum(m.batcher.in_flight_items for m in self._models.values()))

    async def warm(self) -> None:
        """Before the ingress takes traffic: a handle learns its deployment's replicas on its
        first call, which took seconds on a busy machine, and a new ingress in a rollout held
        its first requests that long (then refused them: the probe waited too)."""
        await asyncio.gather(*(m.warm() for m in self._models.values()))

    @property
    def names(self) -> list[str]:
        return list(self._models)

    @property
    def queued(self) -> int:
        return sum(m.batcher.queued for m in self._models.values())

    def _model(self, name: Optional[str]) -> _Model:
        model = self._models.get(self.default if name is None else name)
        if model is None:
            raise UnknownModel(f"No model named {name!r}; this service has {self.names}.")
        return model

    def info(self, name: Optional[str] = None) -> dict:
        """``ModelInfo.as_dict()`` of a served model, with whether it is the default."""
        info = self._model(name).handles.info
        return {**info, "default": info["name"] == self.default}

    async def _bounded(self, awaitable):
        """The call within ``request_timeout_s``; a client's error unwrapped from Ray's."""
        try:
            return await asyncio.wait_for(awaitable, self.settings.request_timeout_s)
        except Exception as exc:
            client_error = find_client_error(exc)
            if client_error is not None:
                raise client_error from None
            raise

    async def classify(self, name: Optional[str], data: bytes, top_k: int,
                       request_id: str) -> list[dict]:
        """One encoded image's top-k, through the model's grouping queue."""
        model = self._model(name)
        model.offered.add()  # before any refusal: demand the policy must see
        model.check_up()
        try:
            pending = model.batcher.submit((data, top_k, request_id))
            return await self._bounded(pending)
        except QueueFull:
            raise Overloaded(f"{model.batcher.queued} images are already waiting for "
                             f"{model.handles.info['name']}; retry later.",
                             self.settings.dispatch.retry_after_s) from None

    async def classify_pixels(self, name: Optional[str], pixels: np.ndarray, top_k: int,
                              request_id: str) -> list[list[dict]]:
        """Already preprocessed images ((N, 3, S, S) uint8, or float32 in [0, 1]) straight to
        the classifier, whose ``@serve.batch`` queue they share with every other image."""
        model = self._model(name)
        n = len(pixels)
        model.offered.add(n)
        model.check_up()
        crops = Crops(pixels, [None] * n)
        return await self._bounded(model.call(
            model.handles.classifier.classify.remote(crops, [top_k] * n, [request_id] * n)))

    async def ready(self, name: Optional[str] = None, every: bool = False) -> None:
        """Raise NotReady unless the model (or ``every`` model) has loaded and warmed up."""
        models = list(self._models.values()) if every else [self._model(name)]

        async def one(model: _Model) -> None:
            try:
                await asyncio.wait_for(model.handles.classifier.ready.remote(),
                                       self.settings.readiness_timeout_s)
            except Exception as exc:
                why = ("did not answer in time" if isinstance(exc, TimeoutError)
                       else f"is unavailable ({type(exc).__name__})")
                raise NotReady(f"the classifier of {model.handles.info['name']} {why}",
                               self.settings.dispatch.retry_after_s) from None

        await asyncio.gather(*(one(m) for m in models))

    def autoscaling_stats(self) -> dict[str, float]:
        """Images waiting here for a free call slot, in all and per classifier deployment, and
        the images/s offered per classifier, refused ones included: load the classifiers' own
        request counts cannot see (serve_app.autoscaling)."""
        stats = {IMAGES_QUEUED: float(self.queued)}
        for model in self._models.values():
            deployment = model.handles.classifier_deployment
            stats[images_queued_key(deployment)] = float(model.batcher.queued)
            stats[images_offered_key(deployment)] = model.offered.rate()
        return stats

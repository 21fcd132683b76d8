"""The HTTP ingress deployment: the protocol routers (serve_app/api/) over a Gateway.

It never decodes an image or touches a model. The images of concurrent requests go out in
groups per model (serve_app/gateway.py): one preprocessor call per group, whose
``DeploymentResponse`` is passed straight into one classifier call, so crops go replica to
replica without passing through here.
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from ray import serve

from serve_app import api, request_metrics
from serve_app.autoscaling import INGRESS_CPU
from serve_app.batch_stats import RateMeter
from serve_app.config import AppConfig
from serve_app.gateway import Gateway, ModelHandles
from serve_app.metrics import IngressMetrics


@serve.deployment(max_ongoing_requests=64)
@serve.ingress()  # the app is built per replica, around this replica's Gateway
class Ingress:
    async def __init__(self, models: dict[str, ModelHandles], settings: AppConfig):
        """``models``: served name -> its description and deployment handles (serve_app/app.py).
        Ready (and reachable through HAProxy) once its handles know the models' replicas."""
        self.metrics = IngressMetrics()
        request_metrics.configure(self.metrics, settings.log_requests)
        self.gateway = Gateway(models, settings, self.metrics)
        self.cpu = RateMeter(total=time.process_time)  # this process's own load
        await self.gateway.warm()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return api.build_app(self.gateway)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Images waiting here for a free call slot and offered per model (serve_app.autoscaling
        adds them to the classifiers' load), and the CPU this replica spent: the Ingress
        scales on its own work, not on requests waiting for the models."""
        return {**self.gateway.autoscaling_stats(), INGRESS_CPU: self.cpu.rate()}

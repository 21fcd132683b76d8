"""The model deployment: dynamic batching, forward pass, softmax and top-k."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import threading
import time

import torch
from ray import serve

from serve_app import artifacts, fault_injection, imaging, models
from serve_app.classifier_base import DEFAULTS as _DEFAULTS
from serve_app.classifier_base import ClassifierBase
from serve_app.config import ModelConfig
from serve_app.crops import Crops
from serve_app.runtime import (assigned_resources, configure_torch_threads, cpu_threads,
                               lower_priority, select_device)

logger = logging.getLogger("ray.serve")


class Predictor:
    """A network on its device: uint8 batches in, probabilities out. No Ray here.

    With ``model.compile`` it runs the compiled artifact built for this machine
    (serve_app/artifacts.py) without building the eager network at all; when none is built
    yet it runs the eager network until :meth:`use_compiled` swaps one in.
    """

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None,
                 threads: int | None = None, build: bool = False,
                 info: models.ModelInfo | None = None):
        """``threads``: what the artifact is compiled for (default: torch's current count).
        ``build``: build a missing artifact now, before returning (tools and benchmarks; a
        replica serves eager and builds in the background instead). ``info``: the model's
        description when the caller has it (``models.describe`` imports torchvision)."""
        self.info = info or models.describe(cfg)
        self.device = device or torch.device("cpu")
        self.dtype = artifacts.effective_dtype(cfg, self.device.type)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.artifact = (artifacts.Artifact.of(cfg, self.device, threads or torch.get_num_threads())
                         if cfg.compile else None)
        if self.artifact is not None and build:
            self.artifact.build(cfg, self.device)
        network = self.artifact.load() if self.artifact else None
        self.model: torch.nn.Module | None = None
        if network is None:
            self.model = models.build_model(cfg).to(self.device, dtype=self.dtype,
                                                    memory_format=self.memory_format)
            self._runner: tuple = (self.model, None)
        else:
            self._runner = (network, artifacts.MAX_BATCH)

    @property
    def compiled(self) -> bool:
        return self._runner[1] is not None

    def use_compiled(self, network: artifacts.Network, warm: list[int], iterations: int = 1) -> None:
        """Warm ``network`` on ``warm`` batch sizes, then serve it from the next batch on and
        drop the eager one. One assignment, so a batch running on another thread finishes on
        whichever network it started with."""
        runner = (network, artifacts.MAX_BATCH)
        self.warm_up(warm, iterations, runner)
        self._runner = runner
        self.model = None

    @torch.inference_mode()
    def predict(self, batch: torch.Tensor, runner: tuple | None = None) -> torch.Tensor:
        """(N, 3, H, W) uint8 (or float in [0, 1]) to (N, classes) float32 probabilities on the
        CPU."""
        network, limit = runner or self._runner
        fault_injection.block_while_wedged()  # inert unless a test wedges this process
        x = batch.to(self.device, non_blocking=True)
        x = imaging.normalize(x, self.info.transform.mean, self.info.transform.std, self.dtype)
        x = x.contiguous(memory_format=self.memory_format)
        if limit is None or len(x) <= limit:
            logits = network(x)
        else:  # a compiled network takes at most its batch range at once
            logits = torch.cat([network(chunk) for chunk in x.split(limit)])
        return logits.float().softmax(dim=-1).cpu()

    @staticmethod
    def sizes_to_warm(max_batch_size: int) -> list[int]:
        """The batch sizes to run before serving up to ``max_batch_size``: the two ends."""
        return sorted({1, max_batch_size})

    def warm_up(self, batch_sizes: list[int], iterations: int = 1,
                runner: tuple | None = None) -> None:
        size = self.info.transform.crop_size
        for n in batch_sizes:
            for _ in range(iterations):
                self.predict(torch.zeros((n, 3, size, size), dtype=torch.uint8), runner)


@serve.deployment(
    max_ongoing_requests=32,
    user_config=_DEFAULTS.model_dump(),
)
class Classifier(ClassifierBase):
    """Model replicas. Requests are batched by ``@serve.batch``; size and wait come from
    ``user_config`` so ``serve deploy`` retunes them without reloading the model."""

    def __init__(self, model: ModelConfig, warmup_iterations: int = 1,
                 info: models.ModelInfo | None = None, log_requests: bool = False,
                 nice: int = 0):
        init_started = time.perf_counter()
        self.nice = lower_priority(nice)
        self._init_counters(model.id, log_requests)
        self.metrics.starting(True)
        resources = self._resources = assigned_resources()
        self.threads = configure_torch_threads(resources)
        self.predictor = Predictor(model, select_device(resources), self.threads, info=info)
        loaded = time.perf_counter()
        self.metrics.start_phase("load", loaded - init_started)
        self._skew_seen: dict[tuple, int] = {}  # crop sizes not this model's: images resized
        self.warmup_iterations = warmup_iterations
        self._warm_sizes = set(self.predictor.sizes_to_warm(_DEFAULTS.max_batch_size))
        self.predictor.warm_up(sorted(self._warm_sizes), warmup_iterations)
        self.init_s = time.perf_counter() - init_started
        self.metrics.start_phase("warmup", self.init_s - (loaded - init_started))
        self.metrics.compiled(self.predictor.compiled)
        self.metrics.starting(False)
        self._builder: subprocess.Popen | None = None
        if model.compile and not self.predictor.compiled:
            # Serve the eager network now; build the artifact at the lowest CPU priority and
            # swap it in when it is ready, so no start ever waits for a compile.
            self._builder = self.predictor.artifact.build_in_background(model, self.predictor.device)
            threading.Thread(target=self._swap_in_when_built, name="serve_app-artifact",
                             daemon=True).start()
        mode = ("compiled" if self.predictor.compiled else
                "eager, compiled artifact building in the background" if model.compile else "eager")
        logger.info("Classifier %s on %s (%s, %d threads, %s) loaded and warmed up in %.2fs",
                    model.id, self.predictor.device, self.predictor.dtype, self.threads, mode,
                    self.init_s)

    def _swap_in_when_built(self) -> None:
        started = time.perf_counter()
        code = self._builder.wait()
        network = self.predictor.artifact.load()
        if network is None:
            logger.warning("Compiled artifact build failed (exit %s); serving the eager network",
                           code)
            return
        configure_torch_threads(threads=self.threads)  # per OS thread, as in _predict_batch
        self.predictor.use_compiled(network, sorted(self._warm_sizes), self.warmup_iterations)
        self.metrics.start_phase("compile", time.perf_counter() - started)
        self.metrics.compiled(True)
        logger.info("Classifier now serves the compiled artifact %s", self.predictor.artifact.path)

    def __del__(self):
        builder = getattr(self, "_builder", None)
        if builder is not None and builder.poll() is None:
            builder.terminate()  # a replica that stops takes its build along; others rebuild

    def reconfigure(self, user_config: dict) -> None:
        self._apply_batch_settings(user_config)
        share = cpu_threads(self._resources)
        threads = configure_torch_threads(threads=self.settings.torch_threads or share)
        if threads > share and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
            logger.warning("torch_threads %d is more than this replica's CPU share gives and "
                           "idle OpenMP threads spin: beside other busy replicas that cost 4-6x "
                           "the throughput here; set OMP_WAIT_POLICY=PASSIVE in runtime_env",
                           threads)
        # Warm what traffic will see first: a new batch size, or every size on a new thread
        # count (oneDNN keys its kernels on the thread count and builds them on first use).
        cold = set(self.predictor.sizes_to_warm(self.settings.max_batch_size)) - self._warm_sizes
        self._warm_sizes |= cold
        if threads != self.threads:
            self.threads, cold = threads, self._warm_sizes
        if cold:
            self.predictor.warm_up(sorted(cold), self.warmup_iterations)

    @serve.batch(max_batch_size=_DEFAULTS.max_batch_size,
                 batch_wait_timeout_s=_DEFAULTS.batch_wait_timeout_s)
    async def _predict_batch(self, images: list[tuple[torch.Tensor, str, float]]
                             ) -> list[torch.Tensor]:
        """``images``: (crop, request id, when it joined the queue). Ray clears the request
        context inside a batch, so the ids come in with the images."""
        batch = imaging.stack_pixels([pixels for pixels, _, _ in images])
        # Here, not only in reconfigure: torch's thread count is per OS thread once a thread
        # has run an op (OpenMP), and Ray runs __init__, reconfigure and requests on
        # different threads. Set in reconfigure alone, 2 threads were reported and 1 used.
        configure_torch_threads(threads=self.threads)
        started = time.perf_counter()
        # On the event loop, on purpose. Ray 2.60's batch loop forms the next batch as soon as
        # this one is *dispatched*; with the forward in a thread it keeps cutting size-1
        # batches that then queue behind it (mean batch 1.0 at 32 clients). Blocking here
        # makes the next batch take everything that arrived during this forward pass.
        probs = self.predictor.predict(batch)
        self._record_batch(images, started, time.perf_counter() - started)
        return list(probs)

    def _batch_inputs(self, crops: Crops) -> torch.Tensor:
        return self._fit(torch.from_numpy(crops.pixels.copy()))  # Ray's array is read-only

    def _answer(self, probs: torch.Tensor, k: int) -> list[dict]:
        return imaging.top_k(probs, k, self.predictor.info.categories)

    def _mode(self) -> str:
        return "compiled" if self.predictor.compiled else "eager"

    def _fit(self, pixels: torch.Tensor) -> torch.Tensor:
        """Crops of another model's size (a model change rolling out) resized to this one's."""
        size = self.predictor.info.transform.crop_size
        if len(pixels) and pixels.shape[-2:] != (size, size):
            if self._skew_seen.setdefault(tuple(pixels.shape[-2:]), 0) == 0:
                logger.warning("Crops of %s px for a model of %d px, resized: another "
                               "version of this application is still serving (a rollout)",
                               "x".join(map(str, pixels.shape[-2:])), size)
            self._skew_seen[tuple(pixels.shape[-2:])] += len(pixels)
            return imaging.fit_crops(pixels, size)
        return pixels

    async def check_health(self) -> None:
        """Ray's health check (``health_check_period_s``): a one-image forward pass in a thread,
        under ``health_check_forward_timeout_s``. A live process whose model no longer returns
        (a wedged kernel or driver call) fails it and is replaced; a liveness check alone would
        keep it. A forward that wedged the event loop fails it too: then this never runs and
        Ray's ``health_check_timeout_s`` expires."""
        size = self.predictor.info.transform.crop_size
        image = torch.zeros((1, 3, size, size), dtype=torch.uint8)

        def forward() -> None:
            configure_torch_threads(threads=self.threads)  # per OS thread
            self.predictor.predict(image)

        timeout = self.settings.health_check_forward_timeout_s
        try:
            await asyncio.wait_for(asyncio.to_thread(forward), timeout)
        except TimeoutError:
            raise RuntimeError(f"a one-image forward pass did not finish in {timeout}s: the "
                               "model is wedged") from None

    def stats(self) -> dict:
        return {**self._stats(), "threads": self.threads, "compiled": self.predictor.compiled,
                "device": str(self.predictor.device)}

"""The CPU preprocessing deployment: image bytes in, uint8 crops out."""

from __future__ import annotations

import logging
import time
from typing import Optional

from ray import serve

from serve_app import imaging
from serve_app.metrics import PreprocessorMetrics
from serve_app.pixel_budget import PixelBudget
from serve_app.runtime import configure_torch_threads
from serve_app.topology import FEEDS

logger = logging.getLogger("ray.serve")


def _jpeg(size: int = 32) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 96, 64)).save(buf, "JPEG")
    return buf.getvalue()


_WARM_UP_JPEG = _jpeg()


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class Preprocessor:
    """Decode, resize and center-crop with the model's own transform.

    One call carries the images of a group of requests (serve_app/batching.py). It returns
    uint8 crops: a quarter of the bytes of float32 to move to the classifier, which normalizes
    on its own device.
    """

    def __init__(self, transform: imaging.TransformSpec, max_image_pixels: int,
                 log_requests: bool = False, feeds: tuple[str, ...] = (),
                 max_decoding_pixels: Optional[int] = None):
        """``feeds``: the classifier deployments this one prepares images for.
        ``max_decoding_pixels``: the pixels decoded at once in this replica, across the
        concurrent calls Ray runs in its thread pool (``AppConfig.decode_budget_pixels``);
        ``None``: no bound."""
        self.transform = transform
        self.feeds = feeds
        self.max_image_pixels = max_image_pixels
        self.budget = PixelBudget(max_decoding_pixels)
        self.log_requests = log_requests
        self.metrics = PreprocessorMetrics()
        configure_torch_threads()
        # Decode and resize one small JPEG before taking traffic: imaging imports torchvision
        # where it is used (the classifier never needs it), and the first request should not
        # pay that import (~2 s of CPU).
        imaging.preprocess(_WARM_UP_JPEG, transform, max_image_pixels)

    def __call__(self, images: list[bytes],
                 request_ids: Optional[list[str]] = None) -> imaging.Crops:
        started = time.perf_counter()
        crops = imaging.preprocess_many(images, self.transform, self.max_image_pixels,
                                        self.metrics.image, self.budget)
        if self.log_requests:
            ids = request_ids or []
            logger.info("request_ids=%s preprocessed %d images (%d failed) in %.1f ms",
                        ",".join(ids), len(images), sum(e is not None for e in crops.errors),
                        (time.perf_counter() - started) * 1000,
                        extra={"request_ids": ids, "serve_app_stage": "preprocessor"})
        return crops

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Which classifiers this preprocessor feeds (serve_app.topology.FEEDS), so the policy
        sizes it to them."""
        return {FEEDS + name: 1.0 for name in self.feeds}

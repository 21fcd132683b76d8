"""The CPU preprocessing deployment: image bytes in, a uint8 crop out."""

from __future__ import annotations

import torch
from ray import serve

from serve_app import imaging
from serve_app.runtime import configure_torch_threads


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class Preprocessor:
    """Decode, resize and center-crop with the model's own transform.

    It returns uint8 (3, crop, crop) tensors: a quarter of the bytes of float32 to pickle and
    move to the classifier, which normalizes on its own device.
    """

    def __init__(self, transform: imaging.TransformSpec, max_image_pixels: int):
        self.transform = transform
        self.max_image_pixels = max_image_pixels
        configure_torch_threads()

    def __call__(self, data: bytes) -> torch.Tensor:
        return imaging.preprocess(data, self.transform, self.max_image_pixels)

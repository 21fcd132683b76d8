"""The CPU preprocessing deployment: image bytes in, uint8 crops out."""

from __future__ import annotations

from ray import serve

from serve_app import imaging
from serve_app.runtime import configure_torch_threads


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=16)
class Preprocessor:
    """Decode, resize and center-crop with the model's own transform.

    One call carries the images of a group of requests (serve_app/batching.py). It returns
    uint8 crops: a quarter of the bytes of float32 to move to the classifier, which normalizes
    on its own device.
    """

    def __init__(self, transform: imaging.TransformSpec, max_image_pixels: int):
        self.transform = transform
        self.max_image_pixels = max_image_pixels
        configure_torch_threads()

    def __call__(self, images: list[bytes]) -> imaging.Crops:
        return imaging.preprocess_many(images, self.transform, self.max_image_pixels)

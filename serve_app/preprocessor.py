"""The CPU preprocessing deployment: image bytes in, uint8 crops out."""

from __future__ import annotations

from ray import serve

from serve_app import imaging
from serve_app.runtime import configure_torch_threads


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

    def __init__(self, transform: imaging.TransformSpec, max_image_pixels: int):
        self.transform = transform
        self.max_image_pixels = max_image_pixels
        configure_torch_threads()
        # Decode and resize one small JPEG before taking traffic: imaging imports torchvision
        # where it is used (the classifier never needs it), and the first request should not
        # pay that import (~2 s of CPU).
        imaging.preprocess(_WARM_UP_JPEG, transform, max_image_pixels)

    def __call__(self, images: list[bytes]) -> imaging.Crops:
        return imaging.preprocess_many(images, self.transform, self.max_image_pixels)

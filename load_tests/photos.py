"""Real photos for load: the ones that ship inside pip packages, as realistic JPEGs.

skimage's chelsea (a cat), coffee, rocket and astronaut, matplotlib's grace_hopper and
scikit-learn's china/flower, each resized to 640x480 and JPEG-encoded (quality 90): the size
of a typical phone upload after client-side downscaling.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

SIZE = (640, 480)


def _sources() -> dict[str, np.ndarray]:
    from skimage import data

    images = {name: getattr(data, name)() for name in ("chelsea", "coffee", "rocket", "astronaut")}
    try:
        import matplotlib.cbook as cbook

        with cbook.get_sample_data("grace_hopper.jpg") as f:
            images["grace_hopper"] = np.asarray(Image.open(f).convert("RGB"))
    except Exception:  # matplotlib without its sample data
        pass
    try:
        from sklearn.datasets import load_sample_images

        for name, img in zip(("china", "flower"), load_sample_images().images):
            images[name] = img
    except ImportError:
        pass
    return images


def encode(array: np.ndarray, fmt: str = "JPEG", size: tuple[int, int] | None = SIZE,
           **save_args) -> bytes:
    image = Image.fromarray(array).convert("RGB")
    if size is not None:
        image = image.resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}), **save_args)
    return buf.getvalue()


@lru_cache(maxsize=None)
def photos_jpeg(size: tuple[int, int] = SIZE) -> tuple[tuple[str, bytes], ...]:
    """(name, JPEG bytes at ``size``, 640x480 by default) for every available sample photo."""
    return tuple((name, encode(img, size=size)) for name, img in sorted(_sources().items()))


def parse_size(text: str) -> tuple[int, int]:
    """``"160x120"`` -> (160, 120)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a photo size is WIDTHxHEIGHT, e.g. 640x480, not {text!r}") from None
    if width < 1 or height < 1:
        raise ValueError(f"a photo size must be positive, not {text!r}")
    return width, height


def large_jpeg(width: int = 6400, height: int = 6250, quality: int = 90) -> bytes:
    """The cat upscaled to ``width`` x ``height`` (40 MP by default, the default
    ``max_image_pixels``) and JPEG-encoded: smooth, so it stays small (1.95 MB at 40 MP, q90;
    under the 10 MiB body limit, where 40 MP of noise would be ~30 MB), and it decodes and
    resizes at full cost."""
    image = Image.fromarray(_sources()["chelsea"]).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()

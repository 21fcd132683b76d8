"""Turning what a caller has (a path, bytes, a PIL image, a numpy array) into upload bytes.

Bytes and files go out exactly as given, never re-encoded: the server decodes them itself and
a re-encode could only lose quality. Pixels (PIL images, arrays) are encoded as PNG, which is
lossless, so the server sees the very pixels the caller holds.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

#: What ``Client.classify`` accepts as an image. PIL and numpy objects are accepted too; they
#: are spelled ``Any`` here so that importing the client needs neither package.
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]

#: Sent when the bytes match no known signature. The server refuses anything not ``image/*``
#: with 415 but sniffs the real format itself, so this lets it give the truer answer: a 400
#: ``invalid_image`` when the bytes are not an image it can decode.
UNKNOWN_IMAGE_TYPE = "image/unknown"

_EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif",
               "image/webp": ".webp", "image/bmp": ".bmp", "image/tiff": ".tiff"}

# Modes PNG stores as they are; anything else (CMYK, YCbCr, float, ...) is converted to RGB.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"}


@dataclass(frozen=True)
class Upload:
    """One image ready to send: the bytes, their media type, and a filename for multipart."""

    filename: str
    data: bytes
    content_type: str


def sniff_content_type(data: bytes) -> str:
    """The media type the bytes' signature says, or :data:`UNKNOWN_IMAGE_TYPE`."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM"):
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return UNKNOWN_IMAGE_TYPE


def to_upload(image: ImageInput, index: int = 0) -> Upload:
    """``image`` as an :class:`Upload`; ``index`` names unnamed images (``image{index}.png``).

    Raises TypeError for an unsupported type, ValueError for an array of the wrong shape or
    dtype, and OSError when a path cannot be read.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        data = path.read_bytes()
        return Upload(path.name or f"image{index}", data, sniff_content_type(data))
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        content_type = sniff_content_type(data)
        return Upload(f"image{index}{_EXTENSIONS.get(content_type, '')}", data, content_type)
    if _is_pil_image(image):
        return Upload(f"image{index}.png", _png_from_pil(image), "image/png")
    if _is_ndarray(image):
        return Upload(f"image{index}.png", _png_from_array(image), "image/png")
    raise TypeError(f"Cannot classify a {type(image).__name__}: pass a path, bytes, a "
                    "PIL.Image.Image or a uint8 numpy array (HxW or HxWx3).")


# PIL and numpy are only imported once the caller has: an object cannot be a PIL image or an
# ndarray unless its module is already loaded.
def _is_pil_image(obj: object) -> bool:
    module = sys.modules.get("PIL.Image")
    return module is not None and isinstance(obj, module.Image)


def _is_ndarray(obj: object) -> bool:
    module = sys.modules.get("numpy")
    return module is not None and isinstance(obj, module.ndarray)


def _png_from_pil(image: Any) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _png_from_array(array: Any) -> bytes:
    import numpy as np
    from PIL import Image

    if array.dtype != np.uint8:
        raise ValueError(f"Arrays must be uint8 (got {array.dtype}); scale and cast first, "
                         "e.g. (x * 255).clip(0, 255).astype(np.uint8).")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        raise ValueError(f"Arrays must be HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA); "
                         f"got shape {array.shape}.")
    return _png_from_pil(Image.fromarray(np.ascontiguousarray(array)))

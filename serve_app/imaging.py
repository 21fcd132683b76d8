"""Pure image functions: decode bytes, resize and crop, normalize, top-k. No Ray in here.

Everything between decoding and the model stays ``uint8`` (CHW): a 224x224 crop is 150 KB
instead of 600 KB of float32, which is what crosses the replica boundary. Normalization
happens on the model's device, in :func:`normalize`.

torchvision is imported inside the functions that decode and resize: the classifier replica
uses only :func:`normalize` and :func:`top_k`, and importing torchvision (which imports
``torch._dynamo``) would add ~2 s of CPU to every classifier start.
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from serve_app.crops import Crops
from serve_app.errors import ClientError, ImageTooLarge, InvalidImage
from serve_app.pixel_budget import PixelBudget

__all__ = ["Crops"]  # re-exported: the preprocessor's output type

#: Formats a client may send. MPO is what cameras call a JPEG with extra frames.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF"})
#: The only parsers ``Image.open`` may try (PIL's JPEG parser opens MPO files as well).
_PIL_FORMATS = tuple(sorted(SUPPORTED_FORMATS - {"MPO"}))

# We enforce our own pixel limit right after reading the header; PIL's own bomb check would
# otherwise warn (or raise) with a different message before ours runs.
Image.MAX_IMAGE_PIXELS = None

_NO_BUDGET = PixelBudget(None)


@dataclass(frozen=True)
class TransformSpec:
    """How a model wants its input, as torchvision's ``weights.transforms()`` declares it."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_torchvision(cls, preset) -> "TransformSpec":
        """Read an ``ImageClassification`` preset (``weights.transforms()``)."""
        return cls(
            resize_size=int(preset.resize_size[0]),
            crop_size=int(preset.crop_size[0]),
            mean=tuple(float(m) for m in preset.mean),
            std=tuple(float(s) for s in preset.std),
            interpolation=preset.interpolation.value,
        )


@dataclass(frozen=True)
class Header:
    """What an image's header declares, read before any pixel is decoded."""

    image: Image.Image  # opened, not loaded
    format: str
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _sniff_format(data: bytes) -> str | None:
    """The name of the format whose signature ``data`` starts with, from PIL's signature
    checks alone (no plugin parses the bytes): to name an unsupported format in the error."""
    Image.init()
    prefix = data[:16]
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # some checks need more bytes than a short body has
            continue
    return None


def read_header(data: bytes, max_pixels: int) -> Header:
    """Open ``data`` with the supported formats' parsers only and check its pixel count.

    Only :data:`SUPPORTED_FORMATS` are tried: PIL's other parsers are not meant for hostile
    input, and one decodes inside ``Image.open`` (an ICO's embedded PNG, at any size: a 219 KB
    ICO took 216 MiB and 0.7 s before its format was refused). Refusing from the header means
    a decompression bomb costs nothing.
    """
    if not data:
        raise InvalidImage("The request body is empty; send the bytes of an image.")
    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
        fmt, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        other = _sniff_format(data)
        if other is not None and other not in SUPPORTED_FORMATS:
            raise InvalidImage(f"Image format {other} is not supported.") from None
        raise InvalidImage("The body is not an image in a supported format "
                           f"({', '.join(sorted(SUPPORTED_FORMATS - {'MPO'}))}).") from None
    except Exception as exc:
        raise InvalidImage(f"The image header cannot be read: {exc}") from None
    if fmt not in SUPPORTED_FORMATS:  # a plugin of a supported format named another one
        raise InvalidImage(f"Image format {fmt} is not supported.")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"The image has {width}x{height} = {width * height} pixels; the limit is {max_pixels}.")
    return Header(image, fmt, width, height)


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """Bytes of a JPEG/PNG/WebP/BMP/GIF to an RGB ``uint8`` tensor of shape (3, H, W).

    EXIF orientation is applied; grayscale, palette, CMYK and alpha images become RGB (alpha
    is composited over white); a GIF gives its first frame. The pixel count is checked from
    the header, before any pixel is decoded, so a decompression bomb costs nothing.
    """
    return decode_pixels(data, read_header(data, max_pixels))


def decode_pixels(data: bytes, header: Header) -> torch.Tensor:
    """The pixels of an image whose header :func:`read_header` has checked."""
    try:
        if header.format == "JPEG":
            from torchvision.io import ImageReadMode, decode_jpeg

            # libjpeg-turbo straight into a tensor: about twice as fast as PIL + numpy.
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, apply_exif_orientation=True)
        return _decode_with_pil(header.image)
    except (ImageTooLarge, InvalidImage):
        raise
    except Exception as exc:
        raise InvalidImage(f"The image is corrupt or truncated: {exc}") from None
    finally:
        # Frees PIL's copy of the pixels now: the caller's resize would otherwise run beside
        # it (a 40 MP RGB image is 160 MB in PIL), and PIL's image files sit in reference
        # cycles that only the garbage collector breaks.
        header.image.close()


def _decode_with_pil(image: Image.Image) -> torch.Tensor:
    """PIL's decode, then RGB; each step makes a full-size copy only when it changes pixels
    (a 40 MP PNG peaked at 687 MiB with the plain copies, most of it copies)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL warns on odd palettes/EXIF; they decode fine
        image.seek(0)  # first frame of an animation
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when there is no orientation
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
            del rgba, background
        if image.mode != "RGB":
            image = image.convert("RGB")
        # A read-only view of PIL's bytes; the permuted copy below is the tensor's own memory.
        array = np.asarray(image)
        del image
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def resized_size(width: int, height: int, resize_size: int) -> tuple[int, int]:
    """(width, height) after the short side is resized to ``resize_size``, as torchvision's
    ``resize`` computes it: what :func:`resize_crop` allocates, in float32, before cropping."""
    short, long = min(width, height), max(width, height)
    if short == 0:
        return width, height
    new_long = int(resize_size * long / short)
    return (resize_size, new_long) if width <= height else (new_long, resize_size)


def check_resized(header: Header, spec: TransformSpec, max_pixels: int) -> int:
    """The pixels the resize makes; an extreme aspect ratio (a 449-byte 30000x4 PNG resizes to
    256x1920000: 12.8 GB and 23 s) is refused like an image over the limit."""
    width, height = resized_size(header.width, header.height, spec.resize_size)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"The image is {header.width}x{header.height}: resizing its short side to "
            f"{spec.resize_size} would make {width}x{height} = {width * height} pixels; the "
            f"limit is {max_pixels}. Its aspect ratio is too extreme.")
    return width * height


def resize_crop(image: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """Resize the short side to ``resize_size`` and center-crop ``crop_size``, staying uint8.

    The same calls, in the same order, as torchvision's ``ImageClassification`` preset, so the
    result equals the reference pipeline's before its float conversion.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    interpolation = InterpolationMode(spec.interpolation)
    out = TF.resize(image, [spec.resize_size], interpolation=interpolation, antialias=True)
    return TF.center_crop(out, [spec.crop_size])


def preprocess(data: bytes, spec: TransformSpec, max_pixels: int,
               budget: PixelBudget | None = None) -> torch.Tensor:
    """Decode, resize and crop one image. With a ``budget``, its pixels (or its resized
    pixels, if more) are reserved from the header's counts until the crop is made: the
    full-size decode and the resize's float32 copy (~15 bytes per pixel together) are what a
    replica's memory peaks on."""
    header = read_header(data, max_pixels)
    resized = check_resized(header, spec, max_pixels)
    with (budget or _NO_BUDGET).reserve(max(header.pixels, resized)):
        return resize_crop(decode_pixels(data, header), spec)


def preprocess_many(images: Sequence[bytes], spec: TransformSpec, max_pixels: int,
                    on_image: Callable[[float, Exception | None], None] | None = None,
                    budget: PixelBudget | None = None) -> Crops:
    """The preprocessor's whole job: :func:`preprocess` each image; one bad image fails alone.
    ``on_image(seconds, error)`` hears of each image as it is done (the metrics)."""
    crops: list[torch.Tensor] = []
    errors: list[Exception | None] = []
    for data in images:
        started = time.perf_counter()
        try:
            crops.append(preprocess(data, spec, max_pixels, budget))
            errors.append(None)
        except ClientError as exc:
            errors.append(exc)
        except Exception as exc:  # a decoder bug must not fail the other requests of the group
            errors.append(RuntimeError(f"preprocessing failed: {type(exc).__name__}: {exc}"))
        if on_image is not None:
            on_image(time.perf_counter() - started, errors[-1])
    if crops:
        pixels = torch.stack(crops).numpy()
    else:
        pixels = np.empty((0, 3, spec.crop_size, spec.crop_size), dtype=np.uint8)
    return Crops(pixels, errors)


def stack_pixels(crops: Sequence[torch.Tensor]) -> torch.Tensor:
    """One batch from crops of one size: uint8 as they come, float32 in [0, 1] as soon as one
    of them is (a /v2 ``pixels`` request may share a batch with decoded images)."""
    if any(c.is_floating_point() for c in crops):
        return torch.stack([c.float() if c.is_floating_point() else c.float().div_(255)
                            for c in crops])
    return torch.stack(list(crops))


def fit_crops(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Crops (N, 3, H, W) resized to ``size`` x ``size`` when they are another size, dtype kept.

    Only while a model change rolls out: Ray restarts the ingress, preprocessor and classifier
    deployments each on its own, so for a few seconds crops cut for the old model can reach the
    new one (or the reverse). Resizing them serves those requests instead of failing them.
    """
    if pixels.shape[-2:] == (size, size) or len(pixels) == 0:
        return pixels
    x = pixels if pixels.is_floating_point() else pixels.float()
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
    if pixels.is_floating_point():
        return out.to(pixels.dtype)
    return out.round_().clamp_(0, 255).to(pixels.dtype)


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W), or floats already in [0, 1], to normalized floats, as
    ``convert_image_dtype`` + ``normalize``."""
    x = batch.to(dtype) if batch.is_floating_point() else batch.to(dtype).div_(255)
    mean_t = torch.as_tensor(mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def top_k(probs: torch.Tensor, k: int, categories: Sequence[str]) -> list[dict]:
    """One image's probabilities to its ``k`` best ``{"label", "class_id", "score"}``."""
    k = max(1, min(int(k), probs.shape[-1]))
    scores, ids = torch.topk(probs.float(), k)
    return [
        {"label": categories[i], "class_id": i, "score": s}
        for s, i in zip(scores.tolist(), ids.tolist())
    ]

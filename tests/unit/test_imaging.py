"""Decoding, transforms and postprocessing, without Ray."""

import io

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, ImageOps
from skimage import data

from serve_app import imaging
from serve_app.errors import ImageTooLarge, InvalidImage
from serve_app.imaging import TransformSpec

MAX_PIXELS = 40_000_000


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cat() -> Image.Image:
    return Image.fromarray(data.chelsea())  # 451x300 RGB


def _as_array(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy().astype(np.int16)


@pytest.mark.parametrize("fmt,tolerance", [("PNG", 0), ("BMP", 0), ("JPEG", 12), ("WEBP", 16)])
def test_decodes_each_format_to_rgb_uint8(cat, fmt, tolerance):
    out = imaging.decode_image(_encode(cat, fmt), MAX_PIXELS)
    assert out.dtype == torch.uint8 and out.shape == (3, 300, 451)
    # lossy formats differ from the source by compression noise only
    assert np.abs(_as_array(out) - np.asarray(cat, dtype=np.int16)).mean() <= tolerance


def test_gif_gives_its_first_frame():
    red, blue = Image.new("RGB", (40, 30), (255, 0, 0)), Image.new("RGB", (40, 30), (0, 0, 255))
    blob = _encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    out = imaging.decode_image(blob, MAX_PIXELS)
    assert out.shape == (3, 30, 40)
    assert out[:, 10, 10].tolist() == [255, 0, 0]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "1"])
def test_other_modes_become_rgb(cat, mode):
    image = cat.convert(mode) if mode != "I;16" else cat.convert("L").convert("I;16")
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    out = imaging.decode_image(_encode(image, fmt), MAX_PIXELS)
    assert out.shape == (3, 300, 451) and out.dtype == torch.uint8
    if mode in ("L", "1"):
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_cmyk_jpeg_matches_pil_conversion(cat):
    blob = _encode(cat.convert("CMYK"), "JPEG", quality=95)
    out = imaging.decode_image(blob, MAX_PIXELS)
    expected = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.int16)
    assert np.abs(_as_array(out) - expected).max() <= 2


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_is_composited_over_white(mode):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    image.putpixel((0, 0), (255, 0, 0, 255))
    save_args = {}
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":  # a palette with a transparent index, as in GIFs and small PNGs
        image = Image.new("P", (8, 8), 0)
        image.putpalette([0, 0, 0, 255, 0, 0])
        image.putpixel((0, 0), 1)
        save_args = {"transparency": 0}
    out = imaging.decode_image(_encode(image, "PNG", **save_args), MAX_PIXELS)
    assert out[:, 4, 4].tolist() == [255, 255, 255]
    assert out[:, 0, 0].tolist() != [255, 255, 255]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation,expected_shape", [(1, (3, 30, 60)), (3, (3, 30, 60)),
                                                        (6, (3, 60, 30)), (8, (3, 60, 30))])
def test_exif_orientation_is_applied(fmt, orientation, expected_shape):
    # A 60x30 image, left half red, right half blue, stored with an EXIF orientation tag.
    image = Image.new("RGB", (60, 30), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = imaging.decode_image(_encode(image, fmt, exif=exif.tobytes()), MAX_PIXELS)
    assert out.shape == expected_shape
    stored = Image.open(io.BytesIO(_encode(image, fmt, exif=exif.tobytes())))
    reference = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"), dtype=np.int16)
    assert np.abs(_as_array(out) - reference).mean() < 8
    # the red half ends where the orientation puts it: top-left pixel is red for 1, blue for 3
    top_left = out[:, 2, 2].tolist()
    assert (top_left[0] > 200) == (orientation in (1, 6)), (orientation, top_left)


@pytest.mark.parametrize("payload", [b"", b"hello, world", b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
                                     b"\xff\xd8\xff\xe0garbage"])
def test_not_an_image_is_invalid(payload):
    with pytest.raises(InvalidImage):
        imaging.decode_image(payload, MAX_PIXELS)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_image_is_invalid(cat, fmt):
    blob = _encode(cat, fmt)
    with pytest.raises(InvalidImage):
        imaging.decode_image(blob[: len(blob) // 2], MAX_PIXELS)


def test_unsupported_format_is_invalid(cat):
    with pytest.raises(InvalidImage, match="TIFF"):
        imaging.decode_image(_encode(cat, "TIFF"), MAX_PIXELS)


def test_decompression_bomb_is_refused_from_the_header():
    # 20000x20000 of one color: a tiny PNG that would take 1.2 GB decoded.
    blob = _encode(Image.new("L", (20000, 20000)), "PNG")
    assert len(blob) < 1_000_000
    with pytest.raises(ImageTooLarge, match="20000x20000"):
        imaging.decode_image(blob, MAX_PIXELS)


def test_pixel_limit_is_configurable(cat):
    with pytest.raises(ImageTooLarge):
        imaging.decode_image(_encode(cat, "PNG"), max_pixels=451 * 300 - 1)
    assert imaging.decode_image(_encode(cat, "PNG"), max_pixels=451 * 300).shape == (3, 300, 451)


@pytest.mark.parametrize("weights", [
    torchvision.models.ResNet50_Weights.IMAGENET1K_V2,       # resize 232, crop 224
    torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1,   # resize 256, crop 224
    torchvision.models.EfficientNet_B3_Weights.IMAGENET1K_V1,  # bicubic, 320/300
])
def test_transforms_match_torchvision_reference(cat, weights):
    preset = weights.transforms()
    spec = TransformSpec.from_torchvision(preset)
    pixels = imaging.decode_image(_encode(cat, "PNG"), MAX_PIXELS)

    ours = imaging.normalize(imaging.resize_crop(pixels, spec)[None], spec.mean, spec.std)[0]
    reference_tensor = preset(pixels)          # the preset applied to the same uint8 tensor
    reference_pil = preset(cat)                # and to the PIL image, as most users do
    assert ours.shape == reference_tensor.shape == (3, spec.crop_size, spec.crop_size)
    assert torch.allclose(ours, reference_tensor, atol=1e-5)
    # PIL's resampling differs from torch's by a few levels per pixel; after normalization
    # that stays small on average.
    assert (ours - reference_pil).abs().mean() < 0.05


def test_resize_crop_stays_uint8():
    spec = TransformSpec(256, 224, (0.5,) * 3, (0.5,) * 3)
    out = imaging.resize_crop(torch.randint(0, 255, (3, 480, 640), dtype=torch.uint8), spec)
    assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)


def test_top_k_orders_and_labels():
    probs = torch.tensor([0.1, 0.5, 0.05, 0.35])
    out = imaging.top_k(probs, 2, ["a", "b", "c", "d"])
    assert out == [{"label": "b", "class_id": 1, "score": pytest.approx(0.5)},
                   {"label": "d", "class_id": 3, "score": pytest.approx(0.35)}]
    assert all(isinstance(p["score"], float) and isinstance(p["class_id"], int) for p in out)


def test_top_k_is_clamped_to_the_number_of_classes():
    assert len(imaging.top_k(torch.tensor([0.2, 0.8]), 5, ["a", "b"])) == 2


def test_preprocess_many_stacks_the_good_and_keeps_each_error(cat):
    spec = TransformSpec(resize_size=64, crop_size=56, mean=(0.5,) * 3, std=(0.5,) * 3)
    good = _encode(cat, "JPEG")
    huge = _encode(Image.new("RGB", (600, 400)), "PNG")  # 240 000 pixels
    crops = imaging.preprocess_many([good, b"not an image", good, huge], spec, max_pixels=200_000)
    assert len(crops) == 4
    assert crops.pixels.dtype == np.uint8 and crops.pixels.shape == (2, 3, 56, 56)
    np.testing.assert_array_equal(crops.pixels[0], imaging.preprocess(good, spec, 200_000).numpy())
    assert crops.errors[0] is None and crops.errors[2] is None
    assert isinstance(crops.errors[1], InvalidImage) and isinstance(crops.errors[3], ImageTooLarge)


def test_preprocess_many_isolates_an_unexpected_failure(cat, monkeypatch):
    spec = TransformSpec(resize_size=64, crop_size=56, mean=(0.5,) * 3, std=(0.5,) * 3)
    good = _encode(cat, "PNG")
    real = imaging.read_header

    def flaky(data, max_pixels):
        if data == b"boom":
            raise KeyError("decoder bug")
        return real(data, max_pixels)

    monkeypatch.setattr(imaging, "read_header", flaky)
    crops = imaging.preprocess_many([b"boom", good], spec, MAX_PIXELS)
    assert crops.pixels.shape[0] == 1 and crops.errors[1] is None
    assert isinstance(crops.errors[0], RuntimeError) and "KeyError" in str(crops.errors[0])
    empty = imaging.preprocess_many([b"boom"], spec, MAX_PIXELS)
    assert empty.pixels.shape == (0, 3, 56, 56)


def test_float_pixels_in_unit_range_normalize_like_uint8():
    """/v2 FP32 ``pixels`` ([0, 1]) give what the same uint8 crop gives, also when a batch
    mixes the two."""
    from serve_app.imaging import normalize, stack_pixels

    crop = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    as_uint8 = normalize(stack_pixels([crop]), mean, std)
    mixed = stack_pixels([crop, crop.float() / 255])
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(normalize(mixed, mean, std), torch.cat([as_uint8, as_uint8]))
    assert stack_pixels([crop, crop]).dtype == torch.uint8  # the common case stays uint8


def test_fit_crops_leaves_the_right_size_alone_and_resizes_another():
    crops = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    assert imaging.fit_crops(crops, 224) is crops
    bigger = imaging.fit_crops(crops, 260)
    assert bigger.shape == (3, 3, 260, 260) and bigger.dtype == torch.uint8
    flat = torch.full((1, 3, 260, 260), 77, dtype=torch.uint8)  # a flat image stays flat
    assert torch.equal(imaging.fit_crops(flat, 224), torch.full((1, 3, 224, 224), 77,
                                                               dtype=torch.uint8))
    floats = torch.rand(2, 3, 224, 224)
    out = imaging.fit_crops(floats, 260)
    assert out.dtype == torch.float32 and out.shape[-2:] == (260, 260)
    assert 0 <= out.min() and out.max() <= 1 + 1e-6
    # Downsized and back, a smooth image keeps its content (the same picture, not noise).
    smooth = torch.linspace(0, 255, 224).round().to(torch.uint8).expand(1, 3, 224, 224)
    back = imaging.fit_crops(imaging.fit_crops(smooth.contiguous(), 260), 224)
    assert (back.int() - smooth.int()).abs().max() <= 2
    empty = torch.zeros((0, 3, 224, 224), dtype=torch.uint8)
    assert imaging.fit_crops(empty, 260) is empty

"""Decompression bombs are refused before their pixels are allocated, without Ray.

Two ways to see it: PIL's and torchvision's allocators are watched (no image core over a
small size is ever made), and a fresh process's peak RSS (the kernel's VmHWM, reset first)
does not grow by more than noise while each is refused.
"""

import pytest
import torch
from PIL import Image

from serve_app import imaging
from serve_app.errors import ImageTooLarge, InvalidImage
from serve_app.imaging import TransformSpec
from tests import hostile_images as hostile

MAX_PIXELS = 40_000_000
SPEC = TransformSpec(resize_size=256, crop_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
BIG = 1_000_000  # pixels: anything over this allocated during a refusal is a failure


@pytest.fixture
def allocations(monkeypatch):
    """Every image core PIL makes and every JPEG torchvision decodes, as pixel counts."""
    made: list[int] = []
    core = Image.core
    for name in ("new", "fill"):
        real = getattr(core, name)

        def watched(mode, size, *args, _real=real):
            made.append(size[0] * size[1])
            return _real(mode, size, *args)

        monkeypatch.setattr(core, name, watched)
    import torchvision.io

    real_jpeg = torchvision.io.decode_jpeg

    def jpeg(data, *args, **kwargs):
        made.append(-1)
        return real_jpeg(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", jpeg)
    return made


BOMBS = {
    # name: (bytes, what is refused, the message names)
    "PNG IHDR 50000x50000": (lambda: hostile.png(50000, 50000), ImageTooLarge, "50000x50000"),
    "GIF screen 65535x65535, frame 1x1": (lambda: hostile.gif((65535, 65535), (1, 1)),
                                          ImageTooLarge, "65535x65535"),
    "GIF screen 1x1, frame 65535x65535": (lambda: hostile.gif((1, 1), (65535, 65535)),
                                          ImageTooLarge, "65535x65535"),
    # An ICO may embed a PNG of any size, and PIL's ICO parser decodes it inside Image.open:
    # before read_header tried only the supported formats' parsers, this 12000x12000 one
    # (~140 KB) cost 140 MiB and ~0.5 s before "ICO is not supported".
    "ICO embedding a 12000x12000 PNG": (lambda: hostile.ico(hostile.png(12000, 12000, rows=True)),
                                        InvalidImage, "ICO"),
    "TIFF 30000x30000": (lambda: hostile.encode(Image.new("1", (30000, 30000)), "TIFF",
                                                compression="group4"), InvalidImage, "TIFF"),
    "BMP declaring 40000x40000": (lambda: b"BM" + (54 + 16).to_bytes(4, "little") + b"\0" * 4
                                  + (54).to_bytes(4, "little") + (40).to_bytes(4, "little")
                                  + (40000).to_bytes(4, "little") + (40000).to_bytes(4, "little")
                                  + (1).to_bytes(2, "little") + (24).to_bytes(2, "little")
                                  + b"\0" * 24 + b"\0" * 16, ImageTooLarge, "40000x40000"),
    # Few pixels, but resizing the short side to 256 makes 256x1920000 floats: 12.8 GB and
    # 23 s before the resized size was checked.
    "PNG 30000x4 (aspect ratio)": (lambda: hostile.encode(Image.new("RGB", (30000, 4)), "PNG"),
                                   ImageTooLarge, "aspect ratio"),
}


@pytest.fixture(scope="module")
def bombs() -> dict:
    return {name: (make(), error, text) for name, (make, error, text) in BOMBS.items()}


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_bomb_is_refused_before_its_pixels_are_allocated(bombs, allocations, name):
    blob, error, text = bombs[name]
    assert len(blob) < 300_000, len(blob)
    with pytest.raises(error, match=text):
        imaging.preprocess(blob, SPEC, MAX_PIXELS)
    assert not [n for n in allocations if n > BIG or n < 0], allocations


#: Run in a fresh interpreter: in a long-lived one (the whole unit suite) freed heap pages
#: stay resident, an allocation can reuse them, and the peak would not show it.
_MEASURE = """
import io, json, os, sys
sys.path.insert(0, sys.argv[1])
from PIL import Image
from load_tests.processes import peak_mib, reset_peak
from serve_app import imaging
from tests import hostile_images as hostile
from tests.unit.test_decompression_bombs import BOMBS, MAX_PIXELS, SPEC

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))

def growth(fn):
    if not reset_peak(os.getpid()):
        return None
    before = rss()
    fn()
    return peak_mib(os.getpid()) - before

def refuse(blob):
    try:
        imaging.preprocess(blob, SPEC, MAX_PIXELS)
    except Exception:
        return
    raise AssertionError("not refused")

out = {}
for name, (make, _, _) in BOMBS.items():
    blob = make()
    refuse(blob)  # imports and first-call caches, outside the measurement
    out[name] = growth(lambda: refuse(blob))
ico = hostile.ico(hostile.png(12000, 12000, rows=True))
out["control: the ICO opened by every PIL parser"] = growth(lambda: Image.open(io.BytesIO(ico)))
print(json.dumps(out))
"""
CONTROL = "control: the ICO opened by every PIL parser"


@pytest.fixture(scope="module")
def peak_growth_mib() -> dict:
    """Each bomb's peak RSS growth (MiB) while refused, in one fresh interpreter."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run([sys.executable, "-c", _MEASURE, root], capture_output=True,
                          text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    if growth[CONTROL] is None:
        pytest.skip("/proc/self/clear_refs is not writable here")
    return growth


@pytest.mark.parametrize("name", list(BOMBS))
def test_a_bomb_does_not_raise_the_peak_rss(peak_growth_mib, name):
    assert peak_growth_mib[name] < 20, peak_growth_mib


def test_the_peak_rss_measure_sees_a_real_decode(peak_growth_mib):
    """The RSS measure can fail: the same ICO opened the way read_header no longer does (any
    format's parser, Image.open's default) decodes its 12000x12000 PNG: +137 MiB."""
    assert peak_growth_mib[CONTROL] > 100, peak_growth_mib


def test_the_watch_sees_a_real_decode(allocations):
    """The allocation watch above can fail: a decode it is meant to catch is caught."""
    imaging.preprocess(hostile.png(2000, 1000, rows=True), SPEC, MAX_PIXELS)
    assert max(allocations) >= 2000 * 1000
    imaging.preprocess(hostile.encode(Image.new("RGB", (64, 64)), "JPEG"), SPEC, MAX_PIXELS)
    assert -1 in allocations


def test_a_multi_frame_gif_decodes_only_its_first_frame(allocations):
    """Frames after the first are never decoded, whatever they declare."""
    first = hostile.encode(Image.new("P", (40, 30), 1), "GIF", save_all=True,
                           append_images=[Image.new("P", (40, 30), 2)])
    out = imaging.decode_image(first, MAX_PIXELS)
    assert out.shape == (3, 30, 40)
    assert max(allocations) <= 40 * 30


def test_a_jpeg_carrying_another_jpeg_decodes_only_the_main_image():
    """An embedded JPEG (as EXIF thumbnails and MPO frames are: inside an APPn segment) is
    never decoded; only the main image's SOF counts, and only it is checked."""
    inner = hostile.encode(Image.new("RGB", (160, 120), (255, 0, 0)), "JPEG")
    main = hostile.encode(Image.new("RGB", (64, 48), (0, 0, 255)), "JPEG")
    app2 = b"\xff\xe2" + (len(inner) + 2).to_bytes(2, "big") + inner
    blob = main[:2] + app2 + main[2:]
    out = imaging.decode_image(blob, MAX_PIXELS)
    assert out.shape == (3, 48, 64) and out[2].float().mean() > 200


def test_resized_size_matches_torchvision():
    from torchvision.transforms import functional as TF

    for w, h in [(451, 300), (300, 451), (1000, 10), (7, 640), (256, 256), (1, 1)]:
        out = TF.resize(torch.zeros(1, h, w, dtype=torch.uint8), [256], antialias=True)
        assert imaging.resized_size(w, h, 256) == (out.shape[2], out.shape[1]), (w, h)

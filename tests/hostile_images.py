"""Hostile and oversized images, built byte by byte where PIL cannot write them (a PNG header
declaring 50000x50000 without 2.5 GB of pixels behind it): shared by the unit, live and fuzz
tests."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

from load_tests.photos import large_jpeg  # noqa: F401  (a 40 MP JPEG, re-exported)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, rows: bool = False) -> bytes:
    """An 8-bit grayscale PNG declaring ``width`` x ``height``. ``rows``: with every row of
    zeros really there (compressed about 1000:1), so a decoder that starts writes them all;
    without, one row then the end (truncated: a decoder still allocates the whole image)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    comp = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + pixels
    data = b"".join(comp.compress(row) for _ in range(height if rows else 1)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data)
            + _chunk(b"IEND", b""))


def gif(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF89a whose logical screen and first frame have the given sizes (one 1-pixel LZW
    block of data)."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return header + descriptor + b"\x02\x02\x44\x01\x00;"


def ico(inner: bytes) -> bytes:
    """A Windows icon with one entry: ``inner`` (a PNG, which an ICO may embed at any size)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner), 6 + 16)
    return header + entry + inner


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()

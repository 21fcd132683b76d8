"""Fuzzing the live service (hypothesis): every answer is a 200 or a JSON 4xx, never a 5xx,
and /readyz stays 200.

Inputs: real photos encoded as JPEG/PNG/GIF/WebP/BMP/TIFF/MPO, mutated (bit flips, byte
runs, truncations, insertions, declared dimensions rewritten to huge or odd ones with the
checksums fixed); random bytes; wrong, odd and missing Content-Types; malformed and nested
multipart for /v1/classify and /v1/classify/batch; malformed V2 inference requests (JSON and
binary tensors); and at the transport level 0- and 1-byte bodies, bodies over max_body_bytes,
chunked bodies with no Content-Length and slow senders.

Reproducible: the examples are derandomized (the same ones every run) and no example
database is written. ``SERVE_APP_FUZZ_EXAMPLES=N`` runs N examples per test instead of the
CI counts (185 examples in all; the run docs/reliability.md quotes had 200, 100, 200, 200 and
30 per test: 733).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import struct
import time
import zlib
from collections import Counter
from functools import lru_cache
from typing import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from load_tests.photos import photos_jpeg
from tests import hostile_images as hostile

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES_ENV = "SERVE_APP_FUZZ_EXAMPLES"
MAX_BODY = 10 * 1024 * 1024  # configs/local.yaml's max_body_bytes
MODEL = "efficientnet_lite0"


def _examples(ci_count: int) -> int:
    value = os.environ.get(EXAMPLES_ENV)
    return int(value) if value else ci_count


def fuzz_settings(ci_count: int):
    return settings(max_examples=_examples(ci_count), deadline=None, derandomize=True,
                    database=None, print_blob=False, report_multiple_bugs=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


# ---- what every answer must be ----

#: (route, status, error code) of every answer, printed at the end (-s): shows what the
#: examples reached (a fuzzer whose inputs all fail the same first check tests little).
SEEN: Counter = Counter()


def _record(path: str, status: int, payload) -> None:
    code = None
    if isinstance(payload, dict) and status >= 400:
        error = payload.get("error")
        code = error.get("code") if isinstance(error, dict) else "v2"
    SEEN[(path.rsplit("/", 1)[-1] if path.startswith("/v2") else path, status, code)] += 1


def check(response: httpx.Response, what: str = "") -> None:
    """A 200 with the route's JSON, or a JSON 4xx in its protocol's shape; never a 5xx, nor an
    internal error hidden in a batch item."""
    status, ctype = response.status_code, response.headers.get("content-type", "")
    where = f"{what} -> {status} {response.text[:300]!r}"
    assert status == 200 or 400 <= status < 500, where
    assert ctype.startswith("application/json") or (
        status == 200 and ctype.startswith("application/octet-stream")), where  # V2 binary
    if not ctype.startswith("application/json"):
        return
    body = response.json()
    _record(response.request.url.path, status, body)
    if status >= 400:
        if response.request.url.path.startswith("/v2"):
            assert isinstance(body.get("error"), str) and body["error"], where
        else:
            assert body["error"]["code"] and body["error"]["message"], where
            assert body["error"]["code"] != "internal_error", where
            # Starlette's own refusal, unmapped (was a malformed multipart on /v1/classify)
            assert body["error"]["code"] != "http_error", where
    for item in body.get("results", []) if isinstance(body, dict) else []:
        assert "predictions" in item or item["error"]["code"] != "internal_error", where


# ---- seeds: real photos in every format, small so that a decode is cheap ----

@lru_cache(maxsize=1)
def seeds() -> tuple[tuple[str, bytes], ...]:
    photos = dict(photos_jpeg())
    out = [("JPEG", photos["chelsea"])]  # one as the load tests send it: 640x480, q90
    import io

    for name in ("coffee", "astronaut"):
        image = Image.open(io.BytesIO(photos[name])).convert("RGB").resize((96, 72))
        out += [("JPEG", hostile.encode(image, "JPEG", quality=85)),
                ("JPEG", hostile.encode(image, "JPEG", progressive=True)),
                ("PNG", hostile.encode(image, "PNG")),
                ("PNG", hostile.encode(image.convert("RGBA"), "PNG")),
                ("GIF", hostile.encode(image.convert("P"), "GIF", save_all=True,
                                       append_images=[image.rotate(90).convert("P")])),
                ("WEBP", hostile.encode(image, "WEBP", quality=70)),
                ("BMP", hostile.encode(image, "BMP")),
                ("TIFF", hostile.encode(image, "TIFF")),
                ("MPO", hostile.encode(image, "MPO", save_all=True,
                                       append_images=[image.rotate(180)]))]
    return tuple(out)


def _png_with_crc(data: bytearray) -> None:
    """Recompute the IHDR's CRC, so a rewritten size is read instead of refused as corrupt."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 33:
        data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))


def set_dimensions(fmt: str, data: bytearray, width: int, height: int) -> None:
    """Rewrite the size the header declares, where each format keeps it."""
    if fmt == "PNG" and len(data) >= 33:
        data[16:24] = struct.pack(">II", width, height)
        _png_with_crc(data)
    elif fmt == "GIF" and len(data) >= 10:
        data[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif fmt == "BMP" and len(data) >= 26:
        data[18:26] = struct.pack("<ii", min(width, 2**31 - 1), min(height, 2**31 - 1))
    elif fmt in ("JPEG", "MPO"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):  # SOF0 (baseline), SOF2 (progressive)
            at = data.find(marker)
            if at >= 0 and len(data) >= at + 9:
                data[at + 5:at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                return
    elif fmt == "WEBP" and data[12:16] == b"VP8 " and len(data) >= 30:
        data[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)


DIMENSIONS = st.one_of(st.sampled_from([0, 1, 2, 255, 6400, 16383, 50000, 65535]),
                       st.integers(0, 70000))


@st.composite
def mutated_images(draw) -> tuple[str, bytes]:
    fmt, seed = draw(st.sampled_from(seeds()))
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete",
                                   "dimensions", "repeat"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            run = draw(st.binary(min_size=1, max_size=64))
            data[at:at + len(run)] = run
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=256))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 512))]
        elif op == "repeat":
            end = min(len(data), at + draw(st.integers(1, 2048)))
            data[at:at] = data[at:end] * draw(st.integers(1, 8))
        else:
            set_dimensions(fmt, data, draw(DIMENSIONS), draw(DIMENSIONS))
    return fmt, bytes(data)


CONTENT_TYPES = st.one_of(
    st.sampled_from(["image/jpeg", "image/png", "image/gif", "image/webp", "image/bmp",
                     "image/tiff", "image/", "image/*", "IMAGE/JPEG", "image/jpeg; q=0.5",
                     "image/png; charset=utf-8", "text/plain", "application/octet-stream",
                     "application/json", "multipart/form-data", "multipart/form-data; boundary=",
                     "multipart/form-data; boundary=\"\"", "multipart/mixed; boundary=x", ""]),
    # (h11, under httpx, will not send a value with whitespace at either end)
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60).map(str.strip),
)
#: Mostly valid (none, 1-20), so that most examples get past the parameter check.
TOP_K = st.one_of(st.none(), st.none(), st.integers(1, 20), st.integers(-5, 30),
                  st.sampled_from(["", "five", "1.5", "1e3", "00005", " 3", "-0"]))


def _params(top_k) -> dict:
    return {} if top_k is None else {"top_k": top_k}


# ---- the tests ----

@fuzz_settings(50)
@given(image=mutated_images(), top_k=TOP_K)
def test_mutated_images_raw(client, image, top_k):
    fmt, data = image
    r = client.post("/v1/classify", content=data, params=_params(top_k),
                    headers={"Content-Type": f"image/{fmt.lower()}"})
    check(r, f"{fmt} {len(data)} bytes")


@fuzz_settings(25)
@given(body=st.one_of(st.binary(max_size=4096), mutated_images().map(lambda fi: fi[1])),
       content_type=CONTENT_TYPES, path=st.sampled_from(
           ["/v1/classify", "/v1/classify/batch", f"/v1/models/{MODEL}/classify",
            "/v1/models/nope/classify", "/exact/v1/classify"]))
def test_random_bytes_and_content_types(client, body, content_type, path):
    r = client.post(path, content=body, headers={"Content-Type": content_type})
    check(r, f"{path} {content_type!r} {len(body)} bytes")


TOKEN = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                              exclude_characters='"\\;'), min_size=1, max_size=20)


MULTIPART_MISTAKES = ["preamble", "no boundary parameter", "empty boundary", "other boundary",
                      "quoted boundary", "no closing boundary", "unclosed last part",
                      "wrong closing boundary", "no Content-Disposition",
                      "malformed Content-Disposition", "CRLF in the name", "odd part type",
                      "nested multipart/mixed", "no parts"]


@st.composite
def multipart_bodies(draw) -> tuple[str, bytes]:
    """A multipart body with zero, one or two mistakes from :data:`MULTIPART_MISTAKES`, so
    that most reach the parser's deeper states and some are valid; parts carry mutated
    images or random bytes, under odd names and filenames."""
    mistakes = set(draw(st.lists(st.sampled_from(MULTIPART_MISTAKES), max_size=2)))
    boundary = draw(st.one_of(st.just("fuzzboundary"), TOKEN))
    count = 0 if "no parts" in mistakes else draw(st.integers(1, 5))
    broken = draw(st.integers(0, max(0, count - 1)))  # the part a part-level mistake is in
    parts = []
    for i in range(count):
        name = draw(st.sampled_from(["file", "files", "file", "files", "image", "", 'fi"le']))
        if i == broken and "CRLF in the name" in mistakes:
            name = "file\r\nX-Injected: y"
        filename = draw(st.one_of(st.none(), st.sampled_from(
            ["a.jpg", "", "../../etc/passwd", "\u00e9\u00e8.png", "x" * 300]), TOKEN))
        content = draw(st.one_of(mutated_images().map(lambda fi: fi[1]),
                                 st.binary(max_size=512)))
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        headers = [f"Content-Disposition: {disposition}"]
        if i == broken and "malformed Content-Disposition" in mistakes:
            headers = ["Content-Disposition: " + draw(st.sampled_from(
                ["form-data", "attachment", "", "form-data; name", 'form-data; name="file']))]
        if i == broken and "no Content-Disposition" in mistakes:
            headers = []
        part_type = draw(st.sampled_from(["image/jpeg", "image/png", None]))
        if i == broken and "odd part type" in mistakes:
            part_type = draw(CONTENT_TYPES)
        if part_type is not None:
            headers.append(f"Content-Type: {part_type}")
        if i == broken and "nested multipart/mixed" in mistakes:
            inner = "innerboundary"
            content = (f"--{inner}\r\nContent-Type: image/jpeg\r\n\r\n".encode() + content
                       + f"\r\n--{inner}--\r\n".encode())
            headers = headers[:1] + [f"Content-Type: multipart/mixed; boundary={inner}"]
        head = "\r\n".join(headers).encode()
        parts.append(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + content + b"\r\n")
    body = b"".join(parts)
    if "preamble" in mistakes:
        body = b"junk before the first boundary\r\n" + body
    if "no closing boundary" not in mistakes:
        body += b"--" + (b"wrong" if "wrong closing boundary" in mistakes
                         else boundary.encode()) + b"--\r\n"
    if "unclosed last part" in mistakes:
        body = body[:max(0, len(body) - draw(st.integers(1, 64)))]
    header_boundary = boundary
    if "other boundary" in mistakes:
        header_boundary = draw(TOKEN)
    if "empty boundary" in mistakes:
        header_boundary = ""
    content_type = f"multipart/form-data; boundary={header_boundary}"
    if "quoted boundary" in mistakes:
        content_type = f'multipart/form-data; charset=utf-8; boundary="{header_boundary}"'
    if "no boundary parameter" in mistakes:
        content_type = "multipart/form-data"
    return content_type, body


@fuzz_settings(50)
@given(multipart=multipart_bodies(), path=st.sampled_from(
    ["/v1/classify", "/v1/classify/batch", f"/v1/models/{MODEL}/classify/batch"]),
    top_k=TOP_K)
def test_malformed_and_nested_multipart(client, multipart, path, top_k):
    content_type, body = multipart
    r = client.post(path, content=body, params=_params(top_k),
                    headers={"Content-Type": content_type})
    check(r, f"{path} {content_type!r} {len(body)} bytes")


def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.floats(allow_nan=False),
              st.text(max_size=20)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                        children, max_size=4),
    max_leaves=12)


@st.composite
def v2_requests(draw) -> tuple[dict, bytes]:
    """A V2 inference request, near-valid or not, in JSON or with binary tensor data."""
    valid = draw(st.integers(0, 3)) > 0  # most requests are one or two mistakes from valid
    images = [draw(mutated_images())[1] for _ in range(draw(st.integers(int(valid), 3)))]
    name = "images" if valid else draw(st.sampled_from(["images", "pixels", "nope", ""]))
    datatype = "BYTES" if valid else draw(st.sampled_from(["BYTES", "UINT8", "FP32", "INT64",
                                                           "bytes", ""]))
    shape = [len(images)] if valid else draw(st.one_of(
        st.just([len(images), 1]), st.lists(st.integers(-2, 2**40), max_size=4),
        st.just([1, 3, 224, 224])))
    tensor: dict = {"name": name, "datatype": datatype, "shape": shape}
    binary = draw(st.booleans())
    blob = b""
    if binary:
        blob = _bytes_tensor(images) if valid or draw(st.booleans()) else draw(
            st.binary(max_size=256))
        tensor["parameters"] = {"binary_data_size": len(blob) if valid else draw(st.one_of(
            st.just(len(blob)), st.integers(-5, 2**33), st.text(max_size=5)))}
    elif valid:
        tensor["data"] = [base64.b64encode(i).decode() for i in images]
    else:
        tensor["data"] = draw(st.one_of(
            st.just([base64.b64encode(i).decode() for i in images]),
            st.lists(st.text(max_size=12), max_size=3), JSON_VALUES))
    request: dict = {"inputs": [tensor] if valid else draw(
        st.sampled_from([[tensor], [tensor, tensor], []]))}
    if draw(st.booleans()):
        request["parameters"] = {
            "top_k": draw(st.integers(1, 20) if valid else st.one_of(st.integers(-3, 2000),
                                                                     JSON_VALUES)),
            "binary_data_output": draw(st.booleans() if valid else JSON_VALUES)}
    if draw(st.booleans()):
        request["outputs"] = draw(st.sampled_from([
            [{"name": "labels", "parameters": {"classification": 3}}],
            [{"name": "scores", "parameters": {"binary_data": True}}, {"name": "class_ids"}]])
            if valid else st.one_of(
                st.lists(st.dictionaries(st.sampled_from(["name", "parameters"]), JSON_VALUES,
                                         max_size=2), max_size=3),
                JSON_VALUES))
    header = json.dumps(request).encode()
    if not valid and draw(st.integers(0, 3)) == 0:
        header = header[:draw(st.integers(0, len(header)))]  # broken JSON
    headers = {"Content-Type": "application/json" if valid else draw(st.sampled_from(
        ["application/json", "application/octet-stream", "text/plain", ""]))}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(header)) if valid else draw(st.one_of(
            st.just(str(len(header))), st.integers(-3, len(header) + len(blob) + 3).map(str),
            st.sampled_from(["", "abc", "1e3", "+12", "0x10", "99999999999999999999"])))
    return headers, header + blob


@fuzz_settings(50)
@given(request=v2_requests(), path=st.sampled_from(
    [f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/1/infer",
     f"/v2/models/{MODEL}/versions/7/infer", "/v2/models/nope/infer"]))
def test_malformed_v2_inference_requests(client, request, path):
    headers, body = request
    r = client.post(path, content=body, headers=headers)
    check(r, f"{path} {headers} {body[:200]!r}")


# ---- the transport: sizes, chunked bodies, slow senders ----

def _send(port: int, path: str, headers: dict, body, chunked: bool,
          timeout_s: float = 60) -> tuple[int, str, bytes]:
    """One request on http.client, which sends a generator as it yields (chunked: with no
    Content-Length); returns (status, Content-Type, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers=headers, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


def _paced(data: bytes, pieces: int, pause_s: float) -> Iterator[bytes]:
    size = max(1, -(-len(data) // max(1, pieces)))
    for i in range(0, len(data), size):
        if i:
            time.sleep(pause_s)
        yield data[i:i + size]


def _multipart(field: str, data: bytes) -> tuple[str, bytes]:
    boundary = "sizeboundary"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", body


def _check_raw(status: int, ctype: str, body: bytes, what: str) -> None:
    where = f"{what} -> {status} {body[:300]!r}"
    assert status == 200 or 400 <= status < 500, where
    assert ctype.startswith("application/json"), where
    payload = json.loads(body)
    _record(what.split()[0], status, payload)
    if status >= 400:
        assert payload["error"]["code"] not in ("internal_error", None), where


@fuzz_settings(10)
@given(image=mutated_images(), pieces=st.integers(1, 12), pause_s=st.sampled_from([0, 0.01, 0.1]),
       chunked=st.booleans(), path=st.sampled_from(["/v1/classify", "/v1/classify/batch"]))
def test_chunked_and_slow_senders(service, image, pieces, pause_s, chunked, path):
    fmt, data = image
    headers = {"Content-Type": f"image/{fmt.lower()}"}
    if path.endswith("/batch"):  # the same image as a multipart upload
        headers["Content-Type"], data = _multipart("files", data)
    if not chunked:
        headers["Content-Length"] = str(len(data))
    status, ctype, body = _send(service.port, path, headers, _paced(data, pieces, pause_s),
                                chunked)
    _check_raw(status, ctype, body, f"{path} chunked={chunked} {pieces}x{pause_s}s")


SIZES = [
    # (what, body, Content-Type, chunked, status)
    ("0 bytes", b"", "image/jpeg", False, 400),
    ("1 byte", b"\xff", "image/jpeg", False, 400),
    ("1 byte chunked", b"\x89", "image/png", True, 400),
    ("0 bytes multipart", b"", "multipart/form-data; boundary=x", False, 400),
    ("max_body_bytes exactly, junk", b"\0" * MAX_BODY, "image/jpeg", False, 400),
    ("one over max_body_bytes", b"\0" * (MAX_BODY + 1), "image/jpeg", False, 413),
    ("one over, chunked", b"\0" * (MAX_BODY + 1), "image/jpeg", True, 413),
]


@pytest.mark.parametrize("what,body,content_type,chunked,status", SIZES,
                         ids=[s[0] for s in SIZES])
def test_body_sizes(service, what, body, content_type, chunked, status):
    headers = {"Content-Type": content_type}
    if not chunked:
        headers["Content-Length"] = str(len(body))
    got = _send(service.port, "/v1/classify", headers, _paced(body, 8, 0) if chunked else body,
                chunked)
    _check_raw(*got, f"/v1/classify {what}")
    assert got[0] == status, (what, got[0], got[2][:200])


def test_oversized_multipart_and_v2_bodies(service):
    content_type, body = _multipart("files", b"\0" * (MAX_BODY + 16))
    got = _send(service.port, "/v1/classify/batch", {"Content-Type": content_type}, body, False)
    _check_raw(*got, "/v1/classify/batch oversized multipart")
    assert got[0] == 413
    status, ctype, payload = _send(service.port, f"/v2/models/{MODEL}/infer",
                                   {"Content-Type": "application/json"},
                                   b"[" + b"0," * (MAX_BODY // 2) + b"0]", False)
    assert status == 413 and ctype.startswith("application/json") and json.loads(payload)["error"]


def test_a_declared_length_far_over_the_limit_is_refused_without_the_body(service):
    """A Content-Length of 1 GB with nothing behind it: refused from the header at once."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/classify")
        conn.putheader("Content-Type", "image/jpeg")
        conn.putheader("Content-Length", str(2**30))
        conn.endheaders()
        conn.send(b"\xff\xd8" * 512)
        response = conn.getresponse()
        status, payload = response.status, response.read()
    finally:
        conn.close()
    assert status == 413 and json.loads(payload)["error"]["code"] == "payload_too_large"
    assert time.perf_counter() - started < 10


def test_still_ready_and_serving_after_the_fuzzing(client):
    """Runs last in this file: nothing above took a replica down or wedged it."""
    print("fuzz answers (route, status, code): count", dict(sorted(SEEN.items(), key=str)))
    assert client.get("/readyz").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    r = client.post("/v1/classify", content=dict(photos_jpeg())["coffee"],
                    headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "espresso"


def test_check_can_fail():
    """The predicate every test above relies on rejects what it must."""
    request = httpx.Request("POST", "http://x/v1/classify")
    for status, payload in [(500, {"error": {"code": "internal_error", "message": "m"}}),
                            (503, {"error": {"code": "overloaded", "message": "m"}}),
                            (200, {"results": [{"error": {"code": "internal_error",
                                                          "message": "m"}}]})]:
        with pytest.raises(AssertionError):
            check(httpx.Response(status, json=payload, request=request))
    with pytest.raises(AssertionError):
        check(httpx.Response(400, text="<html>bad</html>", request=request))
    check(httpx.Response(400, json={"error": {"code": "invalid_image", "message": "m"}},
                         request=request))

"""serve_app.client against a stub HTTP server and httpx.MockTransport: no Ray, seconds."""

from __future__ import annotations

import asyncio
import io
import json
import random
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_app.client import (
    AsyncClient,
    BatchClassification,
    Classification,
    Client,
    Prediction,
    RequestRejected,
    RetryPolicy,
    ServeAppConnectionError,
    ServeAppError,
    ServerError,
    to_upload,
)
from serve_app.client.cli import main
from serve_app.client.errors import error_from_response
from serve_app.client.images import UNKNOWN_IMAGE_TYPE, Upload, sniff_content_type
from serve_app.client.multipart import encode_multipart
from serve_app.client.retry import backoff_cap, next_delay, parse_retry_after

PREDICTIONS = [{"label": "tabby", "class_id": 281, "score": 0.71},
               {"label": "tiger cat", "class_id": 282, "score": 0.2}]
CLASSIFY_OK = {"model": "efficientnet_lite0", "predictions": PREDICTIONS}
OVERLOADED = {"error": {"code": "overloaded", "message": "The service is at capacity."}}
INVALID = {"error": {"code": "invalid_image", "message": "Cannot decode the image."}}
FAST = RetryPolicy(backoff_s=0.01, max_backoff_s=0.05)  # retries without slow tests


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def png_bytes(pixels) -> bytes:
    return png(pixels)


# ---- the stub server ------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    at: float  # time.monotonic() on arrival


class Stub:
    """What the stub server answers (replies in order; the last one repeats) and what it saw.

    A dict body is sent as JSON, with the request's X-Request-ID as ``request_id`` unless it
    has one; bytes or str are sent as text, like a proxy's error page.
    """

    def __init__(self, url: str):
        self.url = url
        self.requests: list[Seen] = []
        self._replies: list[tuple[int, dict[str, str], object]] = []
        self._lock = threading.Lock()

    def reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> "Stub":
        self._replies.append((status, headers or {}, body))
        return self

    def answer(self, seen: Seen) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.requests.append(seen)
            status, headers, body = (self._replies.pop(0) if len(self._replies) > 1
                                     else self._replies[0])
        if isinstance(body, dict):
            body = {"request_id": seen.headers.get("x-request-id", "generated"), **body}
            return status, {"Content-Type": "application/json", **headers}, \
                json.dumps(body).encode()
        data = body.encode() if isinstance(body, str) else bytes(body)
        return status, {"Content-Type": "text/plain", **headers}, data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx's pool expects

    def _serve(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        seen = Seen(self.command, url.path, parse_qs(url.query),
                    {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
        status, headers, data = self.server.stub.answer(seen)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _serve

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture
def stub(request):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.stub = Stub(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()

    def stop() -> None:  # runs whether the test passed or failed
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    request.addfinalizer(stop)
    return server.stub


@pytest.fixture
def dead_url() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---- pure backoff arithmetic ----------------------------------------------------------------
class _TopOfRange(random.Random):
    """An rng that always draws the top of the range, to pin the jitter's upper bound."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_backoff_cap_doubles_up_to_max_backoff():
    policy = RetryPolicy(backoff_s=0.2, max_backoff_s=5.0)
    assert [backoff_cap(policy, n) for n in range(1, 7)] == \
        pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0])
    assert backoff_cap(policy, 1000) == 5.0  # no overflow


def test_full_jitter_spans_zero_to_the_cap():
    policy = RetryPolicy(max_attempts=100, backoff_s=0.2, max_backoff_s=5.0,
                         max_elapsed_s=1e9)
    rng = random.Random(1)
    for attempt in (1, 3, 8):
        cap = backoff_cap(policy, attempt)
        delays = [next_delay(policy, attempt, retry_after=None, remaining_s=1e9, rng=rng)
                  for _ in range(2000)]
        assert all(0.0 <= d <= cap for d in delays)
        assert min(delays) < 0.05 * cap and max(delays) > 0.95 * cap  # full, not equal, jitter
    assert next_delay(policy, 3, retry_after=None, remaining_s=1e9,
                      rng=_TopOfRange()) == pytest.approx(0.8)


@pytest.mark.parametrize("header,seconds", [
    ("3", 3.0), (" 7 ", 7.0), ("0", 0.0), ("1.5", 1.5),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 10.0),  # 10 s after `now` below
    ("Wed, 21 Oct 2015 07:20:00 GMT", 0.0),  # already past
    (None, None), ("", None), ("soon", None), ("-1", None),
])
def test_parse_retry_after_seconds_and_http_dates(header, seconds):
    now = datetime(2015, 10, 21, 7, 27, 50, tzinfo=timezone.utc).timestamp()
    got = parse_retry_after(header, now=now)
    assert got == (None if seconds is None else pytest.approx(seconds))


def test_retry_after_is_honoured_above_max_backoff():
    policy = RetryPolicy(backoff_s=0.2, max_backoff_s=5.0, max_elapsed_s=30.0)
    for seed in range(20):
        assert next_delay(policy, 1, retry_after=10.0, remaining_s=30.0,
                          rng=random.Random(seed)) == 10.0
    # a short hint is a floor under the jitter, not a replacement for it
    assert next_delay(policy, 3, retry_after=0.1, remaining_s=30.0,
                      rng=_TopOfRange()) == pytest.approx(0.8)


def test_budget_and_attempts_cut_retrying_off():
    policy = RetryPolicy(max_attempts=4, backoff_s=1.0, max_backoff_s=10.0)
    assert next_delay(policy, 1, retry_after=5.0, remaining_s=4.9) is None  # would overrun
    assert next_delay(policy, 1, retry_after=5.0, remaining_s=5.1) == 5.0
    assert next_delay(policy, 3, retry_after=None, remaining_s=2.0, rng=_TopOfRange()) is None
    assert next_delay(policy, 3, retry_after=None, remaining_s=0.0,
                      rng=random.Random(0)) is None
    assert next_delay(policy, 4, retry_after=None, remaining_s=1e9) is None  # out of attempts
    assert next_delay(RetryPolicy(max_attempts=1), 1, retry_after=0.0, remaining_s=1e9) is None


def test_retry_policy_validates():
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    assert RetryPolicy(retry_statuses={503}).retry_statuses == frozenset({503})


# ---- image inputs ---------------------------------------------------------------------------
def test_paths_and_bytes_go_out_unchanged(tmp_path, pixels):
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, "JPEG")
    path = tmp_path / "cat.jpg"
    path.write_bytes(jpeg.getvalue())
    for given in (path, str(path)):
        upload = to_upload(given, 3)
        assert upload == Upload("cat.jpg", jpeg.getvalue(), "image/jpeg")
    upload = to_upload(bytearray(jpeg.getvalue()), 3)
    assert upload == Upload("image3.jpg", jpeg.getvalue(), "image/jpeg")
    assert isinstance(upload.data, bytes)


@pytest.mark.parametrize("fmt,content_type", [
    ("PNG", "image/png"), ("GIF", "image/gif"), ("WEBP", "image/webp"),
    ("BMP", "image/bmp"), ("TIFF", "image/tiff"), ("JPEG", "image/jpeg"),
])
def test_content_type_from_magic(pixels, fmt, content_type):
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    assert sniff_content_type(buf.getvalue()) == content_type


def test_unknown_bytes_still_get_an_image_type():
    upload = to_upload(b"definitely not an image", 0)
    assert upload.content_type == UNKNOWN_IMAGE_TYPE and upload.content_type.startswith("image/")
    assert upload.filename == "image0"


def test_pil_images_and_arrays_become_lossless_png(pixels):
    grey = pixels[:, :, 0].copy()
    for given, expected in [(Image.fromarray(pixels), pixels), (pixels, pixels),
                            (grey, grey), (pixels[:, :, :1], grey),
                            (pixels[:, ::-1], pixels[:, ::-1])]:  # a non-contiguous view
        upload = to_upload(given, 2)
        assert upload.content_type == "image/png" and upload.filename == "image2.png"
        assert upload.data.startswith(b"\x89PNG")
        np.testing.assert_array_equal(decode(upload.data), expected)
    cmyk = Image.fromarray(pixels).convert("CMYK")  # a mode PNG cannot store
    assert decode(to_upload(cmyk).data).shape == (6, 8, 3)


def test_unsupported_inputs_are_refused(pixels):
    with pytest.raises(ValueError, match="uint8"):
        to_upload(pixels.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        to_upload(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError):
        to_upload(12345)
    with pytest.raises(FileNotFoundError):
        to_upload("/nonexistent/cat.jpg")


# ---- retries against a real HTTP server -----------------------------------------------------
def test_sync_client_waits_out_retry_after_then_succeeds(stub, png_bytes):
    stub.reply(503, OVERLOADED, {"Retry-After": "1"}).reply(200, CLASSIFY_OK)
    with Client(stub.url, retries=FAST) as client:
        started = time.monotonic()
        result = client.classify(png_bytes, top_k=2)
        elapsed = time.monotonic() - started
    assert isinstance(result, Classification) and result.model == "efficientnet_lite0"
    assert result.top == Prediction("tabby", 281, 0.71) and len(result.predictions) == 2
    assert elapsed >= 0.95  # FAST's own backoff is at most 0.05 s: the 1 s is Retry-After
    first, second = stub.requests
    assert second.at - first.at >= 0.95
    assert first.headers["x-request-id"] == second.headers["x-request-id"] == result.request_id
    assert len(result.request_id) == 32  # a uuid4 hex when none was given
    assert first.body == second.body == png_bytes
    assert first.headers["content-type"] == "image/png"
    assert first.path == "/v1/classify" and first.query == {"top_k": ["2"]}


def test_async_client_waits_out_retry_after_then_succeeds(stub, png_bytes):
    stub.reply(503, OVERLOADED, {"Retry-After": "1"}).reply(200, CLASSIFY_OK)

    async def run() -> tuple[Classification, float]:
        async with AsyncClient(stub.url, retries=FAST) as client:
            started = time.monotonic()
            result = await client.classify(png_bytes, request_id="trace-me")
            return result, time.monotonic() - started

    result, elapsed = asyncio.run(run())
    assert result.top.label == "tabby" and result.request_id == "trace-me"
    assert elapsed >= 0.95
    assert len(stub.requests) == 2
    assert [r.headers["x-request-id"] for r in stub.requests] == ["trace-me", "trace-me"]
    assert stub.requests[0].body == stub.requests[1].body == png_bytes


def test_always_overloaded_gives_up_after_max_attempts(stub, png_bytes):
    stub.reply(503, OVERLOADED)
    policy = RetryPolicy(max_attempts=3, backoff_s=0.01, max_backoff_s=0.02)
    with Client(stub.url, retries=policy) as client, pytest.raises(ServerError) as info:
        client.classify(png_bytes)
    err = info.value
    assert (err.status, err.code, err.attempts) == (503, "overloaded", 3)
    assert not err.is_client_error
    assert len(stub.requests) == 3
    assert err.request_id == stub.requests[0].headers["x-request-id"]


def test_async_always_overloaded_gives_up_after_max_attempts(stub, png_bytes):
    stub.reply(503, OVERLOADED)

    async def run() -> None:
        async with AsyncClient(stub.url, retries=RetryPolicy(max_attempts=2, backoff_s=0.01)) \
                as client:
            await client.classify(png_bytes)

    with pytest.raises(ServerError) as info:
        asyncio.run(run())
    assert info.value.attempts == 2 and len(stub.requests) == 2


@pytest.mark.parametrize("status,body,cls,code", [
    (400, INVALID, RequestRejected, "invalid_image"),
    (404, {"error": {"code": "not_found", "message": "no such model"}}, RequestRejected,
     "not_found"),
    (500, {"error": {"code": "internal_error", "message": "bug"}}, ServerError,
     "internal_error"),
])
def test_client_errors_and_500_are_never_retried(stub, png_bytes, status, body, cls, code):
    stub.reply(status, body)
    with Client(stub.url, retries=FAST) as client, pytest.raises(cls) as info:
        client.classify(png_bytes)
    assert (info.value.status, info.value.code, info.value.attempts) == (status, code, 1)
    assert info.value.is_client_error == (status < 500)
    assert len(stub.requests) == 1


def test_proxy_text_errors_are_retried_and_reported(stub, png_bytes):
    stub.reply(502, "<html>Bad Gateway from the proxy</html>")
    with Client(stub.url, retries=RetryPolicy(max_attempts=2, backoff_s=0.01)) as client, \
            pytest.raises(ServerError) as info:
        client.classify(png_bytes)
    assert info.value.code == "http_502" and "Bad Gateway" in info.value.message
    assert info.value.attempts == 2 and len(stub.requests) == 2


def test_connection_refused_is_retried_then_raised(dead_url, png_bytes):
    sent = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request.headers["x-request-id"])
            return super().handle_request(request)

    policy = RetryPolicy(max_attempts=3, backoff_s=0.01)
    with Client(dead_url, retries=policy, transport=Counting()) as client, \
            pytest.raises(ServeAppConnectionError) as info:
        client.classify(png_bytes)
    err = info.value
    assert isinstance(err, ServeAppError)
    assert (err.status, err.code, err.attempts) == (None, "connection_error", 3)
    assert isinstance(err.__cause__, httpx.ConnectError)
    assert len(sent) == 3 and len(set(sent)) == 1


def test_retry_after_beyond_the_budget_gives_up_at_once(stub, png_bytes):
    stub.reply(503, OVERLOADED, {"Retry-After": "5"})
    with Client(stub.url, retries=RetryPolicy(max_elapsed_s=2.0)) as client, \
            pytest.raises(ServerError) as info:
        started = time.monotonic()
        client.classify(png_bytes)
    assert time.monotonic() - started < 1.0
    assert info.value.attempts == 1 and len(stub.requests) == 1


def test_named_model_batch_with_per_item_errors(stub, tmp_path, png_bytes, pixels):
    from starlette.requests import Request

    path = tmp_path / r'my \\ "cat".png'  # quotes and backslashes must survive the header
    path.write_bytes(png_bytes)
    stub.reply(200, {"model": "resnet 50", "results": [
        {"filename": path.name, "predictions": PREDICTIONS},
        {"filename": "image1.png", "error": {"code": "invalid_image", "message": "bad"}}]})
    with Client(stub.url, retries=FAST) as client:
        batch = client.classify_batch([path, pixels], top_k=3, model="resnet 50",
                                      request_id="b-1")
    assert isinstance(batch, BatchClassification) and batch.request_id == "b-1"
    good, bad = batch.results
    assert good.ok and good.error is None and good.predictions[0].class_id == 281
    assert not bad.ok and bad.predictions is None
    assert (bad.error.code, bad.error.message) == ("invalid_image", "bad")
    assert not batch.ok

    (seen,) = stub.requests
    assert seen.path == "/v1/models/resnet%2050/classify/batch"
    assert seen.query == {"top_k": ["3"]}

    async def parse() -> list[tuple[str, bytes, str]]:  # with the service's own form parser
        async def receive() -> dict:
            return {"type": "http.request", "body": seen.body, "more_body": False}
        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"content-type", seen.headers["content-type"].encode())]}
        form = await Request(scope, receive).form()
        return [(u.filename, await u.read(), u.content_type) for u in form.getlist("files")]

    (name0, data0, type0), (name1, data1, type1) = asyncio.run(parse())
    assert (name0, data0, type0) == (path.name, png_bytes, "image/png")
    assert (name1, type1) == ("image1.png", "image/png")
    np.testing.assert_array_equal(decode(data1), pixels)


def test_multipart_body_is_built_once_per_call():
    uploads = [Upload("a.png", b"\x89PNG one", "image/png")]
    first, second = encode_multipart("files", uploads), encode_multipart("files", uploads)
    assert first[0] != second[0]  # a fresh boundary per call...
    assert first[1].count(first[0].split("=")[1].encode()) == 2  # ...used as a delimiter


# ---- the other endpoints, on MockTransport --------------------------------------------------
def _mock(handler) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def test_models_ready_and_default_headers():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/prefix/v1/models":
            return httpx.Response(200, json={"models": [{"name": "efficientnet_lite0",
                                                         "input_size": [3, 224, 224]}]})
        return httpx.Response(200 if request.url.path == "/prefix/readyz" else 404)

    with Client("http://svc/prefix", headers={"Authorization": "Bearer t"},
                transport=_mock(handler)) as client:
        assert client.models()[0]["name"] == "efficientnet_lite0"
        assert client.ready() is True
    assert [r.url.path for r in seen] == ["/prefix/v1/models", "/prefix/readyz"]
    assert seen[0].headers["authorization"] == "Bearer t"
    assert seen[0].headers["user-agent"].startswith("serve_app-client")


def test_ready_is_false_on_503_and_when_nothing_listens(dead_url):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503, json={"error": {"code": "not_ready", "message": "warming"}})

    with Client("http://svc", transport=_mock(handler)) as client:
        assert client.ready() is False
    assert len(calls) == 1  # a probe, not retried
    with Client(dead_url) as client:
        assert client.ready() is False

    async def run() -> bool:
        async with AsyncClient("http://svc", transport=httpx.MockTransport(handler)) as client:
            return await client.ready()

    assert asyncio.run(run()) is False


def test_each_call_gets_its_own_request_id(png_bytes):
    ids = []

    def handler(request: httpx.Request) -> httpx.Response:
        ids.append(request.headers["x-request-id"])
        return httpx.Response(200, json={**CLASSIFY_OK, "request_id": ids[-1]})

    with Client("http://svc", transport=_mock(handler)) as client:
        assert client.classify(png_bytes).request_id == ids[0]
        client.classify(png_bytes)
    assert len(set(ids)) == 2


def test_a_body_of_the_wrong_shape_is_an_invalid_response(png_bytes):
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>a different service</html>")

    with Client("http://svc", transport=_mock(handler)) as client, \
            pytest.raises(ServeAppError) as info:
        client.classify(png_bytes)
    assert (info.value.status, info.value.code) == (200, "invalid_response")


def test_error_responses_parse_json_text_and_empty_bodies():
    request = httpx.Request("POST", "http://svc/v1/classify")
    err = error_from_response(httpx.Response(
        413, json={"error": {"code": "image_too_large", "message": "too big"},
                   "request_id": "srv"}, request=request), "mine")
    assert isinstance(err, RequestRejected)
    assert (err.code, err.message, err.request_id) == ("image_too_large", "too big", "srv")
    err = error_from_response(httpx.Response(504, text="upstream timed out\n",
                                             request=request), "mine")
    assert (err.code, err.message, err.request_id) == ("http_504", "upstream timed out", "mine")
    err = error_from_response(httpx.Response(503, request=request), "mine")
    assert (err.code, err.message) == ("http_503", "Service Unavailable")
    assert "http_503" in str(err) and "mine" in str(err)


# ---- the CLI --------------------------------------------------------------------------------
@pytest.fixture
def image_files(tmp_path, png_bytes) -> list[str]:
    paths = [tmp_path / "cat.png", tmp_path / "dog.png"]
    for path in paths:
        path.write_bytes(png_bytes)
    return [str(p) for p in paths]


def test_cli_prints_a_table(stub, image_files, capsys):
    stub.reply(200, CLASSIFY_OK)
    assert main([*image_files, "--url", stub.url, "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["file", "rank", "label", "class_id", "score"]
    assert len(lines) == 1 + 2 * 2
    assert "tabby" in out and "tiger cat" in out and "0.7100" in out and "281" in out
    assert all(p in out for p in image_files)
    assert [r.query for r in stub.requests] == [{"top_k": ["2"]}] * 2  # one request per image


def test_cli_json_and_url_from_the_environment(stub, image_files, capsys, monkeypatch):
    stub.reply(200, CLASSIFY_OK)
    monkeypatch.setenv("SERVE_APP_URL", stub.url)
    assert main([image_files[0], "--json", "--model", "efficientnet_lite0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["url"] == stub.url
    (item,) = doc["results"]
    assert item["file"] == image_files[0] and item["predictions"][0]["label"] == "tabby"
    assert stub.requests[0].path == "/v1/models/efficientnet_lite0/classify"


def test_cli_exits_1_when_any_image_fails(stub, image_files, tmp_path, capsys):
    stub.reply(200, CLASSIFY_OK).reply(400, INVALID)
    missing = str(tmp_path / "missing.png")
    assert main([*image_files, missing, "--url", stub.url, "--json"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert doc["ok"] is False
    assert [("error" in r) for r in doc["results"]] == [False, True, True]
    assert f"{image_files[1]}: invalid_image: Cannot decode the image." in captured.err
    assert f"{missing}: unreadable_file" in captured.err
    assert len(stub.requests) == 2  # the missing file never reached the server


def test_cli_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["--top-k", "0", "cat.png"]) == 2
    assert main(["--help"]) == 0
    assert "one request per image" in " ".join(capsys.readouterr().out.split())


def test_cli_prints_no_table_when_nothing_was_classified(stub, image_files, capsys):
    stub.reply(415, {"error": {"code": "unsupported_media_type", "message": "no"}})
    assert main([image_files[0], "--url", stub.url]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unsupported_media_type: no (HTTP 415, request_id " in captured.err

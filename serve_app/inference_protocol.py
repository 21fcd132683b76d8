"""The Open Inference Protocol (KServe V2, Triton's HTTP API) on the wire: pure functions.

No HTTP framework and no Ray here: bytes and a header value in, a validated
:class:`InferRequest` out; predictions in, response bytes out. serve_app/api/v2.py puts them
behind the routes.

A model has two alternative inputs (send exactly one):

* ``images``: ``BYTES [N]`` (or ``[N, 1]``), one encoded image per batch row, as binary tensor
  data (4-byte little-endian length, then the bytes: what ``tritonclient.http`` sends) or in
  JSON as base64 strings (``{"b64": ...}`` objects too; a string that is not base64 is taken
  as the image's bytes in UTF-8, Triton's string form);
* ``pixels``: ``UINT8 [N, 3, S, S]`` at the model's input size ``S``, already resized and
  cropped, or ``FP32`` with the same pixels scaled to [0, 1]; the model's mean/std
  normalization is applied by the server.

and three outputs for the top ``K`` labels (request parameter ``top_k``): ``scores``
``FP32 [N, K]``, ``labels`` ``BYTES [N, K]`` and ``class_ids`` ``INT64 [N, K]``, as binary data
when asked (``binary_data_output``, or ``binary_data`` per output), JSON otherwise. Triton's
classification extension: ``classification: C`` on a requested output returns it as
``BYTES [N, C]`` strings ``"score:class_id:label"``.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import orjson

VERSION = "1"
IMAGES, PIXELS = "images", "pixels"
SCORES, LABELS, CLASS_IDS = "scores", "labels", "class_ids"
OUTPUTS = (SCORES, LABELS, CLASS_IDS)
#: The header naming the JSON part's length when binary tensor data follows it.
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data", "classification")
_PIXEL_TYPES = {"UINT8": np.dtype("<u1"), "FP32": np.dtype("<f4")}


class ProtocolError(ValueError):
    """A request that breaks the protocol; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    class_count: int = 0  # > 0: Triton's classification extension


@dataclass
class InferRequest:
    """One parsed inference request: either ``images`` or ``pixels`` is set."""

    id: Optional[str]
    outputs: list[RequestedOutput]
    top_k: Optional[int] = None
    images: Optional[list[bytes]] = None
    pixels: Optional[np.ndarray] = None
    parameters: dict = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.images) if self.images is not None else len(self.pixels)

    def labels_needed(self, default_k: int) -> int:
        """How many labels per row the outputs need."""
        return max([self.top_k or default_k] + [o.class_count for o in self.outputs])


# ---- requests ----

def split_body(body: bytes, header_length: Optional[str]) -> tuple[dict, bytes]:
    """The JSON header and the binary data after it (empty without the header)."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not an integer") from None
        if not 0 < size <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {size} does not fit a body of {len(body)} bytes")
        json_part, binary = body[:size], body[size:]
    try:
        header = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("the inference request must be a JSON object")
    return header, binary


def parse_infer_request(body: bytes, header_length: Optional[str], *, input_size: int,
                        max_rows: int, num_classes: int) -> InferRequest:
    """Validate a request for a model with ``input_size`` pixels a side; raise ProtocolError."""
    header, binary = split_body(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(f"send exactly one input, {IMAGES!r} (BYTES, encoded images) or "
                            f"{PIXELS!r} (UINT8/FP32 [N, 3, {input_size}, {input_size}])")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise ProtocolError(f"input {name!r}: shape must be a list of non-negative integers")
    blob = _binary_part(tensor, binary)
    parameters = _object(header.get("parameters"), "parameters")
    request = InferRequest(id=_optional_str(header.get("id"), "id"),
                           outputs=_requested_outputs(header, parameters, num_classes),
                           top_k=_top_k(parameters.get("top_k"), num_classes),
                           parameters=parameters)
    if name == IMAGES:
        request.images = _images(tensor, datatype, shape, blob)
    elif name == PIXELS:
        request.pixels = _pixels(tensor, datatype, shape, blob, input_size)
    else:
        raise ProtocolError(f"unknown input {name!r}; this model takes {IMAGES!r} or {PIXELS!r}")
    if request.rows == 0:
        raise ProtocolError(f"input {name!r} has no rows")
    if request.rows > max_rows:
        raise ProtocolError(f"input {name!r} has {request.rows} rows; at most {max_rows} per "
                            "request", status=413)
    return request


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    return value


def _optional_str(value: Any, what: str) -> Optional[str]:
    if value is not None and not isinstance(value, str):
        raise ProtocolError(f"{what} must be a string")
    return value


def _top_k(value: Any, num_classes: int) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_classes:
        raise ProtocolError(f"parameter top_k must be an integer from 1 to {num_classes}")
    return value


def _requested_outputs(header: dict, parameters: dict, num_classes: int) -> list[RequestedOutput]:
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError("parameter binary_data_output must be true or false")
    wanted = header.get("outputs")
    if wanted is None or wanted == []:
        return [RequestedOutput(name, binary_default) for name in OUTPUTS]
    if not isinstance(wanted, list):
        raise ProtocolError("outputs must be a list")
    outputs = []
    for entry in wanted:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in OUTPUTS:
            raise ProtocolError(f"unknown output {name!r}; this model has {list(OUTPUTS)}")
        params = _object(entry.get("parameters"), f"output {name!r} parameters")
        binary = params.get("binary_data", binary_default)
        count = params.get("classification", 0)
        if not isinstance(binary, bool):
            raise ProtocolError(f"output {name!r}: binary_data must be true or false")
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= num_classes:
            raise ProtocolError(f"output {name!r}: classification must be an integer from 0 to "
                                f"{num_classes}")
        outputs.append(RequestedOutput(name, binary, count))
    return outputs


def _binary_part(tensor: dict, binary: bytes) -> Optional[bytes]:
    """The input's binary data (one input per request: all of it), or None for JSON data."""
    size = (tensor.get("parameters") or {}).get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(f"{len(binary)} bytes of binary data follow the JSON, but no "
                                "input declares binary_data_size")
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size != len(binary):
        raise ProtocolError(f"input {tensor.get('name')!r} declares binary_data_size {size!r}, "
                            f"and {len(binary)} bytes follow the JSON")
    if "data" in tensor:
        raise ProtocolError(f"input {tensor.get('name')!r} has both data and binary_data_size")
    return binary


def _flatten(data: Any) -> list:
    if not isinstance(data, list):
        return [data]
    out: list = []
    for item in data:
        out.extend(_flatten(item))
    return out


def _images(tensor: dict, datatype: Any, shape: list[int], blob: Optional[bytes]) -> list[bytes]:
    if datatype != "BYTES":
        raise ProtocolError(f"input {IMAGES!r} must be BYTES (encoded images), not {datatype!r}")
    if math.prod(shape[1:]) != 1:
        raise ProtocolError(f"input {IMAGES!r}: shape {shape} must be [N] or [N, 1], one image "
                            "per row")
    if blob is not None:
        items = decode_bytes_tensor(blob)
    else:
        if "data" not in tensor:
            raise ProtocolError(f"input {IMAGES!r} has neither data nor binary_data_size")
        items = [_image_element(e, i) for i, e in enumerate(_flatten(tensor["data"]))]
    if len(items) != shape[0]:
        raise ProtocolError(f"input {IMAGES!r}: shape {shape} says {shape[0]} images, the data "
                            f"holds {len(items)}")
    return items


def _image_element(element: Any, row: int) -> bytes:
    if isinstance(element, dict) and isinstance(element.get("b64"), str):
        element = element["b64"]
    if not isinstance(element, str):
        raise ProtocolError(f"input {IMAGES!r} row {row}: a BYTES element in JSON must be a "
                            "string (base64)")
    try:
        return base64.b64decode(element, validate=True)
    except (binascii.Error, ValueError):
        return element.encode("utf-8")  # Triton's string form


def _pixels(tensor: dict, datatype: Any, shape: list[int], blob: Optional[bytes],
            size: int) -> np.ndarray:
    dtype = _PIXEL_TYPES.get(datatype)
    if dtype is None:
        raise ProtocolError(f"input {PIXELS!r} must be UINT8 or FP32, not {datatype!r}")
    if len(shape) != 4 or shape[1:] != [3, size, size]:
        raise ProtocolError(f"input {PIXELS!r}: shape {shape} must be [N, 3, {size}, {size}] "
                            "(resized and center-cropped to this model's input size)")
    count = math.prod(shape)
    if blob is not None:
        if len(blob) != count * dtype.itemsize:
            raise ProtocolError(f"input {PIXELS!r}: {len(blob)} bytes of data for shape {shape} "
                                f"of {datatype} ({count * dtype.itemsize} bytes)")
        array = np.frombuffer(blob, dtype=dtype)
    else:
        values = _flatten(tensor.get("data"))
        if len(values) != count:
            raise ProtocolError(f"input {PIXELS!r}: shape {shape} needs {count} values, the "
                                f"data holds {len(values)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise ProtocolError(f"input {PIXELS!r}: data must be numbers")
        array = np.asarray(values, dtype=np.float64)
        if datatype == "UINT8":
            if not np.all((array >= 0) & (array <= 255) & (array == np.floor(array))):
                raise ProtocolError(f"input {PIXELS!r}: UINT8 values must be integers 0-255")
        array = array.astype(dtype)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise ProtocolError(f"input {PIXELS!r}: FP32 values must be finite")
    return np.ascontiguousarray(array.reshape(shape).astype(dtype.newbyteorder("=")))


def decode_bytes_tensor(blob: bytes) -> list[bytes]:
    """Triton's BYTES serialization: each element a 4-byte little-endian length, then bytes."""
    items, offset = [], 0
    while offset < len(blob):
        if offset + 4 > len(blob):
            raise ProtocolError("BYTES data ends inside an element's 4-byte length")
        (length,) = struct.unpack_from("<I", blob, offset)
        offset += 4
        if offset + length > len(blob):
            raise ProtocolError(f"BYTES element {len(items)} declares {length} bytes; "
                                f"{len(blob) - offset} are left")
        items.append(blob[offset:offset + length])
        offset += length
    return items


def encode_bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# ---- responses ----

def _output(request_output: RequestedOutput, rows: list[list[dict]], k: int
            ) -> tuple[dict, Optional[bytes]]:
    """One output tensor: its JSON description and, when binary, its bytes."""
    name, n = request_output.name, len(rows)
    if request_output.class_count:
        c = request_output.class_count
        values: Any = [f"{p['score']:f}:{p['class_id']}:{p['label']}".encode()
                       for row in rows for p in row[:c]]
        datatype, shape = "BYTES", [n, c]
    elif name == SCORES:
        values = np.asarray([[p["score"] for p in row[:k]] for row in rows], dtype="<f4")
        datatype, shape = "FP32", [n, k]
    elif name == CLASS_IDS:
        values = np.asarray([[p["class_id"] for p in row[:k]] for row in rows], dtype="<i8")
        datatype, shape = "INT64", [n, k]
    else:
        values = [p["label"].encode() for row in rows for p in row[:k]]
        datatype, shape = "BYTES", [n, k]
    tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if request_output.binary:
        blob = (encode_bytes_tensor(values) if datatype == "BYTES" else values.tobytes())
        tensor["parameters"] = {"binary_data_size": len(blob)}
        return tensor, blob
    tensor["data"] = ([v.decode() for v in values] if datatype == "BYTES"
                      else values.reshape(-1).tolist())
    return tensor, None


def infer_response(model: str, request: InferRequest, rows: list[list[dict]], top_k: int,
                   request_id: str) -> tuple[bytes, Optional[int]]:
    """The response body for ``rows`` (each a list of at least ``top_k`` predictions, best
    first), and the JSON part's length when binary data follows (None: all JSON)."""
    outputs, blobs = [], []
    for wanted in request.outputs:
        tensor, blob = _output(wanted, rows, top_k)
        outputs.append(tensor)
        if blob is not None:
            blobs.append(blob)
    header = orjson.dumps({"model_name": model, "model_version": VERSION,
                           "id": request.id if request.id is not None else request_id,
                           "parameters": {"request_id": request_id}, "outputs": outputs})
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def server_metadata(version: str) -> dict:
    return {"name": "serve_app", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(info: dict) -> dict:
    """``GET /v2/models/{name}`` for a model described by ``ModelInfo.as_dict()``."""
    size = info["input_size"][-1]
    return {
        "name": info["name"], "versions": [VERSION], "platform": "pytorch",
        "inputs": [{"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
                   {"name": PIXELS, "datatype": "UINT8", "shape": [-1, 3, size, size]}],
        "outputs": [{"name": SCORES, "datatype": "FP32", "shape": [-1, -1]},
                    {"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]},
                    {"name": CLASS_IDS, "datatype": "INT64", "shape": [-1, -1]}],
    }

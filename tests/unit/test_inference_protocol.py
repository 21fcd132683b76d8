"""The Open Inference Protocol wire format, without HTTP or Ray: requests built by
tritonclient's own encoder, responses read back by tritonclient's own parser."""

import base64
import struct

import numpy as np
import pytest
import tritonclient.http as triton

from serve_app import inference_protocol as oip

SIZE, CLASSES = 8, 10


def parse(body: bytes, header_length=None, **kwargs):
    options = {"input_size": SIZE, "max_rows": 4, "num_classes": CLASSES, **kwargs}
    return oip.parse_infer_request(body, None if header_length is None else str(header_length),
                                   **options)


def triton_body(inputs, outputs=None, **parameters):
    body, json_size = triton.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, parameters=parameters or None)
    return body, json_size


def predictions(rows: int, k: int) -> list[list[dict]]:
    return [[{"label": f"class{r}-{j}", "class_id": 10 * r + j, "score": 1.0 / (j + 2)}
             for j in range(k)] for r in range(rows)]


def test_bytes_tensor_round_trip_and_truncation():
    items = [b"", b"\xff\xd8jpeg", b"x" * 300]
    blob = oip.encode_bytes_tensor(items)
    assert blob[:4] == struct.pack("<I", 0) and oip.decode_bytes_tensor(blob) == items
    with pytest.raises(oip.ProtocolError, match="declares 300 bytes"):
        oip.decode_bytes_tensor(blob[:-1])
    with pytest.raises(oip.ProtocolError, match="4-byte length"):
        oip.decode_bytes_tensor(blob + b"\x01")


def test_binary_bytes_input_as_tritonclient_sends_it():
    images = triton.InferInput("images", [2], "BYTES")
    images.set_data_from_numpy(np.array([b"\xff\xd8one", b"\x89PNGtwo"], dtype=np.object_))
    body, json_size = triton_body([images], top_k=3)
    request = parse(body, json_size)
    assert request.images == [b"\xff\xd8one", b"\x89PNGtwo"] and request.pixels is None
    assert request.top_k == 3
    # No outputs named: tritonclient asks for all of them in binary.
    assert [(o.name, o.binary) for o in request.outputs] == [(n, True) for n in oip.OUTPUTS]


def test_json_bytes_input_base64_objects_and_string_form():
    jpeg = b"\xff\xd8\xff\xe0 a jpeg"
    request = parse(b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3, 1], '
                    b'"data": [["' + base64.b64encode(jpeg) + b'"], [{"b64": "'
                    + base64.b64encode(b"two") + b'"}], ["plain text!"]]}]}')
    assert request.images == [jpeg, b"two", b"plain text!"]
    assert all(not o.binary for o in request.outputs)  # JSON unless asked


@pytest.mark.parametrize("datatype,dtype", [("UINT8", np.uint8), ("FP32", np.float32)])
def test_pixels_binary_and_json(datatype, dtype):
    array = (np.arange(2 * 3 * SIZE * SIZE) % 256).reshape(2, 3, SIZE, SIZE).astype(dtype)
    if dtype == np.float32:
        array /= 255
    pixels = triton.InferInput("pixels", list(array.shape), datatype)
    pixels.set_data_from_numpy(array)
    binary = parse(*triton_body([pixels]))
    np.testing.assert_array_equal(binary.pixels, array)
    assert binary.pixels.dtype == dtype and binary.pixels.flags.writeable is not None
    pixels.set_data_from_numpy(array, binary_data=False)
    as_json = parse(*triton_body([pixels]))
    np.testing.assert_allclose(as_json.pixels, array, rtol=1e-6)


@pytest.mark.parametrize("header,fragment", [
    ({"inputs": []}, "exactly one input"),
    ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1], "data": [1]}]},
     "must be BYTES"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]},
     "one image per row"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": ["YQ=="]}]},
     "says 2 images"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [7]}]},
     "must be a string"),
    ({"inputs": [{"name": "pixels", "datatype": "INT32", "shape": [1, 3, 8, 8]}]},
     "UINT8 or FP32"),
    ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 9, 9], "data": []}]},
     "[N, 3, 8, 8]"),
    ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 8, 8],
                  "data": [256] * 192}]}, "integers 0-255"),
    ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 3, 8, 8],
                  "data": [1] * 191}]}, "needs 192 values"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1], "data": []}]},
     "non-negative"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [0], "data": []}]}, "no rows"),
    ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
     "unknown input 'x'"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
      "outputs": [{"name": "logits"}]}, "unknown output 'logits'"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
      "parameters": {"top_k": 0}}, "top_k must be an integer from 1 to 10"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
      "outputs": [{"name": "scores", "parameters": {"classification": 11}}]},
     "classification must be an integer from 0 to 10"),
    ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": 5}}]}, "binary_data_size 5"),
])
def test_bad_requests_say_what_is_wrong(header, fragment):
    import orjson

    with pytest.raises(oip.ProtocolError) as info:
        parse(orjson.dumps(header))
    assert fragment in info.value.message and info.value.status == 400


def test_too_many_rows_is_413_and_framing_errors():
    images = triton.InferInput("images", [5], "BYTES")
    images.set_data_from_numpy(np.array([b"a"] * 5, dtype=np.object_))
    with pytest.raises(oip.ProtocolError) as info:
        parse(*triton_body([images]))
    assert info.value.status == 413 and "at most 4" in info.value.message
    with pytest.raises(oip.ProtocolError, match="does not fit"):
        parse(b"{}", 10)
    with pytest.raises(oip.ProtocolError, match="not an integer"):
        parse(b"{}", "ten")
    with pytest.raises(oip.ProtocolError, match="not valid JSON"):
        parse(b"{nope")
    with pytest.raises(oip.ProtocolError, match="no input declares binary_data_size"):
        parse(b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], '
              b'"data": ["YQ=="]}]}extra', 85)


def test_response_binary_and_json_read_back_by_tritonclient():
    images = triton.InferInput("images", [2], "BYTES")
    images.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    outputs = [triton.InferRequestedOutput("scores"),  # binary (tritonclient's default)
               triton.InferRequestedOutput("labels", binary_data=False),
               triton.InferRequestedOutput("class_ids", class_count=2)]
    request = parse(*triton_body([images], outputs=outputs, top_k=3))
    assert request.labels_needed(5) == 3
    body, json_size = oip.infer_response("m", request, predictions(2, 3), 3, "rid")
    result = triton.InferenceServerClient.parse_response_body(body, header_length=json_size)
    np.testing.assert_allclose(result.as_numpy("scores"), [[0.5, 1 / 3, 0.25]] * 2, rtol=1e-6)
    assert result.as_numpy("scores").dtype == np.float32
    assert result.as_numpy("labels").tolist() == [["class0-0", "class0-1", "class0-2"],
                                                  ["class1-0", "class1-1", "class1-2"]]
    assert result.as_numpy("class_ids").tolist() == [[b"0.500000:0:class0-0",
                                                      b"0.333333:1:class0-1"],
                                                     [b"0.500000:10:class1-0",
                                                      b"0.333333:11:class1-1"]]
    response = result.get_response()
    assert response["model_name"] == "m" and response["model_version"] == "1"
    assert response["id"] == "rid"  # none given: ours


def test_all_json_response_has_no_binary_part():
    request = parse(b'{"id": "abc", "inputs": [{"name": "images", "datatype": "BYTES", '
                    b'"shape": [1], "data": ["YQ=="]}], "outputs": [{"name": "class_ids"}]}')
    body, json_size = oip.infer_response("m", request, predictions(1, 5), 5, "rid")
    assert json_size is None
    result = triton.InferenceServerClient.parse_response_body(body)
    assert result.as_numpy("class_ids").tolist() == [[0, 1, 2, 3, 4]]
    assert result.get_response()["id"] == "abc"


def test_model_metadata_names_both_inputs():
    meta = oip.model_metadata({"name": "m", "input_size": [3, 224, 224]})
    assert meta["versions"] == ["1"]
    assert meta["inputs"][1] == {"name": "pixels", "datatype": "UINT8",
                                 "shape": [-1, 3, 224, 224]}
    assert [o["name"] for o in meta["outputs"]] == list(oip.OUTPUTS)

"""Request rows -> image bytes: raw, multipart, JSON base64, and the 4xx for everything else."""

from __future__ import annotations

import base64

import pytest

from handlers.config import InputConfig
from handlers.errors import InvalidInput, PayloadTooLarge
from handlers.inputs import read_image_bytes

CFG = InputConfig()
DATA = b"\xff\xd8\xff\xe0 fake jpeg bytes \x00\x01"
B64 = base64.b64encode(DATA).decode()


@pytest.mark.parametrize("row,types", [
    ({"body": DATA}, {"body": "application/octet-stream"}),
    ({"body": bytearray(DATA)}, {}),
    ({"data": DATA}, {"data": "image/jpeg"}),                        # multipart field 'data'
    ({"picture": DATA}, {"picture": "image/jpeg"}),                  # any single field name
    ({"image": DATA, "caption": "a cat"}, {}),                       # preferred name among several
    ({"body": {"data": B64}}, {"body": "application/json"}),
    ({"body": {"b64": B64}}, {"body": "application/json"}),
    ({"body": {"data": "data:image/jpeg;base64," + B64}}, {}),
    ({"body": {"data": B64[:10] + "\n" + B64[10:]}}, {}),           # MIME line breaks
    ({"body": {"data": base64.urlsafe_b64encode(DATA).decode()}}, {}),
    ({"body": B64}, {"body": "text/plain"}),                          # base64 text body
    (DATA, {}),                                                        # bare value
])
def test_accepted_shapes(row, types):
    assert read_image_bytes(row, CFG, types) == DATA


@pytest.mark.parametrize("row,types,fragment", [
    ({"body": b""}, {}, "empty"),
    ({}, {}, "empty request"),
    ({"body": None}, {}, "empty"),
    ({"body": {"image": B64}}, {}, "expected one of 'data', 'b64', 'url', found 'image'"),
    ({"body": {}}, {}, "found none"),
    ({"body": {"data": B64, "b64": B64}}, {}, "several image keys"),
    ({"body": {"data": 123}}, {}, "must be a base64 string"),
    ({"body": {"data": "not base64 at all!!"}}, {}, "not valid base64"),
    ({"body": {"data": ""}}, {}, "is empty"),
    ({"body": [1, 2, 3]}, {}, "got a JSON list"),
    ({"body": b"{not json"}, {"body": "application/json"}, "not valid JSON"),
    ({"body": "hello, world"}, {"body": "text/plain"}, "text body is not valid base64"),
    ({"a": DATA, "b": DATA}, {}, "2 form fields (a, b)"),
])
def test_rejected_with_clear_message(row, types, fragment):
    with pytest.raises(InvalidInput) as info:
        read_image_bytes(row, CFG, types)
    assert fragment in info.value.message
    assert info.value.to_response() == {"code": 400, "type": "invalid_input", "message": info.value.message}


def test_too_large_raw_and_base64():
    cfg = InputConfig(max_bytes=10)
    with pytest.raises(PayloadTooLarge, match="at most 10"):
        read_image_bytes({"body": b"x" * 11}, cfg)
    with pytest.raises(PayloadTooLarge):
        read_image_bytes({"body": {"data": base64.b64encode(b"x" * 11).decode()}}, cfg)
    # refused before decoding when the base64 text alone is far too long
    with pytest.raises(PayloadTooLarge, match="decodes to more than 10"):
        read_image_bytes({"body": {"data": "A" * 10_000}}, cfg)
    assert read_image_bytes({"body": b"x" * 10}, cfg) == b"x" * 10


def test_custom_json_keys():
    cfg = InputConfig(json_keys=("image",))
    assert read_image_bytes({"body": {"image": B64}}, cfg) == DATA
    with pytest.raises(InvalidInput, match="expected one of 'image'"):
        read_image_bytes({"body": {"data": B64}}, cfg)

"""End to end: archives built by `tsgpu archive`, served by a stock torchserve, spoken to over HTTP."""

from __future__ import annotations

import base64
import io
import json
import re
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from archiver_scripts import samples
from tests import models
from tests.reference import reference_batch

TIMEOUT = 60


def post(server, model, data=None, json_body=None, files=None, content_type="application/octet-stream"):
    url = f"{server.inference_url}/predictions/{model}"
    if json_body is not None:
        return requests.post(url, json=json_body, timeout=TIMEOUT)
    if files is not None:
        return requests.post(url, files=files, timeout=TIMEOUT)
    return requests.post(url, data=data, headers={"Content-Type": content_type}, timeout=TIMEOUT)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_set():
    out = {name: samples.encode(arr, "JPEG", quality=90) for name, arr in samples.photos().items()}
    out["1080p"] = samples.encode(samples.mosaic(1920, 1080), "JPEG", quality=90)
    out["4k"] = samples.encode(samples.mosaic(3840, 2160, offset=1), "JPEG", quality=88)
    return out


@pytest.fixture(scope="module")
def expected(photo_set):
    model = models.make_model()
    with torch.no_grad():
        probs = torch.softmax(model(reference_batch(list(photo_set.values()))), dim=1)
    return {name: probs[i] for i, name in enumerate(photo_set)}


@pytest.mark.parametrize("model_name", ["tiny", "tiny_eager"])
def test_top_k_for_real_photos(server, photo_set, expected, model_name):
    answers = set()
    for name, data in photo_set.items():
        r = post(server, model_name, data)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("application/json")
        preds = r.json()["predictions"]
        ref = expected[name]
        top = int(ref.argmax())
        assert preds[0]["index"] == top and preds[0]["label"] == f"class_{top}", (name, preds)
        assert preds[0]["probability"] == pytest.approx(float(ref[top]), abs=0.05)
        assert [p["probability"] for p in preds] == sorted((p["probability"] for p in preds), reverse=True)
        assert len(preds) == (3 if model_name == "tiny" else 5)
        answers.add(top)
    assert len(answers) > 1  # the model really looks at the pictures


def test_same_image_three_ways(server, photo_set):
    data = photo_set["chelsea"]
    raw = post(server, "tiny", data).json()
    as_json = post(server, "tiny", json_body={"data": base64.b64encode(data).decode()}).json()
    as_b64_key = post(server, "tiny", json_body={"b64": base64.b64encode(data).decode()}).json()
    as_form = post(server, "tiny", files={"data": ("cat.jpg", data, "image/jpeg")}).json()
    assert raw == as_json == as_b64_key == as_form


def _exif_rotated(upright: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90 degrees clockwise
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def test_awkward_but_valid_images_are_accepted(server):
    photo = Image.fromarray(samples.mosaic(1280, 720))
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    variants = {
        "gray jpeg": encode(photo.convert("L"), "JPEG"),
        "cmyk jpeg": encode(photo.convert("CMYK"), "JPEG"),
        "rgba png": encode(rgba, "PNG"),
        "palette png": encode(photo.convert("P"), "PNG"),
        "webp": encode(photo, "WEBP", quality=90),
        "progressive jpeg": encode(photo, "JPEG", quality=90, progressive=True),
        "gif": encode(photo, "GIF"),
        "bmp": encode(photo, "BMP"),
        "tiff": encode(photo, "TIFF"),
        "exif rotated": _exif_rotated(photo),
    }
    upright = post(server, "tiny", encode(photo, "JPEG", quality=95)).json()
    for name, data in variants.items():
        r = post(server, "tiny", data)
        assert r.status_code == 200, (name, r.text)
        assert len(r.json()["predictions"]) == 3, name
    rotated = post(server, "tiny", variants["exif rotated"]).json()
    assert rotated["predictions"][0]["index"] == upright["predictions"][0]["index"]
    assert rotated["predictions"][0]["probability"] == pytest.approx(upright["predictions"][0]["probability"], abs=0.05)


def _png_bomb(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


BAD_INPUTS = {
    "empty body": (dict(data=b""), 400),
    "truncated jpeg": ("truncated", 400),
    "text": (dict(data=b"hello world, not an image", content_type="application/octet-stream"), 415),
    "random bytes": (dict(data=bytes(np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8))), 415),
    "bad base64": (dict(json_body={"data": "***this is not base64***"}), 400),
    "wrong json key": (dict(json_body={"image": "aGVsbG8="}), 400),
    "json list": (dict(json_body=[1, 2, 3]), 400),
    "pixel bomb": (dict(data=_png_bomb(30000, 30000)), 413),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_clear_4xx(server, photo_set, case):
    kwargs, status = BAD_INPUTS[case]
    if kwargs == "truncated":
        kwargs = dict(data=photo_set["1080p"][:30000])
    r = post(server, "tiny", **kwargs)
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert body["code"] == status and body["type"] and len(body["message"]) > 10


def test_mixed_batch_gives_each_request_its_own_status(server, photo_set):
    good = photo_set["coffee"]
    cases = [
        (dict(data=good), 200),
        (dict(data=b""), 400),
        (dict(data=b"plain text"), 415),
        (dict(json_body={"data": base64.b64encode(good).decode()}), 200),
        (dict(data=_png_bomb(30000, 30000)), 413),
        (dict(json_body={"nope": 1}), 400),
        (dict(data=good[:5000]), 400),
        (dict(data=good), 200),
    ]
    frontend_log = server.log_dir / "ts_log.log"
    # The statuses must be right every time. That the 8 requests really shared one batch is shown by
    # the handler's per-batch RequestErrors metric, logged with the ids of every request in the
    # batch; on a loaded host the requests can straddle two batches, so allow a few attempts.
    shared = []
    for _attempt in range(3):
        before = len(frontend_log.read_text())
        with ThreadPoolExecutor(len(cases)) as pool:
            responses = list(pool.map(lambda c: post(server, "tiny_batch", **c[0]), cases))
        assert [r.status_code for r in responses] == [status for _, status in cases]
        goods = [r.json() for r in responses if r.status_code == 200]
        assert goods[0] == goods[1] == goods[2]
        new = frontend_log.read_text()[before:]
        batches = re.findall(r"\[METRICS\]RequestErrors\.Count:(\d+)\|#ModelName:tiny_batch.*?#hostname:[^,]+,\d+,(\S+), pattern", new)
        shared = [(count, len(ids.split(","))) for count, ids in batches]
        if ("5", 8) in shared:
            break
    assert ("5", 8) in shared, shared


def test_server_healthy_after_abuse_and_no_worker_restarts(server, photo_set):
    pids_before = server.worker_pids()
    for data in (b"", b"\x00" * 100, photo_set["4k"][:1000], _png_bomb(50000, 50000)):
        assert 400 <= post(server, "tiny", data).status_code < 500
    assert requests.get(f"{server.inference_url}/ping", timeout=TIMEOUT).json()["status"] == "Healthy"
    assert post(server, "tiny", photo_set["astronaut"]).status_code == 200
    assert sorted(server.worker_pids()) == sorted(pids_before)


def test_prometheus_metrics_include_handler_metrics(server, photo_set):
    post(server, "tiny", photo_set["rocket"])
    text = requests.get(f"{server.metrics_url}/metrics", timeout=TIMEOUT).text
    for name in ("ImagesProcessed", "PreprocessTime", "InferenceTime"):
        assert name in text, name


def test_archive_serves_its_own_copy_of_the_handlers(server):
    log = (server.log_dir / "model_log.log").read_text()
    paths = re.findall(r"handlers from (\S+)", log)
    assert paths, "no ready line in the worker log"
    assert all(str(server.tmp_dir) in p for p in paths), paths  # unpacked archive, not site-packages


def test_management_shows_batching_config(server):
    info = requests.get(f"{server.management_url}/models/tiny", timeout=TIMEOUT).json()[0]
    assert info["batchSize"] == 8 and info["maxBatchDelay"] == 20
    assert json.dumps(info).count("READY") >= 1

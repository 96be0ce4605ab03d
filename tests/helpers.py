"""What several test modules share: stated tolerances, input builders, handler starters, a loopback
image origin. Test modules import from here (or from tests/models.py, tests/reference.py, ...), never
from each other; pytest fixtures stay in the modules that use them, built from these functions.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from archiver_scripts import samples

# --- tolerances against the reference (tests/reference.py), in normalised units ---------------------
# (1.0 = one std of the channel; one 8-bit level is about 0.0175). Measured values are printed by -s.

# CPU backend without draft decoding: same filter over the same pixels; the fused resize+crop computes
# its filter positions from the crop box, so a few pixels round to the neighbouring 8-bit level.
ONE_LEVEL = 1.0 / (255 * min(0.229, 0.224, 0.225))
EXACT_TOL = ONE_LEVEL + 1e-4
EXACT_MEAN_TOL = 1e-3
# CPU backend with draft decoding (libjpeg's DCT scaling before the resize).
DRAFT_MEAN_TOL = 0.02
DRAFT_MAX_TOL = 0.35
# Accelerated backends on the CPU: libjpeg-turbo, as Pillow, and the exact crop box: a level or two.
CPU_MEAN_TOL, CPU_MAX_TOL = 0.01, 0.05
# On CUDA: nvJPEG / the hardware decoder use other IDCT and chroma upsampling than libjpeg-turbo.
GPU_MEAN_TOL, GPU_MAX_TOL = 0.03, 0.5


# --- preprocess inputs and backends -----------------------------------------------------------------


def photo_jpegs() -> dict[str, bytes]:
    """Real photos at several sizes and aspect ratios, incl. 1080p and 4K mosaics and a portrait."""
    out = {name: samples.encode(arr, "JPEG", quality=90) for name, arr in samples.photos().items()}
    out["1080p"] = samples.encode(samples.mosaic(1920, 1080), "JPEG", quality=90)
    out["4k"] = samples.encode(samples.mosaic(3840, 2160), "JPEG", quality=90)
    out["portrait"] = samples.encode(samples.mosaic(1080, 1920), "JPEG", quality=90)
    out["small"] = samples.encode(samples.photos()["chelsea"][:90, :120], "JPEG", quality=90)
    return out


def exif_rotated(turn: int) -> bytes:
    """A real photo stored sideways with an EXIF orientation tag, as phone cameras write them."""
    image = Image.fromarray(samples.photos()["astronaut"][:, 64:448])
    exif = Image.Exif()
    exif[0x0112] = turn
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


def bad_and_odd_items() -> dict[str, bytes]:
    good = samples.encode(samples.photos()["chelsea"], "JPEG", quality=90)
    coffee = samples.photos()["coffee"]
    cmyk = io.BytesIO()
    Image.fromarray(coffee).convert("CMYK").save(cmyk, "JPEG")
    return {
        "good": good,
        "truncated": good[: len(good) // 2],
        "cmyk_jpeg": cmyk.getvalue(),
        "gif": samples.encode(coffee, "GIF"),
        "text": b"this is not an image",
        "png": samples.encode(coffee, "PNG"),
        "good_again": good,
        "truncated_tail": good[:-300],
    }


def dali_or_skip() -> None:
    """Skip without DALI, or fail where TSGPU_REQUIRE_DALI=1 (CI installs it)."""
    from handlers.preprocess import backend_module

    reason = backend_module("dali").availability(torch.device("cpu"))
    if reason is None:
        return
    if os.environ.get("TSGPU_REQUIRE_DALI") == "1":
        pytest.fail(f"TSGPU_REQUIRE_DALI=1 but DALI is unavailable: {reason}")
    pytest.skip(reason)


def make(backend: str, device: str = "cpu", **spec_kwargs):
    """A preprocess backend (max_batch 8, 2 threads), or a skip saying why it cannot run here."""
    from handlers.preprocess import PreprocessSpec, backend_module, create_preprocessor

    if backend == "dali":
        dali_or_skip()
    spec = PreprocessSpec(device=torch.device(device), **{"max_batch": 8, **spec_kwargs})
    if backend_module(backend).availability(spec.device) is not None:
        pytest.skip(backend_module(backend).availability(spec.device))
    return create_preprocessor(backend, spec, threads=2)


# --- the red-box detector (tests/detection_models.py): images whose right answer is known ------------

DETECTOR_LABELS = {"0": "person", "1": "bicycle", "2": "red_box"}

# (name, upright width, height, drawn box in upright pixels, EXIF orientation of the stored file)
DETECTION_CASES = [
    ("landscape", 1280, 720, (200, 400, 520, 610), 1),
    ("portrait", 720, 1280, (90, 700, 400, 1010), 1),
    ("tiny", 40, 30, (6, 16, 15, 25), 1),
    ("4k", 3840, 2160, (2900, 300, 3500, 700), 1),
    ("exif6", 900, 600, (100, 350, 330, 520), 6),
    ("exif8", 600, 900, (380, 90, 560, 260), 8),
]
# The stored pixels that EXIF orientation `o` turns upright (np.rot90 turns counter-clockwise).
_STORED_TURNS = {1: 0, 6: 1, 8: -1}


def draw(width: int, height: int, box: tuple[int, int, int, int], offset: int = 0) -> np.ndarray:
    """A real photo texture in gray (never red) with a saturated red rectangle at `box`."""
    gray = samples.mosaic(width, height, offset).mean(axis=2).astype(np.uint8)
    image = np.repeat(gray[..., None], 3, axis=2)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = (255, 0, 0)
    return image


def encode_case(width: int, height: int, box: tuple[int, int, int, int], orientation: int) -> bytes:
    upright = draw(width, height, box, offset=width % 4)
    stored = np.ascontiguousarray(np.rot90(upright, k=_STORED_TURNS[orientation]))
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    data = buf.getvalue()
    # The fixture itself: a standard EXIF reader shows the rectangle where it was drawn.
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(int)
    red = np.nonzero(shown[..., 0] - np.maximum(shown[..., 1], shown[..., 2]) > 127)
    assert (red[1].min(), red[0].min(), red[1].max() + 1, red[0].max() + 1) == box
    return data


def model_dir_with(directory: Path, labels: bool = True) -> Path:
    """`directory` as a red-box detector's model dir: the model file, empty weights, labels."""
    from tests import detection_models

    shutil.copy(detection_models.__file__, directory / "red_box.py")
    torch.save({}, directory / "weights.pt")  # the red-box models have no parameters
    if labels:
        (directory / "index_to_name.json").write_text(json.dumps(DETECTOR_LABELS))
    return directory


def eager(class_name: str) -> dict:
    return {"file": "weights.pt", "format": "eager", "model_class": f"red_box.py:{class_name}"}


def start_detector(directory: Path, handler_config: dict, batch_size: int = 1, cls: type | None = None):
    """An initialised ObjectDetector (or `cls`) on a FakeContext: (handler, context)."""
    from handlers.tasks.detector import ObjectDetector
    from handlers.testing import FakeContext

    ctx = FakeContext(directory, handler_config=handler_config, batch_size=batch_size)
    handler = (cls or ObjectDetector)()
    handler.initialize(ctx)
    return handler, ctx


# --- a loopback image origin for URL inputs -----------------------------------------------------------


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


ORIGIN_JPEG = _jpeg()


class OriginHandler(BaseHTTPRequestHandler):
    """Routes for URL tests: images, redirects, HTML, 404, huge and slow bodies. `seen` lists the
    paths requested; `stop_reading` the bytes sent before a client hung up on /stream-huge."""

    seen: list[str] = []
    stop_reading: list[int] = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        type(self).seen.append(self.path)
        route = self.path.split("?")[0]
        if route == "/img.jpg":
            self._send(200, ORIGIN_JPEG, "image/jpeg")
        elif route == "/img-no-type":
            self._send(200, ORIGIN_JPEG, None)
        elif route == "/redirect":
            self._redirect("/img.jpg")
        elif route == "/redirect-chain":
            self._redirect("/redirect")
        elif route == "/loop":
            self._redirect("/loop")
        elif route == "/to-private":
            self._redirect("http://internal.test/secret")
        elif route == "/html":
            self._send(200, b"<html>hi</html>", "text/html; charset=utf-8")
        elif route == "/missing":
            self._send(404, b"nope", "text/plain")
        elif route == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(10**10))
            self.end_headers()
        elif route == "/stream-huge":  # no Content-Length; the client must stop on its own
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            sent = 0
            try:
                while sent < 50 * 2**20:
                    self.wfile.write(b"\xff" * 65536)
                    sent += 65536
            except OSError:
                type(self).stop_reading.append(sent)
        elif route == "/slow":
            time.sleep(2.5)
            self._send(200, ORIGIN_JPEG, "image/jpeg")
        else:
            self._send(404, b"", "text/plain")

    def _send(self, status, body, content_type):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextmanager
def image_origin() -> Iterator[str]:
    """OriginHandler on 127.0.0.1 (a free port) for the block: yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), OriginHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()

"""CPU backend: numerical contract against torchvision's reference, formats, modes, per-item errors."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from archiver_scripts import samples
from handlers.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from handlers.preprocess import PreprocessSpec, create_preprocessor
from handlers.preprocess.cpu import CpuPreprocessor
from tests.helpers import DRAFT_MAX_TOL, DRAFT_MEAN_TOL, EXACT_MEAN_TOL, EXACT_TOL, photo_jpegs
from tests.reference import reference_batch, reference_tensor

# The contract the module docstring states (tolerances in tests/helpers.py); measured values are
# printed by -s for the record.


def run(items, threads=2, **spec_kwargs):
    return CpuPreprocessor(PreprocessSpec(**spec_kwargs), threads).run(items)


@pytest.fixture(scope="module")
def jpegs():
    return photo_jpegs()


def test_exact_without_draft(jpegs):
    items = list(jpegs.values())
    batch = run(items, jpeg_draft=False)
    assert batch.rows == list(range(len(items)))
    diff = (batch.tensor - reference_batch(items)).abs()
    print(f"no draft: mean abs diff {diff.mean():.6f}, max {diff.max():.4f}")
    assert diff.max().item() < EXACT_TOL
    assert diff.mean().item() < EXACT_MEAN_TOL


@pytest.mark.parametrize("name", ["1080p", "4k", "portrait", "astronaut"])
def test_draft_within_stated_tolerance(jpegs, name):
    batch = run([jpegs[name]])
    diff = (batch.tensor[0] - reference_tensor(jpegs[name])).abs()
    print(f"{name}: mean abs diff {diff.mean():.4f}, max {diff.max():.4f} (normalised units)")
    assert diff.mean().item() < DRAFT_MEAN_TOL
    assert diff.max().item() < DRAFT_MAX_TOL


def test_draft_is_actually_used_for_large_jpegs(jpegs):
    # 4K with draft must differ from the exact path (else the fast path silently never runs).
    a = run([jpegs["4k"]]).tensor
    b = run([jpegs["4k"]], jpeg_draft=False).tensor
    assert (a - b).abs().max().item() > 0


def test_output_layout_dtype_and_geometry(jpegs):
    batch = run([jpegs["1080p"]], channels_last=True, dtype=torch.float16, crop_size=200, resize_size=232)
    x = batch.tensor
    assert x.shape == (1, 3, 200, 200) and x.dtype == torch.float16
    assert x.is_contiguous(memory_format=torch.channels_last)
    g = batch.geometry[0]
    assert g.original_size == (1920, 1080)
    # resized to (412, 232) = int(232 * 1920 / 1080), then the crop box (106, 16, 306, 216)
    assert g.source == pytest.approx((106 * 1920 / 412, 16 * 1080 / 232, 306 * 1920 / 412, 216 * 1080 / 232))
    assert g.target == (0, 0, 200, 200) and g.input_size == (200, 200) and g.mode == "center_crop"
    assert g.source_format == "JPEG"
    # model-input pixel (0, 0) is original pixel (106, 16) / (232/1080)
    x0, y0 = g.to_original(0, 0)
    assert x0 == pytest.approx(106 * 1920 / 412) and y0 == pytest.approx(16 * 1080 / 232)


def test_threads_do_not_change_results(jpegs):
    items = list(jpegs.values())
    one = run(items, threads=1).tensor
    four = run(items, threads=4).tensor
    assert torch.equal(one, four)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coffee():
    return Image.fromarray(samples.photos()["coffee"])


@pytest.mark.parametrize("fmt,kwargs", [
    ("PNG", {}), ("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {}), ("GIF", {}),
])
def test_lossless_formats_match_reference(coffee, fmt, kwargs):
    data = _encode(coffee, fmt, **kwargs)
    batch = run([data])
    assert batch.errors == [None]
    assert (batch.tensor[0] - reference_tensor(data)).abs().max().item() < EXACT_TOL


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16", "1"])
def test_any_mode_is_converted_to_rgb(coffee, mode):
    image = coffee.convert("L").convert(mode) if mode in ("LA", "1") else coffee.convert(mode)
    if mode == "I;16":
        wide = np.asarray(coffee.convert("L"), dtype=np.uint16) * 257
        image = Image.frombytes("I;16", coffee.size, wide.astype("<u2").tobytes())
    fmt = {"CMYK": "JPEG", "L": "JPEG"}.get(mode, "PNG" if mode != "CMYK" else "JPEG")
    if mode == "1":
        fmt = "BMP"
    data = _encode(image, fmt)
    batch = run([data])
    assert batch.errors == [None], batch.errors
    x = batch.tensor[0]
    assert x.shape == (3, 224, 224) and torch.isfinite(x).all()
    if mode == "I;16":
        # 16-bit gray must keep its contrast (Pillow's convert would clip it to white)
        gray8 = _encode(coffee.convert("L"), "PNG")
        assert (x - reference_tensor(gray8)).abs().max().item() < 0.05
    else:
        assert (x - reference_tensor(data)).abs().max().item() < EXACT_TOL


def test_progressive_jpeg(jpegs):
    image = Image.open(io.BytesIO(jpegs["1080p"]))
    data = _encode(image, "JPEG", quality=90, progressive=True)
    batch = run([data])
    diff = (batch.tensor[0] - reference_tensor(data)).abs()
    assert diff.mean().item() < DRAFT_MEAN_TOL and diff.max().item() < DRAFT_MAX_TOL


@pytest.mark.parametrize("orientation,undo", [
    (3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270),
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
])
def test_exif_orientation_is_applied(orientation, undo):
    upright = Image.fromarray(samples.mosaic(1600, 900))
    stored = upright.transpose(undo)  # what a camera writes: pixels as sensed + a tag to undo it
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "JPEG", quality=95, exif=exif.tobytes())
    batch = run([data])
    assert batch.geometry[0].original_size == (1600, 900)
    ref_upright = reference_tensor(_encode(upright, "JPEG", quality=95))
    diff = (batch.tensor[0] - ref_upright).abs()
    assert diff.mean().item() < 0.05  # JPEG re-encoding of the rotated pixels adds its own error
    assert (batch.tensor[0] - reference_tensor(data)).abs().mean().item() < DRAFT_MEAN_TOL


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; the data is a tiny (invalid-size) stream."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_items_get_their_own_errors_and_good_ones_survive(jpegs, coffee):
    good = jpegs["chelsea"]
    items = [
        good,
        b"",
        b"this is plainly not an image",
        bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        good[: len(good) // 2],                    # truncated JPEG
        _encode(coffee, "PNG")[:3000],             # truncated PNG
        _png_header_only(12_000, 12_000),          # decompression bomb by header: our limit
        _png_header_only(100_000, 100_000),        # so large that Pillow's own guard refuses it
        _encode(coffee, "PPM"),                    # a real image, but not an accepted format
        good,
    ]
    batch = run(items)
    kinds = [type(e) if e else None for e in batch.errors]
    assert kinds == [
        None, InvalidInput, UnsupportedMediaType, UnsupportedMediaType, InvalidInput,
        InvalidInput, PayloadTooLarge, PayloadTooLarge, UnsupportedMediaType, None,
    ]
    assert batch.rows == [0, 9]
    assert batch.tensor.shape == (2, 3, 224, 224)
    assert torch.equal(batch.tensor[0], batch.tensor[1])
    assert "12000x12000" in batch.errors[6].message and "max_image_pixels" in batch.errors[6].message
    assert "10000000000" in batch.errors[7].message and "max_image_pixels" in batch.errors[7].message
    assert all(batch.geometry[i] is None for i in range(1, 9))


def test_pixel_limit_is_per_model_and_leaves_pillow_global_alone(jpegs):
    before = Image.MAX_IMAGE_PIXELS
    batch = run([jpegs["1080p"], jpegs["astronaut"]], max_image_pixels=1920 * 1080 - 1)
    assert isinstance(batch.errors[0], PayloadTooLarge) and batch.errors[1] is None
    assert Image.MAX_IMAGE_PIXELS == before


def test_auto_backend_on_cpu_is_cpu():
    pre = create_preprocessor("auto", PreprocessSpec(), threads=1)
    assert pre.name == "cpu"
    pre.close()

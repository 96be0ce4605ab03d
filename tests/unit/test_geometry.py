"""Geometry modes: the plan (pure arithmetic), the maps both ways, and every backend against the
independent reference (tests/reference.py `reference_mode_tensor`) on real photos of several
sizes, a portrait, a tiny image and EXIF-rotated ones.

Stated tolerances (normalised units; one 8-bit level is about 0.0175), the same per mode as the
center-crop contract of each backend:
  cpu, no draft decoding      letterbox, stretch: identical (max < 1e-5; the same Pillow resize
                              of the whole image); center_crop: max < one 8-bit level (+1e-4),
                              mean < 3e-3 (the fused resize+crop rounds a few percent of pixels of
                              a non-square crop the other way; 0.0021 measured on a 720x1280 photo)
  cpu, draft decoding (1080p+) mean < 0.02, max < 0.35
  torchvision on CPU          mean < 0.01, max < 0.05
  dali on CPU                 mean < 0.01, max < 0.25: DALI's antialiased resize handles image
                              borders and some scale factors (e.g. exactly 3x) differently from
                              Pillow: up to 7-12 8-bit levels at isolated pixels, on PNG input too
                              (so not the decoder); max 0.21 and mean < 0.003 measured 2026-11-24.
                              The 256/224 center crop of test_preprocess_backends stays within 0.05.
  GPU decoders (marked gpu)   mean < 0.03, max < 0.5 (stated, not yet measured)
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from archiver_scripts import samples
from handlers.preprocess import PreprocessSpec, create_preprocessor
from handlers.preprocess.geometry import Geometry, plan_center_crop, plan_letterbox, plan_stretch
from tests.helpers import (
    CPU_MAX_TOL,
    CPU_MEAN_TOL,
    DRAFT_MAX_TOL,
    DRAFT_MEAN_TOL,
    EXACT_TOL,
    GPU_MAX_TOL,
    GPU_MEAN_TOL,
    make,
)
from tests.reference import reference_mode_tensor

IDENTICAL_TOL = 1e-5
DALI_CPU_MAX_TOL = 0.25
CROP_EXACT_MEAN_TOL = 3e-3

MODES = [
    pytest.param("letterbox", (640, 640), id="letterbox-640"),
    pytest.param("letterbox", (384, 640), id="letterbox-384x640"),
    pytest.param("stretch", (320, 480), id="stretch-320x480"),
    pytest.param("center_crop", (224, 256), id="center_crop-224x256"),
]


# -- the plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size,input_wh,target", [
    ((1920, 1080), (640, 640), (0, 140, 640, 500)),      # r = 1/3: 640x360, 140 px above and below
    ((1080, 1920), (640, 640), (140, 0, 500, 640)),      # portrait: padded left and right
    ((1000, 999), (640, 640), (0, 0, 640, 639)),         # odd padding of 1: Ultralytics puts it below
    ((40, 30), (640, 640), (0, 80, 640, 560)),           # tiny: scaled up
    ((3840, 2160), (640, 384), (0, 12, 640, 372)),        # non-square input: 640x360 in 640x384
])
def test_letterbox_plan_follows_ultralytics(size, input_wh, target):
    g = plan_letterbox(*size, input_wh)
    assert g.target == target
    assert g.source == (0.0, 0.0, float(size[0]), float(size[1]))
    assert g.input_size == input_wh and g.mode == "letterbox"


def test_center_crop_plan_is_torchvisions():
    g = plan_center_crop(1920, 1080, 256, (224, 224))
    # Resize(256) -> 455x256 (int(256 * 1920 / 1080)), CenterCrop(224) -> box (116, 16, 340, 240)
    assert g.source == pytest.approx((116 * 1920 / 455, 16 * 1080 / 256, 340 * 1920 / 455, 240 * 1080 / 256))
    assert g.target == (0, 0, 224, 224)


@pytest.mark.parametrize("geometry", [
    plan_letterbox(1920, 1080, (640, 640)), plan_letterbox(1080, 1920, (640, 384)),
    plan_stretch(1000, 700, (320, 480)), plan_center_crop(1600, 900, 256, (288, 224)),
])
def test_points_and_boxes_map_both_ways(geometry: Geometry):
    for x, y in [(0, 0), (13.5, 101.25), (geometry.input_size[0], geometry.input_size[1])]:
        back = geometry.to_input(*geometry.to_original(x, y))
        assert back == pytest.approx((x, y), abs=1e-9)
    # The content rectangle maps onto the region the model sees, exactly.
    content = torch.tensor([list(map(float, geometry.target))], dtype=torch.float64)
    assert geometry.boxes_to_original(content, clip=False)[0].tolist() == pytest.approx(list(geometry.source))
    # Boxes reaching into the padding are clipped to the image.
    everything = torch.tensor([[-5000.0, -5000.0, 5000.0, 5000.0]], dtype=torch.float64)
    width, height = geometry.original_size
    assert geometry.boxes_to_original(everything)[0].tolist() == [0, 0, width, height]


def _painted(width: int, height: int, box: tuple[int, int, int, int]) -> torch.Tensor:
    mask = torch.zeros((height, width), dtype=torch.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 1
    return mask


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("geometry", [
    plan_letterbox(1920, 1080, (640, 640)), plan_letterbox(90, 120, (640, 384)),
    plan_stretch(1000, 700, (320, 480)),
])
def test_a_map_returns_to_the_original_pixels(geometry: Geometry, interpolation: str):
    """Paint a rectangle in the original, render it in model-input space the way a perfect model
    would (pixel centres through the geometry), map it back: only pixels within one model-input
    pixel of the edge may differ."""
    width, height = geometry.original_size
    box = (width // 5, height // 3, width * 3 // 4, height * 4 // 5)
    in_w, in_h = geometry.input_size
    xs = torch.arange(in_w, dtype=torch.float64) + 0.5
    ys = torch.arange(in_h, dtype=torch.float64) + 0.5
    ox = torch.tensor([geometry.to_original(float(x), 0)[0] for x in xs])
    oy = torch.tensor([geometry.to_original(0, float(y))[1] for y in ys])
    rendered = ((oy[:, None] >= box[1]) & (oy[:, None] < box[3]) & (ox[None] >= box[0]) & (ox[None] < box[2]))
    values = rendered.to(torch.float32)[None] if interpolation == "bilinear" else rendered.to(torch.uint8)[None]
    back = geometry.map_to_original(values, interpolation)[0]
    got = (back > 0.5) if interpolation == "bilinear" else back.bool()
    want = _painted(width, height, box).bool()
    sx, sy = geometry.scale
    margin_x, margin_y = 1 / sx + 1, 1 / sy + 1  # one model-input pixel, in original pixels, +1
    wrong = (got != want).nonzero()
    for y, x in wrong.tolist():
        near_x = min(abs(x - box[0]), abs(x - box[2])) <= margin_x
        near_y = min(abs(y - box[1]), abs(y - box[3])) <= margin_y
        assert near_x or near_y, (x, y)
    assert got.sum().item() == pytest.approx(want.sum().item(), rel=0.05)


def test_map_rows_and_center_crop_fill():
    geometry = plan_center_crop(400, 300, 256, (224, 224))
    values = torch.arange(224 * 224, dtype=torch.int64).view(1, 224, 224)
    whole = geometry.map_to_original(values, "nearest", fill=-1)
    assert whole.shape == (1, 300, 400)
    assert torch.equal(geometry.map_to_original(values, "nearest", fill=-1, rows=(100, 180)), whole[:, 100:180])
    # The crop cut away a border all round (341x256 resized, 224x224 crop): never seen, so -1.
    left, top, right, bottom = (int(v) for v in geometry.source)
    assert (whole[:, :, : left - 1] == -1).all() and (whole[:, :, right + 2:] == -1).all()
    assert (whole[:, : top - 1] == -1).all() and (whole[:, bottom + 2:] == -1).all()
    assert (whole[:, top + 2: bottom - 1, left + 2: right - 1] >= 0).all()
    with pytest.raises(ValueError, match=r"\[C, 224, 224\]"):
        geometry.map_to_original(torch.zeros(1, 200, 224))


# -- every backend against the reference -------------------------------------------------------------


def _exif_rotated(turn: int) -> bytes:
    upright = samples.mosaic(900, 600)
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[turn]
    stored = Image.fromarray(upright).transpose(undo)
    exif = Image.Exif()
    exif[0x0112] = turn
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    photos = samples.photos()
    return {
        "astronaut": samples.encode(photos["astronaut"], "JPEG", quality=90),
        "coffee": samples.encode(photos["coffee"], "JPEG", quality=90),
        "1080p": samples.encode(samples.mosaic(1920, 1080), "JPEG", quality=90),
        "portrait": samples.encode(samples.mosaic(720, 1280), "JPEG", quality=90),
        "tiny": samples.encode(photos["chelsea"][:30, :40], "JPEG", quality=90),
        "exif6": _exif_rotated(6),
        "exif8": _exif_rotated(8),
    }


def _check(tensor: torch.Tensor, items: dict[str, bytes], mode: str, input_hw, mean_tol: float, max_tol: float):
    for k, (name, data) in enumerate(items.items()):
        ref = reference_mode_tensor(data, mode, input_hw)
        diff = (tensor[k].float().cpu() - ref).abs()
        print(f"{mode} {input_hw} {name}: mean {diff.mean():.5f} max {diff.max():.4f}")
        assert diff.mean().item() < mean_tol, name
        assert diff.max().item() < max_tol, name


@pytest.mark.parametrize("mode,input_hw", MODES)
def test_cpu_backend_exact_without_draft(mode, input_hw, images):
    spec = PreprocessSpec(geometry=mode, input_size=input_hw, jpeg_draft=False)
    batch = create_preprocessor("cpu", spec, 2).run(list(images.values()))
    assert batch.tensor.shape == (len(images), 3, *input_hw)
    if mode == "center_crop":
        _check(batch.tensor, images, mode, input_hw, CROP_EXACT_MEAN_TOL, EXACT_TOL)
    else:
        _check(batch.tensor, images, mode, input_hw, IDENTICAL_TOL, IDENTICAL_TOL)
    assert batch.geometry[list(images).index("exif6")].original_size == (900, 600)


@pytest.mark.parametrize("mode,input_hw", MODES)
def test_cpu_backend_with_draft_decoding(mode, input_hw):
    big = {"4k": samples.encode(samples.mosaic(3840, 2160), "JPEG", quality=90),
           "4k-portrait": samples.encode(samples.mosaic(2160, 3840, offset=1), "JPEG", quality=90)}
    spec = PreprocessSpec(geometry=mode, input_size=input_hw)
    batch = create_preprocessor("cpu", spec, 2).run(list(big.values()))
    _check(batch.tensor, big, mode, input_hw, DRAFT_MEAN_TOL, DRAFT_MAX_TOL)


BACKEND_CASES = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in ("torchvision", "dali")] + [
    pytest.param(b, "cuda", id=f"{b}-cuda", marks=pytest.mark.gpu) for b in ("torchvision", "dali", "cvcuda")
]


@pytest.mark.parametrize("mode,input_hw", MODES)
@pytest.mark.parametrize("backend,device", BACKEND_CASES)
def test_accelerated_backends_meet_the_contract_in_every_mode(backend, device, mode, input_hw, images):
    pre = make(backend, device, geometry=mode, input_size=input_hw)
    batch = pre.run(list(images.values()))
    assert batch.rows == list(range(len(images)))
    assert batch.tensor.shape == (len(images), 3, *input_hw) and batch.tensor.device.type == device
    cpu = create_preprocessor("cpu", PreprocessSpec(geometry=mode, input_size=input_hw, jpeg_draft=False), 1)
    assert batch.geometry == cpu.run(list(images.values())).geometry
    mean_tol, max_tol = (CPU_MEAN_TOL, CPU_MAX_TOL) if device == "cpu" else (GPU_MEAN_TOL, GPU_MAX_TOL)
    if backend == "dali" and device == "cpu":
        max_tol = DALI_CPU_MAX_TOL
    _check(batch.tensor, images, mode, input_hw, mean_tol, max_tol)
    assert pre.fallback_items == 0
    pre.close()


def test_draft_decoding_keeps_content_at_the_far_edge_in_place():
    """libjpeg rounds a reduced size up (4001 / 8 -> 501 pixels for 500.125 of image): the geometry
    must use the original's true extent in decoded pixels, or content near the right and bottom
    edges shifts (here by ~0.24 model-input pixels, about 3 original pixels)."""
    import numpy as np

    image = np.full((3001, 4001, 3), 255, np.uint8)
    image[:, 3950:3970] = 0  # a dark bar near the right edge
    data = samples.encode(image, "JPEG", quality=95)
    spec = PreprocessSpec(geometry="letterbox", input_size=(320, 320), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    batch = create_preprocessor("cpu", spec, 1).run([data])
    geometry = batch.geometry[0]
    darkness = 1.0 - batch.tensor[0].mean(0)  # 0..1, high on the bar
    left, top, right, bottom = geometry.target
    profile = darkness[top:bottom, left:right].mean(0)
    xs = torch.arange(left, right, dtype=torch.float64) + 0.5
    weights = profile.double() * (profile.double() > 0.05)
    centroid = float((weights * xs).sum() / weights.sum())
    predicted = geometry.to_input(3960.0, 0.0)[0]
    assert abs(centroid - predicted) < 0.1, (centroid, predicted)

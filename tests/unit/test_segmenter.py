"""SemanticSegmenter: masks land on the drawn pixels of the original image, RLE/PNG round trips.

The known-answer model (`tests.segmentation_models.ColourSegmenter`) labels strongly red pixels 1,
strongly blue pixels 2 and letterbox-padding grey 3, so the right answer for an image is the set of
pixels where the test drew red or blue, in original (EXIF-oriented) pixels.

Tolerance of a mask, stated once: the model's colour rules switch at the midpoint of a colour
edge, so the (symmetric, antialiased) preprocess resize blurs an edge without moving it; what
moves it is the model-input pixel grid, by up to one model-input pixel = 1 / scale original pixels
(scale = model-input pixels per original pixel), plus half an original pixel for sampling each
original pixel at its centre. A band of width t = 1 / scale + 0.5 around a shape of area A and
boundary length P (pixel edges) bounds the error: |area - A| <= t * P and
IoU >= (A - t * P) / (A + t * P). (Measured: IoU >= 0.992 everywhere, bounds 0.65..0.95; a
letterbox mapping that forgot the padding scores 0.63.)
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from handlers.errors import ModelLoadError
from handlers.preprocess.geometry import plan_letterbox
from handlers.tasks.segmenter import (
    SegmenterConfig,
    SemanticSegmenter,
    bilinear_label_map,
    nearest_label_map,
    no_class,
)
from handlers.testing import FakeContext, raw_request, run_handler
from tests.segmentation_models import ChannelMeanMap, ColourSegmenter, save_exported

coco_mask = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed (COCO RLE masks)")

LABELS = {"0": "background", "1": "red", "2": "blue", "3": "padding"}
RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def seg_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("segmenter")
    save_exported(ColourSegmenter(as_dict=True), directory / "letterbox.pt2", (520, 520))
    save_exported(ColourSegmenter(), directory / "crop.pt2", (224, 224))
    (directory / "index_to_name.json").write_text(json.dumps(LABELS))
    return directory


def make_handler(directory, model_file, handler_config=None, batch_size=8):
    ctx = FakeContext(directory, serialized_file=model_file, handler_config=handler_config or {},
                      batch_size=batch_size)
    handler = SemanticSegmenter()
    handler.initialize(ctx)
    return handler, ctx


# -- drawn images ------------------------------------------------------------------------------


def draw_scene(width, height, background=(255, 255, 255)):
    """An RGB image with a red rectangle and a blue ellipse, and the exact mask of each."""
    image = Image.new("RGB", (width, height), background)
    rect = (int(0.1 * width), int(0.15 * height), int(0.45 * width), int(0.6 * height))
    ellipse = (int(0.55 * width), int(0.3 * height), int(0.9 * width), int(0.85 * height))
    masks = {}
    for cls, colour, shape, box in ((1, RED, "rectangle", rect), (2, BLUE, "ellipse", ellipse)):
        getattr(ImageDraw.Draw(image), shape)(box, fill=colour)
        mask = Image.new("L", (width, height), 0)
        getattr(ImageDraw.Draw(mask), shape)(box, fill=1)
        masks[cls] = np.asarray(mask, dtype=np.uint8)
    return image, masks


def encode(image, fmt, orientation=None):
    buf = io.BytesIO()
    kwargs = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


# Stored pixels that EXIF orientation 6 (8) turns back into the drawn image: rotate the other way.
_STORE_ROTATION = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}

CASES = {  # name: (width, height, format, EXIF orientation, background), sizes as displayed
    "landscape": (800, 500, "PNG", None, (255, 255, 255)),
    "portrait": (360, 640, "PNG", None, (0, 0, 0)),
    "tiny": (40, 28, "PNG", None, (255, 255, 255)),
    "4k": (3840, 2160, "JPEG", None, (255, 255, 255)),
    "exif6": (480, 640, "JPEG", 6, (255, 255, 255)),
    "exif8": (640, 400, "JPEG", 8, (0, 0, 0)),
}


@pytest.fixture(scope="module")
def scenes():
    out = {}
    for name, (w, h, fmt, orientation, background) in CASES.items():
        image, masks = draw_scene(w, h, background)
        stored = image.transpose(_STORE_ROTATION[orientation]) if orientation else image
        data = encode(stored, fmt, orientation)
        assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (w, h)  # the test's own premise
        out[name] = (data, masks)
    return out


def decode(segment):
    return coco_mask.decode({"size": segment["mask"]["size"], "counts": segment["mask"]["counts"].encode()})


def perimeter(mask):
    m = mask.astype(np.int8)
    inner = np.abs(np.diff(m, axis=0)).sum() + np.abs(np.diff(m, axis=1)).sum()
    border = m[0].sum() + m[-1].sum() + m[:, 0].sum() + m[:, -1].sum()
    return int(inner + border)


def assert_mask_close(got, drawn, scale, name):
    t = 1.0 / scale + 0.5
    area, edge = int(drawn.sum()), perimeter(drawn)
    inter = int(np.logical_and(got, drawn).sum())
    iou = inter / int(np.logical_or(got, drawn).sum())
    bound = (area - t * edge) / (area + t * edge)
    assert iou >= bound, f"{name}: IoU {iou:.4f} < {bound:.4f} (t={t:.2f}px)"
    assert abs(int(got.sum()) - area) <= t * edge, f"{name}: area {int(got.sum())} vs drawn {area}"
    return iou


# -- the known answer, in every image shape, both interpolations --------------------------------


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_masks_land_on_drawn_pixels(seg_dir, scenes, interpolation):
    handler, ctx = make_handler(seg_dir, "letterbox.pt2", {"segmenter": {"interpolation": interpolation}})
    names = list(scenes)
    requests = [raw_request(scenes[n][0]) for n in names] + [raw_request(scenes["exif6"][0][:300])]  # truncated
    responses = run_handler(handler, ctx, requests)

    bad = responses[-1]
    assert 400 <= bad.status < 500 and bad.body["code"] == bad.status, bad.body  # its own 4xx
    for name, response in zip(names, responses[:-1], strict=True):
        w, h = CASES[name][:2]
        assert response.status == 200, (name, response.body)
        body = response.body
        assert body["image_size"] == [w, h]
        segments = body["segments"]
        ids = [s["class_id"] for s in segments]
        assert ids == sorted(ids) and set(ids) == {0, 1, 2}, (name, ids)  # no padding class (3)
        assert all(s["label"] == LABELS[str(s["class_id"])] for s in segments)
        decoded = {s["class_id"]: decode(s) for s in segments}
        for s in segments:
            assert s["mask"]["size"] == [h, w] and isinstance(s["mask"]["counts"], str)
            assert s["area"] == int(decoded[s["class_id"]].sum())
        # letterbox: every original pixel has exactly one class, padding none
        coverage = sum(d.astype(np.int64) for d in decoded.values())
        assert coverage.min() == 1 and coverage.max() == 1, name
        scale = min(520 / w, 520 / h)
        masks = scenes[name][1]
        for cls in (1, 2):
            assert_mask_close(decoded[cls], masks[cls], scale, f"{name}/{interpolation}/class {cls}")


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_center_crop_border_is_not_labelled(seg_dir, interpolation):
    config = {"preprocess": {"geometry": "center_crop", "input_size": 224, "resize_size": 256},
              "segmenter": {"interpolation": interpolation}}
    handler, ctx = make_handler(seg_dir, "crop.pt2", config, batch_size=2)
    w, h = 600, 400
    image, masks = draw_scene(w, h)
    # torchvision Resize(256) + CenterCrop(224) sees, of 600x400, x in [125, 475), y in [25, 375):
    # resized 384x256, crop offset (80, 16), 600/384 = 400/256 = 1.5625 original px per resized px.
    seen = np.zeros((h, w), dtype=bool)
    seen[25:375, 125:475] = True
    (response,) = run_handler(handler, ctx, [raw_request(encode(image, "PNG"))])
    assert response.status == 200
    decoded = {s["class_id"]: decode(s) for s in response.body["segments"]}
    assert set(decoded) == {0, 1, 2}
    coverage = sum(d.astype(np.int64) for d in decoded.values())
    assert np.array_equal(coverage == 1, seen) and coverage.max() == 1
    assert sum(s["area"] for s in response.body["segments"]) == int(seen.sum())
    scale = 224 / 350
    for cls in (1, 2):
        assert_mask_close(decoded[cls], masks[cls] * seen, scale, f"crop/{interpolation}/class {cls}")


def test_png_output_matches_rle_and_min_area_drops_a_speck(seg_dir):
    w, h = 300, 200
    image, _ = draw_scene(w, h)
    ImageDraw.Draw(image).rectangle((5, 5, 7, 7), fill=BLUE)  # a 3x3 blue speck far from the ellipse
    data = encode(image, "PNG")
    rle_handler, rle_ctx = make_handler(seg_dir, "letterbox.pt2", {}, batch_size=1)
    (rle,) = run_handler(rle_handler, rle_ctx, [raw_request(data)])
    areas = {s["class_id"]: s["area"] for s in rle.body["segments"]}
    assert decode(rle.body["segments"][2])[5:8, 5:8].all()  # the speck is blue at min_area 0

    png_handler, png_ctx = make_handler(seg_dir, "letterbox.pt2", {"segmenter": {"output": "png"}}, batch_size=1)
    (png,) = run_handler(png_handler, png_ctx, [raw_request(data)])
    assert png.status == 200 and png.body["image_size"] == [w, h]
    label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(png.body["label_map_png"]))))
    assert label_map.shape == (h, w) and label_map.dtype == np.uint8
    for s in rle.body["segments"]:
        assert np.array_equal(label_map == s["class_id"], decode(s).astype(bool))
    assert png.body["classes"] == [{k: s[k] for k in ("class_id", "label", "area")} for s in rle.body["segments"]]

    assert areas[0] + areas[1] + areas[2] == w * h

    # min_area 50: a 9-px red speck (a class of its own) goes, the blue ellipse stays.
    speck_only = Image.new("RGB", (w, h), (255, 255, 255))
    ImageDraw.Draw(speck_only).rectangle((5, 5, 7, 7), fill=RED)
    ImageDraw.Draw(speck_only).ellipse((150, 60, 280, 190), fill=BLUE)
    data2 = encode(speck_only, "PNG")
    for output in ("rle", "png"):
        handler, ctx = make_handler(seg_dir, "letterbox.pt2", {"segmenter": {"min_area": 50, "output": output}}, batch_size=1)
        (r,) = run_handler(handler, ctx, [raw_request(data2)])
        entries = r.body["segments"] if output == "rle" else r.body["classes"]
        assert [e["class_id"] for e in entries] == [0, 2], entries  # red (9 px) dropped, blue kept
        if output == "png":
            lm = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.body["label_map_png"]))))
            assert (lm[5:8, 5:8] == 255).all() and not (lm == 1).any()  # dropped pixels: no class


def test_torchvision_lraspp_random_weights(tmp_path):
    """A real architecture (eager, dict output with 'out' and no 'aux'): schema and sizes."""
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "model.py").write_text(
        "from torchvision.models.segmentation import lraspp_mobilenet_v3_large\n\n\n"
        "def LRASPP():\n"
        "    return lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)\n"
    )
    config = {"model": {"model_class": "model.py:LRASPP"}, "preprocess": {"input_size": [96, 128]}}
    handler, ctx = make_handler(tmp_path, "weights.pt", config, batch_size=3)
    landscape, _ = draw_scene(200, 120)
    portrait, _ = draw_scene(90, 160)
    responses = run_handler(handler, ctx, [raw_request(encode(landscape, "JPEG")), raw_request(b"GIF89a\x00"),
                                           raw_request(encode(portrait, "PNG"))])
    assert 400 <= responses[1].status < 500 and responses[1].body["code"] == responses[1].status
    for response, (w, h) in zip((responses[0], responses[2]), ((200, 120), (90, 160)), strict=True):
        assert response.status == 200, response.body
        body = response.body
        assert body["image_size"] == [w, h] and set(body) == {"image_size", "segments"}
        assert body["segments"] and all(0 <= s["class_id"] < 3 for s in body["segments"])
        assert sum(s["area"] for s in body["segments"]) == w * h
        for s in body["segments"]:
            assert set(s) == {"class_id", "label", "area", "mask"} and s["mask"]["size"] == [h, w]
            assert int(decode(s).sum()) == s["area"]


def test_wrong_output_shape_fails_load(seg_dir, tmp_path):
    save_exported(ChannelMeanMap(), tmp_path / "bad.pt2", (520, 520))
    with pytest.raises(ModelLoadError, match=r"\[B, C, H, W\].*\(1, 520, 520\)"):
        make_handler(tmp_path, "bad.pt2", batch_size=1)


# -- host-side encoding, without a model ---------------------------------------------------------


def _handler_with(**segmenter) -> SemanticSegmenter:
    handler = SemanticSegmenter()
    handler.config = dataclasses.replace(handler.config, segmenter=SegmenterConfig(**segmenter))
    handler.labels = {1: "one"}
    return handler


@pytest.mark.parametrize("classes", [5, 300])
def test_rle_and_png_round_trip(classes):
    rng = np.random.default_rng(0)
    h, w = 37, 53
    none = no_class(classes)
    dtype = np.uint8 if classes <= 255 else np.int16
    label_map = rng.integers(0, 4, size=(h, w)).astype(dtype)
    label_map[rng.random((h, w)) < 0.1] = none  # pixels the model did not see
    label_map[0:2, 0:2] = classes - 1  # the highest id, 4 px
    geometry = plan_letterbox(w, h, (64, 64))
    columns = np.ascontiguousarray(label_map.T)

    body = _handler_with().respond(columns, geometry, classes)
    assert body["image_size"] == [w, h]
    ids = [s["class_id"] for s in body["segments"]]
    assert ids == [0, 1, 2, 3, classes - 1]
    assert body["segments"][1]["label"] == "one" and body["segments"][0]["label"] == "0"
    for s in body["segments"]:
        expected = label_map == s["class_id"]
        assert np.array_equal(decode(s).astype(bool), expected)
        assert s["area"] == int(expected.sum())
        json.dumps(s)  # JSON-serialisable as is

    png = _handler_with(output="png", min_area=5).respond(columns, geometry, classes)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(png["label_map_png"]))))
    expected = label_map.copy()
    expected[expected == classes - 1] = none  # 4 px < min_area 5: written as "no class"
    assert np.array_equal(decoded.astype(np.int64), expected.astype(np.int64) if classes <= 255
                          else expected.view(np.uint16).astype(np.int64))
    assert [c["class_id"] for c in png["classes"]] == [0, 1, 2, 3]


def test_bilinear_chunks_agree_with_one_pass():
    torch.manual_seed(0)
    logits = torch.randn(3, 64, 64)
    geometry = plan_letterbox(97, 41, (64, 64))
    whole = bilinear_label_map(logits, geometry)
    chunked = bilinear_label_map(logits, geometry, chunk_floats=3 * 97 * 5)  # 5 rows a chunk
    assert whole.shape == (41, 97) and whole.dtype == torch.uint8
    assert torch.equal(whole, chunked)
    assert set(whole.unique().tolist()) <= {0, 1, 2}


# -- CUDA (skipped without a GPU; see docs/gpu-verification.md) ---------------------------------


@pytest.mark.gpu
def test_label_maps_on_cuda_match_cpu():
    torch.manual_seed(0)
    logits = torch.randn(21, 520, 520)
    geometry = plan_letterbox(1920, 1080, (520, 520))
    cpu = nearest_label_map(logits.max(0).indices, geometry, 21)
    gpu = nearest_label_map(logits.cuda().max(0).indices, geometry, 21)
    assert gpu.device.type == "cuda" and torch.equal(cpu, gpu.cpu())
    cpu = bilinear_label_map(logits, geometry, chunk_floats=21 * 1920 * 100)
    gpu = bilinear_label_map(logits.cuda(), geometry, chunk_floats=21 * 1920 * 100)
    assert (cpu == gpu.cpu()).float().mean().item() > 0.999  # float rounding may flip near-ties


@pytest.mark.gpu
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_handler_on_cuda_masks_land_on_drawn_pixels(seg_dir, scenes, interpolation):
    ctx = FakeContext(seg_dir, serialized_file="letterbox.pt2", batch_size=4, gpu_id=0,
                      handler_config={"segmenter": {"interpolation": interpolation}})
    handler = SemanticSegmenter()
    handler.initialize(ctx)
    names = ["landscape", "4k", "exif6"]
    responses = run_handler(handler, ctx, [raw_request(scenes[n][0]) for n in names])
    for name, response in zip(names, responses, strict=True):
        w, h = CASES[name][:2]
        assert response.status == 200 and response.body["image_size"] == [w, h]
        decoded = {s["class_id"]: decode(s) for s in response.body["segments"]}
        assert set(decoded) == {0, 1, 2}
        for cls in (1, 2):
            assert_mask_close(decoded[cls], scenes[name][1][cls], min(520 / w, 520 / h), f"cuda/{name}/{cls}")

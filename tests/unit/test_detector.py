"""ObjectDetector: post-processing on synthetic outputs with known answers, and boxes that land on
the right original pixels through the whole handler (tests/detection_models.py finds a drawn red
rectangle, so the right answer of every image is known)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from handlers.errors import ConfigError, ModelLoadError
from handlers.preprocess.geometry import Geometry, plan_letterbox
from handlers.tasks.detector import (
    DetectionParams,
    ObjectDetector,
    detect,
    detect_output_format,
    resolve_class_thresholds,
    unwrap_outputs,
)
from handlers.testing import FakeContext, raw_request, run_handler
from tests import detection_models
from tests.helpers import DETECTION_CASES, eager, encode_case, model_dir_with, start_detector


def identity(width: int = 100, height: int = 100) -> Geometry:
    """Model input == original image: boxes come back as they went in (then clipped)."""
    return Geometry((width, height), (width, height), (0.0, 0.0, float(width), float(height)),
                    (0, 0, width, height), "stretch")


def xyxy(rows: list[list[float]], n: int | None = None) -> torch.Tensor:
    """One image's [1, N, 6] xyxy_score_class output (padded with zero rows to n)."""
    t = torch.tensor(rows, dtype=torch.float32)
    if n is not None and n > len(rows):
        t = torch.cat([t, torch.zeros(n - len(rows), 6)])
    return t[None]


def boxes_of(dets) -> list[tuple[int, float, list[float]]]:
    return [(d.class_id, round(d.score, 6), [round(v, 4) for v in d.box]) for d in dets]


# -- post-processing on synthetic outputs ---------------------------------------------------------


def test_yolo_candidates_decode_and_map_through_letterbox():
    # A 200x100 original letterboxed into 100x100: scale 0.5, content at rows 25..75.
    g = plan_letterbox(200, 100, (100, 100))
    assert g.target == (0, 25, 100, 75)
    out = torch.zeros(1, 4 + 3, 8)
    out[0, :, 0] = torch.tensor([50, 50, 20, 10, 0.1, 0.7, 0.3])  # input box (40, 45)-(60, 55)
    [dets] = detect(out, [g], "yolo", DetectionParams())
    # x: 40/0.5 = 80 .. 60/0.5 = 120; y: (45-25)/0.5 = 40 .. (55-25)/0.5 = 60; best class 1.
    assert boxes_of(dets) == [(1, 0.7, [80.0, 40.0, 120.0, 60.0])]


def test_nms_is_per_class_unless_class_agnostic():
    out = torch.zeros(1, 4 + 2, 8)
    out[0, :, 0] = torch.tensor([50, 50, 20, 20, 0.9, 0.0])   # class 0
    out[0, :, 1] = torch.tensor([51, 50, 20, 20, 0.0, 0.8])   # class 1, IoU 0.9 with the first
    aware = detect(out, [identity()], "yolo", DetectionParams())[0]
    assert [(d.class_id, round(d.score, 6)) for d in aware] == [(0, 0.9), (1, 0.8)]
    agnostic = detect(out, [identity()], "yolo", DetectionParams(class_agnostic=True))[0]
    assert [(d.class_id, round(d.score, 6)) for d in agnostic] == [(0, 0.9)]


def test_nms_suppresses_by_iou_threshold_within_a_class():
    out = xyxy([[0, 0, 10, 10, 0.9, 0],
                [1, 0, 11, 10, 0.8, 0],     # IoU 90/110 = 0.82 with the first: suppressed
                [5, 0, 15, 10, 0.7, 0]])    # IoU 50/150 = 0.33 with the first: kept at 0.45
    kept = detect(out, [identity()], "xyxy_score_class", DetectionParams(nms="always"))[0]
    assert [d.box[0] for d in kept] == [0.0, 5.0]
    strict = detect(out, [identity()], "xyxy_score_class", DetectionParams(nms="always", iou_threshold=0.3))[0]
    assert [d.box[0] for d in strict] == [0.0]
    # auto: an xyxy_score_class model ran its own NMS, so nothing more is removed.
    assert len(detect(out, [identity()], "xyxy_score_class", DetectionParams())[0]) == 3


def test_class_thresholds_by_id_and_by_label():
    labels = {0: "person", 1: "bicycle", 2: "car"}
    thresholds = resolve_class_thresholds({"1": 0.5, "car": 0.7, "0": 0.1}, labels)
    assert thresholds == {1: 0.5, 2: 0.7, 0: 0.1}
    out = xyxy([[0, 0, 10, 10, 0.15, 0],    # below the global 0.25, above person's own 0.1: kept
                [20, 0, 30, 10, 0.45, 1],   # below bicycle's 0.5: dropped
                [40, 0, 50, 10, 0.65, 2],   # below car's 0.7: dropped
                [60, 0, 70, 10, 0.75, 2],   # kept
                [80, 0, 90, 10, 0.2, 3]])   # class 3 has no own threshold: below the global 0.25
    params = DetectionParams(score_threshold=0.25, class_thresholds=thresholds)
    dets = detect(out, [identity()], "xyxy_score_class", params)[0]
    assert [(d.class_id, round(d.score, 6)) for d in dets] == [(2, 0.75), (0, 0.15)]


def test_class_threshold_keys_that_name_nothing_fail_with_the_key():
    with pytest.raises(ConfigError, match=r"class_thresholds\.truck: not a class id.*car"):
        resolve_class_thresholds({"truck": 0.5}, {0: "car"})
    with pytest.raises(ConfigError, match="no index_to_name.json"):
        resolve_class_thresholds({"car": 0.5}, {})
    # An id key wins over a label key naming the same class.
    assert resolve_class_thresholds({"2": 0.3, "car": 0.9}, {2: "car"}) == {2: 0.3}


def test_max_detections_per_image_and_sorted_by_score():
    image0 = [[i * 12, 0, i * 12 + 10, 10, s, 0] for i, s in enumerate([0.3, 0.9, 0.5, 0.7, 0.4, 0.8])]
    image1 = [[0, 0, 10, 10, 0.6, 1], [50, 50, 60, 60, 0.95, 1]]
    out = torch.cat([xyxy(image0), xyxy(image1, n=6)])
    dets = detect(out, [identity(), identity()], "xyxy_score_class", DetectionParams(max_detections=3))
    assert [round(d.score, 6) for d in dets[0]] == [0.9, 0.8, 0.7]
    assert [d.box[0] for d in dets[0]] == [12.0, 60.0, 36.0]
    assert [round(d.score, 6) for d in dets[1]] == [0.95, 0.6]


def test_boxes_are_clipped_to_the_original_image():
    out = xyxy([[-10, -5, 120, 50, 0.9, 0], [90, 90, 130, 140, 0.8, 0]])
    dets = detect(out, [identity(100, 100)], "xyxy_score_class", DetectionParams())[0]
    assert [list(d.box) for d in dets] == [[0.0, 0.0, 100.0, 50.0], [90.0, 90.0, 100.0, 100.0]]


def test_torchvision_dicts_per_image_and_optional_nms():
    outputs = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [1, 0, 11, 10]]), "labels": torch.tensor([1, 2]),
         "scores": torch.tensor([0.9, 0.8])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)},
    ]
    dets = detect(outputs, [identity(), identity()], "torchvision", DetectionParams())
    assert [d.class_id for d in dets[0]] == [1, 2] and dets[1] == []
    merged = detect(outputs, [identity(), identity()], "torchvision",
                    DetectionParams(nms="always", class_agnostic=True))
    assert [d.class_id for d in merged[0]] == [1]


def test_nothing_above_threshold_gives_empty_lists():
    out = torch.zeros(2, 4 + 80, 8400)
    assert detect(out, [identity(), identity()], "yolo", DetectionParams()) == [[], []]
    # Zero-score rows are padding, even at threshold 0.
    padded = xyxy([[10, 10, 20, 20, 0.01, 1]], n=300)
    dets = detect(padded, [identity()], "xyxy_score_class", DetectionParams(score_threshold=0.0))[0]
    assert boxes_of(dets) == [(1, 0.01, [10.0, 10.0, 20.0, 20.0])]


@pytest.mark.parametrize("shape, expected", [
    ((1, 84, 8400), "yolo"), ((2, 300, 6), "xyxy_score_class"), ((1, 5, 6), None), ((1, 6, 6), "xyxy_score_class"),
    ((1, 8400, 84), None), ((1, 1000), None),
])
def test_output_format_from_shape(shape, expected):
    outputs = torch.zeros(shape)
    if expected is not None:
        assert detect_output_format(outputs) == expected
        return
    with pytest.raises(ModelLoadError) as info:
        detect_output_format(outputs)
    assert str(list(shape)) in str(info.value) and "handler.detector.output_format" in str(info.value)


def test_output_unwrapping():
    pred = torch.zeros(1, 84, 8400)
    assert unwrap_outputs((pred, [torch.zeros(1)])) is pred  # Ultralytics eager: (y, features)
    dicts = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)}]
    assert unwrap_outputs(({}, dicts)) is dicts  # scripted torchvision: (losses, detections)
    assert detect_output_format(unwrap_outputs(dicts)) == "torchvision"


# -- through the handler: boxes on the right original pixels --------------------------------------

@pytest.fixture(scope="module")
def case_images() -> list[bytes]:
    return [encode_case(w, h, box, o) for _, w, h, box, o in DETECTION_CASES]


def exported_yolo(directory: Path, height: int, width: int) -> dict:
    """RedBoxYolo as a torch.export ExportedProgram (dynamic batch) for a height x width input."""
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(detection_models.RedBoxYolo(), (torch.zeros(2, 3, height, width),),
                                  dynamic_shapes={"x": {0: batch}})
    name = f"yolo_{height}x{width}.pt2"
    torch.export.save(program, str(directory / name))
    return {"file": name}


GEOMETRIES = {
    "letterbox": {},  # the task default: letterbox 640, mean 0, std 1
    "stretch": {"geometry": "stretch", "input_size": [384, 640]},
}


def original_px_per_input_px(width: int, height: int, geometry: str) -> tuple[float, float]:
    """(x, y) original pixels per model-input pixel, from the mode's definition (not the handler)."""
    if geometry == "letterbox":
        ratio = min(640 / width, 640 / height)
        return 1 / ratio, 1 / ratio
    return width / 640, height / 384


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("output_format", ["yolo", "xyxy_score_class", "torchvision"])
def test_boxes_land_on_the_drawn_rectangle(tmp_path, case_images, output_format, geometry):
    directory = model_dir_with(tmp_path)
    height, width = (640, 640) if geometry == "letterbox" else (384, 640)
    model = {
        "yolo": lambda: exported_yolo(directory, height, width),
        "xyxy_score_class": lambda: eager("RedBoxXyxy"),
        "torchvision": lambda: eager("RedBoxTorchvision"),
    }[output_format]()
    config = {"model": model, "preprocess": {"backend": "cpu", **GEOMETRIES[geometry]}}
    handler, ctx = start_detector(directory, config, batch_size=len(DETECTION_CASES))
    assert handler.output_format == output_format  # auto recognised it at warm-up

    responses = run_handler(handler, ctx, [raw_request(b) for b in case_images])
    for (name, w, h, box, _), response in zip(DETECTION_CASES, responses, strict=True):
        assert response.status == 200, (name, response.body)
        assert response.body["image_size"] == [w, h], name
        # Exactly one detection: yolo's shifted duplicate is removed by NMS.
        [det] = response.body["detections"]
        assert (det["class_id"], det["label"], det["score"]) == (2, "red_box", 0.9), name
        # Tolerance per axis, in original pixels: 0.5 + 0.6 * (original px per model-input px).
        # The model finds each edge on the model-input pixel grid: a pixel counts when the
        # rectangle covers more than half of it, and the resampling filters are symmetric, so an
        # edge is off by at most half an input pixel (0.5 input px); JPEG noise can flip a pixel
        # whose centre lies right on the edge (0.1 input px more). Half an original pixel on top
        # covers JPEG at full resolution, where an input pixel is smaller than an original one
        # (the tiny image is upscaled 16x). Measured here: at most 0.45 input px (4K, stretch).
        # A box one input pixel off (e.g. wrong letterbox padding) exceeds this wherever
        # downscaling is >= 1.25x, as in every case but the tiny one.
        per_x, per_y = original_px_per_input_px(w, h, geometry)
        tol = [0.5 + 0.6 * per_x, 0.5 + 0.6 * per_y] * 2
        errors = [abs(a - b) for a, b in zip(det["box"], box, strict=True)]
        assert all(e <= t for e, t in zip(errors, tol, strict=True)), (name, det["box"], box, errors, tol)
        assert 0 <= det["box"][0] < det["box"][2] <= w and 0 <= det["box"][1] < det["box"][3] <= h


def test_a_corrupt_item_gets_its_own_error_and_labels_default_to_ids(tmp_path, case_images):
    directory = model_dir_with(tmp_path, labels=False)
    handler, ctx = start_detector(directory, {"model": eager("RedBoxXyxy"), "preprocess": {"backend": "cpu"}}, batch_size=3)
    responses = run_handler(handler, ctx, [raw_request(case_images[0]), raw_request(case_images[3][: len(case_images[3]) // 3]),
                                           raw_request(case_images[1])])
    assert [r.status for r in responses] == [200, 400, 200]
    assert responses[1].body["code"] == 400 and responses[1].body["type"] == "invalid_input"
    for response, (_, w, h, box, _) in zip([responses[0], responses[2]], [DETECTION_CASES[0], DETECTION_CASES[1]], strict=True):
        [det] = response.body["detections"]
        assert det["label"] == "2" and response.body["image_size"] == [w, h]
        assert max(abs(a - b) for a, b in zip(det["box"], box, strict=True)) < 6  # within the tolerance above


def test_the_table_hook_sees_and_replaces_the_results(tmp_path, case_images):
    seen = []

    class WithTable(ObjectDetector):
        def apply_table(self, results):
            seen.append(results)
            return [{**r, "detections": []} for r in results]

    handler, ctx = start_detector(model_dir_with(tmp_path), {"model": eager("RedBoxXyxy")}, cls=WithTable)
    [response] = run_handler(handler, ctx, [raw_request(case_images[0])])
    assert response.body["detections"] == [] and len(seen[-1][0]["detections"]) == 1


@pytest.mark.parametrize("model, option, message", [
    ("WrongShape", "auto", r"\[1, 5\].*handler\.detector\.output_format"),
    ("Ambiguous", "auto", r"\[1, 5, 6\].*set handler\.detector\.output_format to yolo or xyxy_score_class"),
    ("RedBoxXyxy", "yolo", r"output_format is yolo but the model returned a tensor of shape \[1, 4, 6\]"),
    ("RedBoxYolo", "torchvision", r"output_format is torchvision but .*\[1, 7, 16\]"),
])
def test_an_output_of_the_wrong_shape_fails_model_load(tmp_path, model, option, message):
    directory = model_dir_with(tmp_path)
    ctx = FakeContext(directory, handler_config={"model": eager(model), "detector": {"output_format": option}})
    with pytest.raises(ModelLoadError, match=message):
        ObjectDetector().initialize(ctx)


def test_an_explicit_yolo_form_is_taken_as_stated_when_n_is_not_above_4_plus_c(tmp_path, case_images):
    # [B, 7, 4]: N = 4 <= 4+C = 7, like a YOLO at 64 px with 80 classes ([B, 84, 84]).
    directory = model_dir_with(tmp_path)
    config = {"model": eager("RedBoxYoloFewCandidates"), "preprocess": {"backend": "cpu"},
              "detector": {"output_format": "yolo"}}
    handler, ctx = start_detector(directory, config)
    [response] = run_handler(handler, ctx, [raw_request(case_images[0])])
    _, _, _, box, _ = DETECTION_CASES[0]
    [det] = response.body["detections"]  # the shifted duplicate is removed by NMS
    assert (det["class_id"], det["label"], det["score"]) == (2, "red_box", 0.9)
    assert max(abs(a - b) for a, b in zip(det["box"], box, strict=True)) < 6  # within test_boxes_land_...'s tolerance


def test_auto_says_how_it_read_a_yolo_shape_with_few_candidates(tmp_path):
    ctx = FakeContext(model_dir_with(tmp_path), handler_config={"model": eager("RedBoxYoloFewCandidates")})
    with pytest.raises(ModelLoadError, match=r"auto reads .* as yolo .* only when N > A .* N = 4 <= A = 7.*"
                                              r"set handler\.detector\.output_format to yolo"):
        ObjectDetector().initialize(ctx)


def test_an_explicit_yolo_form_checks_its_classes_against_the_labels(tmp_path):
    directory = model_dir_with(tmp_path)
    (directory / "index_to_name.json").write_text(json.dumps({"0": "person", "1": "red_box"}))
    ctx = FakeContext(directory, handler_config={"model": eager("RedBoxYoloFewCandidates"),
                                                 "detector": {"output_format": "yolo"}})
    with pytest.raises(ModelLoadError, match=r"C = 3 classes, but the archive's index_to_name.json has 2 labels"):
        ObjectDetector().initialize(ctx)


FRCNN_SOURCE = '''
from torch import nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn


class Detector(nn.Module):
    """torchvision's Faster R-CNN (MobileNetV3, 320 px), 4 classes + background, random weights."""

    def __init__(self):
        super().__init__()
        self.model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=5)

    def forward(self, x):
        return self.model(x)
'''


def test_a_real_torchvision_detector_with_random_weights(tmp_path):
    import importlib.util

    from archiver_scripts import samples

    (tmp_path / "frcnn.py").write_text(FRCNN_SOURCE)
    spec = importlib.util.spec_from_file_location("_frcnn_for_weights", tmp_path / "frcnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.Detector().state_dict(), tmp_path / "frcnn.pt")
    labels = {"0": "background", "1": "cat", "2": "dog", "3": "car", "4": "tree"}
    (tmp_path / "index_to_name.json").write_text(json.dumps(labels))
    config = {
        # No warm-up runs: on a CPU each forward costs ~0.5 s; auto recognises the form on the batch.
        "model": {"file": "frcnn.pt", "format": "eager", "model_class": "frcnn.py:Detector", "warmup": False},
        "preprocess": {"backend": "cpu", "input_size": 320},
        "detector": {"score_threshold": 0.05, "max_detections": 10},  # random weights: low scores
    }
    handler, ctx = start_detector(tmp_path, config, batch_size=2)
    sizes = [(300, 500), (500, 300)]
    images = [samples.encode(samples.mosaic(w, h, offset=i)) for i, (w, h) in enumerate(sizes)]
    responses = run_handler(handler, ctx, [raw_request(b) for b in images])  # mixed sizes, one batch
    assert handler.output_format == "torchvision"
    for response, (w, h) in zip(responses, sizes, strict=True):
        assert response.status == 200
        assert set(response.body) == {"detections", "image_size"} and response.body["image_size"] == [w, h]
        dets = response.body["detections"]
        assert 1 <= len(dets) <= 10
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True) and all(0.05 <= s <= 1 for s in scores)
        for d in dets:
            assert set(d) == {"class_id", "label", "score", "box"}
            assert 1 <= d["class_id"] <= 4 and d["label"] == labels[str(d["class_id"])]
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h


@pytest.mark.gpu
@pytest.mark.parametrize("output_format", ["yolo", "xyxy_score_class", "torchvision"])
def test_post_processing_on_cuda_matches_cpu(output_format):
    torch.manual_seed(0)
    g = [plan_letterbox(1920, 1080, (640, 640)), plan_letterbox(480, 640, (640, 640))]
    if output_format == "yolo":
        out = torch.rand(2, 4 + 5, 2000) * torch.tensor([640, 640, 80, 80, 1, 1, 1, 1, 1])[None, :, None]
    elif output_format == "xyxy_score_class":
        xy = torch.rand(2, 300, 2) * 600
        out = torch.cat([xy, xy + 30, torch.rand(2, 300, 1), torch.randint(0, 5, (2, 300, 1))], dim=2)
    else:
        out = [{"boxes": torch.cat([xy := torch.rand(50, 2) * 600, xy + 30], 1), "labels": torch.randint(0, 5, (50,)),
                "scores": torch.rand(50)} for _ in range(2)]
    cuda = out.cuda() if isinstance(out, torch.Tensor) else [{k: v.cuda() for k, v in o.items()} for o in out]
    params = DetectionParams(nms="always", class_thresholds={1: 0.6}, max_detections=20)
    on_cpu, on_gpu = detect(out, g, output_format, params), detect(cuda, g, output_format, params)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert [d.class_id for d in a] == [d.class_id for d in b]
        assert np.allclose([d.box for d in a], [d.box for d in b], atol=1e-3) if a else b == []

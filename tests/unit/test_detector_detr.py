"""ObjectDetector's DETR-family form (`handler.detector.output_format: detr`): normalised cx, cy, w, h
boxes and per-query logits, sigmoid or softmax with "no object", no NMS; boxes in original pixels.

Known answers: synthetic outputs whose boxes are computed by hand, and models that return the
drawn red rectangle's box (tests/instance_models.py) in each DETR output form. Box tolerance as the
detector's (tests/unit/test_detector.py): 0.5 + 0.6 x original pixels per model-input pixel.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from handlers.errors import ModelLoadError
from handlers.preprocess.geometry import plan_letterbox
from handlers.tasks.detector import (
    DetectionParams,
    ObjectDetector,
    check_output,
    detect,
    detect_output_format,
    detr_pair,
    resolve_detr_activation,
    unwrap_outputs,
)
from handlers.testing import FakeContext, raw_request, run_handler
from tests import instance_models
from tests.helpers import DETECTION_CASES, encode_case

LABELS = {"0": "a", "1": "red", "2": "blue"}


def boxes_of(dets) -> list[tuple[int, float, list[float]]]:
    return [(d.class_id, round(d.score, 6), [round(v, 3) for v in d.box]) for d in dets]


# -- post-processing on synthetic outputs ---------------------------------------------------------


def test_normalised_cxcywh_maps_through_the_letterbox():
    g = plan_letterbox(200, 100, (100, 100))  # scale 0.5, content rows 25..75 of the input
    logits = torch.full((1, 3, 2), -9.0)
    logits[0, 0, 1] = math.log(0.8 / 0.2)  # sigmoid 0.8
    boxes = torch.full((1, 3, 4), 0.5)
    boxes[0, 0] = torch.tensor([0.5, 0.5, 0.2, 0.1])  # input (40, 45)-(60, 55)
    [dets] = detect((logits, boxes), [g], "detr", DetectionParams(detr_activation="sigmoid"))
    # x: 40/0.5 = 80 .. 60/0.5 = 120; y: (45-25)/0.5 = 40 .. (55-25)/0.5 = 60
    assert boxes_of(dets) == [(1, 0.8, [80.0, 40.0, 120.0, 60.0])]


def test_sigmoid_makes_every_query_class_pair_a_candidate_and_runs_no_nms():
    g = plan_letterbox(100, 100, (100, 100))
    logits = torch.full((1, 2, 3), -9.0)
    logits[0, 0, 0], logits[0, 0, 2] = 2.0, 1.0  # one query, two classes: both answered
    logits[0, 1, 0] = 0.0  # sigmoid 0.5, the same box as query 0: no NMS removes it
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]]])
    [dets] = detect({"logits": logits, "pred_boxes": boxes}, [g], "detr", DetectionParams(detr_activation="sigmoid"))
    assert [(d.class_id, round(d.score, 6)) for d in dets] == [(0, 0.880797), (2, 0.731059), (0, 0.5)]
    # nms: always merges them as for any form
    [merged] = detect((logits, boxes), [g], "detr", DetectionParams(detr_activation="sigmoid", nms="always"))
    assert [(d.class_id, round(d.score, 6)) for d in merged] == [(0, 0.880797), (2, 0.731059)]


def test_softmax_drops_the_no_object_class():
    g = plan_letterbox(100, 100, (100, 100))
    logits = torch.tensor([[[math.log(27.0), 0.0, 0.0, 0.0],  # class 0 at 27 / 30 = 0.9
                            [0.0, 0.0, 0.0, 9.0]]])  # "no object" wins: class scores ~0.0001
    boxes = torch.tensor([[[0.25, 0.25, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]]])
    [dets] = detect((logits, boxes), [g], "detr", DetectionParams(detr_activation="softmax"))
    assert boxes_of(dets) == [(0, 0.9, [20.0, 20.0, 30.0, 30.0])]
    # The same logits read with sigmoid answer the no-object column as class 3 at 0.9999.
    [wrong] = detect((logits, boxes), [g], "detr", DetectionParams(detr_activation="sigmoid"))
    assert (wrong[0].class_id, round(wrong[0].score, 4)) == (3, 0.9999)


def test_ultralytics_rt_detr_rows_when_stated():
    g = plan_letterbox(200, 100, (100, 100))
    out = torch.zeros(1, 4, 6)
    out[0, 0] = torch.tensor([0.5, 0.5, 0.2, 0.1, 0.7, 2.0])
    [dets] = detect(out, [g], "detr", DetectionParams())
    assert boxes_of(dets) == [(2, 0.7, [80.0, 40.0, 120.0, 60.0])]
    check_output(out, "detr", 1)
    assert detect_output_format(out) == "xyxy_score_class"  # auto cannot tell: the option says detr


def test_auto_recognises_the_pair_and_the_dict():
    logits, boxes = torch.zeros(2, 300, 80), torch.zeros(2, 300, 4)
    for outputs in ((logits, boxes), [logits, boxes, torch.zeros(2, 300, 256)], {"logits": logits, "pred_boxes": boxes},
                    {"pred_logits": logits, "pred_boxes": boxes}, (boxes, logits)):
        pair = unwrap_outputs(outputs)
        assert detect_output_format(pair) == "detr"
        assert pair[0] is logits and pair[1] is boxes
        check_output(pair, "detr", 2)
    assert detr_pair((torch.zeros(2, 84, 8400), [torch.zeros(1)])) is None  # Ultralytics eager yolo
    assert detr_pair((torch.zeros(2, 300, 80), torch.zeros(2, 299, 4))) is None  # queries differ
    with pytest.raises(ModelLoadError, match=r"for a batch of 3 images"):
        check_output((logits, boxes), "detr", 3)


def test_auto_activation_follows_the_labels():
    assert resolve_detr_activation("auto", 92, 91) == "softmax"  # DETR: 91 COCO ids + no object
    assert resolve_detr_activation("auto", 80, 80) == "sigmoid"  # RT-DETR, D-FINE
    assert resolve_detr_activation("auto", 81, 0) == "sigmoid"  # no labels: sigmoid
    assert resolve_detr_activation("softmax", 80, 80) == "softmax"  # stated: as stated


# -- through the handler: boxes on the drawn rectangle --------------------------------------------


def start(tmp_path, model: str, batch_size: int, **config):
    shutil.copy(instance_models.__file__, tmp_path / "instance_models.py")
    torch.save({}, tmp_path / "weights.pt")
    (tmp_path / "index_to_name.json").write_text(json.dumps(LABELS))
    handler_config = {"model": {"file": "weights.pt", "format": "eager", "model_class": f"instance_models.py:{model}"},
                      **config}
    handler_config.setdefault("preprocess", {})["backend"] = "cpu"
    ctx = FakeContext(tmp_path, handler_config=handler_config, batch_size=batch_size)
    handler = ObjectDetector()
    handler.initialize(ctx)
    return handler, ctx


@pytest.fixture(scope="module")
def case_images() -> list[bytes]:
    return [encode_case(w, h, box, o) for _, w, h, box, o in DETECTION_CASES]


@pytest.mark.parametrize("model, config, activation, score, geometry", [
    ("DetrSigmoid", {}, "sigmoid", 0.952574, "letterbox"),
    ("DetrSigmoid", {}, "sigmoid", 0.952574, "stretch"),  # RT-DETR's own preprocessing
    ("DetrSoftmax", {}, "softmax", 0.9, "letterbox"),  # 4 logits for 3 labels: auto picks softmax
    ("RtDetrUltra", {"output_format": "detr"}, "sigmoid", 0.9, "stretch"),
])
def test_detr_boxes_land_on_the_drawn_rectangle(tmp_path, case_images, model, config, activation, score, geometry):
    preprocess = {"geometry": "stretch", "input_size": [384, 640]} if geometry == "stretch" else {}
    handler, ctx = start(tmp_path, model, len(DETECTION_CASES), detector=config, preprocess=preprocess)
    responses = run_handler(handler, ctx, [raw_request(b) for b in case_images])
    assert handler.output_format == "detr" and handler.params.detr_activation == activation
    for (name, w, h, box, _), response in zip(DETECTION_CASES, responses, strict=True):
        assert response.status == 200, (name, response.body)
        assert response.body["image_size"] == [w, h]
        [det] = response.body["detections"]  # the other queries score below the threshold
        assert (det["class_id"], det["label"], det["score"]) == (1, "red", score), name
        per_x, per_y = (w / 640, h / 384) if geometry == "stretch" else (max(w, h) / 640,) * 2
        tol = [0.5 + 0.6 * per_x, 0.5 + 0.6 * per_y] * 2
        errors = [abs(a - b) for a, b in zip(det["box"], box, strict=True)]
        assert all(e <= t for e, t in zip(errors, tol, strict=True)), (name, det["box"], box, errors)


def test_a_bad_item_fails_alone(tmp_path, case_images):
    handler, ctx = start(tmp_path, "DetrSigmoid", 2)
    responses = run_handler(handler, ctx, [raw_request(b"nope"), raw_request(case_images[0])])
    assert [r.status for r in responses] == [415, 200]
    assert len(responses[1].body["detections"]) == 1


def test_a_stated_detr_form_refuses_a_yolo_output(tmp_path):
    shutil.copy(instance_models.__file__, tmp_path / "instance_models.py")
    with pytest.raises(ModelLoadError, match=r"output_format is detr but the model returned a tensor of shape \[1, 20, 32\]"):
        start(tmp_path, "YoloPose", 1, detector={"output_format": "detr"})


@pytest.mark.slow
def test_an_ultralytics_rt_detr_export(tmp_path):
    pytest.importorskip("ultralytics", reason="ultralytics is not installed (a test extra)")
    import io

    from PIL import Image
    from ultralytics import RTDETR

    from archiver_scripts import samples

    model_file, _ = instance_models.ultralytics_export("rtdetr-l.yaml", 160, tmp_path, class_bias=0.0, rtdetr=True)
    # [B, 300, 6] reads as xyxy_score_class under auto: the form is stated; RT-DETR stretches its input
    config = {"model": {"file": model_file.name}, "detector": {"output_format": "detr", "score_threshold": 0.01},
              "preprocess": {"backend": "cpu", "input_size": 160, "geometry": "stretch"}}
    ctx = FakeContext(tmp_path, handler_config=config)
    handler = ObjectDetector()
    handler.initialize(ctx)
    image = samples.encode(samples.mosaic(320, 240), "JPEG", quality=95)
    seen = []
    forward = handler.forward
    handler.forward = lambda x: seen.append((x, forward(x))) or seen[-1][1]
    [response] = run_handler(handler, ctx, [raw_request(image)])
    bgr = np.ascontiguousarray(np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[..., ::-1])
    model = RTDETR(str(model_file))
    model.predict(bgr, imgsz=160, device="cpu", verbose=False, conf=0.01, max_det=100)
    theirs = model.predictor.postprocess(seen[0][1], seen[0][0], [bgr])[0]
    found = response.body["detections"]
    assert len(found) >= 1 and len(found) == len(theirs.boxes)
    ours = sorted((d["score"], d["class_id"], d["box"]) for d in found)
    want = sorted((round(s, 6), int(c), b) for s, c, b in zip(theirs.boxes.conf.tolist(), theirs.boxes.cls.tolist(),
                                                              theirs.boxes.xyxy.tolist(), strict=True))
    for (s, c, b), (ws, wc, wb) in zip(ours, want, strict=True):
        assert (s, c) == (pytest.approx(ws, abs=1e-5), wc) and b == pytest.approx(wb, abs=0.01)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_detr_post_processing_on_cuda_matches_cpu(activation):
    torch.manual_seed(0)
    g = [plan_letterbox(1920, 1080, (640, 640)), plan_letterbox(480, 640, (640, 640))]
    logits, boxes = torch.randn(2, 300, 81) * 3, torch.rand(2, 300, 4) * 0.5 + 0.1
    params = DetectionParams(detr_activation=activation, score_threshold=0.3, max_detections=50)
    on_cpu = detect((logits, boxes), g, "detr", params)
    on_gpu = detect((logits.cuda(), boxes.cuda()), g, "detr", params)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert [d.class_id for d in a] == [d.class_id for d in b]
        assert np.allclose([d.box for d in a], [d.box for d in b], atol=1e-3) if a else b == []

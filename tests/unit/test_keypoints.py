"""KeypointDetector: points at known positions (the corners and the centre of a drawn red
rectangle, tests/instance_models.py) must land on the original (EXIF-oriented) image's pixels, from
Ultralytics' yolo_pose form and torchvision's Keypoint R-CNN form.

Tolerance of a point, per axis: 0.5 + 0.6 x (original pixels per model-input pixel), the detector's
box tolerance (tests/unit/test_detector.py): the corners are the box's corners.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from archiver_scripts import samples
from handlers.errors import ConfigError, ModelLoadError
from handlers.preprocess.geometry import plan_letterbox
from handlers.tasks.keypoints import KeypointDetector, load_schema, points_to_original, pose_layout
from handlers.testing import FakeContext, raw_request, run_handler
from tests import instance_models
from tests.helpers import DETECTION_CASES, encode_case

NAMES = ["top_left", "top_right", "bottom_right", "bottom_left", "centre"]
SKELETON = [[0, 1], [1, 2], [2, 3], [3, 0]]


def start(tmp_path, model: str, batch_size: int = 1, schema: bool = True, labels: dict | None = None, **keypoints):
    shutil.copy(instance_models.__file__, tmp_path / "instance_models.py")
    torch.save({}, tmp_path / "weights.pt")
    (tmp_path / "index_to_name.json").write_text(json.dumps(labels or {"0": "box", "1": "red"}))
    if schema:
        (tmp_path / "keypoints.json").write_text(json.dumps({"names": NAMES, "skeleton": SKELETON}))
    config = {"model": {"file": "weights.pt", "format": "eager", "model_class": f"instance_models.py:{model}"},
              "preprocess": {"backend": "cpu"}, "keypoints": keypoints}
    ctx = FakeContext(tmp_path, handler_config=config, batch_size=batch_size)
    handler = KeypointDetector()
    handler.initialize(ctx)
    return handler, ctx


@pytest.fixture(scope="module")
def case_images() -> list[bytes]:
    return [encode_case(w, h, box, o) for _, w, h, box, o in DETECTION_CASES]


@pytest.mark.parametrize("model, form, class_id, scores", [
    ("YoloPose", "yolo_pose", 0, list(instance_models.KEYPOINT_SCORES)),
    ("KeypointRcnn", "torchvision", 1, [10 * s for s in instance_models.KEYPOINT_SCORES]),
])
def test_points_land_on_the_drawn_corners(tmp_path, case_images, model, form, class_id, scores):
    handler, ctx = start(tmp_path, model, batch_size=len(DETECTION_CASES))
    assert handler.output_format == form
    responses = run_handler(handler, ctx, [raw_request(b) for b in case_images])
    for (name, w, h, (x1, y1, x2, y2), _), response in zip(DETECTION_CASES, responses, strict=True):
        assert response.status == 200, (name, response.body)
        body = response.body
        assert body["image_size"] == [w, h] and body["keypoint_names"] == NAMES and body["skeleton"] == SKELETON
        [inst] = body["instances"]
        assert (inst["class_id"], inst["score"]) == (class_id, 0.9)
        want = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), ((x1 + x2) / 2, (y1 + y2) / 2)]
        per_px = 1 / min(640 / w, 640 / h)
        tol = 0.5 + 0.6 * per_px
        for (px, py, score), (wx, wy), want_score in zip(inst["keypoints"], want, scores, strict=True):
            assert abs(px - wx) <= tol and abs(py - wy) <= tol, (name, (px, py), (wx, wy), tol)
            assert score == pytest.approx(want_score, abs=1e-5)


def test_without_keypoints_json_the_layout_comes_from_the_labels(tmp_path, case_images):
    handler, ctx = start(tmp_path, "YoloPose", schema=False, labels={"0": "box"})  # C = 1 -> K = 5
    [response] = run_handler(handler, ctx, [raw_request(case_images[0])])
    assert set(response.body) == {"image_size", "instances"}
    assert len(response.body["instances"][0]["keypoints"]) == 5


def test_schema_can_stay_out_of_responses_and_a_bad_item_fails_alone(tmp_path, case_images):
    handler, ctx = start(tmp_path, "YoloPose", batch_size=2, schema_in_response=False)  # K from keypoints.json
    responses = run_handler(handler, ctx, [raw_request(b"\x89PNG broken"), raw_request(case_images[1])])
    assert [r.status for r in responses] == [415, 200]  # PNG magic, then nothing: no decodable image
    assert set(responses[1].body) == {"image_size", "instances"}


def test_pose_layout():
    assert pose_layout(4 + 1 + 17 * 3, 17, 3, 0) == (1, 17)
    assert pose_layout(4 + 1 + 17 * 3, 0, 3, 0) == (1, 17)  # C = 1 by default
    assert pose_layout(4 + 80 + 17 * 3, 0, 3, 80) == (80, 17)  # C from the labels
    assert pose_layout(4 + 1 + 12 * 2, 12, 2, 0) == (1, 12)
    with pytest.raises(ModelLoadError, match=r"18 channels, which K = 5 points"):
        pose_layout(18, 5, 3, 0)  # 4 + C + 15 = 18 leaves no class
    with pytest.raises(ModelLoadError, match=r"57 channels, which C = 1 classes \(the default\)"):
        pose_layout(57, 0, 3, 0)  # 52 values are no whole number of points


def test_points_map_through_the_letterbox_and_are_clipped():
    g = plan_letterbox(200, 100, (100, 100))  # scale 0.5, content rows 25..75
    pts = torch.tensor([[[50.0, 50.0], [0.0, 10.0], [100.0, 75.0]]])
    out = points_to_original(pts, torch.tensor([0]), [g])
    assert out.tolist() == [[[100.0, 50.0], [0.0, 0.0], [200.0, 100.0]]]


def test_a_bad_keypoints_json_names_the_file(tmp_path):
    path = tmp_path / "keypoints.json"
    path.write_text(json.dumps({"names": ["a", "b"], "skeleton": [[0, 2]]}))
    with pytest.raises(ConfigError, match=r"keypoints.json: 'skeleton' must be a list of \[i, j\] pairs of indices 0..1"):
        load_schema(path)
    path.write_text("{")
    with pytest.raises(ConfigError, match="keypoints.json: not readable JSON"):
        load_schema(path)
    assert load_schema(tmp_path / "absent.json").names == ()


def test_a_schema_that_does_not_match_the_model_fails(tmp_path):
    (tmp_path / "keypoints.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    with pytest.raises(ModelLoadError, match="keypoints"):
        start(tmp_path, "KeypointRcnn", schema=False)


KEYPOINTRCNN_SOURCE = '''
from torch import nn
from torchvision.models.detection import keypointrcnn_resnet50_fpn


class Pose(nn.Module):
    """torchvision's Keypoint R-CNN (ResNet-50 FPN), person + background, 17 points, random weights."""

    def __init__(self):
        super().__init__()
        self.model = keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2,
                                               min_size=160, max_size=160, box_score_thresh=0.0,
                                               # few proposals and detections: the keypoint head is the cost
                                               rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=10,
                                               box_detections_per_img=3)

    def forward(self, x):
        return self.model(x)
'''


@pytest.mark.slow
def test_a_real_keypoint_rcnn_with_random_weights(tmp_path):
    import importlib.util

    (tmp_path / "kprcnn.py").write_text(KEYPOINTRCNN_SOURCE)
    spec = importlib.util.spec_from_file_location("_kprcnn_for_weights", tmp_path / "kprcnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.Pose().state_dict(), tmp_path / "kp.pt")
    names = [f"p{i}" for i in range(17)]
    (tmp_path / "keypoints.json").write_text(json.dumps({"names": names, "skeleton": [[0, 1]]}))
    config = {"model": {"file": "kp.pt", "format": "eager", "model_class": "kprcnn.py:Pose", "warmup": False},
              "preprocess": {"backend": "cpu", "input_size": 160},
              "keypoints": {"score_threshold": 0.0, "max_detections": 3}}
    ctx = FakeContext(tmp_path, handler_config=config, batch_size=2)
    handler = KeypointDetector()
    handler.initialize(ctx)
    sizes = [(300, 200), (200, 300)]
    images = [samples.encode(samples.mosaic(w, h, offset=i)) for i, (w, h) in enumerate(sizes)]
    responses = run_handler(handler, ctx, [raw_request(b) for b in images])
    assert handler.output_format == "torchvision"
    for response, (w, h) in zip(responses, sizes, strict=True):
        assert response.status == 200 and response.body["keypoint_names"] == names
        found = response.body["instances"]
        assert 1 <= len(found) <= 3
        for inst in found:
            pts = np.array([p[:2] for p in inst["keypoints"]])
            assert pts.shape == (17, 2) and (pts[:, 0] <= w).all() and (pts[:, 1] <= h).all() and (pts >= 0).all()


@pytest.mark.slow
def test_an_ultralytics_yolo_pose_export(tmp_path):
    pytest.importorskip("ultralytics", reason="ultralytics is not installed (a test extra)")
    import io

    from PIL import Image
    from ultralytics import YOLO

    model_file, _ = instance_models.ultralytics_export("yolo11n-pose.yaml", 160, tmp_path, class_bias=-4.0)
    # the YAML's head has 80 classes and 17 points: [B, 4+80+51, N]; K comes from keypoints.json
    (tmp_path / "keypoints.json").write_text(json.dumps({"names": [f"p{i}" for i in range(17)]}))
    config = {"model": {"file": model_file.name}, "preprocess": {"backend": "cpu", "input_size": 160}}
    ctx = FakeContext(tmp_path, handler_config=config)
    handler = KeypointDetector()
    handler.initialize(ctx)
    assert handler.output_format == "yolo_pose"
    image = samples.encode(samples.mosaic(320, 240), "JPEG", quality=95)
    seen = []
    forward = handler.forward
    handler.forward = lambda x: seen.append((x, forward(x))) or seen[-1][1]
    [response] = run_handler(handler, ctx, [raw_request(image)])
    bgr = np.ascontiguousarray(np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[..., ::-1])
    model = YOLO(str(model_file), task="pose")
    model.predict(bgr, imgsz=160, device="cpu", verbose=False, conf=0.25, iou=0.45, max_det=100)
    theirs = model.predictor.postprocess(seen[0][1], seen[0][0], [bgr])[0]
    found = response.body["instances"]
    assert len(found) >= 1 and len(found) == len(theirs.boxes)
    for inst, box, points in zip(found, theirs.boxes.xyxy.tolist(), theirs.keypoints.data.tolist(), strict=True):
        assert inst["box"] == pytest.approx(box, abs=0.01)
        assert np.allclose(inst["keypoints"], points, atol=0.01)  # x, y (2 decimals), score


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["YoloPose", "KeypointRcnn"])
def test_post_processing_on_cuda_matches_cpu(tmp_path, model):
    handler, _ = start(tmp_path, model)
    g = plan_letterbox(1280, 720, (640, 640))
    x = torch.full((1, 3, 640, 640), 0.45)
    x[0, :, 180:300, 100:300] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    net = getattr(instance_models, model)()
    on_cpu = handler.postprocess(net(x), [g])
    on_gpu = handler.postprocess(net(x.cuda()), [g])
    assert len(on_cpu[0]["instances"]) == 1
    assert np.allclose(on_cpu[0]["instances"][0]["keypoints"], on_gpu[0]["instances"][0]["keypoints"], atol=0.01)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"handler\.keypoints\.keypoint_dims: must be 2 \(x, y\) or 3"):
        start(tmp_path, "YoloPose", keypoint_dims=4)
    with pytest.raises(ConfigError, match=r"handler\.keypoints\.output_format: 'yolo' is not one of auto, yolo_pose"):
        start(tmp_path, "YoloPose", output_format="yolo")

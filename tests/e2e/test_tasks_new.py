"""Instance segmentation, keypoints and a DETR-form detector served by a real, stock torchserve from
archives built with `tsgpu archive --task ...`, each answering a mixed good/bad batch: known-answer
models (tests/instance_models.py), so the test checks where masks, points and boxes land in the
original pixels. One server for the module.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from archiver_scripts import samples
from archiver_scripts.cli import main as tsgpu
from archiver_scripts.server import TorchServe
from tests import instance_models

RED = (200, 150, 500, 400)  # original pixels (x1, y1, x2, y2) of the 800x600 scene
BLUE = (420, 320, 700, 520)  # drawn over the red one
NAMES = ["top_left", "top_right", "bottom_right", "bottom_left", "centre"]


def _scene() -> bytes:
    image = np.zeros((600, 800, 3), np.uint8)
    image[...] = (30, 90, 40)
    image[RED[1]:RED[3], RED[0]:RED[2]] = (230, 20, 20)
    image[BLUE[1]:BLUE[3], BLUE[0]:BLUE[2]] = (20, 20, 230)
    return samples.encode(image, "JPEG", quality=95)


def _rotated(turn: int) -> bytes:
    """The scene stored sideways with an EXIF tag: upright it is the 800x600 scene."""
    upright = Image.open(io.BytesIO(_scene()))
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[turn]
    exif = Image.Exif()
    exif[0x0112] = turn
    buf = io.BytesIO()
    upright.transpose(undo).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _export(model: torch.nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(model.eval(), (torch.zeros(2, 3, 640, 640),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    build = tmp_path_factory.mktemp("new-tasks-build")
    store = tmp_path_factory.mktemp("new-tasks-store")
    labels = build / "labels.json"
    labels.write_text(json.dumps({"0": "background", "1": "red", "2": "blue"}))
    pose_labels = build / "pose_labels.json"
    pose_labels.write_text(json.dumps({"0": "box"}))
    keypoints = build / "keypoints.json"
    keypoints.write_text(json.dumps({"names": NAMES, "skeleton": [[0, 1], [1, 2], [2, 3], [3, 0]]}))
    common = ["--batch-size", "4", "--max-batch-delay", "1500", "--export-path", str(store)]
    assert tsgpu(["archive", "--name", "instances", "--task", "instance-segmentation", "--labels", str(labels),
                  "--model", str(_export(instance_models.YoloSeg(), build / "seg.pt2")), *common]) == 0
    assert tsgpu(["archive", "--name", "pose", "--task", "keypoints", "--labels", str(pose_labels),
                  "--extra-files", str(keypoints),
                  "--model", str(_export(instance_models.YoloPose(), build / "pose.pt2")), *common]) == 0
    assert tsgpu(["archive", "--name", "detr", "--task", "object-detection", "--labels", str(labels),
                  "--model", str(_export(instance_models.DetrSigmoid(), build / "detr.pt2")), *common]) == 0
    ts = TorchServe(store, models=["instances.mar", "pose.mar", "detr.mar"],
                    workdir=tmp_path_factory.mktemp("ts-new-tasks"), env={"OMP_NUM_THREADS": "1"})
    with ts:
        ts.wait_ready(["instances", "pose", "detr"], timeout=240)
        yield ts


def _batch(server: TorchServe, model: str, bodies: list[bytes]) -> list[requests.Response]:
    """Send the bodies at once (they share one TorchServe batch: maxBatchDelay is 1.5 s)."""
    out: list[requests.Response | None] = [None] * len(bodies)

    def send(i: int) -> None:
        out[i] = requests.post(f"{server.inference_url}/predictions/{model}", data=bodies[i], timeout=60,
                               headers={"Content-Type": "application/octet-stream"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out  # type: ignore[return-value]


def _mixed() -> list[bytes]:
    return [_scene(), b"definitely not an image", _rotated(6), _scene()[:3000]]


def test_instance_segmentation_mixed_batch(server):
    from pycocotools import mask as mask_utils

    responses = _batch(server, "instances", _mixed())
    assert [r.status_code for r in responses] == [200, 415, 200, 400]
    want = {1: np.zeros((600, 800), bool), 2: np.zeros((600, 800), bool)}
    want[2][BLUE[1]:BLUE[3], BLUE[0]:BLUE[2]] = True
    want[1][RED[1]:RED[3], RED[0]:RED[2]] = True
    want[1] &= ~want[2]
    for r in (responses[0], responses[2]):
        body = r.json()
        assert body["image_size"] == [800, 600]
        assert [(i["label"], i["score"]) for i in body["instances"]] == [("red", 0.9), ("blue", 0.8)]
        for inst, box in zip(body["instances"], (RED, BLUE), strict=True):
            # letterbox 800x600 -> 640x480: 1.25 original px per input px; tolerances as tests/unit/test_instances.py
            assert inst["box"] == pytest.approx(list(box), abs=0.5 + 0.6 * 1.25)
            got = mask_utils.decode({"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode()}).astype(bool)
            truth = want[inst["class_id"]]
            assert inst["area"] == int(got.sum())
            assert (got & truth).sum() / (got | truth).sum() > 0.95


def test_keypoints_mixed_batch(server):
    responses = _batch(server, "pose", _mixed())
    assert [r.status_code for r in responses] == [200, 415, 200, 400]
    x1, y1, x2, y2 = RED
    want = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), ((x1 + x2) / 2, (y1 + y2) / 2)]
    for r in (responses[0], responses[2]):
        body = r.json()
        assert body["keypoint_names"] == NAMES and body["skeleton"] == [[0, 1], [1, 2], [2, 3], [3, 0]]
        [inst] = body["instances"]
        assert inst["label"] == "box" and inst["score"] == 0.9
        got = [(x, y) for x, y, _ in inst["keypoints"]]
        assert np.allclose(got, want, atol=0.5 + 0.6 * 1.25)
        assert [s for _, _, s in inst["keypoints"]] == pytest.approx(list(instance_models.KEYPOINT_SCORES), abs=1e-5)


def test_detr_detector_mixed_batch(server):
    responses = _batch(server, "detr", _mixed())
    assert [r.status_code for r in responses] == [200, 415, 200, 400]
    for r in (responses[0], responses[2]):
        body = r.json()
        assert body["image_size"] == [800, 600]
        red, blue = body["detections"]  # sigmoid(3) and sigmoid(1); no NMS between the classes
        assert (red["label"], red["score"], blue["label"], blue["score"]) == ("red", 0.952574, "blue", 0.731059)
        assert red["box"] == pytest.approx(list(RED), abs=0.5 + 0.6 * 1.25)
        assert blue["box"] == pytest.approx(list(BLUE), abs=0.5 + 0.6 * 1.25)

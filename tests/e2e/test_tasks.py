"""Each task served by a real, stock torchserve from an archive built with `tsgpu archive --task ...`,
answering a mixed good/bad batch: models whose right answer is known, so the test checks where the
boxes and masks land in the original pixels, not only the schema.
"""

from __future__ import annotations

import base64
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
from tests import detection_models, segmentation_models
from tests.models import TAGGER, tagger_model

BOX = (200, 150, 500, 400)  # the red rectangle, original pixels (x1, y1, x2, y2)
BLUE = (560, 60, 760, 260)


def _scene(width: int = 800, height: int = 600) -> bytes:
    image = np.zeros((height, width, 3), np.uint8)
    image[...] = (30, 90, 40)
    image[BOX[1]:BOX[3], BOX[0]:BOX[2]] = (230, 20, 20)
    image[BLUE[1]:BLUE[3], BLUE[0]:BLUE[2]] = (20, 20, 230)
    return samples.encode(image, "JPEG", quality=95)


def _export(model: torch.nn.Module, path: Path, hw: tuple[int, int]) -> Path:
    return segmentation_models.save_exported(model, path, hw)


@pytest.fixture(scope="module")
def task_server(tmp_path_factory):
    build = tmp_path_factory.mktemp("tasks-build")
    store = tmp_path_factory.mktemp("tasks-store")
    det_labels = build / "det_labels.json"
    det_labels.write_text(json.dumps({"0": "a", "1": "b", "2": "red"}))
    seg_labels = build / "seg_labels.json"
    seg_labels.write_text(json.dumps({"0": "background", "1": "red", "2": "blue", "3": "pad"}))
    common = ["--batch-size", "4", "--max-batch-delay", "1500", "--export-path", str(store)]
    assert tsgpu(["archive", "--name", "detect", "--task", "object-detection", "--labels", str(det_labels),
                  "--model", str(_export(detection_models.RedBoxYolo(), build / "det.pt2", (640, 640))),
                  *common]) == 0
    assert tsgpu(["archive", "--name", "segment", "--task", "semantic-segmentation", "--labels", str(seg_labels),
                  "--model", str(_export(segmentation_models.ColourSegmenter(), build / "seg.pt2", (520, 520))),
                  *common]) == 0
    assert tsgpu(["archive", "--name", "embed", "--task", "image-embedding", "--config", "embedder.encoding=base64",
                  "--config", "embedder.dtype=float16",
                  "--model", str(_export(segmentation_models.RegionMeans(grid=2), build / "emb.pt2", (224, 224))),
                  *common]) == 0
    # A user's own task (docs/examples/multilabel_tagger.py) with its own config section.
    weights, model_py = tagger_model(build)
    tags = build / "tags.json"
    tags.write_text(json.dumps({"0": "red", "1": "blue", "2": "green"}))
    assert tsgpu(["archive", "--name", "tagger", "--model", str(weights), "--model-class", f"{model_py}:ConstTags",
                  "--labels", str(tags), "--handler-class", "multilabel_tagger:MultiLabelTagger",
                  "--extra-files", str(TAGGER), "--config", "tagger.threshold=0.7", *common]) == 0
    ts = TorchServe(store, models=["detect.mar", "segment.mar", "embed.mar", "tagger.mar"],
                    workdir=tmp_path_factory.mktemp("ts-tasks"), env={"OMP_NUM_THREADS": "1"})
    with ts:
        ts.wait_ready(["detect", "segment", "embed", "tagger"], timeout=240)
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


def _rotated(turn: int) -> tuple[bytes, tuple[int, int]]:
    """The scene stored sideways with an EXIF tag: upright it is the 800x600 scene."""
    upright = Image.open(__import__("io").BytesIO(_scene()))
    undo = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[turn]
    exif = Image.Exif()
    exif[0x0112] = turn
    buf = __import__("io").BytesIO()
    upright.transpose(undo).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), upright.size


def test_detection_mixed_batch_boxes_in_original_pixels(task_server):
    rotated, _ = _rotated(6)
    good, bad, truncated = _scene(), b"definitely not an image", _scene()[:3000]
    responses = _batch(task_server, "detect", [good, bad, rotated, truncated])
    assert [r.status_code for r in responses] == [200, 415, 200, 400]
    for r in (responses[0], responses[2]):
        body = r.json()
        assert body["image_size"] == [800, 600]
        (det,) = body["detections"]  # the duplicate was suppressed by NMS
        assert det["class_id"] == 2 and det["label"] == "red" and det["score"] == pytest.approx(0.9)
        # letterbox 800x600 -> 640x480: one model-input pixel is 1.25 original pixels; JPEG edges add ~1
        assert det["box"] == pytest.approx(list(BOX), abs=2.5)
    assert responses[1].json()["type"] == "unsupported_media_type"


def test_segmentation_mixed_batch_masks_in_original_pixels(task_server):
    from pycocotools import mask as mask_utils

    rotated, _ = _rotated(8)
    responses = _batch(task_server, "segment", [_scene(), b"nope", rotated])
    assert [r.status_code for r in responses] == [200, 415, 200]
    for r in (responses[0], responses[2]):
        body = r.json()
        assert body["image_size"] == [800, 600]
        by_label = {s["label"]: s for s in body["segments"]}
        assert "pad" not in by_label, "letterbox padding must never be labelled"
        for name, box in (("red", BOX), ("blue", BLUE)):
            rle = by_label[name]["mask"]
            assert rle["size"] == [600, 800]
            got = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)
            want = np.zeros((600, 800), bool)
            want[box[1]:box[3], box[0]:box[2]] = True
            iou = (got & want).sum() / (got | want).sum()
            assert iou > 0.97, (name, iou)  # edges may move by ~1 model-input pixel (1.54 original px)


def test_embedding_mixed_batch(task_server):
    responses = _batch(task_server, "embed", [_scene(), b"", _scene()])
    assert [r.status_code for r in responses] == [200, 400, 200]
    first, second = responses[0].json(), responses[2].json()
    assert first == second and first["dtype"] == "float16" and first["dim"] == 12
    vector = np.frombuffer(base64.b64decode(first["embedding_b64"]), "<f2").astype(np.float32)
    assert vector.shape == (12,) and abs(float(np.linalg.norm(vector)) - 1.0) < 2e-3


def test_a_users_task_with_its_own_config_section(task_server):
    responses = _batch(task_server, "tagger", [_scene(), b"", _scene()])
    assert [r.status_code for r in responses] == [200, 400, 200]
    # tagger.threshold 0.7 from the archive: 0.880797 is listed, 0.622459 and 0.119203 are not.
    expected = {"tags": [{"index": 0, "label": "red", "score": 0.880797}]}
    assert responses[0].json() == expected and responses[2].json() == expected

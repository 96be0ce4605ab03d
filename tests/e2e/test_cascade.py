"""Cascades served by a real, stock torchserve from archives built with `tsgpu archive --task cascade
--second-model ...`: one detect-then-embed and one detect-then-classify archive answering a mixed
good/bad batch, with known-answer models (tests/cascade_models.py), so the test checks where each box
lands, which pixels the second model saw and what it answered for them, not only the schema.
"""

from __future__ import annotations

import io
import json
import threading

import pytest
import requests
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision import transforms as T

from archiver_scripts.cli import main as tsgpu
from archiver_scripts.server import TorchServe
from handlers.tasks.cascade import crop_region
from tests import cascade_models as cm

BOXES = {"red": (100, 80, 400, 300), "blue": (500, 100, 700, 500), "yellow": (60, 380, 300, 560)}
EMBEDDING_TOL = 2e-3  # as tests/unit/test_cascade.py and docs/tasks/cascade.md state


@pytest.fixture(scope="module")
def cascade_server(tmp_path_factory):
    build = tmp_path_factory.mktemp("cascade-build")
    store = tmp_path_factory.mktemp("cascade-store")
    paths = cm.export_models(build)
    labels = build / "colours.json"
    labels.write_text(json.dumps(cm.LABELS))
    second_labels = build / "cascade_index_to_name.json"
    second_labels.write_text(json.dumps(cm.LABELS))
    common = ["--batch-size", "4", "--max-batch-delay", "1500", "--export-path", str(store), "--labels", str(labels)]
    assert tsgpu(["archive", "--name", "embed_boxes", "--task", "cascade", "--model", str(paths["detector"]),
                  "--second-model", str(paths["embedder"]), "--second-task", "image-embedding",
                  "--config", "cascade.crop_pad=0.05", *common]) == 0
    assert tsgpu(["archive", "--name", "classify_boxes", "--task", "cascade", "--model", str(paths["detector"]),
                  "--second-model", str(paths["classifier"]), "--second-task", "image-classification",
                  "--extra-files", str(second_labels), "--config", "cascade.classes=[red, blue]",
                  "--config", "cascade.preprocess.mean=[0, 0, 0]", "--config", "cascade.preprocess.std=[1, 1, 1]",
                  *common]) == 0
    ts = TorchServe(store, models=["embed_boxes.mar", "classify_boxes.mar"],
                    workdir=tmp_path_factory.mktemp("ts-cascade"), env={"OMP_NUM_THREADS": "1"})
    with ts:
        ts.wait_ready(["embed_boxes", "classify_boxes"], timeout=240)
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


def _reference_embedding(data: bytes, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The embedder alone on Pillow's crop of the reference decode, as an embedding archive's
    default preprocessing (resize 256, center crop 224, ImageNet mean/std) makes it."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").crop(box)
    x = T.Compose([T.Resize(256, antialias=True), T.CenterCrop(224), T.ToTensor(),
                   T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])(image)
    with torch.inference_mode():
        return F.normalize(cm.embedder()(x[None]), dim=1)[0]


def test_detect_then_embed_mixed_batch(cascade_server):
    image = cm.scene(800, 600, BOXES)
    jpeg, rotated = cm.encode(image), cm.encode(image, exif_orientation=6)
    responses = _batch(cascade_server, "embed_boxes", [jpeg, b"not an image at all", rotated, jpeg[:4000]])
    assert [r.status_code for r in responses] == [200, 415, 200, 400]
    assert responses[1].json()["type"] == "unsupported_media_type"
    for r, data in ((responses[0], jpeg), (responses[2], rotated)):
        body = r.json()
        assert body["image_size"] == [800, 600]
        dets = body["detections"]
        assert [d["label"] for d in dets] == ["red", "blue", "yellow"]
        for d in dets:
            assert d["box"] == pytest.approx(list(BOXES[d["label"]]), abs=2.5)
            assert d["crop_box"] == list(crop_region(tuple(d["box"]), 0.05, 800, 600))
            got = torch.tensor(d["embedding"])
            assert (got - _reference_embedding(data, tuple(d["crop_box"]))).abs().max() < EMBEDDING_TOL


def test_detect_then_classify_mixed_batch(cascade_server):
    boxes = {**BOXES, "magenta": (600, 520, 780, 590)}
    good = cm.encode(cm.scene(800, 600, boxes), "PNG")
    portrait = cm.encode(cm.scene(600, 900, {"blue": (50, 500, 400, 880), "green": (20, 20, 300, 300)}))
    responses = _batch(cascade_server, "classify_boxes", [good, good[:300], portrait])
    assert [r.status_code for r in responses] == [200, 400, 200]
    first, third = responses[0].json(), responses[2].json()
    assert [d["label"] for d in first["detections"]] == ["red", "blue"]  # cascade.classes
    assert [d["label"] for d in third["detections"]] == ["blue"] and third["image_size"] == [600, 900]
    for d in first["detections"] + third["detections"]:
        top = d["predictions"][0]
        assert top["label"] == d["label"] and top["probability"] > 0.99

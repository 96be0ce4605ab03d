"""The corpus and archives of the batch sameness tests (tests/e2e/test_batch_sameness.py holds
`tsgpu batch` to a real torchserve with them; tests/e2e/test_batch_ray.py holds the Ray engine to the
local one with them).

    archives = build_archives(build_dir, store_dir)   # {"classify", "detect", "segment", "embed32",
                                                      #  "embed16", "poison"} -> .mar
    files = corpus(root)                              # good and bad files under root
    lines = records()                                 # JSON records (a JSONL input)

The server and the batch job must both use MAX_REQUEST_SIZE (torchserve `max_request_size`,
`tsgpu batch --max-request-size`): one file of the corpus is over it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from archiver_scripts import samples
from archiver_scripts.cli import main as tsgpu
from tests import detection_models, models, segmentation_models
from tests.helpers import bad_and_odd_items, exif_rotated, photo_jpegs

MAX_REQUEST_SIZE = 3_000_000  # the server's and the batch job's: the 3.5 MB file is over it
MAX_PIXELS = 20_000_000  # handler.preprocess.max_image_pixels: the 5000 x 5000 PNG is over it
COMMON = ["--batch-size", "8", "--max-batch-delay", "5", "--config", f"preprocess.max_image_pixels={MAX_PIXELS}"]


class Poison(nn.Module):
    """Logits from channel means; raises on a bright red image (as a buggy model would)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x[:, 0].mean() > 1.5):
            raise RuntimeError("poisoned input")
        return x.mean(dim=(2, 3))


def build_archives(build: Path, store: Path) -> dict[str, Path]:
    det_labels = build / "det_labels.json"
    det_labels.write_text(json.dumps({"0": "a", "1": "b", "2": "red"}))
    seg_labels = build / "seg_labels.json"
    seg_labels.write_text(json.dumps({"0": "background", "1": "red", "2": "blue", "3": "pad"}))
    out = ["--export-path", str(store)]

    def export(model: nn.Module, name: str, hw: tuple[int, int]) -> str:
        return str(segmentation_models.save_exported(model, build / name, hw, max_batch=32))

    models.build_tiny_archive("classify", store, build, batch_size=8, max_batch_delay=5, config=[
        "classifier.top_k=3", "url.allowed_networks=[127.0.0.1/32]", "url.read_timeout=2",
        "inputs.max_bytes=1000000", f"preprocess.max_image_pixels={MAX_PIXELS}"])
    assert tsgpu(["archive", "--name", "detect", "--task", "object-detection", "--labels", str(det_labels),
                  "--model", export(detection_models.RedBoxYolo(), "det.pt2", (640, 640)), *COMMON, *out]) == 0
    assert tsgpu(["archive", "--name", "segment", "--task", "semantic-segmentation", "--labels", str(seg_labels),
                  "--model", export(segmentation_models.ColourSegmenter(), "seg.pt2", (520, 520)), *COMMON, *out]) == 0
    assert tsgpu(["archive", "--name", "embed32", "--task", "image-embedding",
                  "--model", export(segmentation_models.RegionMeans(grid=2), "emb.pt2", (224, 224)), *COMMON, *out]) == 0
    assert tsgpu(["archive", "--name", "embed16", "--task", "image-embedding", "--config", "embedder.dtype=float16",
                  "--config", "embedder.encoding=base64",
                  "--model", export(segmentation_models.RegionMeans(grid=2), "emb16.pt2", (224, 224)), *COMMON, *out]) == 0
    torch.jit.save(torch.jit.script(Poison()), str(build / "poison.pt"))
    assert tsgpu(["archive", "--name", "poison", "--model", str(build / "poison.pt"), *COMMON, *out]) == 0
    return {name: store / f"{name}.mar" for name in ("classify", "detect", "segment", "embed32", "embed16", "poison")}


def scene() -> bytes:
    image = np.zeros((600, 800, 3), np.uint8)
    image[...] = (30, 90, 40)
    image[150:400, 200:500] = (230, 20, 20)
    image[60:260, 560:760] = (20, 20, 230)
    return samples.encode(image, "JPEG", quality=95)


def corpus(root: Path) -> list[Path]:
    """Good and bad files, in subdirectories (the batch input is a list file naming them)."""
    files: dict[str, bytes] = {}
    files.update({f"photos/{k}.jpg": v for k, v in photo_jpegs().items()})
    files["photos/scene.jpg"] = scene()
    files.update({f"exif/turn{t}.jpg": exif_rotated(t) for t in (3, 6, 8)})
    files.update({f"odd/{k}": v for k, v in bad_and_odd_items().items()})
    files["odd/empty"] = b""
    files["odd/tiny.png"] = samples.encode(np.full((1, 1, 3), 200, np.uint8), "PNG")
    files["large/too_many_pixels.png"] = samples.encode(np.zeros((5000, 5000, 3), np.uint8), "PNG")
    files["large/over_request_size.bin"] = np.random.default_rng(0).bytes(3_500_000)
    paths = []
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(path)
    return paths


def records() -> list[str]:
    chelsea = base64.b64encode(samples.encode(samples.photos()["chelsea"], "JPEG", quality=90)).decode()
    return [json.dumps({"data": chelsea}), json.dumps({"b64": chelsea}), json.dumps({"nope": 1}), "[1, 2]",
            '"a string"', json.dumps({"data": "!!not base64!!"}), '{"data": ', json.dumps({"data": chelsea, "b64": chelsea})]

"""Instance segmentation vs Ultralytics' own predictor: the same YOLO-seg model and images, masks
compared object by object, and the size of our response per image.

    python -m benchmarks.instances [--images 8] [--imgsz 640] [--workdir /tmp/bench-instances]

The model is Ultralytics' `yolo11n-seg.yaml` built with random weights (seed 0; no download). Random
weights alone answer nothing useful (every activation fades to the same constant through ~100
layers), so its batch-norm statistics are calibrated on four photo mosaics (the features then vary
with the image, as a trained model's do) and its class biases set to --class-bias; then it is
exported to TorchScript as users export it. Our side: `InstanceSegmenter` in-process (handlers.testing.FakeContext, CPU backend,
letterbox at --imgsz) on the JPEG bytes. Ultralytics' side: `YOLO(<the same .torchscript>).predict`
on the decoded image (CPU, `retina_masks=True` so its masks are in original pixels, the same
conf 0.25 / iou 0.45 / max_det 100 as our defaults), and its `postprocess` on the very input tensor
and raw output our handler had (so only NMS, box scaling and mask assembly are compared). Objects
are paired by class and box IoU >= 0.9; for each pair the masks' IoU is printed, also without the
one-pixel frame of the box where the two crop conventions differ (handlers/tasks/masks.py). The
exit status is 0 when every pair of the same-output comparison reaches 0.95 inside that frame. Needs `pip install ultralytics` (a test extra here).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from archiver_scripts import samples

TARGET_IOU = 0.95
WARMUP = 3


def build_model(workdir: Path, imgsz: int, class_bias: float) -> Path:
    """yolo11n-seg with random weights (seed 0), batch-norm calibrated, exported to TorchScript."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolo11n-seg.yaml")
    net = model.model
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    frames = [smooth(samples.mosaic(imgsz * 3, imgsz * 3, offset=i))[::3, ::3] for i in range(4)]
    batch = torch.stack([torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).float() / 255 for f in frames])
    net.train()
    with torch.no_grad():
        net(batch)
    net.eval()
    for branch in net.model[-1].cv3:  # the class-score convolutions
        torch.nn.init.constant_(branch[-1].bias, class_bias)
    workdir.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        return workdir / model.export(format="torchscript", imgsz=imgsz, verbose=False)
    finally:
        os.chdir(cwd)


def smooth(image: np.ndarray) -> np.ndarray:
    """`image` blurred (Gaussian, sigma 4 px): Ultralytics resizes with OpenCV's bilinear filter,
    which aliases fine texture when it shrinks 1080p to 640, and we with an antialiasing filter.
    On sharp photo mosaics the two model inputs differ by up to 0.6 (of 1) in places, and a
    random-weight model, unlike a trained one, answers such inputs with unrelated objects; on
    smooth images both inputs agree to 0.02 and the comparison measures the masks."""
    import cv2

    return cv2.GaussianBlur(image, (0, 0), 4)


def make_images(count: int, landscape: tuple[int, int] = (1920, 1080)) -> list[bytes]:
    """Landscape (1080p by default) and portrait JPEGs of real photo textures, smoothed."""
    sizes = [landscape if i % 4 else landscape[::-1] for i in range(count)]
    frames = [samples.mosaic(w, h, offset=i) for i, (w, h) in enumerate(sizes)]
    frames = [f if i % 8 < 4 else np.ascontiguousarray(f[:, ::-1]) for i, f in enumerate(frames)]  # 4 photos: mirror
    return [samples.encode(smooth(f), "JPEG", quality=90) for f in frames]


def ours(model_file: Path, images: list[bytes], imgsz: int) -> tuple[list[dict[str, Any]], list[Any], float]:
    """Our responses (parsed JSON bodies), each image's (model input, raw model output), seconds per image."""
    from handlers.tasks.instances import InstanceSegmenter
    from handlers.testing import FakeContext, raw_request, run_handler

    directory = model_file.parent
    (directory / "index_to_name.json").write_text(json.dumps({str(i): f"c{i}" for i in range(80)}))
    config = {"model": {"file": model_file.name}, "preprocess": {"backend": "cpu", "input_size": imgsz}}
    ctx = FakeContext(directory, handler_config=config, batch_size=1)
    handler = InstanceSegmenter()
    handler.initialize(ctx)
    for _ in range(WARMUP):  # TorchScript's profiling executor optimises over the first runs
        run_handler(handler, ctx, [raw_request(images[0])])
    bodies, started = [], time.perf_counter()
    for data in images:
        [response] = run_handler(handler, ctx, [raw_request(data)])
        assert response.status == 200, response.body
        bodies.append(response.body)
    seconds = (time.perf_counter() - started) / len(images)
    seen: list[Any] = []
    forward = handler.forward
    handler.forward = lambda x: seen.append((x, forward(x))) or seen[-1][1]  # type: ignore[method-assign]
    for data in images:  # once more, keeping what the model saw and said (untimed)
        run_handler(handler, ctx, [raw_request(data)])
    return bodies, seen, seconds


def upright_bgr(data: bytes) -> np.ndarray:
    from PIL import Image, ImageOps

    rgb = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    return np.ascontiguousarray(rgb[..., ::-1])


def theirs(model_file: Path, images: list[bytes], imgsz: int, seen: list[Any]) -> tuple[list[Any], list[Any], float]:
    """Ultralytics' predictor: its `predict` on each decoded image (its own preprocessing), and its
    `postprocess` (NMS, box scaling, process_mask_native) on our model input and raw output; seconds
    per image of `predict`."""
    from ultralytics import YOLO

    model = YOLO(str(model_file), task="segment")
    decoded = [upright_bgr(b) for b in images]
    settings = {"imgsz": imgsz, "device": "cpu", "conf": 0.25, "iou": 0.45, "max_det": 100, "retina_masks": True,
                "verbose": False}
    for _ in range(WARMUP):
        model.predict(decoded[0], **settings)
    predicted, started = [], time.perf_counter()
    for bgr in decoded:
        predicted.append(model.predict(bgr, **settings)[0])
    seconds = (time.perf_counter() - started) / len(images)
    same_output = [model.predictor.postprocess(out, x, [bgr])[0] for (x, out), bgr in zip(seen, decoded, strict=True)]
    return predicted, same_output, seconds


def box_iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def compare(body: dict[str, Any], result: Any) -> tuple[list[tuple[float, float]], int, int]:
    """(per paired object: mask IoU, and mask IoU without the one-pixel frame of our box, where
    the crop conventions differ (masks.py); our object count, theirs)."""
    from pycocotools import mask as coco

    their_boxes = result.boxes.xyxy.tolist() if result.boxes is not None else []
    their_cls = [int(c) for c in result.boxes.cls.tolist()] if result.boxes is not None else []
    their_masks = result.masks.data.numpy().astype(bool) if result.masks is not None else np.zeros((0, 1, 1), bool)
    free = set(range(len(their_boxes)))
    ious = []
    for inst in body["instances"]:
        candidates = [(box_iou(inst["box"], their_boxes[j]), j) for j in free if their_cls[j] == inst["class_id"]]
        best = max(candidates, default=(0.0, -1))
        if best[0] < 0.9:
            continue
        free.discard(best[1])
        got = coco.decode({"size": inst["mask"]["size"], "counts": inst["mask"]["counts"].encode()}).astype(bool)
        want = their_masks[best[1]]
        inner = np.zeros_like(got)
        x1, y1, x2, y2 = inst["box"]
        inner[int(y1) + 1:max(int(y1) + 1, int(np.ceil(y2)) - 1), int(x1) + 1:max(int(x1) + 1, int(np.ceil(x2)) - 1)] = True
        ious.append((iou(got, want), iou(got & inner, want & inner)))
    return ious, len(body["instances"]), len(their_boxes)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def report(title: str, bodies: list[dict[str, Any]], results: list[Any]) -> list[tuple[float, float]]:
    """Print one line per image and a summary; returns every pair's (mask IoU, IoU inside the frame)."""
    print(title)
    pairs: list[tuple[float, float]] = []
    for i, (body, result) in enumerate(zip(bodies, results, strict=True)):
        ious, n_ours, n_theirs = compare(body, result)
        pairs += ious
        w, h = body["image_size"]
        print(f"  image {i} {w}x{h}: ours {n_ours} objects, theirs {n_theirs}, paired {len(ious)}, "
              f"mask IoU min {min((v for v, _ in ious), default=float('nan')):.4f}")
    for name, values in (("mask IoU", [v for v, _ in pairs]), ("inside the box frame", [v for _, v in pairs])):
        share = sum(v >= TARGET_IOU for v in values) / len(values) if values else float("nan")
        print(f"  {name}: {len(values)} pairs, min {min(values, default=float('nan')):.4f}, "
              f"median {statistics.median(values) if values else float('nan'):.4f}, share >= {TARGET_IOU}: {share:.3f}")
    return pairs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--class-bias", type=float, default=-6.0, help="bias of the class scores (random weights)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-instances"))
    args = parser.parse_args(argv)
    model_file = build_model(args.workdir, args.imgsz, args.class_bias)
    images = make_images(args.images)
    bodies, seen, our_s = ours(model_file, images, args.imgsz)
    predicted, same_output, their_s = theirs(model_file, images, args.imgsz, seen)
    same = report("Ultralytics' postprocess on our model input and output (NMS, boxes, masks):", bodies, same_output)
    report("Ultralytics' predict end to end (its own decoding and resizing):", bodies, predicted)
    # Images that fit the model input without resizing (letterbox padding only): both sides then
    # give the model the same pixels, and predict end to end is compared without the resize filters.
    fitting = make_images(4, (args.imgsz, args.imgsz * 3 // 4))
    fit_bodies, fit_seen, _ = ours(model_file, fitting, args.imgsz)
    fit_predicted, _, _ = theirs(model_file, fitting, args.imgsz, fit_seen)
    report(f"Ultralytics' predict end to end on {args.imgsz}x{args.imgsz * 3 // 4} images (no resize):",
           fit_bodies, fit_predicted)
    sizes = [len(json.dumps(b, separators=(",", ":")).encode()) for b in bodies]
    objects = sum(len(b["instances"]) for b in bodies)
    raw = sum(len(b["instances"]) * b["image_size"][0] * b["image_size"][1] for b in bodies) / len(bodies)
    print(f"response size per image: mean {statistics.mean(sizes):.0f} bytes, max {max(sizes)} bytes "
          f"({objects / len(bodies):.1f} objects per image; the same masks as uint8 arrays: {raw:.0f} bytes)")
    print(f"CPU seconds per image (1 process, batch 1): ours {our_s:.3f}, Ultralytics predict {their_s:.3f}")
    return 0 if same and min(v for _, v in same) >= TARGET_IOU else 1


if __name__ == "__main__":
    raise SystemExit(main())

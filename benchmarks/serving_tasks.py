"""Task benchmark: our ObjectDetector and SemanticSegmenter vs TorchServe's stock `object_detector` and
`image_segmenter` handlers, on the same models, images and server settings, in one run.

- detection: torchvision `fasterrcnn_mobilenet_v3_large_320_fpn` (random weights, eager: torchvision
  detectors do not torch.export), photo mosaics of mixed sizes around 1080p (landscape, portrait,
  4:3, 720p), and again with every image 1920x1080 (the stock handler stacks unresized images, so
  only a batch of equal sizes works there). Same score threshold (0.5, the stock handler's fixed value).
- segmentation: torchvision `lraspp_mobilenet_v3_large` (random weights, eager), the same images.
  Ours runs twice: its task default (the whole image, letterboxed at 520, masks in original pixels
  as COCO RLE) and at the stock handler's geometry (center crop 224), which does the same model
  work as stock.

Each configuration gets its own stock torchserve on loopback (2 workers, batchSize 8,
maxBatchDelay 10 ms, OMP_NUM_THREADS=1, the best stock setting measured for the classifier) and a
closed-loop client. Prints QPS, p50, p99, statuses, response bytes per image, and the ratios.

    python -m benchmarks.serving_tasks [--duration 20] [--concurrency 16] [--tasks detection segmentation]

Needs captum for the stock handlers (TorchServe's vision handler imports it): `make bench` installs it.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import platform
import re
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from archiver_scripts import samples
from archiver_scripts.archive import build_archive
from archiver_scripts.server import TorchServe
from benchmarks.common import measure

BATCH_SIZE, WORKERS, BATCH_DELAY_MS = 8, 2, 10
SIZES = [(1920, 1080), (1080, 1920), (1600, 1200), (1280, 720), (1920, 1080), (1440, 1080), (1080, 1350), (1920, 1200)]
ENV = {"OMP_NUM_THREADS": "1"}

MODEL_SOURCE = '''"""Benchmark models: torchvision architectures with random weights, one class per file (the stock
handler requires exactly one class in its model file and builds it without arguments)."""

import torch
import torchvision


class {cls}(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.model = torchvision.models.{builder}(weights=None, weights_backbone=None, num_classes={classes})

    def forward(self, x):
        return self.model(x)
'''


def write_model(work: Path, cls: str, builder: str, classes: int) -> tuple[Path, Path, Path]:
    import importlib.util as util

    import torch

    source = work / f"{cls.lower()}_model.py"
    source.write_text(MODEL_SOURCE.format(cls=cls, builder=builder, classes=classes))
    spec = util.spec_from_file_location(source.stem, source)
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    weights = work / f"{cls.lower()}_weights.pt"
    torch.save(getattr(module, cls)().eval().state_dict(), weights)
    labels = work / f"{cls.lower()}_index_to_name.json"
    labels.write_text(json.dumps({str(i): f"class_{i}" for i in range(classes)}))
    return source, weights, labels


def build_stock(name: str, handler: str, source: Path, weights: Path, labels: Path, store: Path) -> None:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    config_file = store.parent / f"{name}-config.yaml"
    config_file.write_text(f"minWorkers: {WORKERS}\nmaxWorkers: {WORKERS}\nbatchSize: {BATCH_SIZE}\n"
                           f"maxBatchDelay: {BATCH_DELAY_MS}\nresponseTimeout: 120\n")
    config = ModelArchiverConfig(
        model_name=name, handler=handler, version="1.0", serialized_file=str(weights), model_file=str(source),
        extra_files=str(labels), export_path=str(store), force=True, config_file=str(config_file),
    )
    package_model(config, manifest=ModelExportUtils.generate_manifest_json(config))


def response_sizes(server: TorchServe, model: str, images: list[bytes]) -> tuple[float, list[int]]:
    """Mean response bytes per image (one request per image, sequentially) and the statuses."""
    url = urlsplit(f"{server.inference_url}/predictions/{model}")
    sizes, statuses = [], []
    for data in images:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
        conn.request("POST", url.path, body=data, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        sizes.append(len(response.read()))
        statuses.append(response.status)
        conn.close()
    return sum(sizes) / len(sizes), statuses


def run_one(label: str, model: str, store: Path, work: Path, images: list[bytes], args) -> dict:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)  # a work dir name the JVM's arguments survive
    row = measure(slug, model, store, work, images, ENV, args)
    row["label"] = label
    server = TorchServe(store, models=[f"{model}.mar"], workdir=work / f"{slug}-bytes", env=ENV)
    with server:
        server.wait_ready([model], timeout=300)
        mean_bytes, statuses = response_sizes(server, model, images)
    row["bytes_per_image"] = round(mean_bytes)
    row["single_request_statuses"] = statuses
    print(f"[{label}] one image per request: mean response {mean_bytes / 1024:.1f} KiB, statuses {statuses}", flush=True)
    return row


def detection(work: Path, store: Path, images: list[bytes], args, tag: str = "") -> list[dict]:
    source, weights, labels = write_model(work, "Detector", "detection.fasterrcnn_mobilenet_v3_large_320_fpn", 91)
    build_stock("stock_det", "object_detector", source, weights, labels, store)
    build_archive("ours_det", weights, store, task="object-detection", model_class=f"{source}:Detector",
                  labels=labels, batch_size=BATCH_SIZE, max_batch_delay=BATCH_DELAY_MS, workers=WORKERS,
                  # [360, 640]: a 1920x1080 image fills it, and the model's own transform (min_size
                  # 320, max_size 640) then runs it at 569x320, exactly as it runs the stock
                  # handler's full-size 1080p tensor: the same model work, so the comparison is
                  # of the handlers (the task default, letterbox 640x640, would run it at 320x180).
                  config=["detector.output_format=torchvision", "detector.score_threshold=0.5",
                          "preprocess.input_size=[360,640]"],
                  force=True, log=lambda m: None)
    return [run_one(f"stock object_detector{tag}", "stock_det", store, work, images, args),
            run_one(f"ours ObjectDetector{tag}", "ours_det", store, work, images, args)]


def segmentation(work: Path, store: Path, images: list[bytes], args) -> list[dict]:
    source, weights, labels = write_model(work, "Segmenter", "segmentation.lraspp_mobilenet_v3_large", 21)
    build_stock("stock_seg", "image_segmenter", source, weights, labels, store)
    common = dict(task="semantic-segmentation", model_class=f"{source}:Segmenter", labels=labels,
                  batch_size=BATCH_SIZE, max_batch_delay=BATCH_DELAY_MS, workers=WORKERS, force=True,
                  log=lambda m: None)
    build_archive("ours_seg", weights, store, **common)
    build_archive("ours_seg224", weights, store, config=["preprocess.geometry=center_crop", "preprocess.input_size=224"],
                  **common)
    return [run_one("stock image_segmenter", "stock_seg", store, work, images, args),
            run_one("ours SemanticSegmenter (letterbox 520)", "ours_seg", store, work, images, args),
            run_one("ours SemanticSegmenter (center crop 224)", "ours_seg224", store, work, images, args)]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a (baseline 0)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per configuration")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--concurrency", type=int, default=16, help="client connections")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality of the test images")
    parser.add_argument("--tasks", nargs="+", default=["detection", "detection-1080p", "segmentation"],
                        choices=["detection", "detection-1080p", "segmentation"],
                        help="detection-1080p: every image 1920x1080, where the stock detector's batching works")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("captum") is None:
        print("TorchServe's stock vision handlers need captum: pip install captum (make bench does)", file=sys.stderr)
        return 2
    images = [samples.encode(samples.mosaic(w, h, offset=i), "JPEG", quality=args.quality) for i, (w, h) in enumerate(SIZES)]
    print(f"{len(images)} JPEGs of mixed sizes {sorted(set(SIZES))}; {WORKERS} workers, batchSize {BATCH_SIZE}, "
          f"maxBatchDelay {BATCH_DELAY_MS} ms, {ENV}; {args.concurrency} clients, {args.warmup:.0f}+{args.duration:.0f} s "
          f"per run; {platform.processor() or platform.machine()}", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tsgpu-bench-tasks-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        if "detection" in args.tasks:
            results["detection"] = detection(work, store, images, args)
        if "detection-1080p" in args.tasks:
            same = [samples.encode(samples.mosaic(1920, 1080, offset=i), "JPEG", quality=args.quality)
                    for i in range(len(SIZES))]
            results["detection-1080p"] = detection(work, store, same, args, tag=" (all 1080p)")
        if "segmentation" in args.tasks:
            results["segmentation"] = segmentation(work, store, images, args)

    print("\n| task | handler | QPS | p50 ms | p99 ms | statuses (load) | bytes/image |")
    print("|---|---|---:|---:|---:|---|---:|")
    for task, rows in results.items():
        for row in rows:
            print(f"| {task} | {row['label']} | {row['qps']} | {row['p50_ms']} | {row['p99_ms']} | "
                  f"{row['statuses']} | {row['bytes_per_image']} |")
    for task, rows in results.items():
        stock, ours = rows[0], rows[1:]
        for row in ours:
            ok_stock = stock["statuses"].get("200", 0) / max(1, stock["requests"]) * stock["qps"]
            ok_ours = row["statuses"].get("200", 0) / max(1, row["requests"]) * row["qps"]
            print(f"{task}: {row['label']} vs stock: successful QPS {ratio(ok_ours, ok_stock)}, "
                  f"response bytes {ratio(stock['bytes_per_image'], row['bytes_per_image'])} smaller")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

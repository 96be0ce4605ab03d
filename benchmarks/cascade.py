"""Cascade benchmark: one `--task cascade` archive (detect, crop on the device, embed) vs the same two
models as two chained requests, where the client crops each detected box out of its own decode,
re-encodes it and sends it to an embedding archive (what users do today without a cascade).

Workload: 1920x1080 JPEGs (quality 85) of washed-out photo mosaics with 1-5 coloured boxes each
(tests/cascade_models.py); the detector is the known-answer ColourBoxes (letterboxed to 640), the
second model RegionMeans (default, nearly free: the measurement is then the pipeline around the
models) or torchvision's resnet18 with random weights and its head removed (`--second resnet18`: a
real embedder's cost on every crop, paid by both sides alike). One stock torchserve on loopback
serves the three archives (batchSize 8, maxBatchDelay 10 ms, OMP_NUM_THREADS=1) with the same
worker processes on each side: the detector and the embedder archives 1 worker each, the cascade 2
(`--cascade-workers`; one cascade worker runs both stages in one process, so on a small host it
would otherwise get half the cores the chained pair gets). Each side then runs alone under a closed
loop of `--concurrency` clients, each client handling one image at a time end to end:

    cascade   POST image -> detections with embeddings
    chained   POST image to the detector -> decode the image (Pillow, EXIF) -> for each box: crop
              (the same crop_region and crop_pad as the cascade), encode (JPEG q95 by default, or
              PNG), POST to the embedder, one after the other

images/s counts whole images answered within the measured window (boxes/s their boxes: when one
image takes seconds, the images that finish in the window are biased towards few boxes, so compare
boxes/image too); p99 is per image (all of its requests). The two sides are
measured alternately `--rounds` times and the median of the per-round ratios is reported: on a shared
host a neighbour's load otherwise lands on one side only. The client's own
decode/crop/encode runs on the same host, as it does for a user's service next to TorchServe.

Results must agree: on a fixed subset the boxes and crop regions of both sides are compared exactly,
and the embeddings within the stated tolerance (docs/tasks/cascade.md) when the chained client sends
lossless PNG crops; with JPEG crops the difference is printed (re-encoding changes the pixels).

    python -m benchmarks.cascade [--duration 20] [--concurrency 8] [--second region_means|resnet18]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageOps

from archiver_scripts import samples
from archiver_scripts.archive import build_archive
from archiver_scripts.server import TorchServe
from handlers.tasks.cascade import crop_region

BATCH_SIZE, BATCH_DELAY_MS = 8, 10
ENV = {"OMP_NUM_THREADS": "1"}
EMBEDDING_TOL = 2e-3  # docs/tasks/cascade.md: cascade vs the embedder alone on the same crop


# -- models and archives -------------------------------------------------------------------------------


def build(work: Path, second: str, crop_pad: float, cascade_workers: int) -> Path:
    import torch
    import torchvision

    from tests import cascade_models as cm
    from tests.segmentation_models import save_exported

    store = work / "store"
    store.mkdir()
    paths = cm.export_models(work)
    if second == "resnet18":
        torch.manual_seed(0)
        net = torchvision.models.resnet18()
        net.fc = torch.nn.Identity()  # [B, 512] pooled features
        paths["embedder"] = save_exported(net.eval(), work / "resnet18_features.pt2", (224, 224), 64)
    labels = work / "colours.json"
    labels.write_text(json.dumps(cm.LABELS))
    quiet = lambda message: None  # noqa: E731
    common = dict(export_path=store, labels=labels, batch_size=BATCH_SIZE, max_batch_delay=BATCH_DELAY_MS, log=quiet)
    build_archive("cascade", paths["detector"], task="cascade", second_model=paths["embedder"],
                  second_task="image-embedding", config=[f"cascade.crop_pad={crop_pad}", "cascade.crop_batch=64"],
                  workers=cascade_workers, **common)
    build_archive("detector", paths["detector"], task="object-detection", **common)
    build_archive("embedder", paths["embedder"], task="image-embedding", **common)
    return store


def make_images(count: int, quality: int) -> list[bytes]:
    from tests import cascade_models as cm

    backgrounds = [samples.mosaic(1920, 1080, offset=i) for i in range(4)]
    return [cm.encode(image, "JPEG", quality=quality)
            for image, _ in cm.random_scenes(count, backgrounds=backgrounds)]


# -- the two clients --------------------------------------------------------------------------------------


class Client:
    """One keep-alive connection to the server; POST returns the parsed JSON (raises on non-200)."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"benchmarks only talk to loopback, got {base}")
        self.host, self.port = parts.hostname, parts.port
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def post(self, model: str, body: bytes) -> dict:
        self.conn.request("POST", f"/predictions/{model}", body=body,
                          headers={"Content-Type": "application/octet-stream"})
        response = self.conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{model}: HTTP {response.status}: {data[:200]!r}")
        return json.loads(data)

    def close(self) -> None:
        self.conn.close()


def cascade_image(client: Client, data: bytes, crop_pad: float, crop_format: str) -> list[dict]:
    return client.post("cascade", data)["detections"]


def chained_image(client: Client, data: bytes, crop_pad: float, crop_format: str) -> list[dict]:
    """What a user's service does without a cascade: detect, then crop, re-encode and embed each box."""
    answer = client.post("detector", data)
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    width, height = answer["image_size"]
    out = []
    for det in answer["detections"]:
        box = crop_region(tuple(det["box"]), crop_pad, width, height)
        buf = io.BytesIO()
        if crop_format == "png":
            image.crop(box).save(buf, "PNG", compress_level=1)
        else:
            image.crop(box).save(buf, "JPEG", quality=95)
        out.append({**det, "crop_box": list(box), **client.post("embedder", buf.getvalue())})
    return out


@dataclass
class Run:
    images: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    boxes: int = 0

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def closed_loop(base: str, images: list[bytes], per_image: Callable[..., list[dict]], args) -> Run:
    """`args.concurrency` clients, each one image at a time, for warmup + duration seconds."""
    run, lock = Run(), threading.Lock()
    start = time.perf_counter()
    measure_from, stop_at = start + args.warmup, start + args.warmup + args.duration

    def worker(w: int) -> None:
        client, i = Client(base), w
        local = Run()
        while (t0 := time.perf_counter()) < stop_at:
            data = images[i % len(images)]
            i += args.concurrency
            try:
                boxes = len(per_image(client, data, args.crop_pad, args.crop_format))
                ok = True
            except (OSError, http.client.HTTPException, RuntimeError):
                client.close()
                client, ok, boxes = Client(base), False, 0
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                if ok:
                    local.images += 1
                    local.boxes += boxes
                    local.latencies_ms.append((t1 - t0) * 1000)
                else:
                    local.errors += 1
        client.close()
        with lock:
            run.images += local.images
            run.errors += local.errors
            run.boxes += local.boxes
            run.latencies_ms.extend(local.latencies_ms)

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return run


# -- agreement ---------------------------------------------------------------------------------------------


def _vector(det: dict) -> np.ndarray:
    return np.asarray(det["embedding"], dtype=np.float64)


def agreement(base: str, images: list[bytes], crop_pad: float) -> dict:
    """Boxes and crop regions equal; embeddings' max abs difference (PNG and JPEG crops)."""
    client = Client(base)
    worst = {"png": 0.0, "jpeg": 0.0}
    boxes = 0
    try:
        for data in images:
            ours = cascade_image(client, data, crop_pad, "")
            for fmt in ("png", "jpeg"):
                theirs = chained_image(client, data, crop_pad, fmt)
                if [(d["class_id"], d["box"], d["crop_box"]) for d in ours] != \
                        [(d["class_id"], d["box"], d["crop_box"]) for d in theirs]:
                    raise SystemExit("the cascade and the chained requests found different boxes or crops")
                for a, b in zip(ours, theirs, strict=True):
                    worst[fmt] = max(worst[fmt], float(np.abs(_vector(a) - _vector(b)).max()))
            boxes += len(ours)
    finally:
        client.close()
    return {"images": len(images), "boxes": boxes, "max_abs_png": worst["png"], "max_abs_jpeg": worst["jpeg"]}


# -- main ----------------------------------------------------------------------------------------------------


def summarise(label: str, run: Run, seconds: float) -> dict:
    row = {"label": label, "images_per_s": round(run.images / seconds, 2), "boxes_per_s": round(run.boxes / seconds, 2),
           "boxes_per_image":
           round(run.boxes / max(1, run.images), 2), "p50_ms": round(run.p(50), 1), "p99_ms": round(run.p(99), 1),
           "mean_ms": round(statistics.fmean(run.latencies_ms), 1) if run.latencies_ms else None,
           "images": run.images, "errors": run.errors}
    print(f"[{label}] {row['images_per_s']} images/s ({row['boxes_per_s']} boxes/s), p50 {row['p50_ms']} ms, "
          f"p99 {row['p99_ms']} ms, "
          f"{row['boxes_per_image']} boxes/image, {run.errors} errors", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per side and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating cascade/chained measurements")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="clients, each one image at a time")
    parser.add_argument("--images", type=int, default=16, help="distinct 1080p JPEGs, sent round-robin")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality of the test images")
    parser.add_argument("--second", choices=["region_means", "resnet18"], default="region_means",
                        help="the second model (default: region_means, the known-answer embedder)")
    parser.add_argument("--crop-pad", type=float, default=0.05, help="handler.cascade.crop_pad (both sides)")
    parser.add_argument("--crop-format", choices=["jpeg", "png"], default="jpeg",
                        help="how the chained client re-encodes crops during the load (default jpeg q95)")
    parser.add_argument("--check-images", type=int, default=6, help="images whose results are compared")
    parser.add_argument("--cascade-workers", type=int, default=2,
                        help="workers of the cascade archive (default 2: as many as the chained pair has)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    images = make_images(args.images, args.quality)
    print(f"{len(images)} 1920x1080 JPEGs (q{args.quality}, {sum(map(len, images)) / len(images) / 1e3:.0f} kB avg) "
          f"with 1-5 boxes; second model {args.second}; workers: cascade {args.cascade_workers}, detector 1, "
          f"embedder 1; batchSize {BATCH_SIZE}, "
          f"maxBatchDelay {BATCH_DELAY_MS} ms, {ENV}; {args.concurrency} clients, {args.warmup:.0f}+"
          f"{args.duration:.0f} s per side; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="tsgpu-bench-cascade-") as tmp:
        work = Path(tmp)
        store = build(work, args.second, args.crop_pad, args.cascade_workers)
        server = TorchServe(store, models=["cascade.mar", "detector.mar", "embedder.mar"], workdir=work / "ts", env=ENV)
        with server:
            server.wait_ready(["cascade", "detector", "embedder"], timeout=300)
            base = server.inference_url
            check = agreement(base, images[: args.check_images], args.crop_pad)
            print(f"agreement on {check['images']} images, {check['boxes']} boxes: boxes and crop regions equal; "
                  f"embeddings max abs diff {check['max_abs_png']:.2e} with PNG crops (tolerance {EMBEDDING_TOL}), "
                  f"{check['max_abs_jpeg']:.2e} with JPEG q95 crops", flush=True)
            rows, ratios = [], []
            for r in range(args.rounds):  # alternated, so that a busy neighbour on the host hits both sides
                pair = [summarise(f"cascade #{r + 1}", closed_loop(base, images, cascade_image, args), args.duration),
                        summarise(f"chained ({args.crop_format} crops) #{r + 1}",
                                  closed_loop(base, images, chained_image, args), args.duration)]
                rows += pair
                ratios.append(pair[0]["images_per_s"] / pair[1]["images_per_s"] if pair[1]["images_per_s"] else float("inf"))
    ratio = statistics.median(ratios)
    print("\n| side | images/s | boxes/s | p50 ms | p99 ms | boxes/image | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['label']} | {row['images_per_s']} | {row['boxes_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
              f"{row['boxes_per_image']} | {row['errors']} |")
    print(f"\ncascade vs chained, images/s per round: {', '.join(f'{x:.2f}x' for x in ratios)}; median {ratio:.2f}x "
          f"(target >= 2x)")
    agreed = check["max_abs_png"] <= EMBEDDING_TOL
    print(f"results agree within {EMBEDDING_TOL}: {'yes' if agreed else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "median_ratio": ratio, "agreement": check},
                                        indent=2))
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Worker memory without a server: drive the handler in one process and print RSS as it goes.

The same model and input mix as benchmarks/soak.py (raw, base64 and, with `url`/`trim`, URL inputs
from a local HTTP server on 127.0.0.1), through FakeContext. Separates Python-level growth
(`trace`: tracemalloc top growth) from allocator retention (`trim`: malloc_trim every 50 batches),
and (`cycles`) counts what only Python's cyclic garbage collector would free: request-sized objects
kept alive by reference cycles until a full collection, which a busy worker rarely runs.

    python -m benchmarks.handler_memory {plain,url,trim,trace,cycles} BATCHES
"""

from __future__ import annotations

import base64
import ctypes
import gc
import random
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import psutil
import torch
import torchvision

from benchmarks.common import image_server, soak_images
from handlers.image_classifier import ImageClassifier
from handlers.testing import FakeContext, json_request, raw_request, run_handler


def main() -> int:
    mode, batches = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="tsgpu-mem-"))
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 224, 224),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=16)}})
    torch.export.save(program, str(work / "m.pt2"))
    good = soak_images()
    bad = [b"", b"text", good[-1][: len(good[-1]) // 3]]
    server = image_server({f"img{i}.jpg": g for i, g in enumerate(good)})
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    ctx = FakeContext(work, serialized_file="m.pt2", batch_size=8, model_yaml_config={"maxWorkers": 2},
                      handler_config={"url": {"allowed_networks": ["127.0.0.1/32"]}, "malloc_trim_seconds": 0})
    handler = ImageClassifier()
    handler.initialize(ctx)
    rng = random.Random(0)
    libc = ctypes.CDLL("libc.so.6")

    def batch() -> None:
        requests = []
        for _ in range(rng.randint(1, 8)):
            r = rng.random()
            if r < 0.6:
                requests.append(raw_request(rng.choice(good)))
            elif r < 0.8:
                requests.append(json_request({"data": base64.b64encode(rng.choice(good)).decode()}))
            elif r < 0.9 and mode in ("url", "trim"):
                requests.append(json_request({"url": f"{origin}/img{rng.randrange(len(good))}.jpg"}))
            else:
                requests.append(raw_request(rng.choice(bad)))
        run_handler(handler, ctx, requests)
        ctx.metrics.calls.clear()

    process = psutil.Process()
    if mode == "cycles":
        gc.collect()
        gc.disable()
        for _ in range(batches):
            batch()
        gc.set_debug(gc.DEBUG_SAVEALL)
        found = gc.collect()
        gc.set_debug(0)
        garbage = gc.garbage
        top = Counter(type(o).__name__ for o in garbage).most_common(12)
        tensors = sum(o.untyped_storage().nbytes() for o in garbage if isinstance(o, torch.Tensor))
        raw = sum(len(o) for o in garbage if isinstance(o, (bytes, bytearray)))
        frames = Counter(f"{Path(o.f_code.co_filename).name}:{o.f_code.co_name}"
                         for o in garbage if type(o).__name__ == "frame")
        print(f"mode cycles: {found} unreachable objects after {batches} batches (gc disabled): {top}")
        print(f"  of which tensors {tensors / 2**20:.1f} MiB, bytes/bytearray {raw / 2**20:.1f} MiB")
        print("  frames:", frames.most_common(15))
        print("  exceptions:", dict(Counter(type(o).__name__ for o in garbage if isinstance(o, BaseException))))
        gc.garbage.clear()
        server.shutdown()
        return 0
    if mode == "trace":
        tracemalloc.start(25)
    for _ in range(150):  # warm-up: every batch size and image size seen
        batch()
    gc.collect()
    start = process.memory_info().rss
    baseline = tracemalloc.take_snapshot() if mode == "trace" else None
    t0 = time.time()
    for i in range(batches):
        batch()
        if mode == "trim" and i % 50 == 0:
            libc.malloc_trim(0)
        if i % 200 == 0:
            print(f"batch {i}: RSS {process.memory_info().rss / 2**20:.1f} MiB", flush=True)
    gc.collect()
    end = process.memory_info().rss
    print(f"mode {mode}: RSS {start / 2**20:.1f} -> {end / 2**20:.1f} MiB ({(end - start) / start * 100:+.1f}%) "
          f"over {batches} batches in {time.time() - t0:.0f}s")
    if baseline is not None:
        for stat in tracemalloc.take_snapshot().compare_to(baseline, "lineno")[:10]:
            print(stat)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

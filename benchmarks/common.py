"""Helpers the benchmark modules share; no command line here.

- The serving workload (benchmarks.serving and the benchmarks that reuse its archive: serving_pipeline,
  serving_backbones, serving_tasks): the model, the 1080p JPEGs, the server settings, the load
  arguments, and `measure`, one real torchserve under closed-loop load (benchmarks/loadgen.py).
- The soak inputs (benchmarks.soak, benchmarks.handler_memory): images of several sizes and a
  loopback HTTP server for URL inputs.
- Compiled-backbone variants (benchmarks.backbones, benchmarks.serving_backbones).

Run a benchmark from the repository root as a module: `python -m benchmarks.serving`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil

from archiver_scripts import samples
from archiver_scripts.cpu_time import tree_cpu_seconds
from archiver_scripts.server import TorchServe
from benchmarks.loadgen import run_load

# --- the serving workload --------------------------------------------------------------------------

BATCH_SIZE, WORKERS, BATCH_DELAY_MS = 8, 2, 10


def make_model(workdir: Path) -> tuple[Path, Path]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=1000).eval()  # random weights: speed only
    path = workdir / "mobilenet_v3_small.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    labels = workdir / "index_to_name.json"
    labels.write_text(json.dumps({str(i): f"class_{i}" for i in range(1000)}))
    return path, labels


def make_images(count: int, quality: int) -> list[bytes]:
    return [samples.encode(samples.mosaic(1920, 1080, offset=i), "JPEG", quality=quality) for i in range(count)]


def server_cpu_seconds(server: TorchServe) -> float:
    try:
        return tree_cpu_seconds(psutil.Process(server.process.pid))
    except psutil.Error:
        return 0.0


def measure(label: str, model: str, store: Path, workdir: Path, images: list[bytes], env: dict[str, str], args) -> dict:
    print(f"\n[{label}] starting torchserve ({', '.join(f'{k}={v}' for k, v in env.items()) or 'default env'}) ...", flush=True)
    server = TorchServe(store, models=[f"{model}.mar"], workdir=workdir / label, env=env)
    with server:
        server.wait_ready([model], timeout=300)
        url = f"{server.inference_url}/predictions/{model}"
        cpu_before = server_cpu_seconds(server)
        started = time.perf_counter()
        result = run_load(url, images, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup)
        wall = time.perf_counter() - started
        cpu = server_cpu_seconds(server) - cpu_before
    row = {
        "label": label,
        "qps": round(result.qps, 1),
        "p50_ms": round(result.p50, 1),
        "p99_ms": round(result.p99, 1),
        "requests": result.requests,
        "errors": result.errors,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        # CPU the whole server (frontend + workers) spent per request, warm-up included in both terms
        "server_cpu_ms_per_request": round(cpu * 1000 / max(1, result.requests * wall / args.duration), 2),
    }
    print(f"[{label}] {row['qps']} QPS, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
          f"{row['errors']} errors, statuses {row['statuses']}", flush=True)
    return row


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The load benchmarks.serving (and benchmarks.serving_pipeline, on the same archive) applies."""
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per configuration")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--images", type=int, default=16, help="distinct 1080p JPEGs, sent round-robin")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality of the test images")


# --- soak inputs -----------------------------------------------------------------------------------


def image_server(images: dict[str, bytes]) -> ThreadingHTTPServer:
    """A loopback HTTP server (127.0.0.1, a free port) answering GET /NAME with images[NAME]."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = images.get(self.path.lstrip("/"))
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if self.path.endswith(".html") else "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def soak_images() -> list[bytes]:
    """Good images of several sizes: the bundled photos and 720p-4K mosaics."""
    photos = [samples.encode(arr, "JPEG", quality=88) for arr in samples.photos().values()]
    big = [samples.encode(samples.mosaic(w, h, offset=i), "JPEG", quality=85)
           for i, (w, h) in enumerate([(1920, 1080), (1280, 720), (3840, 2160), (800, 1200)])]
    return photos + big


# --- compiled-backbone variants --------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    backend: str
    precision: str = "fp32"
    channels_last: bool = False
    static_batch: bool = False
    cpu_target: str = "native"

    def label(self, top: int) -> str:
        return (f"{self.backend} {self.precision}" + (" channels-last" if self.channels_last else "")
                + (f" static b{top}" if self.static_batch else "")
                + (f" {self.cpu_target}" if self.cpu_target != "native" else ""))


def parse_variant(spec: str, precision: str = "fp32", channels_last: bool = False, static_batch: bool = False) -> Variant:
    """`BACKEND[:PRECISION][+cl][+static][+v3]`, e.g. `aoti`, `aoti:bf16`, `aoti:fp32+cl+static`,
    `aoti+v3` (built for any x86-64-v3 CPU instead of this host); the keyword arguments are the
    defaults for what the spec leaves out."""
    from archiver_scripts.compile import DTYPES

    head, *flags = spec.split("+")
    backend, _, named = head.partition(":")
    precision = named or precision
    if precision not in DTYPES:
        raise SystemExit(f"{spec!r}: precision must be one of {', '.join(DTYPES)}")
    unknown = set(flags) - {"cl", "static", "v3"}
    if unknown:
        raise SystemExit(f"{spec!r}: unknown flag(s) {', '.join(sorted(unknown))} (use +cl, +static, +v3)")
    return Variant(backend, precision, channels_last or "cl" in flags, static_batch or "static" in flags,
                   "x86-64-v3" if "v3" in flags else "native")


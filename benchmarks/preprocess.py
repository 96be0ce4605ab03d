"""Preprocessing throughput (images/s) per backend, image size and batch size, in one process.

Baseline, measured in the same run: the stock path (PIL decode -> torchvision Resize(256) ->
CenterCrop(224) -> ToTensor -> Normalize, one image at a time, then torch.stack), as TorchServe's
vision handlers do it. Each backend gets the same encoded JPEGs and the same thread budget
(`--threads`, default 1 = one worker's share on a 2-core host running 2 workers).

Backends: every one available on `--device` (cpu: cpu, torchvision with libjpeg-turbo, dali as a
CPU pipeline; cuda: torchvision nvJPEG, dali mixed, cvcuda, and cpu with upload). On CUDA each
timed run ends with a synchronize, so the figures include all device work. The issue's GPU target
is printed: the best GPU backend at least 10x the stock CPU path per worker on 1080p JPEGs.

    python -m benchmarks.preprocess [--device cpu|cuda] [--backends ...] [--sizes 1080p 4k]
                                    [--batches 1 8 32 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time

import torch

from archiver_scripts import samples
from handlers.artifacts import cpu_model_name
from handlers.preprocess import BACKEND_NAMES, PreprocessSpec, backend_module

SIZES = {"1080p": (1920, 1080), "4k": (3840, 2160)}


def stock_path(items: list[bytes]) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose([
        T.Resize(256), T.CenterCrop(224), T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    return torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in items])


def throughput(fn, items: list[bytes], min_seconds: float, sync=lambda: None) -> float:
    fn(items)  # warm-up: plugins, buffers, thread pool, pipelines
    sync()
    done, started = 0, time.perf_counter()
    while True:
        fn(items)
        sync()
        done += len(items)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--threads", type=int, default=1, help="decode threads (and torch threads) per backend")
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum measured time per cell")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--backends", nargs="+", default=None, help="default: all available on --device")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = args.backends or list(BACKEND_NAMES)
    backends = {"stock PIL+torchvision (cpu)": stock_path}
    skipped = {}
    for name in names:
        module = backend_module(name)
        reason = module.availability(device)
        if reason:
            skipped[name] = reason
            continue
        for label, extra in _variants(name):
            spec = PreprocessSpec(device=device, max_batch=max(args.batches), **extra)
            backends[label] = module.create(spec, args.threads).run
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {_device_name(device)}, torch "
          f"{torch.__version__}, threads {args.threads}, JPEG quality {args.quality}")
    for name, reason in skipped.items():
        print(f"# not measured: {name}: {reason}")
    ours = [label for label in backends if not label.startswith("stock")]
    # the GPU verdict is about the GPU backends, not the CPU backend uploading its output
    gpu_ours = [label for label in ours if not label.startswith("cpu")] if device.type == "cuda" else []
    print("| size | batch | " + " | ".join(backends) + " | best / stock |")
    print("|---|---:|" + "---:|" * len(backends) + "---|")
    best_1080p = 0.0
    for size in args.sizes:
        pool = [samples.encode(samples.mosaic(*SIZES[size], offset=i), "JPEG", quality=args.quality) for i in range(8)]
        for batch in args.batches:
            items = [pool[i % len(pool)] for i in range(batch)]
            rates = {name: throughput(fn, items, args.seconds, sync) for name, fn in backends.items()}
            base = rates["stock PIL+torchvision (cpu)"]
            best = max(ours, key=lambda k: rates[k])
            if size == "1080p" and gpu_ours:
                best_1080p = max(best_1080p, max(rates[k] for k in gpu_ours) / base)
            cells = " | ".join(f"{rates[name]:.1f}" for name in backends)
            print(f"| {size} | {batch} | {cells} | {rates[best] / base:.2f}x ({best}) |", flush=True)
    print("(images/s per worker)")
    if device.type == "cuda" and "1080p" in args.sizes:
        verdict = "met" if best_1080p >= 10 else "NOT met"
        print(f"GPU target (>= 10x the stock CPU path on 1080p JPEGs): best {best_1080p:.1f}x - {verdict}")
    return 0


def _variants(name: str) -> list[tuple[str, dict]]:
    if name == "cpu":
        return [("cpu (draft)", {}), ("cpu (no draft)", {"jpeg_draft": False})]
    return [(name, {})]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model_name()}, {torch.get_num_threads()} torch threads)"


if __name__ == "__main__":
    sys.exit(main())

"""Preprocessing throughput (images/s) per backend, image size and batch size, in one process.

Baseline, measured in the same run: the stock path (PIL decode -> torchvision Resize(256) ->
CenterCrop(224) -> ToTensor -> Normalize, one image at a time, then torch.stack), as TorchServe's
vision handlers do it. Each backend gets the same encoded JPEGs and the same thread budget
(`--threads`, default 1 = one worker's share on a 2-core host running 2 workers).

    python benchmarks/preprocess.py [--sizes 1080p 4k] [--batches 1 8 32 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from archiver_scripts import samples  # noqa: E402
from handlers.preprocess import PreprocessSpec  # noqa: E402
from handlers.preprocess.cpu import CpuPreprocessor  # noqa: E402

SIZES = {"1080p": (1920, 1080), "4k": (3840, 2160)}


def stock_path(items: list[bytes]) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms as T

    transform = T.Compose([
        T.Resize(256), T.CenterCrop(224), T.ToTensor(),
        T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    return torch.stack([transform(Image.open(io.BytesIO(d)).convert("RGB")) for d in items])


def throughput(fn, items: list[bytes], min_seconds: float) -> float:
    fn(items)  # warm-up: plugins, buffers, thread pool
    done, started = 0, time.perf_counter()
    while True:
        fn(items)
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backends = {
        "stock PIL+torchvision": stock_path,
        "cpu (default: draft)": CpuPreprocessor(PreprocessSpec(), args.threads).run,
        "cpu (jpeg_draft=false)": CpuPreprocessor(PreprocessSpec(jpeg_draft=False), args.threads).run,
    }
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, torch {torch.__version__}, "
          f"threads {args.threads}, JPEG quality {args.quality}")
    print("| size | batch | " + " | ".join(backends) + " | best cpu / stock |")
    print("|---|---:|" + "---:|" * len(backends) + "---:|")
    for size in args.sizes:
        pool = [samples.encode(samples.mosaic(*SIZES[size], offset=i), "JPEG", quality=args.quality) for i in range(8)]
        for batch in args.batches:
            items = [pool[i % len(pool)] for i in range(batch)]
            rates = {name: throughput(fn, items, args.seconds) for name, fn in backends.items()}
            base = rates["stock PIL+torchvision"]
            best = max(v for k, v in rates.items() if k.startswith("cpu"))
            cells = " | ".join(f"{rates[name]:.1f}" for name in backends)
            print(f"| {size} | {batch} | {cells} | {best / base:.2f}x |", flush=True)
    print("(images/s; GPU backends are not built yet)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory growth of a preprocess backend over many requests of random sizes, in one process.

Runs `--requests` images (default 10,000) in batches of random size (1..--max-batch) through one
backend: JPEGs of random sizes (64 px to 4K, random quality and aspect ratio, some EXIF-rotated),
a share of PNGs and GIFs (CPU fallback) and of corrupt items (per-item errors). Warm-up runs a
full batch of the largest image, every image once, then `--warmup` random requests. Samples host RSS
and, on CUDA, torch's allocated/reserved memory and the device-wide used memory (which includes
nvJPEG / DALI / CV-CUDA allocations outside torch) after warm-up and every `--every` requests.
Prints the samples and the growth from the first sample after warm-up to the last; exits 1 when
growth exceeds `--max-growth` percent (default 5).

    python -m benchmarks.preprocess_memory --backend dali [--device cuda] [--requests 10000]
"""

from __future__ import annotations

import argparse
import gc
import io
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from archiver_scripts import samples
from handlers.preprocess import PreprocessSpec, create_preprocessor


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_pool(rng: random.Random, count: int) -> list[bytes]:
    pool = []
    for i in range(count):
        width = rng.choice([64, 200, 640, 1024, 1920, 2560, 3840])
        height = max(32, int(width * rng.choice([0.5, 0.75, 1.0, 1.33, 1.78])))
        arr = samples.mosaic(width, min(height, 4096), offset=i)
        kind = rng.random()
        if kind < 0.08:
            pool.append(samples.encode(arr, "PNG"))
        elif kind < 0.12:
            pool.append(samples.encode(arr, "GIF"))
        elif kind < 0.2:
            image, buf, exif = Image.fromarray(arr), io.BytesIO(), Image.Exif()
            exif[0x0112] = rng.choice([3, 6, 8])
            image.save(buf, "JPEG", quality=rng.randint(60, 95), exif=exif.tobytes())
            pool.append(buf.getvalue())
        else:
            pool.append(samples.encode(arr, "JPEG", quality=rng.randint(50, 98)))
    good = pool[0]
    pool += [good[: len(good) // 2], b"not an image", good[:-500]]  # per-item errors
    return pool


def pixels(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as image:
        return image.size[0] * image.size[1]


def snapshot(device: torch.device) -> dict[str, float]:
    out = {"rss": rss_mib()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        out.update(
            allocated=torch.cuda.memory_allocated(device) / 2**20,
            reserved=torch.cuda.memory_reserved(device) / 2**20,
            device_used=(total - free) / 2**20,
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--warmup", type=int, default=500, help="requests before the first sample")
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--pool", type=int, default=40, help="distinct encoded images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-growth", type=float, default=5.0, help="percent")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    device = torch.device(args.device)
    print(f"building a pool of {args.pool} images ...", flush=True)
    pool = make_pool(rng, args.pool)
    spec = PreprocessSpec(device=device, max_batch=args.max_batch)
    pre = create_preprocessor(args.backend, spec, args.threads)
    print(f"backend {pre.name} on {device}; {args.requests} requests in batches of 1..{args.max_batch}", flush=True)

    # Warm-up reaches the high-water marks first: libraries keep buffers sized by the largest
    # batch of the largest images they have seen, which is a bound, not growth.
    largest = max(pool[:-3], key=pixels)  # the last three are the corrupt items
    pre.run([largest] * args.max_batch)
    for data in pool:
        pre.run([data])
    gc.collect()
    gc.freeze()  # as the handler does after loading: full collections then scan only new objects
    done, errors, samples_taken, next_sample = 0, 0, [], args.warmup
    started = time.perf_counter()
    while done < args.requests:
        n = min(rng.randint(1, args.max_batch), args.requests - done)
        batch = pre.run([rng.choice(pool) for _ in range(n)])
        if batch.tensor is not None:
            batch.tensor.sum().item()  # consume it, as the model would (and wait for the device)
        errors += sum(e is not None for e in batch.errors)
        done += n
        if done >= next_sample:
            snap = snapshot(device)
            samples_taken.append((done, snap))
            print(f"  {done:6d} requests: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in snap.items()), flush=True)
            next_sample += args.every
    elapsed = time.perf_counter() - started
    pre.close()

    first, last = samples_taken[0][1], samples_taken[-1][1]
    print(f"{done} requests ({errors} per-item errors, {getattr(pre, 'fallback_items', 0)} CPU fallbacks) "
          f"in {elapsed:.0f}s ({done / elapsed:.1f} images/s)")
    worst = 0.0
    for key in first:
        growth = 100.0 * (last[key] - first[key]) / max(first[key], 1.0)
        worst = max(worst, growth)
        print(f"{key}: {first[key]:.1f} -> {last[key]:.1f} MiB ({growth:+.1f}%)")
    verdict = "met" if worst <= args.max_growth else "NOT met"
    print(f"target: growth <= {args.max_growth}% after warm-up - {verdict}")
    return 0 if worst <= args.max_growth else 1


if __name__ == "__main__":
    sys.exit(main())

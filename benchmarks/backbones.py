"""Backbone latency and throughput per compile backend and batch size, against eager, in one run.

Each backend's artifact is produced by `tsgpu compile` (surgery + compile + validation; cached) and
loaded the way the handler loads it; eager is the untouched torchvision model in eval mode.

    python benchmarks/backbones.py [--model torchvision:resnet50] [--device cpu] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from archiver_scripts.compile import CompileOptions, compile_model, load_model  # noqa: E402
from handlers.backbone import load_backbone  # noqa: E402
from handlers.config import ModelConfig  # noqa: E402


def time_ms(fn, x: torch.Tensor, repeat: int, device: torch.device) -> list[float]:
    out = []
    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        for _ in range(repeat):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["export", "aoti"])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--channels-last", action="store_true", help="compile the backends for channels-last input")
    parser.add_argument("--static-batch", action="store_true",
                        help="compile for exactly max(--batches) rows (smaller batches are padded up to it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    top = max(args.batches)
    torch.manual_seed(0)
    eager, _ = load_model(args.model)
    eager = eager.to(device)
    runners = {"eager fp32": (eager, torch.float32, False)}
    with tempfile.TemporaryDirectory(prefix="tsgpu-bb-") as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(eager.state_dict(), weights)  # fixed weights: compiles hit the cache when repeated
        for backend in args.backends:
            t0 = time.perf_counter()
            result = compile_model(CompileOptions(
                model=args.model, weights=str(weights), output=Path(tmp) / backend, backend=backend,
                device=args.device, precision=args.precision, batch=(top, top, top) if args.static_batch else (1, max(2, min(8, top)), max(2, top)),
                cache_dir=args.cache_dir, channels_last=args.channels_last,
            ), log=lambda m: print("   " + m, flush=True))
            print(f"{backend}: compiled in {time.perf_counter() - t0:.1f}s", flush=True)
            bb = load_backbone(result.artifact.parent, result.artifact.name, ModelConfig(), device)
            layout = (" channels-last" if bb.channels_last else "") + (f" static b{top}" if args.static_batch else "")
            runners[f"{backend} {args.precision}{layout}"] = (bb, bb.dtype, bb.channels_last)

        print(f"\n# {time.strftime('%Y-%m-%d')}, {args.model} on {device} "
              f"({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)")
        print("| backend | batch | median ms | images/s | vs eager |")
        print("|---|---:|---:|---:|---:|")
        for n in args.batches:
            x32 = torch.randn(n, 3, 224, 224, device=device)
            base = None
            for label, (fn, dtype, channels_last) in runners.items():
                x = x32.to(dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                ms = statistics.median(time_ms(fn, x, args.repeat, device))
                base = base or ms
                print(f"| {label} | {n} | {ms:.1f} | {n * 1000 / ms:.1f} | {base / ms:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

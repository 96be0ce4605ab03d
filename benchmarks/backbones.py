"""Backbone latency and throughput per compile backend and batch size, against eager, in one run.

Each backend's artifact is produced by `tsgpu compile` (surgery + compile + validation; cached) and
loaded the way the handler loads it; eager is the untouched torchvision model in eval mode.

    python -m benchmarks.backbones [--model torchvision:resnet50] [--device cpu] [--batches 1 8]
        [--backends export aoti aoti+cl aoti:bf16 ...] [--repeat 20]

A backend whose library is missing here (tensorrt without torch_tensorrt, or on a CPU) is reported as
`# not measured: LABEL: reason` and the other rows are still measured; a compile or load failure is
reported the same way and makes the exit status 1 after the table.

All rows of a batch size are timed interleaved (one call of each in turn), and every precision
below fp32 also gets an eager row at that precision, so the table separates compile from precision.
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from archiver_scripts.compile import DTYPES, CompileError, CompileOptions, compile_model, load_model
from benchmarks.common import parse_variant
from handlers.artifacts import cpu_model_name, native_cpu_precision
from handlers.backbone import load_backbone
from handlers.config import ModelConfig
from handlers.errors import ModelLoadError
from handlers.extras import install_hint


def time_interleaved(runners: dict, inputs: dict, repeat: int, device: torch.device,
                     faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Time every runner `repeat` times, one call each in turn, so that host noise (other work, clock
    changes) falls on the baseline and the candidates alike instead of on whichever ran last.
    With `faults`, also collect each call's minor page faults (the allocator's share of the time)."""
    out: dict[str, list[float]] = {label: [] for label in runners}
    with torch.inference_mode():
        for label, (fn, *_rest) in runners.items():
            for _ in range(2):  # warm-up: allocator, oneDNN primitive caches, lazy init
                fn(inputs[label])
        for _ in range(repeat):
            for label, (fn, *_rest) in runners.items():
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                fn(inputs[label])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                out[label].append((time.perf_counter() - t0) * 1000)
                if faults is not None:
                    faults.setdefault(label, []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return out


def model_gflop(model: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops() / 1e9


def conv_ceiling_gflops(dtype: torch.dtype, device: torch.device, repeat: int = 8) -> float:
    """Best-case convolution throughput here: one large 3x3 conv (8x256x56x56, channels-last), the
    shape a vendor library runs closest to peak. A network can approach it, not pass it."""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1, bias=False).eval().to(device=device, dtype=dtype)
    conv = conv.to(memory_format=torch.channels_last)
    x = torch.randn(8, 256, 56, 56, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    flop = 2 * 8 * 256 * 256 * 9 * 56 * 56
    times = time_interleaved({"conv": (conv,)}, {"conv": x}, repeat, device)["conv"]
    return flop / (min(times) / 1000) / 1e9


def host_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    bf16 = "native" if native_cpu_precision("bf16") else "emulated"
    return f"{cpu_model_name()}, {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 {bf16}"


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot be measured here (a missing optional library), or None."""
    if backend == "tensorrt":
        if device.type != "cuda":
            return f"TensorRT needs a CUDA device, this run is on {device}"
        try:
            import torch_tensorrt  # noqa: F401
        except Exception as exc:  # ImportError, or TensorRT's libraries failing to load
            return f"torch_tensorrt is not importable ({type(exc).__name__}: {exc}); {install_hint('trt')}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="torchvision:resnet50")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["export", "aoti"],
                        help="variants BACKEND[:PRECISION][+cl][+static][+v3], e.g. aoti aoti:bf16 aoti+cl aoti+v3")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's; a TorchServe worker of ours gets CPUs / workers)")
    parser.add_argument("--no-eager-precision", action="store_true",
                        help="with --precision bf16/fp16, skip the eager row at that precision")
    parser.add_argument("--channels-last", action="store_true", help="compile the backends for channels-last input")
    parser.add_argument("--static-batch", action="store_true",
                        help="compile for exactly max(--batches) rows (smaller batches are padded up to it)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    top = max(args.batches)
    torch.manual_seed(0)
    eager, _ = load_model(args.model)
    eager = eager.to(device)
    variants = [parse_variant(v, args.precision, args.channels_last, args.static_batch) for v in args.backends]
    labels = [v.label(top) for v in variants]
    clash = {l for l in labels if labels.count(l) > 1 or l.startswith("eager ")}
    if clash:
        raise SystemExit(f"--backends: {', '.join(sorted(clash))} given twice or clashing with the eager rows")
    # A backend whose library is absent is reported and left out; the others are still measured.
    missing = {label: unavailable(v.backend, device) for v, label in zip(variants, labels, strict=True)}
    for label, reason in missing.items():
        if reason:
            print(f"# not measured: {label}: {reason}", flush=True)
    variants = [v for v, label in zip(variants, labels, strict=True) if not missing[label]]
    labels = [label for label in labels if not missing[label]]
    failed: dict[str, str] = {}
    runners = {"eager fp32": (eager, torch.float32, False)}
    if not args.no_eager_precision:
        # The same eager model at each compiled precision: separates what compiling buys from what
        # the lower precision buys.
        for precision in sorted({v.precision for v in variants} - {"fp32"}):
            dtype = DTYPES[precision]
            runners[f"eager {precision}"] = (copy.deepcopy(eager).to(dtype), dtype, False)
    with tempfile.TemporaryDirectory(prefix="tsgpu-bb-") as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save(eager.state_dict(), weights)  # fixed weights: compiles hit the cache when repeated
        for i, (v, label) in enumerate(zip(variants, labels, strict=True)):
            t0 = time.perf_counter()
            try:
                result = compile_model(CompileOptions(
                    model=args.model, weights=str(weights), output=Path(tmp) / f"{i}-{v.backend}", backend=v.backend,
                    device=args.device, precision=v.precision,
                    batch=(top, top, top) if v.static_batch else (1, max(2, min(8, top)), max(2, top)),
                    cache_dir=args.cache_dir, channels_last=v.channels_last, cpu_target=v.cpu_target,
                ), log=lambda m: print("   " + m, flush=True))
                print(f"{label}: compiled ({result.meta['backend']}) in {time.perf_counter() - t0:.1f}s", flush=True)
                bb = load_backbone(result.artifact.parent, result.artifact.name, ModelConfig(), device)
            except (CompileError, ModelLoadError) as exc:  # the other rows are still worth measuring
                failed[label] = f"{type(exc).__name__}: {exc}"
                print(f"# FAILED: {label}: {failed[label]}", flush=True)
                continue
            runners[label] = (bb, bb.dtype, bb.channels_last)

        print(f"\n# {time.strftime('%Y-%m-%d')}, {args.model} on {device} ({platform.machine()}; "
              f"{host_description(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"{args.repeat} interleaved runs per row, median)")
        dtypes = {dtype for _fn, dtype, _cl in runners.values()}
        ceiling = {d: conv_ceiling_gflops(d, device) for d in sorted(dtypes, key=str)}
        print("conv ceiling (one 3x3 256-channel conv, best of 8): " + ", ".join(
            f"{str(d).replace('torch.', '')} {g:.0f} GFLOP/s" for d, g in ceiling.items()))
        print("| backend | batch | median ms | p90 ms | images/s | GFLOP/s | % of conv ceiling | vs eager fp32 "
              "| paired ratio p10-p90 | page faults/call |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n in args.batches:
            x32 = torch.randn(n, 3, 224, 224, device=device)
            inputs = {}
            for label, (_fn, dtype, channels_last) in runners.items():
                x = x32.to(dtype)
                inputs[label] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            gflop = model_gflop(eager, x32)
            faults: dict[str, list[int]] = {}
            times = time_interleaved(runners, inputs, args.repeat, device, faults)
            base = statistics.median(times["eager fp32"])
            for label, ts in times.items():
                ms = statistics.median(ts)
                p90 = statistics.quantiles(ts, n=10)[-1] if len(ts) >= 2 else ms
                rate = gflop / (ms / 1000)
                share = 100 * rate / ceiling[runners[label][1]]
                # Per round, eager fp32 and this row ran back to back: their ratio cancels slow drift.
                paired = sorted(e / t for e, t in zip(times["eager fp32"], ts, strict=True))
                spread = (f"{paired[len(paired) // 10]:.2f}-{paired[-1 - len(paired) // 10]:.2f}"
                          if len(paired) >= 10 else "-")
                print(f"| {label} | {n} | {ms:.1f} | {p90:.1f} | {n * 1000 / ms:.1f} | {rate:.0f} | {share:.0f}% "
                      f"| {base / ms:.2f}x | {spread} | {statistics.median(faults[label]):.0f} |", flush=True)
            need = gflop / (base / 1.5 / 1000)
            print(f"(batch {n}: 1.5x eager fp32 would need {need:.0f} GFLOP/s, "
                  f"{100 * need / ceiling[torch.float32]:.0f}% of the fp32 conv ceiling)")
    for label, reason in failed.items():
        print(f"not measured, compile or load failed: {label}: {reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

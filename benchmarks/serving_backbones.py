"""End to end through a real torchserve: one ResNet-50 served by our handler with an eager fp32
backbone and with compiled ones, in one run.

Every variant is built by `tsgpu compile` from the same weights (random: speed only) and packed by
`tsgpu archive` with the same settings (2 workers, batchSize 8, maxBatchDelay 10 ms); the same
1080p JPEGs go through the same CPU preprocessing, so the backbone is the only difference. Prints
QPS, p50, p99, errors and server CPU per request for each, and QPS relative to eager fp32.

    python -m benchmarks.serving_backbones [--duration 30] [--variants eager aoti aoti:bf16+cl]

A variant is BACKEND[:PRECISION][+cl][+static][+v3], as in benchmarks/backbones.py. bf16 variants
are skipped, with the reason, on CPUs where oneDNN only emulates bf16.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from archiver_scripts.archive import build_archive
from archiver_scripts.compile import CompileOptions, compile_model
from benchmarks.common import BATCH_DELAY_MS, BATCH_SIZE, WORKERS, Variant, make_images, measure, parse_variant
from handlers.artifacts import cpu_model_name, native_cpu_precision


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["eager", "aoti", "aoti:bf16+cl"])
    parser.add_argument("--duration", type=float, default=30.0, help="measured seconds per variant")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="client connections")
    parser.add_argument("--images", type=int, default=16, help="distinct 1080p JPEGs, sent round-robin")
    parser.add_argument("--quality", type=int, default=85)
    parser.add_argument("--cache-dir", type=Path, default=None, help="tsgpu compile's artifact cache")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment for the server and its workers (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants]
    if variants[0] != Variant("eager"):
        variants.insert(0, Variant("eager"))  # the baseline every ratio is taken against

    import torch
    import torchvision

    rows = []
    with tempfile.TemporaryDirectory(prefix="tsgpu-serve-bb-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        torch.manual_seed(0)
        weights = work / "resnet50.pt"
        torch.save(torchvision.models.resnet50().state_dict(), weights)
        labels = work / "index_to_name.json"
        labels.write_text(json.dumps({str(i): f"class_{i}" for i in range(1000)}))
        names = []
        for v in variants:
            label = v.label(BATCH_SIZE).replace(" ", "-")
            if not native_cpu_precision(v.precision):
                print(f"[{label}] skipped: this CPU has no native {v.precision}", flush=True)
                continue
            print(f"[{label}] tsgpu compile ...", flush=True)
            result = compile_model(CompileOptions(
                model="torchvision:resnet50", weights=str(weights), output=work / label, backend=v.backend,
                precision=v.precision, batch=(BATCH_SIZE,) * 3 if v.static_batch else (1, BATCH_SIZE, BATCH_SIZE),
                channels_last=v.channels_last, cpu_target=v.cpu_target, cache_dir=args.cache_dir,
            ), log=lambda m: print("   " + m, flush=True))
            build_archive(label, result.artifact, store, labels=labels, batch_size=BATCH_SIZE,
                          max_batch_delay=BATCH_DELAY_MS, workers=WORKERS, force=True, log=lambda m: None)
            names.append(label)
        images = make_images(args.images, args.quality)
        print(f"{len(images)} JPEGs 1920x1080 (quality {args.quality}); {WORKERS} workers, batchSize {BATCH_SIZE}, "
              f"maxBatchDelay {BATCH_DELAY_MS} ms; {args.concurrency} clients, {args.warmup:.0f}+{args.duration:.0f} s "
              "per variant", flush=True)
        for name in names:
            rows.append(measure(name, name, store, work, images, dict(e.split("=", 1) for e in args.env), args))

    base = rows[0]["qps"] or float("nan")
    print(f"\n# {time.strftime('%Y-%m-%d')}, ResNet-50 through torchserve on {cpu_model_name()} "
          f"({platform.machine()}, torch {torch.__version__})")
    print("| backbone | QPS | p50 ms | p99 ms | errors | server CPU ms/request | QPS vs eager fp32 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} "
              f"| {r['server_cpu_ms_per_request']} | {r['qps'] / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Serving benchmark: our ImageClassifier vs TorchServe's stock `image_classifier`, in one run.

Same TorchScript MobileNetV3-small, same 1080p JPEGs, same server settings (2 workers, batchSize 8,
maxBatchDelay 10 ms), a real stock torchserve on loopback, a closed-loop client. The stock handler
runs twice (default threading and OMP_NUM_THREADS=1) and our handler is compared with the better of
the two. Prints QPS, p50, p99, errors, server CPU per request, and the ratios.

    python -m benchmarks.serving [--duration 30] [--concurrency 32] [--json results.json]

Needs captum for the stock handler (TorchServe's vision handler imports it): `make bench` installs it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil

from archiver_scripts.archive import build_archive
from benchmarks.common import (
    BATCH_DELAY_MS,
    BATCH_SIZE,
    WORKERS,
    add_workload_arguments,
    make_images,
    make_model,
    measure,
)


def build_stock_archive(model: Path, labels: Path, store: Path) -> None:
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    config_file = store.parent / "stock-config.yaml"
    config_file.write_text(
        f"minWorkers: {WORKERS}\nmaxWorkers: {WORKERS}\nbatchSize: {BATCH_SIZE}\n"
        f"maxBatchDelay: {BATCH_DELAY_MS}\nresponseTimeout: 120\n"
    )
    config = ModelArchiverConfig(
        model_name="stock", handler="image_classifier", version="1.0", serialized_file=str(model),
        extra_files=str(labels), export_path=str(store), force=True, config_file=str(config_file),
    )
    package_model(config, manifest=ModelExportUtils.generate_manifest_json(config))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("captum") is None:
        print("TorchServe's stock image_classifier handler needs captum: pip install captum (make bench does)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="tsgpu-bench-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        print("building MobileNetV3-small (TorchScript), test images and both archives ...", flush=True)
        model, labels = make_model(work)
        images = make_images(args.images, args.quality)
        build_stock_archive(model, labels, store)
        build_archive("ours", model, store, labels=labels, batch_size=BATCH_SIZE, max_batch_delay=BATCH_DELAY_MS,
                      workers=WORKERS, force=True, log=lambda m: None)
        mean_kb = sum(map(len, images)) / len(images) / 1024
        print(f"{len(images)} JPEGs 1920x1080 (quality {args.quality}, mean {mean_kb:.0f} KiB); "
              f"{WORKERS} workers, batchSize {BATCH_SIZE}, maxBatchDelay {BATCH_DELAY_MS} ms; "
              f"{args.concurrency} clients, {args.warmup:.0f}+{args.duration:.0f} s per run", flush=True)
        rows = [
            measure("stock-default", "stock", store, work, images, {}, args),
            measure("stock-omp1", "stock", store, work, images, {"OMP_NUM_THREADS": "1"}, args),
            measure("ours", "ours", store, work, images, {}, args),
        ]

    stock_best = max(rows[:2], key=lambda r: r["qps"])
    ours = rows[2]
    ratio = ours["qps"] / stock_best["qps"] if stock_best["qps"] else float("inf")
    p99_ok = ours["p99_ms"] <= stock_best["p99_ms"]
    print("\n| run | QPS | p50 ms | p99 ms | errors | server CPU ms/request |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['label']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r['server_cpu_ms_per_request']} |")
    print(f"\nratio ours / best stock ({stock_best['label']}): {ratio:.2f}x QPS; "
          f"p99 {ours['p99_ms']} vs {stock_best['p99_ms']} ms ({'no worse' if p99_ok else 'WORSE'}); "
          f"errors {ours['errors']}")
    print(f"target >= 3.00x with p99 no worse and zero errors: "
          f"{'MET' if ratio >= 3 and p99_ok and ours['errors'] == 0 else 'NOT MET'}")
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                   f"{platform.python_implementation()} {platform.python_version()}",
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "ratio": round(ratio, 2),
        "p99_no_worse": p99_ok,
    }
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

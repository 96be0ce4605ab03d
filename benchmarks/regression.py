"""Regression benchmark: this tree's handler against the same handler from another git revision.

Same TorchScript MobileNetV3-small, 1080p JPEGs, server settings and closed-loop client as
benchmarks/serving.py; both archives are built here (the older one by that revision's own
`tsgpu archive` code, so it ships that revision's `handlers`), and served one after the other,
alternating (A B A B by default) so slow drift of the host shows up in both. Prints QPS, p50, p99,
errors and server CPU per request for each run, and the ratio of the means.

    python -m benchmarks.regression --against 6a17d87 [--rounds 2] [--duration 30]

Used to show that a refactor of the request path costs nothing.
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import subprocess
import sys
import tarfile
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

ROOT = Path(__file__).resolve().parent.parent

_BUILD_OLD = """
import sys
sys.path.insert(0, sys.argv[1])
from archiver_scripts.archive import build_archive
build_archive("before", sys.argv[2], sys.argv[3], labels=sys.argv[4], batch_size=int(sys.argv[5]),
              max_batch_delay=int(sys.argv[6]), workers=int(sys.argv[7]), force=True, log=lambda m: None)
"""


def checkout(ref: str, into: Path) -> str:
    """`git archive` of `ref` unpacked into `into`; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    blob = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return commit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--against", required=True, help="git revision to compare with (e.g. a commit id)")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (default 2)")
    args = parser.parse_args(argv)
    head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="tsgpu-regress-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        old_tree = work / "before-tree"
        old_tree.mkdir()
        commit = checkout(args.against, old_tree)
        print(f"building MobileNetV3-small, images, and archives of this tree ({head}) and {commit[:12]} ...",
              flush=True)
        model, labels = make_model(work)
        images = make_images(args.images, args.quality)
        build_archive("after", model, store, labels=labels, batch_size=BATCH_SIZE, max_batch_delay=BATCH_DELAY_MS,
                      workers=WORKERS, force=True, log=lambda m: None)
        subprocess.run([sys.executable, "-c", _BUILD_OLD, str(old_tree), str(model), str(store), str(labels),
                        str(BATCH_SIZE), str(BATCH_DELAY_MS), str(WORKERS)], check=True, cwd=work)
        rows: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for name in ("before", "after"):
                rows[name].append(measure(f"{name}-{r + 1}", name, store, work, images, {}, args))

    print("\n| run | QPS | p50 ms | p99 ms | errors | server CPU ms/request |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in range(args.rounds):
        for name in ("before", "after"):
            x = rows[name][r]
            print(f"| {x['label']} | {x['qps']} | {x['p50_ms']} | {x['p99_ms']} | {x['errors']} | "
                  f"{x['server_cpu_ms_per_request']} |")
    qps = {name: statistics.mean(x["qps"] for x in runs) for name, runs in rows.items()}
    cpu = {name: statistics.mean(x["server_cpu_ms_per_request"] for x in runs) for name, runs in rows.items()}
    print(f"\nmean QPS: before ({commit[:12]}) {qps['before']:.1f}, after ({head}) {qps['after']:.1f}: "
          f"ratio after/before {qps['after'] / qps['before']:.3f}x; server CPU ms/request "
          f"{cpu['before']:.2f} -> {cpu['after']:.2f}")
    print(f"machine: {platform.machine()}, {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}; "
          f"{time.strftime('%Y-%m-%d')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`tsgpu batch` and `tsgpu annotate`: argument parsing and the command functions.

    tsgpu batch ARCHIVE.mar --input IN --output OUT/ [--column C] [--batch-size N] [--workers N]
                [--config k=v]... [--limit N] [--resume | --overwrite] [--max-error-rate F]
                [--engine local|ray] [--ray-address ADDR] [--gpus-per-worker F] [--annotate DIR]
    tsgpu annotate ARCHIVE.mar IMAGE... [--out DIR] [--config k=v]...

Registered in archiver_scripts/cli.py's command table; this module imports only argparse at import
time (the engines, torch and pyarrow load when a command runs). docs/batch.md is the user's guide.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXIT_USAGE = 2
EXIT_STOPPED = 1


def add_batch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="run an archive's handler over many inputs offline, into Parquet (same answers as the server)",
        description="Offline batch inference with the same .mar: every input answered as torchserve would answer "
                    "it, written to OUT/part-NNNNN.parquet with a _manifest.json and _SUCCESS (docs/batch.md).")
    p.add_argument("archive", help="the .mar to run")
    p.add_argument("--input", required=True, metavar="IN",
                   help="a directory (recursive, sorted), a text file of paths/URLs, or a CSV/JSONL/Parquet file")
    p.add_argument("--output", required=True, metavar="OUT", help="output directory for the Parquet parts")
    p.add_argument("--column", help="CSV/JSONL/Parquet: the column holding paths or URLs "
                                    "(JSONL without it: each record is sent as its JSON)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per handler call (default: the archive's batchSize)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (local) or Ray actors (ray); each sizes its threads like a server "
                        "worker: CPUs // workers (default 1)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="handler setting over the archive's, same keys as tsgpu archive, e.g. classifier.top_k=3 "
                        "(repeatable)")
    p.add_argument("--limit", type=int, help="only the first N inputs (in the fixed order)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="inputs per part file (default: about 4 shards per worker, whole batches, at most 1024; "
                        "recorded in the manifest, which --resume reuses); fixed for a job: --resume needs the same")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted job in OUT (same archive, config and inputs): done parts are kept")
    mode.add_argument("--overwrite", action="store_true", help="remove a previous output in OUT first")
    p.add_argument("--max-error-rate", type=float, metavar="F",
                   help="stop when more than this fraction of rows are errors (e.g. 0.05), judged after 50 rows")
    p.add_argument("--max-request-size", type=int, default=6_553_500, metavar="BYTES",
                   help="the server's max_request_size: larger files get its 413 (default 6553500, TorchServe's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu, or cuda (one GPU per worker, round robin; unverified: no GPU where this was built)")
    p.add_argument("--engine", default="local", choices=["local", "ray"], help="local processes or a Ray cluster")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="F",
                   help="Ray: GPUs per actor (fractions share a GPU; default 0)")
    p.add_argument("--annotate", metavar="DIR",
                   help="also draw boxes/masks on each input image into DIR (detection/segmentation archives)")
    p.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default="auto",
                   help="auto: a bar on a terminal, plain lines otherwise (default)")


def add_annotate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("annotate", help="draw an archive's boxes and masks on a few images",
                       description="Run a few images through a detection/segmentation archive's handler in-process "
                                   "and write each with its boxes, labels and masks drawn (docs/batch.md).")
    p.add_argument("archive", help="the .mar to run")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", default="annotated", help="directory for the pictures (default: annotated)")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="handler setting over the archive's (repeatable)")


def _archive_batch_size(archive: str) -> int:
    """The archive's own batchSize (model-config.yaml), 8 when it has none."""
    import json
    import zipfile

    import yaml

    try:
        with zipfile.ZipFile(archive) as zf:
            manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
            name = manifest.get("model", {}).get("configFile")
            config = yaml.safe_load(zf.read(name)) if name else {}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return 8
    size = (config or {}).get("batchSize")
    return size if isinstance(size, int) and size > 0 else 8


def run_batch(args: argparse.Namespace) -> int:
    from .job import JobError, finish, parse_config, plan_job, prepare_output, write_manifest
    from .progress import ErrorRateExceeded, summary_text
    from .shards import shard_done

    def fail(message: str, code: int = EXIT_USAGE) -> int:
        print(f"tsgpu batch: error: {message}", file=sys.stderr)
        return code

    if args.max_error_rate is not None and not 0 <= args.max_error_rate <= 1:
        return fail(f"--max-error-rate {args.max_error_rate}: a fraction between 0 and 1 (0.05 = 5%)")
    try:
        job, shards = plan_job(
            args.archive, args.input, args.output, column=args.column,
            batch_size=args.batch_size or _archive_batch_size(args.archive),
            shard_size=args.shard_size, config=parse_config(args.config), limit=args.limit,
            device=args.device, workers=args.workers,
            max_request_size=args.max_request_size, resume=args.resume)
        prepare_output(job, shards, resume=args.resume, overwrite=args.overwrite)
    except JobError as exc:
        return fail(str(exc))
    done_rows = sum(len(s.inputs) for s in shards if shard_done(job, s))
    progress = _progress(args.progress, job.rows, done_rows, args.max_error_rate)
    print(f"tsgpu batch: {job.rows} inputs in {len(shards)} shard(s) of {job.shard_size}, batch size {job.batch_size}, "
          f"{args.workers} worker(s), engine {args.engine}"
          + (f"; {done_rows} rows already done (--resume)" if done_rows else ""), file=sys.stderr)
    try:
        summary = _run_engine(args, job, shards, progress)
    except ErrorRateExceeded as exc:
        progress.close()
        write_manifest(job, shards, state="stopped", extra={"stopped": str(exc)})
        return fail(str(exc), EXIT_STOPPED)
    except JobError as exc:
        progress.close()
        write_manifest(job, shards, state="failed", extra={"error": str(exc)})
        return fail(str(exc), EXIT_STOPPED)
    except KeyboardInterrupt:
        progress.close()
        print("tsgpu batch: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    progress.close()
    if summary.stopped:
        write_manifest(job, shards, state="stopped", extra={"stopped": summary.stopped})
        return fail(summary.stopped, EXIT_STOPPED)
    try:
        total = finish(job, shards, [summary])
    except JobError as exc:
        return fail(str(exc), EXIT_STOPPED)
    print(summary_text(total, progress, job.output), file=sys.stderr)
    if args.annotate:
        from .annotate import annotate_job

        print(f"tsgpu batch: annotate: {annotate_job(job, shards, args.annotate)}", file=sys.stderr)
    return 0


def _progress(mode: str, total: int, done: int, max_error_rate: float | None) -> Any:
    import io

    from .progress import Progress

    if mode == "none":
        return Progress(total, done, max_error_rate, stream=io.StringIO(), tty=False, interval=1e9)
    tty = {"bar": True, "lines": False}.get(mode)
    return Progress(total, done, max_error_rate, tty=tty)


def _run_engine(args: argparse.Namespace, job: Any, shards: Any, progress: Any) -> Any:
    if args.engine == "ray":
        from .engines import ray as ray_engine

        return ray_engine.run(job, shards, args.workers, args.gpus_per_worker, args.ray_address, progress)
    if args.ray_address or args.gpus_per_worker:
        print("tsgpu batch: note: --ray-address/--gpus-per-worker apply to --engine ray only", file=sys.stderr)
    from .engines import local

    return local.run(job, shards, args.workers, progress)


def run_annotate(args: argparse.Namespace) -> int:
    from .job import JobError, parse_config

    try:
        from .annotate import annotate_files

        summary = annotate_files(args.archive, args.images, args.out, config=parse_config(args.config))
    except (JobError, ValueError) as exc:
        print(f"tsgpu annotate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"tsgpu annotate: {summary}")
    return 0

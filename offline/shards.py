"""One shard -> one part file, written so that a killed job can never leave a part that looks done.

The part is written under a temporary name in OUT/ and renamed into place (`os.replace`, atomic on
one filesystem), so `part-NNNNN.parquet` either does not exist or is complete. Its footer (Parquet
key-value metadata, key `tsgpu_batch`) records the job identity (archive sha256, --config, input
fingerprint, shard size), the shard index, its row count and counts of errors by type. A shard is
done (`shard_done`) only when its part exists and that footer matches this job and shard and the
file really holds that many rows: anything else is redone by `--resume`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .job import FORMAT, JobSpec, Shard, error_counts

if TYPE_CHECKING:
    from .worker import ArchiveWorker, PreparedBatch, RowResult

FOOTER_KEY = b"tsgpu_batch"


class Stopped(Exception):
    """The engine asked the shard to stop (--max-error-rate, Ctrl-C); its part was not written."""


@dataclass
class ShardOutcome:
    index: int
    rows: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # error_type -> rows
    seconds: float = 0.0
    skipped: bool = False  # already done (resume)


def footer(job: JobSpec, shard: Shard, results: list[RowResult]) -> dict[str, Any]:
    return {"format": FORMAT, **job.identity(), "shard": shard.index, "rows": len(results),
            "first": shard.inputs[0].uri if shard.inputs else None,
            "last": shard.inputs[-1].uri if shard.inputs else None,
            "errors": error_counts(r.error_type for r in results)}


def read_footer(path: Path) -> tuple[dict[str, Any], int] | None:
    """(footer, rows in the file) of a part, or None when it is missing or not readable."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
    except (OSError, ValueError):  # missing, truncated, not Parquet (ArrowInvalid is a ValueError)
        return None
    raw = (meta.metadata or {}).get(FOOTER_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw), meta.num_rows
    except ValueError:
        return None


def shard_done(job: JobSpec, shard: Shard) -> bool:
    """Its part exists and its footer matches this job, this shard and the rows it holds."""
    found = read_footer(job.part_path(shard.index))
    if found is None:
        return False
    meta, num_rows = found
    identity_ok = all(meta.get(k) == v for k, v in job.identity().items())
    first = shard.inputs[0].uri if shard.inputs else None
    last = shard.inputs[-1].uri if shard.inputs else None
    return (identity_ok and meta.get("shard") == shard.index and meta.get("rows") == len(shard.inputs) == num_rows
            and meta.get("first") == first and meta.get("last") == last)


def read_part_counts(job: JobSpec, shard: Shard) -> tuple[int, dict[str, int]]:
    """(rows, errors by type) recorded in a done shard's footer."""
    found = read_footer(job.part_path(shard.index))
    if found is None:
        raise FileNotFoundError(job.part_path(shard.index))
    meta, num_rows = found
    return num_rows, dict(meta.get("errors") or {})


def run_shard(
    job: JobSpec,
    shard: Shard,
    worker: ArchiveWorker,
    progress: Callable[[int, int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> ShardOutcome:
    """Run a shard's inputs through `worker` in batches of `job.batch_size` and write its part.

    The next batch's files are read on a thread while the handler runs the current one (the
    read releases the GIL; the requests are the same bytes either way). A temporary part an
    earlier, killed attempt at this shard left behind is removed first (`remove_partial`).
    `progress(rows, errors)` is called after each batch with that batch's counts; `stop()` is asked
    before each batch, and True raises Stopped (no part is written for this shard)."""
    started = time.perf_counter()
    remove_partial(job, shard)
    results: list[RowResult] = []
    inputs = shard.inputs
    batches = [inputs[start:start + job.batch_size] for start in range(0, len(inputs), job.batch_size)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tsgpu-read-{shard.index}") as reader:
        ahead: Future[PreparedBatch] | None = reader.submit(worker.prepare, batches[0]) if batches else None
        for i in range(len(batches)):
            if stop is not None and stop():
                if ahead is not None:
                    ahead.cancel()
                raise Stopped(f"shard {shard.index} stopped after {len(results)} of {len(inputs)} rows")
            assert ahead is not None
            prepared = ahead.result()
            ahead = reader.submit(worker.prepare, batches[i + 1]) if i + 1 < len(batches) else None
            batch = worker.run_prepared(prepared)
            results.extend(batch)
            if progress is not None:
                progress(len(batch), sum(1 for r in batch if r.status != 200))
    write_part(job, shard, results, worker.task_info())
    outcome = ShardOutcome(shard.index, len(results), error_counts(r.error_type for r in results))
    outcome.seconds = time.perf_counter() - started
    return outcome


def temporary_parts(job: JobSpec, shard: Shard) -> list[Path]:
    """The shard's temporary part files in OUT/ (`.part-NNNNN.parquet.<pid>.<id>.tmp`)."""
    target = job.part_path(shard.index)
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


def remove_partial(job: JobSpec, shard: Shard) -> None:
    """Delete the temporary part a worker killed mid-write left behind (its own cleanup never ran).
    Its final name was never written, so nothing else is affected; a writer of that file still
    alive somewhere (an orphan of a killed job) would only fail its rename."""
    for leftover in temporary_parts(job, shard):
        with contextlib.suppress(OSError):
            leftover.unlink()


def write_part(job: JobSpec, shard: Shard, results: list[RowResult], info: Any) -> Path:
    """Write the part under a temporary name, then rename it into place."""
    import pyarrow.parquet as pq

    from .output import to_table

    if [r.uri for r in results] != [ref.uri for ref in shard.inputs]:
        raise RuntimeError(f"shard {shard.index}: the worker answered {len(results)} rows for "
                           f"{len(shard.inputs)} inputs, or out of order")
    metadata = {FOOTER_KEY: json.dumps(footer(job, shard, results), sort_keys=True).encode()}
    table = to_table(results, info, metadata)
    target = job.part_path(shard.index)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target

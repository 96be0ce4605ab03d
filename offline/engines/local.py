"""The local engine: a pool of worker processes on this machine, one ArchiveWorker in each.

Each process is started fresh (multiprocessing "spawn": no torch state inherited), loads the
archive once, then takes shards from a queue until none are left; after every batch it reports
(rows, errors) to the parent, which drives the progress display. A shard whose part is already
done (--resume) is never queued. Processes, not threads, because a TorchServe worker is a process:
the handler's own thread sizing (cores // workers, handlers/runtime.py) then holds as on a server.

If `progress` raises (ErrorRateExceeded from --max-error-rate, Ctrl-C), the workers are told to
stop before their next batch, their unfinished shards are not written, and the summary says why.
A worker process that dies (killed, out of memory) stops the job with a JobError: parts already
written stay valid and `--resume` redoes only the rest.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ..job import JobError, JobSpec, JobSummary, Shard
from ..shards import ShardOutcome, Stopped, run_shard, shard_done

#: Seconds the parent waits for workers to stop by themselves before terminating them.
STOP_GRACE_S = 30.0


def _not_from_the_wire_decoder(record: logging.LogRecord) -> bool:
    """TorchServe's message decoder logs a traceback for every body declared JSON that does not
    parse; the row's own error says so already (a server writes it to model_log.log)."""
    return not record.pathname.endswith("otf_message_handler.py")


def _quiet_child_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_not_from_the_wire_decoder)
    # TorchServe's base_handler warns at import about optional runtimes (OpenVINO, onnxruntime,
    # TensorRT) that our handlers do not use.
    logging.getLogger("ts.torch_handler.base_handler").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)


def _gpu_for(rank: int, device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    if ":" in device:
        return int(device.partition(":")[2])
    count = torch.cuda.device_count()
    return rank % count if count else None


def _child(rank: int, job: JobSpec, tasks: Any, results: Any, stop: Any, threads: int | None) -> None:
    """A worker process: load the archive, run shards from `tasks` until a None. It also stops when
    its parent is gone (killed): nobody would collect its work."""
    parent = os.getppid()
    # OpenMP users other than torch (whose threads the handler sizes itself) get the same share,
    # unless the user chose: N processes x all cores each would oversubscribe the CPU.
    os.environ.setdefault("OMP_NUM_THREADS", str(threads or max(1, len(os.sched_getaffinity(0)) // job.workers)))
    _quiet_child_logging()
    try:
        from ..worker import ArchiveWorker

        worker = ArchiveWorker(job, gpu_id=_gpu_for(rank, job.device), threads=threads)
    except Exception as exc:  # the user's archive/config: report it, named, to the parent
        results.put(("fatal", rank, f"loading {job.archive} failed: {type(exc).__name__}: {exc}"))
        return
    try:
        while True:
            shard = tasks.get()
            if shard is None or stop.is_set() or os.getppid() != parent:
                break
            try:
                outcome = run_shard(job, shard, worker, progress=lambda r, e: results.put(("progress", r, e)),
                                    stop=lambda: stop.is_set() or os.getppid() != parent)
            except Stopped:
                break
            results.put(("done", rank, outcome))
    except Exception as exc:
        results.put(("fatal", rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        worker.close()
        results.put(("exit", rank, None))


def run(job: JobSpec, shards: Sequence[Shard], workers: int,
        progress: Callable[[int, int], None] | None = None, threads: int | None = None) -> JobSummary:
    """Run the shards not yet done on `workers` processes; return what this run did."""
    started = time.monotonic()
    todo = [s for s in shards if not shard_done(job, s)]
    skipped = len(shards) - len(todo)
    if not todo:
        return JobSummary.from_outcomes([], 0.0, skipped)
    ctx = mp.get_context("spawn")
    tasks, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    count = max(1, min(workers, len(todo)))
    for shard in todo:
        tasks.put(shard)
    for _ in range(count):
        tasks.put(None)
    procs = [ctx.Process(target=_child, args=(rank, job, tasks, results, stop, threads), daemon=True,
                         name=f"tsgpu-batch-{rank}") for rank in range(count)]
    for p in procs:
        p.start()
    outcomes: list[ShardOutcome] = []
    stopped: str | None = None
    try:
        _collect(procs, results, progress, outcomes, len(todo))
    except BaseException as exc:
        stop.set()
        stopped = str(exc) or type(exc).__name__
        _drain_until_exit(procs, results, outcomes)
        if not isinstance(exc, JobError) or isinstance(exc, _WorkerFailed):
            raise
        # ErrorRateExceeded (a JobError raised by progress): report it in the summary
    finally:
        _reap(procs)
    return JobSummary.from_outcomes(outcomes, time.monotonic() - started, skipped, stopped)


class _WorkerFailed(JobError):
    """A worker process could not load the archive or died; the message says which and why."""


def _collect(procs: list[Any], results: Any, progress: Callable[[int, int], None] | None,
             outcomes: list[ShardOutcome], expected: int) -> None:
    exited: set[int] = set()
    while len(outcomes) < expected:
        try:
            kind, a, b = results.get(timeout=0.5)
        except queue.Empty:
            dead = [p for i, p in enumerate(procs) if i not in exited and not p.is_alive()]
            if dead:
                p = dead[0]
                raise _WorkerFailed(f"worker process {p.name} died (exit code {p.exitcode}) with "
                                    f"{expected - len(outcomes)} shard(s) left; parts written so far are kept: "
                                    f"rerun with --resume") from None
            continue
        if kind == "progress" and progress is not None:
            progress(a, b)
        elif kind == "done":
            outcomes.append(b)
        elif kind == "fatal":
            raise _WorkerFailed(f"worker {a}: {b}")
        elif kind == "exit":
            exited.add(a)
            if len(exited) == len(procs) and len(outcomes) < expected:
                raise _WorkerFailed(f"every worker process exited with {expected - len(outcomes)} shard(s) left")


def _drain_until_exit(procs: list[Any], results: Any, outcomes: list[ShardOutcome]) -> None:
    """After a stop: keep what finishes, until every worker has exited (or the grace time is over)."""
    deadline = time.monotonic() + STOP_GRACE_S
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        try:
            kind, _, b = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if kind == "done":
            outcomes.append(b)


def _reap(procs: list[Any]) -> None:
    for p in procs:
        p.join(timeout=5)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=5)

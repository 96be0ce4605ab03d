"""The Ray engine: the job's shards on a Ray cluster, one archive handler per actor, loaded once.

    tsgpu batch model.mar --input IN --output OUT/ --engine ray [--ray-address ADDR]
                          [--workers N] [--gpus-per-worker F]

The same shards as the local engine, run by `N` Ray actors (`ShardRunner`): each actor loads the
archive's handler once (an `ArchiveWorker`, TorchServe's own loader) and runs whole shards with
`offline.shards.run_shard`, which writes the shard's part file itself (temporary name + rename,
footer naming the job). The driver (this process) hands out shards, feeds the progress display and
collects each shard's counts. So on a cluster of several machines the inputs and `OUT/` must be at
the same path on every node (a shared filesystem), and every node needs this package installed.

Why plain actors and not a Ray Data pipeline: a shard's output is one part file whose footer proves
it complete, and the driver must know which shards are done to resume and to retry; Ray Data would
hand back a dataset of rows and own the retries. Actors give both: `ray.wait` on each shard's result,
and a dead actor's shard handed to a fresh actor.

A worker that dies (its process killed, its node lost) costs that shard's partial work only: the
driver sees the actor's death on the shard's result, starts a replacement actor, and runs the shard
again, up to `max_retries` times per shard. The half-written part never got its final name, and a
part is trusted only when its footer matches (`shard_done`), so a retried shard is written exactly
once and the finished job holds every input exactly once; the dead worker's temporary part (when it
was killed mid-write) is deleted before the rerun. An exception raised inside `run_shard` (not a
death: a full disk, a bug) stops the job with the shard and the error named; bad inputs never raise,
they are error rows.

GPUs: `--gpus-per-worker F` asks Ray for `num_gpus=F` per actor (fractions share a GPU: 0.5 puts two
actors on one GPU; Ray does not divide its memory). Ray sets CUDA_VISIBLE_DEVICES for the actor, so a
`cuda` job's handler runs on device 0 of what it sees. That path has not run on a GPU (no GPU here):
the tests schedule `F = 0.5` on logical GPUs of a CPU-only cluster.

Ray is an optional extra: `pip install 'torchserve-gpu-handlers[ray]'`; it is imported when the
engine runs, never at import. A cluster with Ray's token authentication (on when the head has a token)
refuses a driver unless RAY_AUTH_MODE=token is set before Ray is imported (and RAY_AUTH_TOKEN where the
token file is absent): the user's environment decides, this module does not switch it (docs/batch.md).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

from handlers.extras import PACKAGE

from ..job import JobError, JobSpec, JobSummary, Shard
from ..shards import remove_partial

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

RAY_HINT = f"pip install '{PACKAGE}[ray]'"
#: Runs of one shard before the job gives up on it (each after its actor died).
MAX_RETRIES = 3
#: Seconds between the driver's progress polls of busy actors.
POLL_S = 0.5


def import_ray() -> ModuleType:
    """`ray`, or a JobError with the install hint."""
    try:
        import ray
    except ImportError as exc:
        raise JobError(f"--engine ray needs Ray, which is not installed: {RAY_HINT}") from exc
    return ray


# -- the actor -------------------------------------------------------------------------------------


class ShardRunner:
    """One Ray actor: the archive's handler, loaded once, running whole shards.

    A threaded actor (max_concurrency 2): `run` holds one thread for a shard while `progress` answers
    the driver's polls from the other."""

    def __init__(self, job: JobSpec, gpu_id: int | None, threads: int | None) -> None:
        from offline.worker import ArchiveWorker

        self.job = job
        self.worker = ArchiveWorker(job, gpu_id=gpu_id, threads=threads)
        self._lock = threading.Lock()
        self._current = (-1, 0, 0)  # shard index, rows done, errors
        self._halt = threading.Event()

    def where(self) -> dict[str, Any]:
        """Node, host and pid of this actor (the driver waits on this before handing out shards)."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}

    def run(self, shard: Shard) -> tuple[int, int, dict[str, int]] | None:
        """Run `shard` and write its part: (shard index, rows, errors by type); None when `halt` stopped
        it before its end (no part written)."""
        from offline.shards import Stopped, run_shard

        with self._lock:
            self._current = (shard.index, 0, 0)

        def progress(rows: int, errors: int) -> None:
            with self._lock:
                index, done, failed = self._current
                self._current = (index, done + rows, failed + errors)

        try:
            outcome = run_shard(self.job, shard, self.worker, progress, stop=self._halt.is_set)
        except Stopped:
            return None
        return shard.index, outcome.rows, dict(outcome.errors)

    def halt(self) -> None:
        """Stop the running shard before its next batch (--max-error-rate): it writes no part."""
        self._halt.set()

    def progress(self) -> tuple[int, int, int]:
        """(shard index, rows, errors) of the shard running now, counted so far."""
        with self._lock:
            return self._current

    def close(self) -> None:
        self.worker.close()


# -- the driver ------------------------------------------------------------------------------------


@dataclass
class _Slot:
    """An actor and what it runs now."""

    actor: Any
    shard: Shard | None = None
    ref: Any = None
    poll: Any = None


@dataclass
class _Books:
    """What the driver knows: counts, retries, progress already reported per shard."""

    summary: JobSummary = field(default_factory=JobSummary)
    retries: dict[int, int] = field(default_factory=dict)
    reported: dict[int, tuple[int, int]] = field(default_factory=dict)  # shard -> (rows, errors) shown
    halted: BaseException | None = None  # what `progress` raised (ErrorRateExceeded, Ctrl-C): stop the job
    job: JobSpec | None = None

    def report(self, progress: Progress | None, index: int, rows: int, errors: int) -> None:
        """Show the rows of shard `index` not shown yet (a retried shard's rows are shown once)."""
        shown_rows, shown_errors = self.reported.get(index, (0, 0))
        new_rows, new_errors = max(0, rows - shown_rows), max(0, errors - shown_errors)
        self.reported[index] = (max(rows, shown_rows), max(errors, shown_errors))
        if progress is not None and (new_rows or new_errors) and self.halted is None:
            try:
                progress(new_rows, new_errors)
            except BaseException as exc:  # --max-error-rate or Ctrl-C: finish what runs, start nothing
                self.halted = exc


def connect(ray: ModuleType, address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a one-machine Ray for this job.
    True when this call connected (so `run` disconnects at the end; a Ray it started stops then)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "configure_logging": False}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise JobError(
            f"--ray-address {address or os.environ.get('RAY_ADDRESS')}: no Ray cluster answered ({exc}). Start one "
            f"with `ray start --head` and pass its address (or 'auto' on a node of it). A cluster with token "
            f"authentication (Ray's default when the head has a token) refuses a driver without it: "
            f"export RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN=<`ray get-auth-token` on the head> on another "
            f"machine)") from None
    return True


def actors_that_fit(workers: int, gpus_per_worker: float, cpus_per_worker: float,
                    resources: dict[str, float]) -> int:
    """How many of the `workers` actors the cluster can hold at once; JobError when none fits.
    (Actors asked for beyond this would wait forever for resources, holding their shards.)"""
    fits = workers
    if gpus_per_worker > 0:
        gpus = resources.get("GPU", 0.0)
        if gpus < gpus_per_worker:
            raise JobError(f"--gpus-per-worker {gpus_per_worker}: the Ray cluster has {gpus:g} GPU(s); "
                           f"use --gpus-per-worker 0 for CPU workers or add GPU nodes")
        fits = min(fits, math.floor(gpus / gpus_per_worker + 1e-9))
    if cpus_per_worker > 0:
        cpus = resources.get("CPU", 0.0)
        if cpus < cpus_per_worker:
            raise JobError(f"the Ray cluster has {cpus:g} CPU(s); each worker needs {cpus_per_worker:g}")
        fits = min(fits, math.floor(cpus / cpus_per_worker + 1e-9))
    return fits


def run(job: JobSpec, shards: Sequence[Shard], workers: int, gpus_per_worker: float = 0.0,
        address: str | None = None, progress: Progress | None = None, *, cpus_per_worker: float = 1.0,
        threads: int | None = None, max_retries: int = MAX_RETRIES) -> JobSummary:
    """Run the shards not done yet on Ray actors; the parts land in `job.output`.

    `workers` actors (fewer when the cluster cannot hold them: logged), each `num_gpus=gpus_per_worker`,
    `num_cpus=cpus_per_worker`, spread over the nodes. `progress(rows, errors)` is called on this
    process as batches finish; when it raises (ErrorRateExceeded from --max-error-rate, Ctrl-C), no
    shard is started any more, the running ones stop before their next batch without writing a part,
    and the exception is raised again once the actors have stopped. Parts already written stay valid
    for --resume."""
    from offline.shards import shard_done

    if workers < 1:
        raise JobError(f"--workers {workers}: must be at least 1")
    if gpus_per_worker < 0:
        raise JobError(f"--gpus-per-worker {gpus_per_worker}: must be 0 or more")
    started = time.monotonic()
    books = _Books(job=job)
    todo = deque(s for s in shards if not shard_done(job, s))
    books.summary.shards_skipped = len(shards) - len(todo)
    if not todo:
        return books.summary
    ray = import_ray()
    connected = connect(ray, address)
    try:
        count = min(actors_that_fit(workers, gpus_per_worker, cpus_per_worker, ray.cluster_resources()), len(todo))
        if count < min(workers, len(todo)):
            logger.warning("the Ray cluster holds %d of the %d workers asked for (its resources: %s)",
                           count, workers, ray.cluster_resources())
        remote = ray.remote(ShardRunner).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                                 max_concurrency=2, max_restarts=0, scheduling_strategy="SPREAD")
        gpu_id = 0 if job.device.startswith("cuda") else None  # Ray's CUDA_VISIBLE_DEVICES: the actor sees its GPU as 0
        # job.workers sizes each handler's threads as cores // workers (per host): the actors per node
        nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0))
        actor_job = replace(job, workers=max(1, math.ceil(count / nodes)))
        spawn = lambda: _Slot(remote.remote(actor_job, gpu_id, threads))  # noqa: E731
        slots = [spawn() for _ in range(count)]
        try:
            _wait_loaded(ray, slots, job)
            _drive(ray, slots, todo, books, progress, spawn, max_retries)
        finally:
            _stop(ray, slots)
    finally:
        if connected:
            ray.shutdown()  # leaves a cluster we joined running; stops one we started
    if books.halted is not None:
        raise books.halted  # after the actors stopped: the CLI reports ErrorRateExceeded / Ctrl-C
    books.summary.seconds = time.monotonic() - started
    return books.summary


def _wait_loaded(ray: ModuleType, slots: list[_Slot], job: JobSpec) -> None:
    """Wait until every actor has loaded the handler; a handler that fails to load stops the job
    here with its error, rather than as "worker died" retries."""
    try:
        where = ray.get([s.actor.where.remote() for s in slots])
    except ray.exceptions.RayActorError as exc:
        raise JobError(f"{job.archive}: the handler failed to load on a Ray worker: {_tail(exc)}") from None
    nodes = {w["node"] for w in where}
    hosts = sorted({w["host"] for w in where})
    logger.info("%d Ray worker(s) loaded the handler on %d node(s) (hosts %s; pids %s)", len(where), len(nodes),
                ", ".join(hosts), ", ".join(str(w["pid"]) for w in where))


def _drive(ray: ModuleType, slots: list[_Slot], todo: deque[Shard], books: _Books, progress: Progress | None,
           spawn: Callable[[], _Slot], max_retries: int) -> None:
    """Hand out shards until none is left or running; retry a dead actor's shard on a new actor."""
    while True:
        for slot in slots:
            if slot.shard is None and todo and books.halted is None:
                slot.shard = todo.popleft()
                slot.ref = slot.actor.run.remote(slot.shard)
        busy = [s for s in slots if s.shard is not None]
        if not busy:
            return
        ready, _ = ray.wait([s.ref for s in busy], num_returns=1, timeout=POLL_S)
        for slot in busy:
            if slot.ref in ready:
                replacement = _collect(ray, slot, todo, books, progress, spawn, max_retries)
                if replacement is not None:
                    slots[slots.index(slot)] = replacement
        _poll(ray, [s for s in slots if s.shard is not None], books, progress)
        if books.halted is not None:
            for slot in slots:
                if slot.shard is not None:
                    slot.actor.halt.remote()


def _collect(ray: ModuleType, slot: _Slot, todo: deque[Shard], books: _Books, progress: Progress | None,
             spawn: Callable[[], _Slot], max_retries: int) -> _Slot | None:
    """Take a finished shard's result; returns a replacement slot when the actor died."""
    shard = slot.shard
    assert shard is not None
    try:
        result = ray.get(slot.ref)
    except ray.exceptions.RayActorError as exc:  # the actor died (killed, OOM, node lost): run it again
        tries = books.retries.get(shard.index, 0) + 1
        books.retries[shard.index] = tries
        if tries > max_retries:
            raise JobError(f"shard {shard.index} ({len(shard.inputs)} inputs from {shard.inputs[0].uri}): its "
                           f"worker died {tries} times, last: {_first_line(exc)}") from None
        logger.warning("a Ray worker died running shard %d (%s); running it again (%d/%d)",
                       shard.index, _first_line(exc), tries, max_retries)
        if books.job is not None:  # its killed attempt may have left a temporary part
            remove_partial(books.job, shard)
        todo.appendleft(shard)
        ray.kill(slot.actor, no_restart=True)
        return spawn()
    except ray.exceptions.RayTaskError as exc:
        raise JobError(f"shard {shard.index} failed on a Ray worker: {_first_line(exc.cause or exc)}") from None
    slot.shard, slot.ref, slot.poll = None, None, None
    if result is None:  # halted: no part, nothing to count (its rows are redone by --resume)
        return None
    index, rows, errors = result
    books.report(progress, index, rows, sum(errors.values()))
    books.summary.add(rows, errors)
    books.summary.shards_written += 1
    return None


def _poll(ray: ModuleType, busy: list[_Slot], books: _Books, progress: Progress | None) -> None:
    """Ask busy actors how far their shard got; show the new rows (answers come back next round)."""
    for slot in busy:
        if slot.poll is not None:
            ready, _ = ray.wait([slot.poll], timeout=0)
            if not ready:
                continue
            try:
                index, rows, errors = ray.get(slot.poll)
            except ray.exceptions.RayError:
                index = -1  # a dead actor: its shard's result says so
            if slot.shard is not None and index == slot.shard.index:
                books.report(progress, index, rows, errors)
        slot.poll = slot.actor.progress.remote()


def _stop(ray: ModuleType, slots: list[_Slot]) -> None:
    """Close each actor's handler (its decode processes), then end the actors."""
    closing = [s.actor.close.remote() for s in slots]
    try:
        ray.wait(closing, num_returns=len(closing), timeout=30)
    finally:
        for slot in slots:
            ray.kill(slot.actor, no_restart=True)


def _tail(exc: BaseException, lines: int = 6) -> str:
    """The last lines of a Ray error (where the cause's own message is)."""
    text = [line for line in str(exc).strip().splitlines() if line.strip()]
    return " | ".join(text[-lines:])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"

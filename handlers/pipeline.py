"""The in-worker pipeline: one TorchServe batch as overlapped micro-batches.

With `handler.pipeline.micro_batch: m` (> 0) `VisionHandler.handle` splits a batch of N requests into
micro-batches of m rows and runs the request sequence's stage functions (handlers/sequence.py, the
same ones the unpipelined path runs) as three stages on three threads, so that while
micro-batch k runs its forward, k+1 is being decoded and uploaded and k-1 is being post-processed.
The batch's rows are read, and its URL items fetched, first and all at once (as on the plain path:
fetching per micro-batch would add up one fetch timeout per micro-batch):

    producer thread     read + fetch(all rows), then preprocess.run(k+1)  [upload stream]  --queue(1)-->
    caller thread       forward(k)                                        [model's stream]  -->
    postprocess thread  postprocess(k-1)                                  [postprocess stream]

Contract (tests/unit/test_pipeline.py): per-item errors, response order and results are those of the
unpipelined path. Only the batch the model sees changes (m rows instead of N): a kernel whose
arithmetic depends on the batch size may round the last bits differently; the tests hold the
results to the unpipelined ones at the same micro-batch exactly and to the whole batch within 1e-5.

On a GPU each stage issues its work on its own CUDA stream and the stages are ordered by events
(upload -> forward -> postprocess), never by `torch.cuda.synchronize`: the forward stream waits on
the upload's event, the postprocess stream on the forward's; tensors handed across streams are
marked with `record_stream` so the caching allocator does not reuse them early. The preprocess
backends' pinned host buffers are reused across micro-batches (each backend waits for its previous
upload before overwriting them). On a CPU the same threads overlap the stages; `plan_threads` sizes
torch's intra-op pool and the decode threads so that together they fit the worker's CPU share.

Why not TorchServe's `ts.handler_utils.micro_batching.MicroBatching` (read in TorchServe 0.12.0):
its stage threads (`execute_call`) catch nothing, so an exception in preprocess, inference or
postprocess ends that thread and `handle` waits forever on the output queue: the worker hangs until
the frontend's response timeout kills it. It also reassembles outputs by position, with no notion of
an item failing inside a stage (our preprocess returns fewer rows than items, with per-item errors
that must travel beside the tensor), reads no CUDA streams, and keeps its queues across batches.
Here an exception fails its batch only (tested), per-item statuses and order are kept, and each
stage has its own stream on a GPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from .preprocess import Geometry
from .sequence import Outcome, Produced, RequestStages
from .stages import StageTimer

#: What the producer hands the consumer: a decoded micro-batch, the exception that stopped it, or
#: None after the last micro-batch.
_Handoff = queue.Queue[Produced | BaseException | None]

_QUEUE_POLL_S = 0.05  # how often a blocked stage checks whether the batch was abandoned


def plan_threads(share: int, micro_batch: int, decode_processes: int, threads: int = 0,
                 decode_threads: int = 0) -> tuple[int, int]:
    """(torch intra-op threads, decode threads) for a worker with `share` CPUs.

    Unpipelined, decode and forward take turns, so each may use the whole share. Pipelined, they run
    at the same time: decode processes take `decode_processes` CPUs and torch the rest; decode
    threads and torch split the share. `threads` / `decode_threads` (the user's
    handler.threads / handler.preprocess.decode_threads) win when set (> 0).
    """
    share = max(1, share)
    if micro_batch <= 0:
        torch_threads = threads or share
        return torch_threads, decode_threads or torch_threads
    if decode_processes > 0:
        torch_threads = threads or max(1, share - decode_processes)
        return torch_threads, decode_threads or max(1, share - torch_threads)
    torch_threads = threads or max(1, share // 2)
    return torch_threads, decode_threads or max(1, share - torch_threads)


class _Abandoned(Exception):
    """The batch failed in another stage; the producer stops early."""


class Pipeline:
    """Runs the request sequence's stages (handlers/sequence.py) over micro-batches on three threads
    (see the module docstring). One Pipeline per handler; `run` is called by one thread at a time
    (TorchServe's worker thread).
    """

    def __init__(self, micro_batch: int, device: torch.device, stages: RequestStages) -> None:
        self.micro_batch = micro_batch
        self.device = device
        self.stages = stages
        self._producer = ThreadPoolExecutor(1, thread_name_prefix="pipeline-produce")
        self._post = ThreadPoolExecutor(1, thread_name_prefix="pipeline-post")
        self._cuda = device.type == "cuda"
        self._upload_stream = torch.cuda.Stream(device) if self._cuda else None
        self._post_stream = torch.cuda.Stream(device) if self._cuda else None

    def close(self) -> None:
        self._producer.shutdown(wait=True)
        self._post.shutdown(wait=True)

    # -- one TorchServe batch --------------------------------------------------------------------

    def run(self, data: list[Any], timer: StageTimer) -> Outcome:
        """Every input row's result or error, as `RequestStages.run_once` computes them."""
        n = len(data)
        outcome = Outcome.empty(n)
        chunks = [(start, min(n, start + self.micro_batch)) for start in range(0, n, self.micro_batch)]
        handoff: _Handoff = queue.Queue(maxsize=1)
        abandoned = threading.Event()
        producing = self._producer.submit(self._produce, data, chunks, timer, handoff, abandoned)
        pending: list[tuple[Produced, Future[list[Any]] | None]] = []
        try:
            while True:
                item = self._take(handoff, producing)
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                pending.append((item, self._run_forward(item, timer)))
            for produced, post in pending:
                outcome.collect(produced, post.result() if post is not None else None)
        except BaseException:
            abandoned.set()
            raise
        finally:
            producing.exception()  # the producer has stopped before the next batch may use the backend
            for _, post in pending:
                if post is not None:
                    post.exception()
        return outcome

    # -- stages ----------------------------------------------------------------------------------

    def _produce(self, data: list[Any], chunks: list[tuple[int, int]], timer: StageTimer,
                 handoff: _Handoff, abandoned: threading.Event) -> None:
        try:
            # Every row is read first, so the batch's URL items download concurrently (as on the plain
            # path): fetching per micro-batch would add up one fetch timeout per micro-batch.
            items = self.stages.read(data, timer)
            with self._on(self._upload_stream):
                for start, stop in chunks:
                    if abandoned.is_set():
                        return
                    produced = self.stages.decode(items[start:stop], start, timer)
                    if self._cuda and produced.has_rows:
                        produced.ready = torch.cuda.Event()
                        produced.ready.record(self._upload_stream)
                    self._put(handoff, produced, abandoned)
            self._put(handoff, None, abandoned)
        except _Abandoned:
            return
        except BaseException as exc:  # handed to the caller, which raises it
            try:
                self._put(handoff, exc, abandoned)
            except _Abandoned:
                pass

    def _run_forward(self, produced: Produced, timer: StageTimer) -> Future[list[Any]] | None:
        if not produced.has_rows:
            return None
        assert produced.batch is not None and produced.batch.tensor is not None
        tensor = produced.batch.tensor
        forwarded = None
        if self._cuda:
            assert produced.ready is not None
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(produced.ready)
            tensor.record_stream(compute)  # allocated on the upload stream, read on this one
        with torch.inference_mode():
            outputs = self.stages.forward(tensor, timer)
        if self._cuda:
            forwarded = torch.cuda.Event()
            forwarded.record(compute)
            post_stream = self._post_stream
            assert post_stream is not None
            for t in _tensors(outputs):
                if t.is_cuda:
                    t.record_stream(post_stream)
        return self._post.submit(self._run_postprocess, outputs, produced.geometry(), forwarded, timer)

    def _run_postprocess(self, outputs: Any, geometry: list[Geometry], forwarded: torch.cuda.Event | None,
                         timer: StageTimer) -> list[Any]:
        with self._on(self._post_stream):
            if forwarded is not None:
                assert self._post_stream is not None
                self._post_stream.wait_event(forwarded)
            with torch.inference_mode():
                return self.stages.postprocess(outputs, geometry, timer)

    # -- plumbing --------------------------------------------------------------------------------

    @staticmethod
    def _take(handoff: _Handoff, producing: Future[None]) -> Produced | BaseException | None:
        while True:
            try:
                return handoff.get(timeout=_QUEUE_POLL_S)
            except queue.Empty:
                if producing.done() and handoff.empty():
                    # The producer ended without a last message: only if it was abandoned, which
                    # the caller did not do, or it died in a way _produce could not report.
                    exc = producing.exception()
                    raise RuntimeError("the pipeline's producer stopped early") from exc

    @staticmethod
    def _put(handoff: _Handoff, item: Produced | BaseException | None, abandoned: threading.Event) -> None:
        while True:
            if abandoned.is_set():
                raise _Abandoned
            try:
                handoff.put(item, timeout=_QUEUE_POLL_S)
                return
            except queue.Full:
                continue

    @staticmethod
    def _on(stream: torch.cuda.Stream | None) -> AbstractContextManager[object]:
        return torch.cuda.stream(stream) if stream is not None else nullcontext()


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a model output (tensor, tuple/list, dict, nesting of those)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)

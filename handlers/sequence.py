"""The request sequence, written once: the stage functions every batch goes through.

    read (rows -> bytes; URL items fetched together) -> decode (preprocess backend) -> forward
        -> postprocess (the task's hook) -> table (handler.table) -> collect (per-row result or error)
        -> respond (VisionHandler.handle)

`RequestStages` holds one function per stage. `run_once` runs them over a whole TorchServe batch;
`handlers.pipeline.Pipeline` runs the very same functions over micro-batches on three threads. Only
the scheduling differs between the two, so their answers can only differ where a kernel's rounding
depends on the batch size (tests/unit/test_pipeline.py holds that contract).
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch

from .errors import RequestError
from .fetch import fetch_all
from .inputs import UrlInput
from .preprocess import Batch, Geometry
from .stages import DECODE, FETCH, POSTPROCESS, READ, StageTimer

if TYPE_CHECKING:
    from .base import VisionHandler

logger = logging.getLogger(__name__)


@dataclass
class Produced:
    """A batch (or one micro-batch) after read and decode: its rows' errors so far, which row each
    encoded item came from, and the preprocessed batch."""

    owners: list[int]  # input index of each encoded item
    batch: Batch | None = None  # None when no item of the chunk reached the decoder
    ready: torch.cuda.Event | None = None  # after the upload, on a GPU pipeline
    fallbacks: int = 0
    read_errors: dict[int, RequestError] = field(default_factory=dict)

    @property
    def has_rows(self) -> bool:
        return self.batch is not None and bool(self.batch.rows)

    def geometry(self) -> list[Geometry]:
        """The geometry of each decoded row, in the order of the model's batch."""
        assert self.batch is not None
        geometry = [self.batch.geometry[r] for r in self.batch.rows]
        assert all(g is not None for g in geometry)  # a decoded row always has its geometry
        return cast("list[Geometry]", geometry)


@dataclass
class Outcome:
    """Per input row: its result or its error; and how many items went to a CPU fallback."""

    results: list[Any]
    errors: list[RequestError | None]
    fallbacks: int = 0

    @classmethod
    def empty(cls, n: int) -> Outcome:
        return cls([None] * n, [None] * n)

    def collect(self, produced: Produced, item_results: list[Any] | None) -> None:
        """Write one (micro-)batch's outcome into the rows: read errors, decode errors, then
        postprocess results (or their RequestErrors)."""
        for i, err in produced.read_errors.items():
            self.errors[i] = err
        self.fallbacks += produced.fallbacks
        batch = produced.batch
        if batch is None:
            return
        for k, error in enumerate(batch.errors):
            if error is not None:
                self.errors[produced.owners[k]] = error
        for r, result in zip(batch.rows, item_results or [], strict=True):
            if isinstance(result, RequestError):
                self.errors[produced.owners[r]] = result
            else:
                self.results[produced.owners[r]] = result


def split_read(items: list[bytes | RequestError], start: int = 0) -> tuple[Produced, list[bytes]]:
    """Read results of rows start.. (bytes or the row's RequestError) -> the rows' bookkeeping and
    the encoded items to decode, in row order."""
    produced = Produced(owners=[])
    encoded: list[bytes] = []
    for k, item in enumerate(items):
        if isinstance(item, RequestError):
            produced.read_errors[start + k] = item
        else:
            encoded.append(item)
            produced.owners.append(start + k)
    return produced, encoded


class RequestStages:
    """The stage functions of one handler, each written once (see the module docstring).

    They call the handler's hooks (`read_input`, `forward`, `postprocess`, `apply_table`) and its
    parts (preprocess backend, stage clock); one instance per handler, made by `initialize`.
    """

    def __init__(self, handler: VisionHandler) -> None:
        # A weak reference back: the handler owns its stages, and a cycle between them would outlive
        # the handler (initialize's gc.freeze never collects it), its thread pools included.
        self.handler = cast("VisionHandler", weakref.proxy(handler))
        self._fetch_pool: ThreadPoolExecutor | None = None

    def read(self, data: list[Any], timer: StageTimer) -> list[bytes | RequestError]:
        """Every row's bytes or error; URL items of the batch are downloaded concurrently."""
        h = self.handler
        items: list[bytes | UrlInput | RequestError] = []
        with timer.stage(READ):
            for i, row in enumerate(data):
                try:
                    items.append(h.read_input(row, i))
                except RequestError as err:
                    items.append(err.detach())
        urls = [(i, item.url) for i, item in enumerate(items) if isinstance(item, UrlInput)]
        if urls:
            started = time.perf_counter()
            if self._fetch_pool is None:
                self._fetch_pool = ThreadPoolExecutor(h.config.url.max_concurrency, thread_name_prefix="fetch")
            for (i, _), fetched in zip(urls, fetch_all([u for _, u in urls], h.config.url, self._fetch_pool),
                                       strict=True):
                items[i] = fetched
            timer.add(FETCH, time.perf_counter() - started)
        return cast("list[bytes | RequestError]", items)  # every UrlInput was replaced by its fetch

    def decode(self, items: list[bytes | RequestError], start: int, timer: StageTimer) -> Produced:
        """Rows start.. after read -> their preprocessed batch (on the model's device) and errors."""
        produced, encoded = split_read(items, start)
        if encoded:
            preprocessor = self.handler.preprocessor
            if preprocessor is None:
                raise RuntimeError("the handler is not initialized: no preprocess backend")
            with timer.stage(DECODE):
                before = preprocessor.fallback_items
                produced.batch = preprocessor.run(encoded)
                produced.fallbacks = preprocessor.fallback_items - before
        return produced

    def forward(self, tensor: torch.Tensor, timer: StageTimer) -> Any:
        """The model on a decoded batch (call under torch.inference_mode); ForwardTime from the clock."""
        h = self.handler
        with h.stage_clock.forward(timer, h.device):
            return h.forward(tensor)

    def postprocess(self, outputs: Any, geometry: list[Geometry], timer: StageTimer) -> list[Any]:
        """The task's results for the batch, then the table stage (handler.table) over them."""
        with timer.stage(POSTPROCESS):
            return self.handler.run_postprocess(outputs, geometry)

    def run_once(self, data: list[Any], timer: StageTimer) -> Outcome:
        """The whole batch through every stage once (the unpipelined path)."""
        outcome = Outcome.empty(len(data))
        produced = self.decode(self.read(data, timer), 0, timer)
        item_results = None
        if produced.has_rows:
            assert produced.batch is not None and produced.batch.tensor is not None
            with torch.inference_mode():
                outputs = self.forward(produced.batch.tensor, timer)
                item_results = self.postprocess(outputs, produced.geometry(), timer)
        outcome.collect(produced, item_results)
        return outcome

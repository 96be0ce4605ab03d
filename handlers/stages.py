"""Where a batch's time goes: per-stage timers, and the metrics and log line they become.

`VisionHandler.handle` opens one `StageTimer` per batch (`StageClock.begin`) and wraps each stage
in `timer.stage(NAME)`; at the end `StageClock.finish` turns it into a `StageReport`, which the
handler emits as TorchServe metrics (ms, like HandlerTime) and one debug log line.

    ReadTime         request rows -> encoded bytes (or URL items to fetch), every row of the batch
    FetchTime        downloading the batch's URL items (only batches with URLs)
    DecodeTime       the preprocess backend's run(): decode + resize + normalise, and on a GPU the
                     host->device copy and the GPU decode kernels it issues (= PreprocessTime)
    UploadTime       host->device copy on its own; not measured on the plain path (see below)
    ForwardTime      the backbone's forward: host wall on a CPU; on CUDA the device time between
                     two CUDA events recorded around it, read without a synchronize
    PostprocessTime  task postprocess (outputs -> per-item results), host wall
    DeviceIdleTime   the device's gap between batches (below)
    StageOverlap     percent of the stage time hidden by running stages concurrently

UploadTime: the cpu backend issues its pinned host->device copy inside `run()`, asynchronously, and
the GPU backends decode straight into device memory. Timing the copy on the device needs a CUDA event
recorded *before* the copy on the same stream, inside the backend; from outside `run()` the only
device-side measurement would span the CPU decode too. So on the plain path the copy's host cost (a few
microseconds to issue) is inside DecodeTime and its device time inside the next event span
(ForwardTime starts once the copy has finished, because the forward waits for it in-stream).
UploadTime is emitted only when a stage records it (a pipelined path that uploads on its own stream).

No `torch.cuda.synchronize` anywhere: on CUDA, `forward()` records a start and an end event on the
current stream; `finish()` reads every recorded pair whose end event has completed
(`event.query()`, which does not block) and reports the latest one. Postprocess normally copies
results to the host, so that is this batch's own forward; otherwise it is read at a later batch.

DeviceIdleTime: on CUDA, from the end of the previous batch's forward to the start of this batch's
forward on the device timeline (both events), i.e. everything the model's device did that was not
the model (GPU decode, copies) plus every gap in which it waited for the host or for requests. On a
CPU, the host wall time between the end of the previous `handle` and the start of this one (the time
the worker spent outside the handler: waiting for the frontend's next batch, IPC, response writes).

StageOverlap = max(0, 1 - wall / sum of the stages' host times): 0 when stages run one after the
other (the plain path: wall >= their sum), > 0 when a pipeline runs them concurrently (their sum then
exceeds the wall). Timers are thread-safe and add up repeated stages, so a pipeline that times each
micro-batch's stages on its own threads reports through the same object.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from ts.metrics.metric_cache_abstract import MetricCacheAbstract
    from typing_extensions import Self

logger = logging.getLogger(__name__)

READ = "ReadTime"
FETCH = "FetchTime"
DECODE = "DecodeTime"
UPLOAD = "UploadTime"
FORWARD = "ForwardTime"
POSTPROCESS = "PostprocessTime"
DEVICE_IDLE = "DeviceIdleTime"
OVERLAP = "StageOverlap"
#: The stages of a batch, in request order (what `tsgpu profile` ranks).
STAGES: tuple[str, ...] = (READ, FETCH, DECODE, UPLOAD, FORWARD, POSTPROCESS)
#: Older names kept for dashboards and deploy/prometheus/rules.yml.
ALIASES: dict[str, str] = {DECODE: "PreprocessTime"}

Clock = Callable[[], float]
_MAX_PENDING = 16  # device spans kept while waiting for their events; older ones are dropped


def overlap(stage_seconds: float, wall_seconds: float) -> float:
    """Fraction (0..1) of the stage time hidden by concurrency: 1 - wall / sum of stage times."""
    if stage_seconds <= 0 or wall_seconds <= 0:
        return 0.0
    return max(0.0, 1.0 - wall_seconds / stage_seconds)


class StageTimer:
    """One batch's host-clock time per stage. `stage()` may be used from several threads at once."""

    def __init__(self, clock: Clock = time.perf_counter, items: int = 0) -> None:
        self.clock = clock
        self.items = items
        self.started = clock()
        self.seconds: dict[str, float] = {}
        self.idle_seconds: float | None = None  # set by StageClock.begin on a CPU
        self._lock = threading.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - started)

    def add(self, name: str, seconds: float) -> None:
        """Add `seconds` to stage `name` (repeated stages, e.g. micro-batches, add up)."""
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)

    def elapsed(self) -> float:
        return self.clock() - self.started


class TimingEvent(Protocol):
    """What the stage clock uses of a `torch.cuda.Event(enable_timing=True)` (tests pass fakes)."""

    def record(self, stream: torch.cuda.Stream | None = None) -> None: ...

    def query(self) -> bool: ...

    def elapsed_time(self, end_event: Self) -> float: ...


@dataclass
class _DeviceSpan:
    """CUDA events around one batch's forward, and the previous forward's end event (for idle)."""

    start: TimingEvent
    end: TimingEvent
    previous_end: TimingEvent | None


@dataclass
class StageReport:
    """A finished batch: stage times in ms (only stages that ran), idle, overlap and wall."""

    items: int
    times_ms: dict[str, float] = field(default_factory=dict)
    wall_ms: float = 0.0
    idle_ms: float | None = None
    overlap: float = 0.0
    device_timed: bool = False

    def emit(self, metrics: MetricCacheAbstract) -> None:
        """Each stage time (plus its older alias) as `add_time(ms)`, idle as time, overlap as percent."""
        for name, ms in self.times_ms.items():
            metrics.add_time(name, ms, None, "ms")
            if name in ALIASES:
                metrics.add_time(ALIASES[name], ms, None, "ms")
        if self.idle_ms is not None:
            metrics.add_time(DEVICE_IDLE, self.idle_ms, None, "ms")
        metrics.add_percent(OVERLAP, round(self.overlap * 100, 2))

    def log_line(self) -> str:
        def fmt(ms: float | None) -> str:
            return "-" if ms is None else f"{ms:.2f}ms"

        parts = [f"{name[:-4].lower()}={fmt(self.times_ms.get(name))}" for name in STAGES]
        device = " (forward on the device timeline)" if self.device_timed else ""
        return (f"stages: items={self.items} {' '.join(parts)} idle={fmt(self.idle_ms)} "
                f"overlap={self.overlap * 100:.0f}% wall={fmt(self.wall_ms)}{device}")


def _cuda_event() -> TimingEvent:
    return torch.cuda.Event(enable_timing=True)


class StageClock:
    """Lives as long as the handler: hands out per-batch timers and keeps what spans batches
    (the previous batch's end for DeviceIdleTime, CUDA events not yet complete)."""

    def __init__(self, clock: Clock = time.perf_counter, event_factory: Callable[[], TimingEvent] = _cuda_event) -> None:
        self.clock = clock
        self._event_factory = event_factory
        self._last_end: float | None = None
        self._pending: deque[_DeviceSpan] = deque(maxlen=_MAX_PENDING)
        self._previous_end: TimingEvent | None = None

    def begin(self, items: int = 0) -> StageTimer:
        timer = StageTimer(self.clock, items)
        if self._last_end is not None:
            timer.idle_seconds = max(0.0, timer.started - self._last_end)
        return timer

    @contextmanager
    def forward(self, timer: StageTimer, device: torch.device, stream: torch.cuda.Stream | None = None,
                ) -> Iterator[None]:
        """Time the backbone's forward: host clock always (for InferenceTime and overlap); on CUDA
        also events on `stream` (default: the device's current stream) for the device time."""
        events = self._record_start(device, stream)
        with timer.stage(FORWARD):
            yield
        if events is not None:
            self._record_end(events, device, stream)

    def finish(self, timer: StageTimer) -> StageReport:
        """The batch's report. Reads completed CUDA events (never waits for one)."""
        wall = timer.elapsed()
        report = StageReport(items=timer.items, wall_ms=_ms(wall))
        report.overlap = overlap(sum(timer.seconds.values()), wall)
        report.times_ms = {name: _ms(timer.seconds[name]) for name in STAGES if name in timer.seconds}
        report.idle_ms = None if timer.idle_seconds is None else _ms(timer.idle_seconds)
        device = self._read_completed()
        if device is not None:
            forward_ms, idle_ms = device
            report.device_timed = True
            if FORWARD in report.times_ms:
                report.times_ms[FORWARD] = round(forward_ms, 3)
            report.idle_ms = None if idle_ms is None else round(max(0.0, idle_ms), 3)
        elif self._pending or self._previous_end is not None:
            report.idle_ms = None  # a CUDA worker: the host gap is not the device's idle time
        self._last_end = self.clock()
        return report

    # -- CUDA events -----------------------------------------------------------------------------

    def _record_start(self, device: torch.device, stream: torch.cuda.Stream | None,
                      ) -> tuple[TimingEvent, TimingEvent] | None:
        if device.type != "cuda":
            return None
        try:
            start, end = self._event_factory(), self._event_factory()
            start.record(stream if stream is not None else torch.cuda.current_stream(device))
            return start, end
        except Exception:  # timing must never fail a request
            logger.debug("could not record a CUDA start event", exc_info=True)
            return None

    def _record_end(self, events: tuple[TimingEvent, TimingEvent], device: torch.device,
                    stream: torch.cuda.Stream | None) -> None:
        start, end = events
        try:
            end.record(stream if stream is not None else torch.cuda.current_stream(device))
        except Exception:
            logger.debug("could not record a CUDA end event", exc_info=True)
            return
        self._pending.append(_DeviceSpan(start, end, self._previous_end))
        self._previous_end = end

    def _read_completed(self) -> tuple[float, float | None] | None:
        """(forward ms, idle ms or None) of the latest span whose end event completed, or None."""
        latest = None
        while self._pending and self._pending[0].end.query():
            span = self._pending.popleft()
            idle = None
            if span.previous_end is not None and span.previous_end.query():
                # Both on the device timeline; on one stream the previous end completed first.
                idle = span.previous_end.elapsed_time(span.start)
            latest = (span.start.elapsed_time(span.end), idle)
        return latest


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)

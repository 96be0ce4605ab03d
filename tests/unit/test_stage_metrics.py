"""Per-stage metrics: the stage timer on a fake clock, lazily read device events, and what
`handle()` emits through FakeContext's metrics (names, units, once per batch, never failing a request)."""

from __future__ import annotations

import logging

import pytest
import torch

from archiver_scripts import samples
from handlers.image_classifier import ImageClassifier
from handlers.stages import (
    DECODE,
    DEVICE_IDLE,
    FORWARD,
    OVERLAP,
    POSTPROCESS,
    READ,
    STAGES,
    StageClock,
    StageTimer,
    overlap,
)
from handlers.testing import FakeContext, FakeMetrics, raw_request, run_handler


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeEvent:
    """A CUDA event on a fake device timeline: `record` stamps the timeline's current time."""

    def __init__(self, timeline: dict) -> None:
        self.timeline = timeline
        self.at: float | None = None

    def record(self, stream=None) -> None:
        self.at = self.timeline["t"]

    def query(self) -> bool:
        return self.at is not None and self.timeline["done"] >= self.at

    def elapsed_time(self, other: "FakeEvent") -> float:
        assert self.query() and other.query(), "elapsed_time on an event that has not completed"
        return (other.at - self.at) * 1000.0


# -- the timer on a fake clock -------------------------------------------------------------------


def test_stage_times_add_up_per_stage():
    clock = FakeClock()
    timer = StageTimer(clock, items=3)
    with timer.stage(READ):
        clock.advance(0.002)
    with timer.stage(DECODE):
        clock.advance(0.010)
    with timer.stage(DECODE):  # a second micro-batch of the same stage adds up
        clock.advance(0.005)
    assert timer.seconds == {READ: pytest.approx(0.002), DECODE: pytest.approx(0.015)}
    assert timer.elapsed() == pytest.approx(0.017)


def test_stage_is_timed_even_when_it_raises():
    clock = FakeClock()
    timer = StageTimer(clock)
    with pytest.raises(ValueError):
        with timer.stage(FORWARD):
            clock.advance(0.004)
            raise ValueError("model failed")
    assert timer.seconds[FORWARD] == pytest.approx(0.004)


def test_overlap_is_zero_when_serial_and_positive_when_concurrent():
    assert overlap(0.010, 0.012) == 0.0  # serial: wall >= sum of stages
    assert overlap(0.0, 0.0) == 0.0
    assert overlap(0.020, 0.010) == pytest.approx(0.5)  # two 10 ms stages fully overlapped


def test_cpu_report_idle_between_batches_and_overlap():
    clock = FakeClock()
    stages = StageClock(clock)
    device = torch.device("cpu")

    first = stages.begin(2)
    with first.stage(DECODE):
        clock.advance(0.010)
    with stages.forward(first, device):
        clock.advance(0.020)
    with first.stage(POSTPROCESS):
        clock.advance(0.001)
    clock.advance(0.002)  # responding: in the wall, in no stage
    report = stages.finish(first)
    assert report.times_ms == {DECODE: 10.0, FORWARD: 20.0, POSTPROCESS: 1.0}
    assert report.wall_ms == pytest.approx(33.0)
    assert report.idle_ms is None  # nothing before the first batch
    assert report.overlap == 0.0

    clock.advance(0.050)  # the worker waits for the next batch
    second = stages.begin(1)
    with stages.forward(second, device):
        clock.advance(0.005)
    report = stages.finish(second)
    assert report.idle_ms == pytest.approx(50.0)
    assert not report.device_timed


def test_report_emits_names_units_alias_and_log_line():
    clock = FakeClock()
    stages = StageClock(clock)
    timer = stages.begin(4)
    with timer.stage(READ):
        clock.advance(0.001)
    with timer.stage(DECODE):
        clock.advance(0.003)
    report = stages.finish(timer)
    metrics = FakeMetrics()
    report.emit(metrics)
    emitted = [(c.kind, c.name, c.unit) for c in metrics.calls]
    assert emitted == [("time", READ, "ms"), ("time", DECODE, "ms"), ("time", "PreprocessTime", "ms"),
                       ("percent", OVERLAP, "percent")]
    assert metrics.values("PreprocessTime") == metrics.values(DECODE) == [3.0]
    line = report.log_line()
    assert "items=4" in line and "read=1.00ms" in line and "decode=3.00ms" in line and "forward=-" in line


# -- CUDA events, faked: read lazily, never waited for -------------------------------------------


def test_device_forward_and_idle_come_from_events_read_once_complete():
    clock = FakeClock()
    timeline = {"t": 0.0, "done": -1.0}
    stages = StageClock(clock, event_factory=lambda: FakeEvent(timeline))
    cuda = torch.device("cuda", 0)

    first = stages.begin(1)
    timeline["t"] = 1.000
    with stages.forward(first, cuda, stream=object()):
        clock.advance(0.0002)  # host: the launch only
        timeline["t"] = 1.030  # device: the kernels end 30 ms later
    report = stages.finish(first)  # the device has not got there yet: nothing is read, nothing waits
    assert FORWARD in report.times_ms and report.times_ms[FORWARD] == pytest.approx(0.2)
    assert not report.device_timed and report.idle_ms is None

    timeline["done"] = 1.030  # batch 1's forward completes
    second = stages.begin(1)
    timeline["t"] = 1.045  # batch 2's forward starts 15 ms after batch 1's ended
    with stages.forward(second, cuda, stream=object()):
        timeline["t"] = 1.065
    report = stages.finish(second)  # reads batch 1's span (the latest complete one)
    assert report.device_timed
    assert report.times_ms[FORWARD] == pytest.approx(30.0)
    assert report.idle_ms is None  # batch 1 had no previous forward

    timeline["done"] = 1.065
    third = stages.begin(0)  # an all-bad batch: no forward of its own
    report = stages.finish(third)
    assert FORWARD not in report.times_ms
    assert report.idle_ms == pytest.approx(15.0)  # batch 2's idle, read once its events completed


# -- through handle() ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg():
    return samples.encode(samples.mosaic(320, 240))


def make_handler(model_dir, batch_size=4):
    ctx = FakeContext(model_dir, serialized_file="model.pt", handler_config={"classifier": {"top_k": 2}},
                      batch_size=batch_size)
    handler = ImageClassifier()
    handler.initialize(ctx)
    ctx.metrics.calls.clear()  # initialize reports nothing per batch; start clean anyway
    return handler, ctx


def batch_calls(ctx, requests, handler):
    before = len(ctx.metrics.calls)
    responses = run_handler(handler, ctx, requests)
    return responses, ctx.metrics.calls[before:]


def test_handle_emits_each_stage_metric_once_per_batch(model_dir, jpeg, caplog):
    handler, ctx = make_handler(model_dir)
    with caplog.at_level(logging.DEBUG, logger="handlers.base"):
        _, first = batch_calls(ctx, [raw_request(jpeg), raw_request(b"not an image"), raw_request(jpeg)], handler)
        responses, second = batch_calls(ctx, [raw_request(jpeg)], handler)
    assert [r.status for r in responses] == [200]
    expected_times = {READ, DECODE, "PreprocessTime", FORWARD, POSTPROCESS, "InferenceTime", "HandlerTime"}
    for calls, idle in ((first, False), (second, True)):
        times = [c.name for c in calls if c.kind == "time"]
        assert sorted(times) == sorted(expected_times | ({DEVICE_IDLE} if idle else set()))  # each exactly once
        assert all(c.unit == "ms" and c.value >= 0 for c in calls if c.kind == "time")
        assert [(c.name, c.unit) for c in calls if c.kind == "percent"] == [(OVERLAP, "percent")]
        assert "FetchTime" not in times  # no URL items
    counters = {c.name: c.value for c in first if c.kind == "counter"}
    assert counters == {"RequestErrors": 1, "ImagesProcessed": 2}
    by_name = {c.name: c.value for c in first}
    assert by_name["PreprocessTime"] == by_name[DECODE]
    assert by_name["InferenceTime"] == pytest.approx(by_name[FORWARD] + by_name[POSTPROCESS], abs=0.002)
    assert by_name["HandlerTime"] >= by_name[READ] + by_name[DECODE] + by_name[FORWARD] - 0.003
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stages:")]
    assert len(lines) == 2  # one debug line per batch
    assert all(f"{name[:-4].lower()}=" in lines[0] for name in STAGES)
    assert "items=3" in lines[0] and "overlap=0%" in lines[0]


class ExplodingMetrics(FakeMetrics):
    def add_time(self, *args, **kwargs):
        raise RuntimeError("metrics backend down")

    def add_percent(self, *args, **kwargs):
        raise RuntimeError("metrics backend down")


def test_metric_reporting_failures_never_fail_a_request(model_dir, jpeg, monkeypatch):
    handler, ctx = make_handler(model_dir)
    ctx.metrics = ExplodingMetrics()
    responses = run_handler(handler, ctx, [raw_request(jpeg), raw_request(b"")])
    assert [r.status for r in responses] == [200, 400]
    assert responses[0].body["predictions"]

    def broken_finish(timer):
        raise RuntimeError("stage clock bug")

    monkeypatch.setattr(handler.stage_clock, "finish", broken_finish)
    ctx.metrics = FakeMetrics()
    responses = run_handler(handler, ctx, [raw_request(jpeg)])
    assert [r.status for r in responses] == [200]
    # a broken stage report costs only the stage metrics: the older ones still go out
    assert {c.name for c in ctx.metrics.calls} == {"InferenceTime", "ImagesProcessed", "HandlerTime"}


@pytest.mark.gpu
def test_cuda_forward_is_timed_by_events_without_synchronize(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize in the hot path")

    device = torch.device("cuda", 0)
    x = torch.randn(32, 512, 512, device=device)
    stages = StageClock()
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    reports = []
    for _ in range(3):
        timer = stages.begin(1)
        with stages.forward(timer, device):
            y = x @ x
        y.sum().item()  # what a postprocess does: results to the host (the stream, not the device, waits)
        reports.append(stages.finish(timer))
    assert all(r.device_timed for r in reports)
    assert all(r.times_ms[FORWARD] > 0 for r in reports)
    assert reports[0].idle_ms is None and reports[-1].idle_ms is not None and reports[-1].idle_ms >= 0

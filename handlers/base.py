"""The handler base class: one fixed request sequence, small override points.

    rows --read_input--> bytes --preprocessor.run--> tensor --forward--> outputs --postprocess--> JSON

`VisionHandler.handle` owns that sequence and the per-item error isolation: a RequestError raised
for one item (bad bytes, wrong JSON key, too many pixels...) becomes that item's 4xx JSON body
`{"code", "type", "message"}` through `context.set_response_status(code, idx=i)`, while the other
items of the batch are answered normally. Task handlers override `postprocess` (and, if needed,
`forward`, `read_input` or `load_assets`); they never override `handle`.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import io
import json
import logging
import sys
import time
from collections.abc import Mapping
from http import HTTPStatus
from pathlib import Path
from types import FrameType, MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from .backbone import Backbone, load_backbone, warm_up
from .config import HandlerConfig, load_handler_config, with_task_defaults
from .errors import ConfigError, ModelLoadError, RequestError
from .inputs import UrlInput, parameter_content_types, read_image_bytes
from .pipeline import Pipeline, plan_threads
from .preprocess import Geometry, Preprocessor, PreprocessSpec, create_preprocessor
from .runtime import HeapReport, MemoryTrimmer, apply_torch_threads, cpu_threads_per_worker, select_device
from .sequence import RequestStages
from .stages import FORWARD, POSTPROCESS, StageClock, StageTimer
from .tables import TableSpec, TableStage, load_table_stage


def _import_torchserve_base() -> type:
    # TorchServe's base_handler module sets torch's float32 matmul precision process-wide at import
    # on Ampere+ GPUs; put back whatever the process had, so importing us changes nothing.
    precision = torch.get_float32_matmul_precision()
    from ts.torch_handler.base_handler import BaseHandler

    torch.set_float32_matmul_precision(precision)
    return BaseHandler


if TYPE_CHECKING:
    from ts.context import Context
    from ts.torch_handler.base_handler import BaseHandler

    from .video.serve import VideoServer
    from .video.summary import VideoSummary
else:
    BaseHandler = _import_torchserve_base()
logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"


class VisionHandler(BaseHandler):
    """Base class for our vision handlers. Subclasses implement `postprocess`."""

    #: The `handler:` section this handler validates: HandlerConfig, or a subclass adding a section.
    config_class: type[HandlerConfig] = HandlerConfig
    #: The task's name (`tsgpu archive --task`; handlers.tasks registers the built-in ones).
    task: str = ""
    #: Defaults under the archive's `handler:` section (the user's values win, nested keys merged).
    task_defaults: Mapping[str, Any] = MappingProxyType({})
    #: How results become rows of the optional result table (handler.table); None = no table.
    table: TableSpec | None = None
    #: Ask the preprocess backend for each item's full-resolution decoded image too (Batch.images,
    #: PreprocessSpec.keep_images): a cascade crops its second stage from them (tasks/cascade.py).
    keep_images: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.config: HandlerConfig = self.config_class()
        self.backbone: Backbone | None = None
        self.preprocessor: Preprocessor | None = None
        self.model_dir: Path = Path(".")
        self.batch_size = 1
        self._trimmer = MemoryTrimmer(0)
        self._heap_report = HeapReport()
        self.stage_clock = StageClock()  # per-stage metrics (handlers/stages.py)
        self._sequence = RequestStages(self)  # the stage functions (handlers/sequence.py)
        self._pipeline: Pipeline | None = None  # handler.pipeline.micro_batch > 0 (handlers/pipeline.py)
        self._video: VideoServer | None = None  # handler.media: video (handlers/video/serve.py)

    # -- lifecycle -------------------------------------------------------------------------------

    def initialize(self, context: Context) -> None:
        """Load config, pick the device, load + warm the model. Raises with a clear message on misconfiguration."""
        started = time.perf_counter()
        self._read_context(context)
        self.config = self.load_config(self.model_yaml_config)
        self.device = select_device(context.system_properties.get("gpu_id"))
        self.map_location = self.device.type
        threads, decode_threads = self._size_threads()
        self._load_model()
        spec = self._make_preprocessor(decode_threads)
        self._make_pipeline()
        self.load_assets(self.model_dir)
        self._table = load_table_stage(self.config.table, self.model_dir, self.device.type, own=self.table)
        self._trimmer = MemoryTrimmer(self.config.malloc_trim_seconds)
        if self.config.model.warmup:
            self._warm_up(spec)
        self._make_video(spec)
        _freeze_what_is_loaded()
        self.initialized = True
        self._log_ready(threads, decode_threads, time.perf_counter() - started)

    def _read_context(self, context: Context) -> None:
        self.context = context
        self.manifest = context.manifest or {}
        properties = context.system_properties
        self.model_dir = Path(properties.get("model_dir") or ".")
        self.batch_size = int(properties.get("batch_size") or 1)
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}

    def _size_threads(self) -> tuple[int, int]:
        """(torch threads, decode threads) for this worker's CPU share; torch's are applied."""
        pipeline = self.config.pipeline
        threads, decode_threads = plan_threads(
            cpu_threads_per_worker(0, self.model_yaml_config), pipeline.micro_batch, pipeline.decode_processes,
            self.config.threads, self.config.preprocess.decode_threads,
        )
        apply_torch_threads(threads)
        return threads, decode_threads

    def _load_model(self) -> None:
        self.backbone = load_backbone(self.model_dir, self._model_file(), self.config.model, self.device)
        self.model = self.backbone.module
        max_batch = self.backbone.max_batch
        if max_batch is not None and self.batch_size > max_batch:
            raise ModelLoadError(
                f"TorchServe batchSize {self.batch_size} exceeds the artifact's max batch {max_batch}: "
                f"recompile with tsgpu compile --batch 1,{self.batch_size},{self.batch_size} or lower batchSize"
            )

    def _make_preprocessor(self, decode_threads: int) -> PreprocessSpec:
        """The preprocess backend, making what the model takes (size checked, dtype followed)."""
        assert self.backbone is not None
        spec = PreprocessSpec.from_config(
            self.config.preprocess, self.device, channels_last=self.backbone.channels_last,
            max_batch=self.batch_size,
        )
        self._check_input_size(spec)
        if spec.dtype != self.backbone.dtype:
            logger.info("preprocess dtype %s follows the model's %s", spec.dtype, self.backbone.dtype)
            spec = dataclasses.replace(spec, dtype=self.backbone.dtype)
        if self.keep_images:
            spec = dataclasses.replace(spec, keep_images=True)
        pipeline = self.config.pipeline
        self.preprocessor = create_preprocessor(
            self.config.preprocess.backend, spec, decode_threads, pipeline.decode_processes,
            pipeline.decode_timeout_s,
        )
        return spec

    def _make_pipeline(self) -> None:
        """The micro-batch pipeline (handler.pipeline.micro_batch > 0), warning when the artifact's
        smallest batch would pad every micro-batch."""
        assert self.backbone is not None
        micro_batch, least = self.config.pipeline.micro_batch, self.backbone.min_batch
        if micro_batch <= 0:
            return
        if least is not None and micro_batch < least:
            logger.warning(
                "handler.pipeline.micro_batch %d is smaller than the %d rows %s was compiled for: "
                "every micro-batch is padded to %d rows (%.1fx the model work); recompile with a "
                "batch range (tsgpu compile --batch 1,%d,%d) or set micro_batch: %d",
                micro_batch, least, self.backbone.describe(), least, least / micro_batch,
                micro_batch, self.batch_size, least,
            )
        self._pipeline = Pipeline(micro_batch, self.device, self._sequence)

    def _make_video(self, spec: PreprocessSpec) -> None:
        """The video request path (handler.media: video): checked against the batch size and the
        artifact, and warmed up on a synthetic frame batch."""
        if self.config.media != "video":
            return
        from .video.serve import VideoServer

        assert self.backbone is not None
        video = VideoServer(self, spec)
        video.check(self.batch_size, self.backbone.max_batch)
        video.size_threads(self.config.threads, self.model_yaml_config)
        if self.config.model.warmup:
            video.warm_up()
        self._video = video

    def _log_ready(self, threads: int, decode_threads: int, seconds: float) -> None:
        assert self.backbone is not None and self.preprocessor is not None
        pipeline = self.config.pipeline
        logger.info(
            "ready: %s, preprocess=%s (%d decode threads, %d decode processes), torch threads=%d, "
            "batch size %d, micro-batch %s, handlers from %s, %.1fs",
            self.backbone.describe(), self.preprocessor.name, decode_threads, pipeline.decode_processes,
            threads, self.batch_size, pipeline.micro_batch or "off", Path(__file__).parent, seconds,
        )

    def _check_input_size(self, spec: PreprocessSpec) -> None:
        """A compiled artifact records its input [3, H, W]: refuse a preprocess that makes another."""
        info = self.backbone.info if self.backbone is not None else None
        shape = (info.meta.get("input", {}).get("shape") if info is not None else None) or []
        if info is not None and len(shape) == 3 and tuple(shape[1:]) != tuple(spec.size):
            h, w = shape[1:]
            raise ModelLoadError(
                f"{info.file} was compiled for {h}x{w} inputs (height x width) but the preprocess "
                f"makes {spec.size[0]}x{spec.size[1]}: set handler.preprocess.input_size: [{h}, {w}] "
                f"(or crop_size: {h} for a square center crop), or recompile with --input-size "
                f"{spec.size[0]},{spec.size[1]}"
            )

    def load_config(self, model_yaml_config: dict[str, Any]) -> HandlerConfig:
        section = (model_yaml_config or {}).get("handler")
        if section is None or isinstance(section, dict):  # anything else: load_handler_config says why
            model_yaml_config = {**(model_yaml_config or {}),
                                 "handler": with_task_defaults(section, self.task_defaults)}
        return load_handler_config(model_yaml_config, self.config_class)

    def load_assets(self, model_dir: Path) -> None:
        """Hook: load task files from the archive (labels, thresholds...). Default: nothing."""

    def _model_file(self) -> str:
        if self.config.model.file:
            return self.config.model.file
        serialized = self.manifest.get("model", {}).get("serializedFile")
        if not serialized:
            raise ConfigError(
                "no model file: the archive has no serializedFile and handler.model.file is unset"
            )
        return serialized

    def _warm_up(self, spec: PreprocessSpec) -> None:
        assert self.backbone is not None and self.preprocessor is not None
        # One tiny real image through the whole path first: decoders load their plugins and any
        # mismatch between preprocess output and model input fails the load, not a request.
        probe = self.preprocessor.run([_probe_jpeg()])
        geometry = probe.geometry[0]
        if probe.tensor is None or geometry is None:
            raise RuntimeError(f"warm-up: the preprocess backend failed on a valid JPEG: {probe.errors[0]}")
        with torch.inference_mode():
            self.run_postprocess(self.forward(probe.tensor), [geometry])
        # The pipeline's micro-batches are batch sizes the model sees too (a compiled artifact may
        # specialise or pad per size): warm them up before the first request does.
        sizes = sorted({1, self.batch_size, min(self.config.pipeline.micro_batch or 1, self.batch_size)})
        seconds = warm_up(self.backbone, sizes, spec.size)
        logger.info("warm-up over batch sizes %s took %.2fs", sizes, seconds)

    # -- the request sequence (do not override) --------------------------------------------------

    def handle(self, data: list[Any], context: Context) -> list[str]:
        self.context = context
        if self._video is not None:  # handler.media: video: each row is a clip (handlers/video/serve.py)
            return self._video.handle(data, context)
        timer = self.stage_clock.begin(len(data))
        if self._pipeline is not None and len(data) > self._pipeline.micro_batch:
            outcome = self._pipeline.run(data, timer)
        else:
            outcome = self._sequence.run_once(data, timer)
        if _called_by_envelope():
            responses = self._respond_enveloped(outcome.results, outcome.errors, context)
        else:
            responses = [self._respond(i, result, error, context)
                         for i, (result, error) in enumerate(zip(outcome.results, outcome.errors, strict=True))]
        self._report(context, timer, outcome.errors, outcome.fallbacks)
        self._trimmer.maybe_trim()
        self._heap_report.maybe_report()
        return responses

    def run_postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        """The postprocess stage: the task's `postprocess`, then the table stage over its results.

        A subclass written before the table stage joined the sequence may still call
        `self.apply_table` at the end of its postprocess: the table then runs once, there."""
        self._table_applied = False
        results = self.postprocess(outputs, geometry)
        if self._table_applied:
            if not self._warned_table_call:
                self._warned_table_call = True
                logger.warning("%s.postprocess calls apply_table: the table stage now runs after postprocess "
                               "by itself; remove the call", type(self).__name__)
            return results
        return self.apply_table(results)

    # -- override points -------------------------------------------------------------------------

    def read_input(self, row: Any, idx: int) -> bytes | UrlInput:
        """One request row -> encoded image bytes, or a UrlInput to fetch (raise RequestError for a bad row)."""
        return read_image_bytes(row, self.config.inputs, parameter_content_types(self.context, idx), self.config.url)

    def forward(self, x: torch.Tensor) -> Any:
        """Run the backbone on a preprocessed batch (called under torch.inference_mode)."""
        assert self.backbone is not None
        return self.backbone(x)

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        """Model outputs for the batch -> one JSON-serialisable result (or RequestError) per row."""
        raise NotImplementedError(f"{type(self).__name__} must implement postprocess(outputs, geometry)")

    def video_summary(self) -> VideoSummary:
        """Hook: a fresh per-clip summary accumulator for one video request (handlers/video/summary.py).
        Default: an empty summary `{}`; each built-in task returns its own."""
        from .video.summary import NoSummary

        return NoSummary()

    #: The result-table stage (handler.table, handlers/tables.py); None while it is off.
    _table: TableStage | None = None

    _table_applied = False
    _warned_table_call = False

    def apply_table(self, results: list[Any]) -> list[Any]:
        """The table stage on a batch's results: it runs after `postprocess` as part of the sequence.

        Returns `results` unchanged when handler.table is disabled; RequestError items pass through.
        """
        self._table_applied = True
        if self._table is None:
            return results
        return self._table.apply(results, self.postprocess_table)

    def postprocess_table(self, df: Any) -> Any:
        """Hook: the batch's rows after the rules file (pandas or cuDF DataFrame, pandas API) -> rows.

        Columns: item (the result's position), class_id, label, score (+ x1, y1, x2, y2 for
        detections). Keep `item`; added columns appear in each entry. Default: df unchanged.
        """
        return df

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _respond(idx: int, result: Any, error: RequestError | None, context: Context) -> str:
        if error is not None:
            context.set_response_status(error.code, HTTPStatus(error.code).phrase, idx)
            body = error.to_response()
        else:
            body = result
        context.set_response_content_type(idx, JSON_CONTENT_TYPE)
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False)

    @staticmethod
    def _respond_enveloped(results: list[Any], errors: list[RequestError | None], context: Context) -> list[Any]:
        """Under a TorchServe request envelope (service_envelope=kserve / kservev2) the items are the
        instances of ONE request, and the envelope wraps the list we return into its one response
        (`{"predictions": [...]}`) and serialises it. So: plain objects (no JSON text, which would be
        encoded twice), errors kept per instance in their own `{"code", "type", "message"}` body, and
        the request's HTTP status set only when every instance failed with the same code."""
        bodies = [e.to_response() if e is not None else r for r, e in zip(results, errors, strict=True)]
        codes = {e.code for e in errors if e is not None}
        if errors and all(e is not None for e in errors) and len(codes) == 1:
            code = codes.pop()
            context.set_response_status(code, HTTPStatus(code).phrase, 0)
        return bodies

    def _report(
        self, context: Context, timer: StageTimer, errors: list[RequestError | None], fallbacks: int = 0,
    ) -> None:
        """Stage times (handlers/stages.py), counters and HandlerTime; one debug line per batch."""
        metrics = getattr(context, "metrics", None)
        try:  # metrics and logging must never fail a request
            report = self.stage_clock.finish(timer)
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(report.log_line())
            if metrics is not None:
                report.emit(metrics)
        except Exception:
            logger.debug("stage metrics failed", exc_info=True)
        if metrics is None:
            return
        try:  # the older metrics on their own, so a failure above cannot cost the dashboards them
            if FORWARD in timer.seconds:  # host wall of forward + postprocess, as before the split
                inference = timer.seconds[FORWARD] + timer.seconds.get(POSTPROCESS, 0.0)
                metrics.add_time("InferenceTime", round(inference * 1000, 3), None, "ms")
            failed = [e for e in errors if e is not None]
            if failed:
                metrics.add_counter("RequestErrors", len(failed))
            if fallbacks:
                metrics.add_counter("PreprocessFallbacks", fallbacks)
            metrics.add_counter("ImagesProcessed", len(errors) - len(failed))
            metrics.add_time("HandlerTime", round(timer.elapsed() * 1000, 3), None, "ms")
        except Exception:
            logger.debug("metrics reporting failed", exc_info=True)


def _freeze_what_is_loaded() -> None:
    """Move everything loaded so far (torch, the model, TorchServe) out of the collector's
    generations: full collections then scan only what requests create, so they stay cheap and run
    often enough that no request-sized cycle waits long."""
    gc.collect()
    gc.freeze()


def _called_by_envelope(max_depth: int = 6) -> bool:
    """Whether `handle` was called by TorchServe's KServe request envelope (service_envelope=kserve
    or kservev2), which turns the instances of ONE request into the items of a batch. Nothing in
    the context says so, so the callers' frames are asked (a few levels: a subclass or a
    module-level `handle` may sit between the envelope and us)."""
    envelopes = _kserve_envelopes()
    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return False
        if isinstance(frame.f_locals.get("self"), envelopes):
            return True
    return False


@functools.lru_cache(maxsize=1)
def _kserve_envelopes() -> tuple[type, ...]:
    """TorchServe's KServe envelope classes, imported once (on the first batch, not at import)."""
    try:
        from ts.torch_handler.request_envelope.kserve import KServeEnvelope
        from ts.torch_handler.request_envelope.kservev2 import KServev2Envelope
    except ImportError:  # pragma: no cover - torchserve is a dependency
        return ()
    return (KServeEnvelope, KServev2Envelope)


def _probe_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 80, 40)).save(buf, "JPEG", quality=90)
    return buf.getvalue()

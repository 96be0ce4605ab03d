"""The request path of video archives (`handler.media: video`): one clip in, per-frame results and a
per-clip summary out, by the archive's own task.

    row --read--> clip bytes (+ the request's "sampling")      raw body, multipart, {"data": b64},
                                                               {"url": ...} through handlers.fetch
        --open_video--> probed clip, limits checked            handlers/video/decode.py
        --chunks--> uint8 frames, frame_batch at a time        only the sampled frames are decoded
        --FramePreprocessor--> model input + Geometry          handlers/preprocess/frames.py
        --forward, postprocess (the task's)--> frame bodies    boxes and masks in displayed pixels
        --the task's video_summary()--> summary                handlers/video/summary.py

`VisionHandler.handle` hands the whole batch here when the archive's media is video; archives are
served at TorchServe batchSize 1 (a clip is many frames: they are batched inside the handler, by
`handler.video.frame_batch`), so one TorchServe job is one clip.

Response (200, application/json); the keys are a contract (docs/video.md):

    {"video": {"duration_s", "fps", "width", "height", "rotation", "codec", "decoder"},
     "sampling": {"mode", "frames", "truncated"},
     "frames": [{"index", "pts_s", ...the image task's own body...}],
     "summary": {...the task's summary...}}

Streaming (`handler.video.stream: true`, application/x-ndjson through TorchServe's intermediate
responses): `{"type": "video", "video": ..., "sampling": ...}`, then `{"type": "frames", "frames":
[...]}` per frame batch, then `{"type": "summary", "sampling": ..., "summary": ...}`. The clip is
opened and its first frame batch decoded and run before the first line goes out, so input errors
found there keep their 4xx status; a failure after the first line ends the stream with
`{"type": "error", "error": {"code", "type", "message"}}`.

A client's URL is fetched here by handlers.fetch (SSRF rules, limits); decoders only ever see bytes.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch

from ..backbone import warm_up
from ..errors import InvalidInput, ModelLoadError, PayloadTooLarge, RequestError
from ..fetch import VIDEO, fetch_url
from ..inputs import UrlInput, parameter_content_types, read_image_bytes
from ..preprocess import PreprocessSpec
from ..preprocess.frames import FramePreprocessor
from ..runtime import apply_torch_threads, cpu_threads_per_worker
from ..stages import DECODE, FETCH, READ, StageTimer
from . import open_video, request_sampling
from .config import SamplingConfig, VideoConfig
from .decode import prestart
from .summary import VideoSummary

if TYPE_CHECKING:
    from ts.context import Context

    from ..base import VisionHandler
    from .decode import FrameChunk, OpenVideo

logger = logging.getLogger(__name__)

JSON_CONTENT_TYPE = "application/json"
STREAM_CONTENT_TYPE = "application/x-ndjson"
SAMPLING_KEY = "sampling"
#: Decimals of `pts_s` in responses (microseconds).
PTS_DECIMALS = 6


@dataclass
class ClipRequest:
    """One row read: the clip's bytes and the request's own "sampling" object (None = the archive's)."""

    data: bytes
    sampling: Any = None


class VideoServer:
    """The video request path of one handler (made by `VisionHandler.initialize` when media is video)."""

    def __init__(self, handler: VisionHandler, spec: PreprocessSpec) -> None:
        # A weak reference back, as RequestStages keeps: the handler owns this object.
        self.handler = cast("VisionHandler", weakref.proxy(handler))
        self.video: VideoConfig = handler.config.video
        self.frames = FramePreprocessor(spec)
        self._spec = spec
        self._prefetch: ThreadPoolExecutor | None = None  # one thread: the next frame batch's decode

    # -- load --------------------------------------------------------------------------------------

    def check(self, batch_size: int, max_batch: int | None) -> None:
        """Refuse a TorchServe batchSize above 1 and a frame batch the artifact cannot take."""
        if batch_size > 1:
            raise ModelLoadError(
                f"handler.media is video but TorchServe batchSize is {batch_size}: video archives are served "
                f"at batchSize 1 (frames are batched inside the handler by handler.video.frame_batch); set "
                f"batchSize: 1 in model-config.yaml or rebuild with tsgpu archive --media video"
            )
        if max_batch is not None and self.video.frame_batch > max_batch:
            raise ModelLoadError(
                f"handler.video.frame_batch {self.video.frame_batch} exceeds the artifact's max batch {max_batch}: "
                f"set handler.video.frame_batch: {max_batch} or recompile with tsgpu compile --batch "
                f"1,{self.video.frame_batch},{self.video.frame_batch}"
            )

    def size_threads(self, configured: int, model_yaml_config: Mapping[str, Any]) -> None:
        """Unless handler.threads is set, a CPU worker gives torch its CPU share less one: the decode
        process decodes the next frame batch while the model runs on this one, on a CPU of its own.
        (Measured on a busy 2-CPU host: resizing 1080p frames on 2 torch threads cost 3.6-4x the CPU time
        of 1 thread, for no gain in wall time.)"""
        if configured > 0 or self.handler.device.type != "cpu":
            return
        apply_torch_threads(max(1, cpu_threads_per_worker(0, model_yaml_config) - 1))

    def warm_up(self) -> None:
        """One synthetic frame batch through preprocess, forward, postprocess and the summary, so a
        task that cannot take frames fails the load, not the first clip; then the frame batch size."""
        h = self.handler
        assert h.backbone is not None
        frames = torch.full((1, 3, 48, 64), 100, dtype=torch.uint8)
        tensor, geometry = self.frames.run(frames)
        with torch.inference_mode():
            outputs = h.forward(tensor)
            results = h.run_postprocess(outputs, [geometry])
            summary = h.video_summary()
            summary.add(outputs, results, [0.0])
            summary.result()
        seconds = warm_up(h.backbone, [self.video.frame_batch], self._spec.size)
        started = time.perf_counter()
        prestart(self.video, h.device)  # the decode process and its decoder's imports, before the first clip
        logger.info("video warm-up (frame batch %d) took %.2fs, decode process start %.2fs",
                    self.video.frame_batch, seconds, time.perf_counter() - started)

    # -- requests ----------------------------------------------------------------------------------

    def handle(self, data: list[Any], context: Context) -> list[str]:
        """Every row of the batch (one, at batchSize 1) answered: JSON, or NDJSON when streaming."""
        h = self.handler
        timer = h.stage_clock.begin(len(data))
        responses: list[str] = []
        errors: list[RequestError | None] = []
        for idx, row in enumerate(data):
            try:
                clip = self.read(row, idx, context, timer)
                if self.video.stream:
                    body = self.stream(clip, idx, context, timer)
                    responses.append(body)
                    errors.append(None)
                    continue
                result = self.answer(clip, timer)
                error = None
            except RequestError as err:
                result, error = None, err.detach()
            responses.append(h._respond(idx, result, error, context))
            errors.append(error)
        h._report(context, timer, errors)
        return responses

    def read(self, row: Any, idx: int, context: Context, timer: StageTimer) -> ClipRequest:
        """A request row -> the clip's bytes (URLs fetched here) and its "sampling" object."""
        h = self.handler
        with timer.stage(READ):
            row, sampling = split_sampling(row)
            inputs = replace(h.config.inputs, max_bytes=self.video.max_bytes)
            try:
                item = read_image_bytes(row, inputs, parameter_content_types(context, idx), h.config.url)
            except PayloadTooLarge:
                raise PayloadTooLarge(
                    f"the clip is larger than {self.video.max_bytes} bytes (handler.video.max_bytes)"
                ) from None
        if isinstance(item, UrlInput):
            started = time.perf_counter()
            try:
                item = fetch_url(item.url, h.config.url, VIDEO)
            finally:
                timer.add(FETCH, time.perf_counter() - started)
            if len(item) > self.video.max_bytes:
                raise PayloadTooLarge(
                    f"the clip is {len(item)} bytes; at most {self.video.max_bytes} (handler.video.max_bytes)"
                )
        return ClipRequest(item, sampling)

    def answer(self, clip: ClipRequest, timer: StageTimer) -> dict[str, Any]:
        """The whole response body of one clip."""
        sampling = request_sampling(clip.sampling, self.video)
        opened = open_video(clip.data, self.video, self.handler.device)
        chunks: Prefetched | None = None
        try:
            plan = opened.plan(sampling)
            summary = self.handler.video_summary()
            frames: list[dict[str, Any]] = []
            chunks = self._chunks(opened, plan, timer)
            for chunk in chunks:
                frames.extend(self.run_chunk(chunk, summary, timer))
            return {
                "video": opened.info.to_response(opened.decoder),
                "sampling": self._sampling(sampling, len(frames), opened.truncated),
                "frames": frames,
                "summary": summary.result(),
            }
        finally:
            if chunks is not None:
                chunks.close()
            opened.close()

    def stream(self, clip: ClipRequest, idx: int, context: Context, timer: StageTimer) -> str:
        """Answer one clip as NDJSON lines; returns the last line (TorchServe sends it last).

        Raises RequestError only before the first line is sent (the response still has its status)."""
        sampling = request_sampling(clip.sampling, self.video)
        opened = open_video(clip.data, self.video, self.handler.device)
        chunks: Prefetched | None = None
        try:
            plan = opened.plan(sampling)
            summary = self.handler.video_summary()
            chunks = self._chunks(opened, plan, timer)
            first = next(chunks, None)
            frames = self.run_chunk(first, summary, timer) if first is not None else []
            context.set_response_content_type(idx, STREAM_CONTENT_TYPE)
            self._send(context, {"type": "video", "video": opened.info.to_response(opened.decoder),
                                 "sampling": self._sampling(sampling, plan.count, opened.truncated)})
            sent = len(frames)
            try:
                if frames:
                    self._send(context, {"type": "frames", "frames": frames})
                for chunk in chunks:
                    frames = self.run_chunk(chunk, summary, timer)
                    sent += len(frames)
                    self._send(context, {"type": "frames", "frames": frames})
                return _line({"type": "summary", "sampling": self._sampling(sampling, sent, opened.truncated),
                              "summary": summary.result()})
            except RequestError as err:
                return _line({"type": "error", "error": err.detach().to_response()})
            except Exception as exc:  # the status is sent: end the stream with its reason, keep the worker
                logger.exception("video stream failed after its first line")
                return _line({"type": "error", "error": {"code": 500, "type": "internal_error",
                                                         "message": f"{type(exc).__name__}: {exc}"}})
        finally:
            if chunks is not None:
                chunks.close()
            opened.close()

    def run_chunk(self, chunk: FrameChunk, summary: VideoSummary, timer: StageTimer) -> list[dict[str, Any]]:
        """One frame batch through preprocess, the task's forward and postprocess, and the summary."""
        h = self.handler
        with timer.stage(DECODE):
            tensor, geometry = self.frames.run(chunk.frames)
        with torch.inference_mode():
            outputs = h._sequence.forward(tensor, timer)
            results = h._sequence.postprocess(outputs, [geometry] * len(chunk.indices), timer)
            for result in results:
                if isinstance(result, RequestError):
                    raise result
            summary.add(outputs, results, list(chunk.pts_s))
        return [
            {"index": index, "pts_s": round(pts, PTS_DECIMALS), **summary.frame_result(result)}
            for index, pts, result in zip(chunk.indices, chunk.pts_s, results, strict=True)
        ]

    # -- helpers -----------------------------------------------------------------------------------

    def _chunks(self, opened: OpenVideo, plan: Any, timer: StageTimer) -> Prefetched:
        """The plan's frame batches, the next one decoded while the model runs on the current one."""
        if self._prefetch is None:
            self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="video-decode")
        return Prefetched(opened.chunks(plan, self.video.frame_batch), self._prefetch, timer)

    @staticmethod
    def _sampling(sampling: SamplingConfig, frames: int, truncated: bool) -> dict[str, Any]:
        return {"mode": sampling.mode, "frames": frames, "truncated": bool(truncated)}

    def _send(self, context: Context, line: dict[str, Any]) -> None:
        send_intermediate(context, _line(line))


class Prefetched:
    """A clip's frame batches with one decode ahead: while the caller runs the model on batch k, a
    thread waits for the decoder (the decode process, or NVDEC) to deliver batch k+1, so decoding and
    inference overlap. Only that thread ever advances the decoder's iterator; a decode error comes out
    of `next` in the caller's thread. The time the caller waits for a batch is DecodeTime.

    `close()` must be called before the clip is closed: it waits for a decode still in flight, so
    the decode process is never handed back to its pool mid-decode."""

    def __init__(self, chunks: Iterator[FrameChunk], pool: ThreadPoolExecutor, timer: StageTimer) -> None:
        self._chunks = chunks
        self._pool = pool
        self._timer = timer
        self._pending: Future[FrameChunk | None] | None = pool.submit(next, chunks, None)

    def __iter__(self) -> Prefetched:
        return self

    def __next__(self) -> FrameChunk:
        if self._pending is None:
            raise StopIteration
        with self._timer.stage(DECODE):
            try:
                chunk = self._pending.result()
            except BaseException:
                self._pending = None
                raise
        self._pending = self._pool.submit(next, self._chunks, None) if chunk is not None else None
        if chunk is None:
            raise StopIteration
        return chunk

    def close(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.cancel():
            try:
                pending.result()
            except BaseException:  # the clip is being abandoned: its next batch's error is moot
                logger.debug("a prefetched frame batch failed after its clip was abandoned", exc_info=True)


def send_intermediate(context: Context, text: str) -> None:
    """One NDJSON line to the client now, through TorchServe's intermediate responses (its status
    and headers go out with the first one)."""
    from ts.handler_utils.utils import send_intermediate_predict_response

    send_intermediate_predict_response([text], context.request_ids, "Intermediate Prediction success", 200, context)


def split_sampling(row: Any) -> tuple[Any, Any]:
    """(the row without its "sampling", the request's "sampling" object or None).

    "sampling" may be a key of a JSON body (`{"data": ..., "sampling": {...}}`), or, beside a raw or
    multipart clip, a form field holding JSON text."""
    if not isinstance(row, Mapping):
        return row, None
    sampling = None
    rest = dict(row)
    if SAMPLING_KEY in rest and len(rest) > 1:
        sampling = _parse_sampling(rest.pop(SAMPLING_KEY))
    for name, value in rest.items():
        if isinstance(value, Mapping) and SAMPLING_KEY in value:
            if sampling is not None:
                raise InvalidInput("'sampling' is given twice (a form field and a JSON key); send it once")
            body = dict(value)
            sampling = body.pop(SAMPLING_KEY)
            rest[name] = body
    return rest, sampling


def _parse_sampling(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise InvalidInput(f"the 'sampling' field is not valid JSON: {value[:200]!r}") from None
    return value


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n"

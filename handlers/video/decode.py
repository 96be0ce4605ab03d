"""The decode contract the serving side uses: `open_video` -> `OpenVideo.plan` -> `OpenVideo.chunks`.

    video = open_video(data, cfg, device)          # probe + limits; 413/415/400 before any frame
    plan = video.plan(sampling)                    # which frames; 413 when too many to sample/decode
    for chunk in video.chunks(plan, cfg.frame_batch):
        chunk.frames    # uint8 [n, 3, H, W], displayed orientation, on `device`
        chunk.indices   # frame ordinals in presentation order ("index")
        chunk.pts_s     # true presentation times ("pts_s")
    video.truncated     # plan cut by max_frames, or the stream ended early (a cut or damaged tail)
    video.close()

Decoders (`handler.video.decoder`): `auto` = torchcodec where it imports with the installed torch,
else PyAV. CPU decoding (PyAV, or torchcodec on CPU) runs in a decode process (process.py / child.py)
that is killed past handler.video.decode_timeout_s (408 `decode_timeout`), so a decoder that hangs or
crashes on a clip costs only that clip. With torchcodec and a CUDA device, decoding is NVDEC in the
worker itself (frames land on the model's device; the probe still runs in the decode process); that
path is UNVERIFIED (no GPU where it was written) and its timeout is checked between chunks only.

Errors, in the order they can happen (docs/video.md has the table):
    415 unsupported_media_type   not a video; container or codec not allowed
    413 too_large                handler.video.max_bytes, max_duration_s, max_frame_pixels (open_video);
                                 max_sampled_frames, max_decoded_frames (plan; max_decoded_frames also
                                 while decoding, counted on the frames FFmpeg returns with PyAV)
    400 invalid_input            a video whose header/index cannot be read; a packet that does not decode
                                 (raised from chunks(): a streamed response ends with an error line)
    408 decode_timeout           decoding ran past handler.video.decode_timeout_s (process killed)
A stream that simply ends early (a cut upload) is not an error: its readable frames are sampled and
`truncated` is true.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInput, PayloadTooLarge
from . import process
from .config import SamplingConfig, VideoConfig
from .probe import VideoInfo
from .process import Budget, DecodeProcess, DecodeTimeout, acquire, release
from .sampling import FrameTable, SamplePlan, decode_cost, make_plan

__all__ = ["DecodeTimeout", "FrameChunk", "OpenVideo", "SamplePlan", "VideoInfo", "choose_backend", "open_video", "prestart"]

logger = logging.getLogger(__name__)


@dataclass
class FrameChunk:
    frames: torch.Tensor
    """uint8 [n, 3, H, W], displayed orientation, on the requested device (the worker's own memory)."""
    indices: list[int]
    pts_s: list[float]


@functools.cache
def _torchcodec_problem() -> str | None:
    from .torchcodec import torchcodec_available

    return torchcodec_available()


def choose_backend(decoder: str) -> str:
    """"torchcodec" or "pyav" for handler.video.decoder (auto: torchcodec where it imports), checked in
    this process (it imports torchcodec: ~200 MB here). CPU decoding does not call it: the decode
    process resolves `auto` itself, so only an NVDEC worker imports torchcodec."""
    if decoder == "pyav":
        return "pyav"
    problem = _torchcodec_problem()
    if problem is None:
        return "torchcodec"
    if decoder == "torchcodec":
        raise RuntimeError(f"handler.video.decoder: torchcodec does not load here ({problem}); install it with "
                           f"the system's FFmpeg libraries (docs/video.md), or set handler.video.decoder: pyav")
    return "pyav"


def prestart(cfg: VideoConfig, device: Any = "cpu") -> None:
    """Start this worker's decode process now, its decoder imported (a handler's initialize calls it):
    otherwise the first clip pays for it (PyAV ~0.5 s; torchcodec imports torch: seconds)."""
    requested = "pyav" if _uses_nvdec(cfg, torch.device(device)) else cfg.decoder
    process.prestart("torchcodec" if requested == "auto" else requested)


def _uses_nvdec(cfg: VideoConfig, device: torch.device) -> bool:
    """torchcodec on a CUDA device decodes with NVDEC in the worker (imports torchcodec here)."""
    return device.type == "cuda" and cfg.decoder != "pyav" and choose_backend(cfg.decoder) == "torchcodec"


def open_video(data: bytes, cfg: VideoConfig, device: Any = "cpu") -> OpenVideo:
    """Probe `data`, check the limits, open it for decoding (see the module docstring)."""
    if not data:
        raise InvalidInput("the request carries no video bytes")
    if len(data) > cfg.max_bytes:
        raise PayloadTooLarge(f"the clip is {len(data)} bytes, above handler.video.max_bytes={cfg.max_bytes}")
    device = torch.device(device)
    nvdec = _uses_nvdec(cfg, device)
    budget = Budget(cfg.decode_timeout_s)
    proc = acquire()
    try:
        info, table, damaged, backend = proc.open(data, cfg, "probe" if nvdec else cfg.decoder, budget)
    except BaseException:
        release(proc)
        raise
    if not nvdec:
        return OpenVideo(info, table, damaged, cfg, device, backend, budget, proc=proc)
    release(proc)  # the probe is done; NVDEC decodes in this process
    gpu = _nvdec(data, table, info, damaged, cfg, device)
    return OpenVideo(info, table, damaged, cfg, device, "torchcodec", budget, gpu=gpu)


def _nvdec(data: bytes, table: FrameTable, info: VideoInfo, damaged: bool, cfg: VideoConfig,
           device: torch.device) -> Any:
    """UNVERIFIED (no GPU here): torchcodec's NVDEC decoder on the model's device."""
    from .torchcodec import TorchCodecDecoder

    return TorchCodecDecoder(data, table, info.rotation, cfg.max_decoded_frames, device=str(device),
                             damaged=damaged, displayed=(info.width, info.height))


class OpenVideo:
    """One request's clip, probed and open for decoding (see the module docstring)."""

    def __init__(self, info: VideoInfo, table: FrameTable, damaged: bool, cfg: VideoConfig, device: torch.device,
                 backend: str, budget: Budget, proc: DecodeProcess | None = None, gpu: Any = None) -> None:
        self.info = info
        self.table = table
        self.damaged = damaged
        """The stream ends before its header says, or demuxing hit an error: frames past it are missing."""
        self.cfg = cfg
        self.device = device
        self.backend = backend
        self.decoder = "nvdec" if gpu is not None else "cpu"
        self.budget = budget
        self.decoded_frames = 0
        """Frames decoded so far for this clip (PyAV: counted by FFmpeg's output; torchcodec: planned)."""
        self._proc = proc
        self._gpu = gpu
        # a clip dropped without close() still gives its decode process back (once)
        self._release = weakref.finalize(self, release, proc) if proc is not None else None
        self._plan_truncated = False
        self._missing = False

    @property
    def truncated(self) -> bool:
        """The plan was cut by max_frames, or the stream is cut/damaged (frames past the damage missing)."""
        return self._plan_truncated or self._missing or self.damaged

    @property
    def decode_pid(self) -> int | None:
        """The pid of the decode process holding this clip (None with NVDEC, or once closed)."""
        return self._proc.pid if self._proc is not None else None

    def plan(self, sampling: SamplingConfig) -> SamplePlan:
        """The frames `sampling` selects; 413 when more than max_sampled_frames would be sampled or the
        decode walk would decode more than max_decoded_frames."""
        plan = make_plan(self.table, sampling, self.cfg.max_sampled_frames)
        cost = decode_cost(self.table, plan.indices)
        if cost > self.cfg.max_decoded_frames:
            raise PayloadTooLarge(
                f"sampling {plan.count} frames of this clip decodes {cost} frames (seeking to the keyframe "
                f"before each), above handler.video.max_decoded_frames={self.cfg.max_decoded_frames}; "
                f"sample fewer frames or a shorter range"
            )
        self._plan_truncated = plan.truncated
        return plan

    def chunks(self, plan: SamplePlan, frame_batch: int) -> Iterator[FrameChunk]:
        """The plan's frames, `frame_batch` at a time, decoded only as each chunk is asked for."""
        if frame_batch <= 0:
            raise ValueError(f"frame_batch must be > 0, got {frame_batch}")
        for start in range(0, plan.count, frame_batch):
            wanted = list(plan.indices[start: start + frame_batch])
            done, frames = self._decode(wanted)
            if len(done) < len(wanted):
                self._missing = True  # frames the stream did not deliver (a cut or damaged tail)
            if done:
                yield FrameChunk(frames, done, [self.table.pts_s[i] for i in done])

    def close(self) -> None:
        """Give the decode process back (idle, its clip dropped; killed if it failed). Idempotent."""
        if self._release is not None:
            self._release()
            self._proc = None
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None

    def __enter__(self) -> OpenVideo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _decode(self, indices: list[int]) -> tuple[list[int], torch.Tensor]:
        if self._gpu is not None:
            return self._decode_gpu(indices)
        if self._proc is None:
            raise RuntimeError("this video is closed")
        shape = (3, self.info.height, self.info.width)
        try:
            done, view, self.decoded_frames = self._proc.decode(indices, shape, self.budget)
        except BaseException:
            self.close()  # a killed process is not reused; a live one goes back idle with its clip closed
            raise
        frames = torch.from_numpy(view.copy())  # the shared frames are rewritten by the next chunk
        return done, frames.to(self.device) if self.device.type != "cpu" else frames

    def _decode_gpu(self, indices: list[int]) -> tuple[list[int], torch.Tensor]:
        """UNVERIFIED: NVDEC in the worker; the timeout is checked after each chunk (it cannot be killed)."""
        if self.budget.left <= 0:
            raise self.budget.timeout("decoding stopped")
        start = time.monotonic()
        done, frames = self._gpu.decode(indices)
        self.budget.spent += time.monotonic() - start
        self.decoded_frames = self._gpu.decoded
        if self.budget.left <= 0:
            raise self.budget.timeout("decoding stopped after the chunk that ran past it")
        return done, frames

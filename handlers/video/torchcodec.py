"""The torchcodec decoder: CPU in the decode process, NVDEC in the worker when the model is on a GPU.

torchcodec (exact seek mode: its own scan of the packets) seeks to the keyframe before each frame it
is asked for and decodes forward, and applies the display rotation itself (checked on 0.17's CPU
path by the contract test: displayed width/height, marker in the displayed top-left corner). Frames
are asked for by index (`get_frames_at`): torchcodec's exact-mode index and the planner's FrameTable
are both the packets' pts in presentation order, and every pts torchcodec returns is checked against
the plan's (within 1 microsecond; a disagreement fails the clip instead of mistiming its frames).
(`get_frames_played_at` is not used: 0.17 refuses a time at the last frame's pts on some VFR clips.)

It cannot count the frames FFmpeg decodes, so handler.video.max_decoded_frames is enforced on the
planner's count of the same walk (`sampling.decode_cost`), before each chunk.

NVDEC (`device="cuda:N"`): frames are decoded into the GPU's memory and handed on as CUDA tensors
on the model's device, no host copy. UNVERIFIED: no GPU on the machine this was written on; listed in
docs/gpu-verification.md. The rotation check there is by shape only (a 90/270 turn torchcodec left
undone is done here with torch.rot90; a 180 turn could not be told apart).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..errors import InvalidInput, PayloadTooLarge
from .sampling import PTS_EPSILON_S, FrameTable, seek_for

__all__ = ["TorchCodecDecoder", "torchcodec_available"]

logger = logging.getLogger(__name__)


def torchcodec_available() -> str | None:
    """None when torchcodec imports with the installed torch and FFmpeg, else why not."""
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception as exc:  # ImportError, or its loader's RuntimeError when FFmpeg's libraries are missing
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


class IndexMismatch(Exception):
    """torchcodec's frame i is not the planner's frame i (their scans disagree): a bug to report, not a
    client error; the clip fails rather than answering with wrongly timed frames."""


class TorchCodecDecoder:
    """One clip opened with torchcodec; `decode` returns a chunk's frames as a uint8 [n, 3, H, W] tensor
    on `device` (CPU in the decode process, CUDA in the worker)."""

    name = "torchcodec"

    def __init__(self, data: bytes, table: FrameTable, rotation: int, max_decoded_frames: int,
                 device: Any = "cpu", threads: int = 0, damaged: bool = False,
                 displayed: tuple[int, int] | None = None) -> None:
        from torchcodec.decoders import VideoDecoder

        self.table = table
        self.rotation = rotation
        self.max_decoded_frames = max_decoded_frames
        self.device = device
        self.damaged = damaged
        self.displayed = displayed  # (width, height) after rotation, from the probe
        self.decoded = 0
        """Frames the walk decodes so far, as the planner counts them (torchcodec does not report it)."""
        self._pos = -1
        try:
            self._decoder = VideoDecoder(data, seek_mode="exact", device=device, dimension_order="NCHW",
                                         num_ffmpeg_threads=threads)
        except (RuntimeError, ValueError) as exc:
            raise InvalidInput(f"torchcodec cannot open the video: {exc}") from None

    def decode(self, indices: list[int]) -> tuple[list[int], Any]:
        """(indices decoded, uint8 [n, 3, H, W] tensor of them); on a damaged clip (probe: cut or damaged
        tail) frames that do not decode are left out; on an intact one they are a 400."""
        self._count(indices)
        try:
            return indices, self._frames(indices)
        except (RuntimeError, IndexError) as exc:
            if not self.damaged:
                raise InvalidInput(f"corrupt video stream: torchcodec cannot decode it ({exc})") from None
        return self._decode_until_failure(indices)

    def decode_into(self, indices: list[int], out: np.ndarray) -> list[int]:
        """CPU: decode into out[0..] (the decode process's shared frames), as PyAVDecoder does."""
        done, frames = self.decode(indices)
        if done:
            out[: len(done)] = frames.numpy()
        return done

    def close(self) -> None:
        self._decoder = None  # type: ignore[assignment]  # frees FFmpeg's state now

    # -- internals ---------------------------------------------------------------------------------

    def _count(self, indices: list[int]) -> None:
        for target in indices:
            key = seek_for(self.table, self._pos, target)
            self.decoded += target - key + 1 if key is not None else target - self._pos
            self._pos = target
        if self.decoded > self.max_decoded_frames:
            raise PayloadTooLarge(
                f"decoding this sampling needs more than handler.video.max_decoded_frames="
                f"{self.max_decoded_frames} frames; sample fewer frames or a shorter range"
            )

    def _frames(self, indices: list[int]) -> Any:
        import torch

        times = [self.table.pts_s[i] for i in indices]
        batch = self._decoder.get_frames_at(indices)
        got = batch.pts_seconds.tolist()
        if any(abs(a - b) > PTS_EPSILON_S for a, b in zip(got, times, strict=True)):
            raise IndexMismatch(f"torchcodec's frames {indices[:4]}... are at {got[:4]} s, the plan's at {times[:4]} s")
        frames = batch.data
        h, w = frames.shape[-2:]
        if self.rotation % 180 and self.displayed is not None and (h, w) == self.displayed:
            # the coded orientation (w, h swapped against the displayed size): turn it here
            frames = torch.rot90(frames, k=-(self.rotation // 90), dims=(-2, -1)).contiguous()
        return frames

    def _decode_until_failure(self, indices: list[int]) -> tuple[list[int], Any]:
        import torch

        done, frames = [], []
        for i in indices:
            try:
                frames.append(self._frames([i]))
            except (RuntimeError, IndexError):
                continue  # not delivered (a damaged tail): left out, the caller marks the response truncated
            done.append(i)
        if not frames:
            return [], torch.empty((0, 3, 1, 1), dtype=torch.uint8)
        return done, torch.cat(frames)

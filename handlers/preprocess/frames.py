"""Decoded video frames -> the model's input: the preprocess geometry of images, applied to frames.

A video decoder (handlers/video/) hands over uint8 `[n, 3, H, W]` RGB frames in their displayed
orientation (rotation metadata already applied), on the model's device (NVDEC) or on the host (CPU
decoders). `FramePreprocessor.run` turns them into one normalised `[n, 3, h, w]` batch on the model's
device, in its dtype and layout, plus the one `Geometry` every frame of the clip shares (they all
have the clip's displayed size), so a task maps boxes and masks back to displayed pixels exactly as
it does for an image.

The resize, center crop and letterbox are the torchvision backend's own code
(`TorchvisionPreprocessor._resize_into` and `_resize`, handlers/preprocess/torchvision_gpu.py), run
here on frames instead of on nvJPEG output; nothing of it is copied. They are torch ops, so they run
on whatever device the frames are on; a host frame crosses to the model's device once, as uint8
(a quarter of the float bytes).

Numerical contract (tests/unit/test_video_handler.py `test_frames_meet_the_preprocess_contract`):
the same frame given to this module and, as a lossless PNG, to the reference (tests/reference.py,
torchvision/Pillow on the CPU) agree within the torchvision backend's CPU tolerance, mean absolute
difference < 0.01 and max < 0.05 in normalised units, for every geometry mode. On CUDA the stated
bound is the torchvision backend's GPU one (mean < 0.03, max < 0.5); not measured (no GPU here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch

from .accelerated import Plan
from .contract import Normaliser, PreprocessSpec
from .geometry import Geometry
from .torchvision_gpu import _MODES, TorchvisionPreprocessor

NAME = "frames"
#: `Geometry.source_format` of a video frame.
FRAME_FORMAT = "video"

# The torchvision backend's functions, called with this module's object as `self`: they read only
# `spec`, `_mode`, `_antialias` and `_resize`, which FramePreprocessor sets the same way.
_RESIZE_INTO = cast("Callable[[Any, torch.Tensor, Plan, torch.Tensor], None]", TorchvisionPreprocessor._resize_into)
_RESIZE = cast("Callable[[Any, torch.Tensor, int, int], torch.Tensor]", TorchvisionPreprocessor._resize)


class FramePreprocessor:
    """Frames -> normalised model input, with the geometry of `spec` (handler.preprocess)."""

    name = NAME

    def __init__(self, spec: PreprocessSpec) -> None:
        self.spec = spec
        self.normalise = Normaliser(spec)
        self._mode, self._antialias = _MODES[spec.interpolation]

    def geometry(self, width: int, height: int) -> Geometry:
        """The geometry of a frame of (width, height) displayed pixels under the spec's mode."""
        return self.spec.plan(width, height, FRAME_FORMAT)

    def run(self, frames: torch.Tensor) -> tuple[torch.Tensor, Geometry]:
        """uint8 [n, 3, H, W] frames (any device) -> ([n, 3, h, w] model input on the model's device,
        the frames' geometry). Raises ValueError for anything but a non-empty uint8 RGB batch."""
        if frames.dim() != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8 or frames.shape[0] == 0:
            raise ValueError(
                f"frames must be a non-empty uint8 [n, 3, H, W] RGB batch, got {frames.dtype} {tuple(frames.shape)}"
            )
        spec = self.spec
        n, _, height, width = frames.shape
        geometry = self.geometry(width, height)
        plan = Plan(FRAME_FORMAT, "RGB", 1, geometry)
        frames = frames.to(spec.device, non_blocking=True)  # no-op for frames decoded on the device
        in_h, in_w = spec.size
        out = torch.empty((n, 3, in_h, in_w), dtype=torch.float32, device=spec.device)
        if spec.geometry == "letterbox":
            out.fill_(float(spec.pad_value))
        for row in range(n):
            _RESIZE_INTO(self, frames[row], plan, out[row])
        out = self.normalise(out)
        memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        return out.to(dtype=spec.dtype, memory_format=memory_format), geometry

    def _resize(self, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
        return _RESIZE(self, image, width, height)

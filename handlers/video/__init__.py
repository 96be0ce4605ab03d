"""The video room: clips in, sampled frames out, decoded only where the sampling needs them.

    config.py      `handler.video` (VideoConfig, SamplingConfig) and a request's "sampling" (torch-free)
    sampling.py    which frames a sampling selects, from a clip's frame table (torch-free)
    probe.py       a clip's container, stream, frame table and limits, read with PyAV (torch-free)
    pyav.py        the PyAV decoder: seek to the keyframe before each target, decode forward (torch-free)
    torchcodec.py  the torchcodec decoder (CPU, and NVDEC on a CUDA device: UNVERIFIED, no GPU here)
    child.py       the decode process: a decoder run on hostile bytes, killable (torch-free for PyAV)
    process.py     the worker's side of the decode process: shared-memory chunks, deadline, kill
    decode.py      the contract the serving side uses: `open_video` -> OpenVideo -> FrameChunks

Serving (serve.py, summary.py) turns chunks into model inputs and responses. Importing this package
imports nothing heavy: `open_video` loads the decoders when it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import SamplingConfig, VideoConfig, request_sampling

if TYPE_CHECKING:
    from .decode import OpenVideo

__all__ = ["SamplingConfig", "VideoConfig", "open_video", "request_sampling"]


def open_video(data: bytes, cfg: VideoConfig, device: Any = "cpu") -> OpenVideo:
    """Open one request's clip: probe it, check the limits, pick the decoder (see decode.open_video)."""
    from .decode import open_video as _open

    return _open(data, cfg, device)

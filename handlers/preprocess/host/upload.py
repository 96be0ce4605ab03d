"""Host -> device for the CPU path: the pinned upload, and page-locking the decode processes' frames.

On a GPU worker the CPU path's host buffer is pinned (or, with decode processes, the shared frames
are page-locked with cudaHostRegister) so that `upload` is a real asynchronous DMA, ordered on the
current stream; the caller records an event after it and waits on that event before overwriting or
freeing the buffer.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

__all__ = ["page_lock", "page_unlock", "upload"]

logger = logging.getLogger(__name__)


def upload(pinned: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Asynchronous host-to-device copy of a pinned, contiguous tensor (a DMA the caller must not
    overwrite before the current stream has passed it)."""
    return pinned.to(device, non_blocking=True)


def page_lock(frames: np.ndarray) -> int | None:
    """cudaHostRegister the shared frames so uploads from them are async DMAs; their address, or
    None when CUDA refuses. UNVERIFIED: written without a GPU (no test has run it on one)."""
    try:
        address: int = frames.ctypes.data
        if int(torch.cuda.cudart().cudaHostRegister(address, frames.nbytes, 0)) == 0:
            return address
    except Exception as exc:  # no CUDA runtime binding, or a driver that refuses the mapping
        logger.debug("cudaHostRegister failed: %s", exc)
    return None


def page_unlock(address: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(address)
    except Exception as exc:
        logger.debug("cudaHostUnregister failed: %s", exc)

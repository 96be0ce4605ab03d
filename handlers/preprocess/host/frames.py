"""Shared frames: the decoded pixels of a batch, in memory the worker and its decode processes share.

A [capacity, H, W, 3] uint8 array in an anonymous file (`memfd_create`; else a /dev/shm file
unlinked right after it is created) that the worker maps and hands on without a copy, and every
decode process maps through an inherited fd; the process decoding item i writes frame i. Nothing
ever has a name that outlives its creation, so no segment can leak, even when the worker is
SIGKILLed. The file is sealed against shrinking: a child holds it read-write, and a shrink under the
worker's map would be a SIGBUS there. Torch-free: decode processes import it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile

import numpy as np

__all__ = ["SharedFrames", "map_frames"]


class SharedFrames:
    """[capacity, H, W, 3] uint8 frames in an anonymous shared file, mapped into this process."""

    def __init__(self, frame_shape: tuple[int, int, int], capacity: int) -> None:
        self.frame_shape = frame_shape
        self.fd = _anonymous_file()
        self.capacity = 0
        self.nbytes = 0
        self.array: np.ndarray = np.empty((0, *frame_shape), dtype=np.uint8)
        self._map: mmap.mmap | None = None
        self.grow(max(1, capacity))

    def grow(self, capacity: int) -> np.ndarray:
        """Make room for `capacity` frames (never shrinks); returns the (possibly new) array.

        The file grows in place (children remap it on their next item); the old array stays valid
        for whoever still holds it, but shows the new file's first frames only up to its old size.
        """
        if capacity > self.capacity:
            nbytes = capacity * int(np.prod(self.frame_shape))
            os.ftruncate(self.fd, nbytes)
            self._map = mmap.mmap(self.fd, nbytes)  # the old map is unmapped once nothing uses it
            self.array = np.frombuffer(self._map, dtype=np.uint8).reshape(capacity, *self.frame_shape)
            self.capacity, self.nbytes = capacity, nbytes
        return self.array

    def close(self) -> None:
        self.array = np.empty((0, *self.frame_shape), dtype=np.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views it: unmapped when that one is freed
                pass
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def map_frames(fd: int, capacity: int, size: tuple[int, int]) -> np.ndarray:
    """A decode process's view of the worker's frames: `capacity` frames of (height, width) = size."""
    shape = (capacity, *size, 3)
    mapped = mmap.mmap(fd, int(np.prod(shape)))
    return np.frombuffer(mapped, dtype=np.uint8).reshape(shape)


def _anonymous_file() -> int:
    """An fd to a shared-memory file with no name (memfd), or one unlinked at once (/dev/shm)."""
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("tsgpu-decoded-frames", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:  # e.g. a seccomp profile without memfd_create
            pass
        else:
            try:  # children may write pixels but never shrink the file under the worker's map (SIGBUS)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            except (AttributeError, OSError):
                pass
            return fd
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="tsgpu-frames-", dir=directory)
    os.unlink(path)
    return fd

"""CPU preprocess backend: Pillow decode, fused resize+crop, vectorised normalise.

Also the CPU path of every other backend (accelerated.py falls back to it). Built from the CPU
path's internals in host/. Per item (host/decode.py, torch-free): threads decode the items of a
batch in parallel (Pillow releases the GIL), or with `processes` (handler.pipeline.decode_processes)
a pool of decode processes does, writing into shared memory that becomes this backend's buffer
(host/pool.py):
  1. open with an allow-list of formats; refuse oversized images from the header, before decoding;
  2. JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling) when the image is
     much larger than needed, keeping at least `draft_min_ratio` source pixels per output pixel;
  3. apply EXIF orientation, convert any mode (gray, CMYK, palette, alpha, 16-bit) to RGB;
  4. resize only the region that survives the center crop (Pillow's `box`), straight to crop size:
     the same filter and the same pixels as torchvision's Resize + CenterCrop, without computing the
     discarded border;
then the whole batch is converted to float and normalised in one vectorised op.

Numerical contract (asserted by tests/unit/test_preprocess_cpu.py on real photos, in normalised
units, where one 8-bit level is about 0.0175): without draft decoding the output is within one 8-bit
level of torchvision's PIL reference (the fused resize+crop rounds a few pixels the other way); with
it (the default) the mean absolute difference stays under 0.02 and the max under 0.35.
"""

from __future__ import annotations

import functools
import logging
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, RequestError
from .contract import Batch, Normaliser, PreprocessSpec
from .geometry import Geometry
from .host.decode import decode_into, resample_filter
from .host.upload import page_lock, page_unlock, upload

if TYPE_CHECKING:
    from .host.pool import DecodePool

NAME = "cpu"
logger = logging.getLogger(__name__)


def availability(device: torch.device) -> str | None:
    """Always usable: the output is moved to `device` when that is a GPU."""
    return None


def create(spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0) -> CpuPreprocessor:
    return CpuPreprocessor(spec, threads, processes, decode_timeout_s)


class CpuPreprocessor:
    """Decodes and preprocesses a batch on CPU threads, or in `processes` decode processes
    (host/pool.py, handler.pipeline.decode_processes); output goes to `spec.device`."""

    name = NAME
    fallback_items = 0  # the CPU path is no other backend's fallback

    def __init__(
        self, spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0,
    ) -> None:
        Image.init()  # register every format plugin now; open(formats=...) does not load them itself
        self.spec = spec
        self.threads = max(1, threads)
        self.processes = max(0, processes)
        if spec.keep_images and self.processes:
            raise ConfigError(
                "handler.pipeline.decode_processes: a cascade keeps each decoded image in the worker "
                f"(preprocess keep_images), which decode processes cannot hand back; set it to 0 "
                f"(got {self.processes})"
            )
        self._resample = resample_filter(spec.interpolation)
        self._normaliser = Normaliser(spec, spec.dtype)  # constants in the output dtype
        self._buffer = torch.empty((0, *spec.size, 3), dtype=torch.uint8)
        # On a GPU worker the host buffer is pinned and reused, so the upload is a real async DMA;
        # an event marks when the last upload has read it, before the next batch overwrites it.
        self._pinned = spec.device.type == "cuda"
        self._uploaded: torch.cuda.Event | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._decoders: DecodePool | None = None
        if self.processes:
            from .host.pool import DecodePool

            self._decoders = DecodePool(spec.decode_spec(), self.processes, spec.max_batch, decode_timeout_s)
        elif self.threads > 1:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        # Process mode: `_buffer` wraps the pool's shared frames (`_frames`); on a GPU worker they
        # are page-locked with cudaHostRegister (`_registered`), else copied into `_staging`.
        self._frames: np.ndarray | None = None
        self._registered: int | None = None
        self._staging: torch.Tensor | None = None

    # -- public interface ------------------------------------------------------------------------

    def run(self, items: list[bytes]) -> Batch:
        n = len(items)
        buffer = self._ensure_buffer(n)
        kept: list[np.ndarray | None] | None = [None] * n if self.spec.keep_images else None
        if self._decoders is not None:
            results = self._decoders.decode(items)
            buffer = self._stage(buffer, n)
        else:
            results = self._decode_in_threads(items, buffer.numpy(), kept)

        geometry: list[Geometry | None] = [r if isinstance(r, Geometry) else None for r in results]
        errors: list[RequestError | None] = [r if isinstance(r, RequestError) else None for r in results]
        rows = [i for i, g in enumerate(geometry) if g is not None]
        tensor = self._normalise(buffer, rows) if rows else None
        images = self._upload_images(kept, geometry) if kept is not None else []
        return Batch(tensor=tensor, rows=rows, geometry=geometry, errors=errors, images=images)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._wait_for_upload()  # the last upload may still read the buffer (GPU, unverified)
        if self._decoders is not None:
            self._unregister()
            self._buffer = torch.empty((0, *self.spec.size, 3), dtype=torch.uint8)
            self._frames = None
            self._decoders.close()
            self._decoders = None

    # -- internals -------------------------------------------------------------------------------

    def _decode_in_threads(
        self, items: list[bytes], slots: np.ndarray, kept: list[np.ndarray | None] | None = None,
    ) -> list[Geometry | RequestError]:
        def work(i: int) -> Geometry | RequestError:
            keep = None if kept is None else functools.partial(kept.__setitem__, i)
            try:
                return decode_into(items[i], self.spec, self._resample, slots[i], keep)
            except RequestError as err:
                return err.detach()

        n = len(items)
        if self._pool is not None and n > 1:
            return list(self._pool.map(work, range(n)))
        return [work(i) for i in range(n)]

    def _upload_images(self, kept: list[np.ndarray | None], geometry: list[Geometry | None]) -> list[torch.Tensor | None]:
        """keep_images: each decoded item's full image as uint8 [3, H, W] on the device (one upload
        of the HWC pixels, then a view; on a CPU device no copy at all)."""
        images: list[torch.Tensor | None] = []
        for array, g in zip(kept, geometry, strict=True):
            if array is None or g is None:
                images.append(None)
                continue
            with warnings.catch_warnings():
                # Pillow hands back a read-only array; the image is only ever read.
                warnings.simplefilter("ignore", UserWarning)
                hwc = torch.from_numpy(array)
            images.append(hwc.to(self.spec.device).permute(2, 0, 1))
        return images

    def _wait_for_upload(self) -> None:
        """Block until the last upload has read the host buffer (before it is overwritten or freed)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def _ensure_buffer(self, n: int) -> torch.Tensor:
        self._wait_for_upload()
        if self._decoders is not None:
            frames = self._decoders.reserve(n)
            if frames is not self._frames:
                self._adopt(frames)
            return self._buffer
        if self._buffer.shape[0] < n:
            # Reused across batches: the tensor handed on is a new allocation, so the next batch
            # may overwrite this one once its upload (if any) has completed.
            self._buffer = torch.empty((n, *self.spec.size, 3), dtype=torch.uint8, pin_memory=self._pinned)
        return self._buffer

    def _adopt(self, frames: np.ndarray) -> None:
        """Use the decode pool's shared frames as the buffer, without a copy."""
        self._unregister()
        self._frames = frames
        self._buffer = torch.from_numpy(frames)
        if self._pinned:
            self._registered = page_lock(frames)
            if self._registered is None and self._staging is None:
                logger.warning(
                    "cudaHostRegister failed on the decode processes' shared frames; uploads take "
                    "an extra host copy into a pinned buffer"
                )

    def _stage(self, buffer: torch.Tensor, n: int) -> torch.Tensor:
        """The buffer `_normalise` uploads from: the shared frames themselves, or (on a GPU worker
        where they could not be page-locked) a pinned copy of the first n."""
        if not self._pinned or self._registered is not None:
            return buffer
        if self._staging is None or self._staging.shape[0] < n:
            self._staging = torch.empty((buffer.shape[0], *self.spec.size, 3), dtype=torch.uint8, pin_memory=True)
        self._staging[:n].copy_(buffer[:n])
        return self._staging

    def _unregister(self) -> None:
        if self._registered is not None:
            page_unlock(self._registered)
            self._registered = None

    def _normalise(self, buffer: torch.Tensor, rows: list[int]) -> torch.Tensor:
        n = len(rows)
        if rows[-1] != n - 1:  # rows are sorted and unique: gaps are failed items; close them
            buffer[:n] = buffer[rows]
        hwc = buffer[:n]  # contiguous NHWC uint8 (pinned on a GPU worker)
        if self._pinned:
            # Upload the pinned uint8 slice itself, then convert on the device: anything derived
            # on the host first (a dtype cast, a layout copy, an index) would be a pageable
            # temporary, turning the copy into a staged synchronous one that the event below would
            # not even cover.
            hwc = upload(hwc, self.spec.device)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record(torch.cuda.current_stream(hwc.device))
        # NHWC viewed as NCHW is already channels-last; only copy when the model wants NCHW.
        nchw = hwc.permute(0, 3, 1, 2)
        if not self.spec.channels_last:
            nchw = nchw.contiguous()
        x = nchw.to(device=self.spec.device, dtype=self.spec.dtype)
        return self._normaliser(x)

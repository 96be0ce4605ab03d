"""DALI backend: external_source -> decoders.image -> resize of the crop box -> crop_mirror_normalize.

On a GPU the decoder runs as `mixed` (nvJPEG, with `hw_decoder_load` of the JPEG data on the
A100/H100 hardware decoder) and the output goes to torch through DLPack, on the GPU, with DALI's
stream ordered before the current torch stream by the DLPack exchange: no host round trip. On a
CPU device the same pipeline runs as a CPU pipeline (`device_id=None`), which is how CI tests it.

The pipeline's batch size is TorchServe's batchSize (`spec.max_batch`; bigger inputs are split);
`device_id` is the worker's GPU. Resize takes each item's source region in original pixels (geometry.py)
as its region of interest and scales it straight to its size in the model input, so no pixel
outside a center crop is computed (the same fused resize+crop as the CPU backend, here with the
exact box rather than a draft-decoded one); letterbox then pads it to the input size with a slice
whose start is minus the padding.

Output lifetime: the pipeline uses DALI's legacy executor (exec_async=False,
exec_pipelined=False), which releases and reuses its output buffers at the next run() and frees
them at shutdown. The copy out of them is queued on torch's stream, so an event recorded after
that copy is waited on before the next run and before any shutdown (rebuild, close).

Fault isolation: Pillow checks every header first (accelerated.py), so DALI only sees images that look
valid. When DALI still fails a sample (a truncated JPEG), the pipeline is rebuilt (DALI invalidates
a pipeline after any error, RuntimeError or one of its typed ValueError/TypeError/IndexError); when the error names the sample, that one goes to the CPU path for its
4xx and the rest run through DALI again, otherwise the batch is split in halves. After
`MAX_REBUILDS` rebuilds in one batch, the items not yet done take the CPU path.

Numerical contract (tests/unit/test_preprocess_backends.py): mean absolute difference < 0.01, max
< 0.05 against torchvision's PIL reference on real photos as a CPU pipeline (mean < 0.03, max < 0.5
stated for the GPU decoder, not yet measured).
"""

from __future__ import annotations

import gc
import importlib
import logging
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..extras import install_hint
from .accelerated import AcceleratedPreprocessor, Plan

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline
from .contract import PreprocessSpec

NAME = "dali"
logger = logging.getLogger(__name__)

_FAILED_SAMPLE = re.compile(r"sample #(\d+)")
# DALI's decoder handles these modes of these formats like Pillow's convert("RGB") does; others
# (CMYK JPEG, palette or 16-bit PNG, GIF, TIFF) go to the CPU path.
_ACCEPTED = {
    "JPEG": ("RGB", "L"),
    "MPO": ("RGB", "L"),
    "PNG": ("RGB", "RGBA", "L"),
    "BMP": ("RGB",),
}


def _reason(message: str) -> str:
    """DALI's error text after its pipeline-definition traceback, on one line."""
    text = message.split("encountered:")[-1]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:300]


def availability(device: torch.device) -> str | None:
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:
        return f"nvidia.dali is not importable ({type(exc).__name__}: {exc}); {install_hint('dali')}"
    return None


def create(spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0) -> DaliPreprocessor:
    return DaliPreprocessor(spec, threads, processes, decode_timeout_s)


class DaliPreprocessor(AcceleratedPreprocessor):
    name = NAME
    ACCEPTED = _ACCEPTED
    MAX_REBUILDS = 4
    COLLECT_EVERY = 16

    def __init__(
        self, spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(spec, threads, processes, decode_timeout_s)
        reason = availability(spec.device)
        if reason:
            raise ImportError(reason)
        self.threads = max(1, threads)
        self.rebuilds = 0
        self._copied: torch.cuda.Event | None = None  # the last copy out of DALI's buffers
        self._pipe = self._build()

    def accelerate(self, items: list[bytes], plans: list[Plan]) -> tuple[torch.Tensor | None, list[int]]:
        step = self.spec.max_batch
        chunks: list[torch.Tensor] = []
        failed: list[int] = []
        for first in range(0, len(items), step):
            rows, bad = self._run_isolating(items[first:first + step], plans[first:first + step])
            failed.extend(first + k for k in bad)
            if rows is not None:
                chunks.append(rows)
        if not chunks:
            return None, failed
        return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)), failed

    # -- internals -------------------------------------------------------------------------------

    def _run_isolating(self, items: list[bytes], plans: list[Plan]) -> tuple[torch.Tensor | None, list[int]]:
        """Run one pipeline batch, isolating the samples DALI fails.

        DALI invalidates a pipeline after an error, so each failure costs a rebuild. When the error
        names the sample, that one goes to the CPU path and the rest run again; when it does not,
        the batch is split in halves. After `MAX_REBUILDS` rebuilds in one batch, the items not yet
        done go to the CPU path, so hostile input cannot make a batch rebuild the pipeline often.
        """
        # An explicit work list, not a recursive closure: a closure that refers to itself is a
        # reference cycle, which would keep this batch's tensors alive until a full collection.
        failed: list[int] = []
        rows: list[tuple[list[int], torch.Tensor]] = []
        budget = self.MAX_REBUILDS
        pending: list[list[int]] = [list(range(len(items)))]
        while pending:
            live = pending.pop(0)
            if budget <= 0:  # another failure would cost one more rebuild: CPU path instead
                failed.extend(live)
                continue
            try:
                rows.append((live, self._run([items[k] for k in live], [plans[k] for k in live])))
                continue
            except Exception as exc:  # any DALI error invalidates the pipeline, not only RuntimeError
                message = f"{type(exc).__name__}: {exc}"
            self._rebuild()
            budget -= 1
            named = _FAILED_SAMPLE.search(message)
            logger.info("dali failed a sample (%s); pipeline rebuilt", _reason(message))
            if len(live) == 1:
                failed.extend(live)
            elif named is not None and int(named.group(1)) < len(live):
                bad = live[int(named.group(1))]
                failed.append(bad)
                pending.insert(0, [k for k in live if k != bad])
            else:
                half = len(live) // 2
                pending[:0] = [live[:half], live[half:]]
        if not rows:
            return None, sorted(failed)
        # The work list runs front to back and puts retries and halves at its front, so the rows
        # come back in input order.
        tensor = rows[0][1] if len(rows) == 1 else torch.cat([t for _, t in rows])
        return tensor, sorted(failed)

    def _rebuild(self) -> None:
        """Replace the pipeline DALI invalidated, and free the old one now.

        A DALI Pipeline sits in reference cycles of its own, so merely dropping it leaves its
        buffers to the next full garbage collection (measured: RSS +27 MiB over 350 rebuilds;
        flat with a collection every 10).
        """
        self._wait_for_copy()  # the old pipeline's buffers may still be read by the last copy
        old, self._pipe = self._pipe, self._build()
        self.rebuilds += 1
        shutdown = getattr(old, "_shutdown", None)  # what Pipeline.__del__ calls
        if shutdown is not None:
            shutdown()
        del old
        if self.rebuilds % self.COLLECT_EVERY == 0:
            # The graph's Python objects (operator classes DALI creates per pipeline, data nodes)
            # are cycles too, about 130 objects per rebuild: collect them now and then.
            gc.collect()

    def close(self) -> None:
        self._wait_for_copy()
        shutdown = getattr(self._pipe, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        super().close()

    def _wait_for_copy(self) -> None:
        """Block until the last copy out of DALI's output buffers has run (GPU only)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None

    def _run(self, items: list[bytes], plans: list[Plan]) -> torch.Tensor:
        pipe = self._pipe
        self._wait_for_copy()  # run() releases and reuses the buffers the last copy reads
        pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in items])
        # ROI coordinates and sizes follow the HWC shape order: (y, x).
        pipe.feed_input("roi_start", [np.array(p.source_box[1::-1], dtype=np.float32) for p in plans])
        pipe.feed_input("roi_end", [np.array(p.source_box[3:1:-1], dtype=np.float32) for p in plans])
        pipe.feed_input("size", [np.array(p.geometry.target_size[::-1], dtype=np.float32) for p in plans])
        if self.spec.geometry == "letterbox":
            # The slice starts at minus the padding: DALI fills what lies outside the image.
            pipe.feed_input("anchor", [np.array([-p.geometry.target[1], -p.geometry.target[0]], dtype=np.int32)
                                       for p in plans])
        (out,) = pipe.run()
        hwc = torch.from_dlpack(out.as_tensor())
        # DALI reuses its output buffer on the next run: copy out (on the device) now. NHWC viewed
        # as NCHW is channels-last already, which is what a channels-last model wants.
        nchw = hwc.permute(0, 3, 1, 2)
        layout = torch.channels_last if self.spec.channels_last else torch.contiguous_format
        rows = nchw.to(device=self.spec.device, dtype=self.spec.dtype, memory_format=layout, copy=True)
        if rows.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(rows.device))
        return rows

    def _build(self) -> Pipeline:
        # DALI's bundled stubs lag its API (enum members, decoder keywords): use it untyped here.
        fn: Any = importlib.import_module("nvidia.dali.fn")
        types: Any = importlib.import_module("nvidia.dali.types")
        pipeline_def: Any = importlib.import_module("nvidia.dali").pipeline_def

        spec = self.spec
        on_gpu = spec.device.type == "cuda"
        device_id = (spec.device.index or 0) if on_gpu else None
        interp = {
            "bilinear": types.INTERP_LINEAR,
            "bicubic": types.INTERP_CUBIC,
            "nearest": types.INTERP_NN,
        }[spec.interpolation]
        dtype = types.FLOAT16 if spec.dtype == torch.float16 else types.FLOAT
        decoder_args = {"hw_decoder_load": spec.hw_decoder_load} if on_gpu else {}

        @pipeline_def(
            batch_size=spec.max_batch, num_threads=self.threads, device_id=device_id,
            prefetch_queue_depth=1, exec_async=False, exec_pipelined=False,
        )
        def graph() -> Any:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
            size = fn.external_source(name="size", dtype=types.FLOAT, ndim=1)
            images = fn.decoders.image(
                encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB, **decoder_args
            )
            images = fn.resize(
                images, size=size, roi_start=roi_start, roi_end=roi_end,
                roi_relative=False, interp_type=interp, antialias=interp != types.INTERP_NN,
            )
            if spec.geometry == "letterbox":
                anchor = fn.external_source(name="anchor", dtype=types.INT32, ndim=1)
                images = fn.slice(
                    images, start=anchor, shape=list(spec.size), axis_names="HW",
                    out_of_bounds_policy="pad", fill_values=spec.pad_value,
                )
            return fn.crop_mirror_normalize(
                images, dtype=dtype, output_layout="HWC",
                mean=[m * 255.0 for m in spec.mean], std=[s * 255.0 for s in spec.std],
            )

        pipe = graph()
        pipe.build()
        return pipe

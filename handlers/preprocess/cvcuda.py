"""CV-CUDA backend: nvImageCodec batch decoding on the GPU, then one CV-CUDA HQ resize over the
variable-size batch that reads each image's source region (its region of interest, geometry.py)
and writes the float result straight into the output tensor (letterbox: into one tensor per item,
then placed on the padded canvas), then normalisation in place.

Everything is issued on the current torch stream of the worker's device (nvImageCodec's decode and
CV-CUDA's operator both take it), so it is ordered with the model without host synchronisation.
CV-CUDA keeps a cache of tensors per shape; `handler.preprocess.gpu_cache_limit_mb` bounds it.

nvImageCodec returns None for an image it cannot decode: that item goes to the CPU path, which
gives it its 4xx or decodes it if only the GPU codec disliked it.

UNVERIFIED: this module has not run on a GPU yet (see docs/gpu-verification.md). It needs CUDA
to import CV-CUDA, so on a CPU-only host it reports itself unavailable and `auto` skips it.
"""

from __future__ import annotations

import torch

from ..extras import install_hint
from .accelerated import AcceleratedPreprocessor, Plan
from .contract import PreprocessSpec

NAME = "cvcuda"

_ACCEPTED = {"JPEG": ("RGB", "L"), "MPO": ("RGB", "L"), "PNG": ("RGB", "RGBA", "L")}


def availability(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"CV-CUDA needs a CUDA device; this worker runs on {device} (use cpu, or dali/torchvision)"
    try:
        import cvcuda  # noqa: F401
        import nvidia.nvimgcodec  # noqa: F401
    except Exception as exc:
        return f"CV-CUDA or nvImageCodec is not importable ({type(exc).__name__}: {exc}); {install_hint('cvcuda')}"
    return None


def create(spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0) -> CvcudaPreprocessor:
    return CvcudaPreprocessor(spec, threads, processes, decode_timeout_s)


class CvcudaPreprocessor(AcceleratedPreprocessor):
    name = NAME
    ACCEPTED = _ACCEPTED
    KEEPS_IMAGES = True  # spec.keep_images: nvImageCodec's oriented HWC images, viewed as CHW (unverified)

    def __init__(
        self, spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(spec, threads, processes, decode_timeout_s)
        reason = availability(spec.device)
        if reason:
            raise ImportError(reason)
        import cvcuda
        import nvidia.nvimgcodec as nvimgcodec

        self._cvcuda = cvcuda
        self._nvimgcodec = nvimgcodec
        index = spec.device.index if spec.device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            cvcuda.set_cache_limit_inbytes(spec.gpu_cache_limit_mb << 20)
        self._decoder = nvimgcodec.Decoder(device_id=index, max_num_cpu_threads=max(1, threads))
        self._params = nvimgcodec.DecodeParams(
            apply_exif_orientation=True, color_spec=nvimgcodec.SRGB, allow_any_depth=False,
            sample_format=nvimgcodec.I_RGB,
        )
        self._interp = {
            "bilinear": cvcuda.Interp.LINEAR,
            "bicubic": cvcuda.Interp.CUBIC,
            "nearest": cvcuda.Interp.NEAREST,
        }[spec.interpolation]

    def accelerate(self, items: list[bytes], plans: list[Plan]) -> tuple[torch.Tensor | None, list[int]]:
        cvcuda, nvimgcodec = self._cvcuda, self._nvimgcodec
        stream = torch.cuda.current_stream(self.spec.device)
        streams = [nvimgcodec.CodeStream(data) for data in items]
        images = self._decoder.decode(streams, params=self._params, cuda_stream=stream.cuda_stream)
        ok = [k for k, image in enumerate(images) if image is not None]
        failed = [k for k, image in enumerate(images) if image is None]
        if not ok:
            return None, failed
        if self.spec.keep_images:  # UNVERIFIED on a GPU: __cuda_array_interface__, no copy
            self.kept = [torch.as_tensor(images[k], device=self.spec.device).permute(2, 0, 1) for k in ok]
        height, width = self.spec.size
        out = torch.empty((len(ok), height, width, 3), dtype=torch.float32, device=self.spec.device)
        letterbox = self.spec.geometry == "letterbox"
        if letterbox:
            # Each item's content has its own size: resize into one dense tensor per item, then
            # place it on the padded canvas (a strided sub-view is not handed to CV-CUDA).
            out.fill_(float(self.spec.pad_value))
            targets = [torch.empty((*plans[k].geometry.target_size[::-1], 3), dtype=torch.float32,
                                   device=self.spec.device) for k in ok]
        else:
            targets = [out[r] for r in range(len(ok))]
        src = cvcuda.as_tensors([images[k] for k in ok], cvcuda.TensorLayout.HWC)
        dst = cvcuda.as_tensors(targets, cvcuda.TensorLayout.HWC)
        rois = [_roi(plans[k]) for k in ok]
        cvcuda.hq_resize_into(
            dst, src, antialias=self._interp != cvcuda.Interp.NEAREST, roi=rois,
            interpolation=self._interp, stream=cvcuda.as_stream(stream),
        )
        if letterbox:
            for r, k in enumerate(ok):
                left, top, right, bottom = plans[k].geometry.target
                out[r, top:bottom, left:right] = targets[r]
        # NHWC storage viewed as NCHW is channels-last; the reference rounds to uint8 after resize.
        nchw = out.permute(0, 3, 1, 2).round_().clamp_(0, 255)
        return self.normalise(nchw), failed


def _roi(plan: Plan) -> tuple[float, float, float, float]:
    """The source region as CV-CUDA's 2D ROI: (low_h, low_w, high_h, high_w) in source pixels."""
    left, top, right, bottom = plan.source_box
    return (top, left, bottom, right)

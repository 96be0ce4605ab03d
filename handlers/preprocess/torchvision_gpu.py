"""torchvision backend: batched nvJPEG decoding (`torchvision.io.decode_jpeg(device="cuda")`), then
EXIF orientation, antialiased resize, center crop and normalisation as torch ops on the GPU.

It takes baseline and progressive JPEGs in RGB or grayscale; every other item (PNG, WebP, CMYK
JPEG...) goes through the CPU backend and is uploaded (see accelerated.py). If nvJPEG rejects a batch,
the items are decoded one by one so that only the bad ones fall back (and get their 4xx there).

On a CPU device the same code runs with torchvision's libjpeg-turbo decoder: that is how CI tests
it. It is slower there than the `cpu` backend (no DCT-domain downscaling, full-size float resize),
so `auto` never picks it on a CPU.

Numerical contract (tests/unit/test_preprocess_backends.py, real photos): against torchvision's
PIL reference, mean absolute difference < 0.01 and max < 0.05 in normalised units on the CPU
(mean < 0.03, max < 0.5 stated for CUDA, not yet measured). It resizes the
whole image, which is what the reference does; unlike the CPU backend it has no draft decoding.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .accelerated import AcceleratedPreprocessor, Plan
from .contract import PreprocessSpec
from .geometry import center_crop_box, resized_size

NAME = "torchvision"

# interpolation -> (torch mode, antialias). PIL's NEAREST samples pixel centres: nearest-exact.
_MODES = {
    "bilinear": ("bilinear", True),
    "bicubic": ("bicubic", True),
    "nearest": ("nearest-exact", False),
}


def availability(device: torch.device) -> str | None:
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception as exc:  # ImportError, or a torchvision built against another torch
        return f"torchvision.io.decode_jpeg is not importable ({exc}); pip install torchvision"
    return None


def create(spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0) -> TorchvisionPreprocessor:
    return TorchvisionPreprocessor(spec, threads, processes, decode_timeout_s)


def orient(image: torch.Tensor, turn: int) -> torch.Tensor:
    """Apply EXIF orientation `turn` (1..8) to a CHW tensor, as PIL's exif_transpose does."""
    if turn == 2:
        return image.flip(-1)
    if turn == 3:
        return image.flip(-2, -1)
    if turn == 4:
        return image.flip(-2)
    if turn == 5:
        return image.transpose(-2, -1)
    if turn == 6:
        return image.transpose(-2, -1).flip(-1)
    if turn == 7:
        return image.transpose(-2, -1).flip(-2, -1)
    if turn == 8:
        return image.transpose(-2, -1).flip(-2)
    return image


class TorchvisionPreprocessor(AcceleratedPreprocessor):
    name = NAME
    ACCEPTED = {"JPEG": ("RGB", "L"), "MPO": ("RGB", "L")}  # orientation is applied in `orient`
    KEEPS_IMAGES = True  # spec.keep_images: the oriented nvJPEG output of each row

    def __init__(
        self, spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(spec, threads, processes, decode_timeout_s)
        from torchvision.io import ImageReadMode, decode_jpeg

        self._decode_jpeg = decode_jpeg
        self._rgb = ImageReadMode.RGB
        self._mode, self._antialias = _MODES[spec.interpolation]

    def accelerate(self, items: list[bytes], plans: list[Plan]) -> tuple[torch.Tensor | None, list[int]]:
        decoded = self._decode(items)
        images = {k: image for k, image in enumerate(decoded) if image is not None}
        ok = list(images)
        failed = [k for k, image in enumerate(decoded) if image is None]
        if not ok:
            return None, failed
        height, width = self.spec.size
        out = torch.empty((len(ok), 3, height, width), dtype=torch.float32, device=self.spec.device)
        if self.spec.geometry == "letterbox":
            out.fill_(float(self.spec.pad_value))
        for row, k in enumerate(ok):
            image = orient(images[k], plans[k].orientation or 1)
            self._resize_into(image, plans[k], out[row])
            if self.spec.keep_images:
                self.kept.append(image)
        return self.normalise(out), failed

    def _decode(self, items: list[bytes]) -> list[torch.Tensor | None]:
        with warnings.catch_warnings():
            # frombuffer warns that bytes are read-only; the decoder only reads them.
            warnings.simplefilter("ignore", UserWarning)
            encoded = [torch.frombuffer(data, dtype=torch.uint8) for data in items]
        # On CUDA, torchvision (decode_jpegs_cuda) decodes on a private stream and makes the current
        # stream wait on it before returning: every op below, and the model after it, is queued
        # behind the decode without a host synchronisation. The resize, normalise and forward rely
        # on that ordering; keep all of them on the current stream.
        try:
            return list(self._decode_jpeg(encoded, mode=self._rgb, device=self.spec.device))
        except RuntimeError:
            pass  # one bad item fails nvJPEG's whole batch: find it
        decoded: list[torch.Tensor | None] = []
        for tensor in encoded:
            try:
                decoded.append(self._decode_jpeg(tensor, mode=self._rgb, device=self.spec.device))
            except RuntimeError:
                decoded.append(None)
        return decoded

    def _resize_into(self, image: torch.Tensor, plan: Plan, out: torch.Tensor) -> None:
        """Resize `image` (CHW uint8) as the plan says and write it into `out` (CHW float 0..255)."""
        geometry = plan.geometry
        if geometry.mode == "center_crop":
            # The reference resizes the whole image, then crops: do the same, pixel for pixel.
            resized_w, resized_h = resized_size(*geometry.original_size, self.spec.resize_size)
            left, top, right, bottom = center_crop_box(resized_w, resized_h, *geometry.input_size)
            x = self._resize(image, resized_w, resized_h)
            out.copy_(x[0, :, top:bottom, left:right])
            return
        left, top, right, bottom = geometry.target
        out[:, top:bottom, left:right] = self._resize(image, right - left, bottom - top)[0]

    def _resize(self, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
        x = image.unsqueeze(0).to(torch.float32)
        x = F.interpolate(x, size=(height, width), mode=self._mode, antialias=self._antialias,
                          **({} if self._mode.startswith("nearest") else {"align_corners": False}))
        # The reference resizes to uint8: round and clamp the same way, so both see the same pixels.
        return x.round_().clamp_(0, 255)

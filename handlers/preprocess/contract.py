"""The preprocess contract: what every backend is given, what it returns, and what it must not do.

    PreprocessSpec   the one description of what the model needs (geometry, normalisation, dtype,
                     device, layout, decode limits); every backend is built from it
    Preprocessor     the object a backend's `create` returns: run(items) -> Batch, close(), and the
                     `name` and `fallback_items` the handler reads
    Batch            one run's result: a tensor of the successful rows plus per-item geometry/errors
    Normaliser       (x/255 - mean)/std, the normalisation every backend applies the same way
    BackendContractError  a backend returned something the contract rules out (a bug, not an item)

The numerical contract every backend meets against the CPU reference, per geometry mode
(geometry.py): center_crop = torchvision's Resize(resize_size, antialias=True) -> CenterCrop(input)
-> ToTensor -> Normalize; letterbox and stretch = Pillow's antialiased resize of the whole image to
the planned size, pasted on a pad_value canvas for letterbox.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Protocol

import torch

from .geometry import Geometry, plan
from .host.decode import DecodeSpec, decode_spec

if TYPE_CHECKING:
    from ..config import PreprocessConfig
    from ..errors import RequestError

__all__ = ["BackendContractError", "Batch", "Normaliser", "PreprocessSpec", "Preprocessor"]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""handler.preprocess.dtype -> the torch dtype of the model input."""


class BackendContractError(RuntimeError):
    """A backend broke the contract of this module (e.g. returned a wrong number of rows): a bug in
    the backend, not a fault of any item, so it fails the batch loudly rather than misaligning rows."""


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model needs: output geometry, normalisation, dtype, device and memory layout.

    The only spec type: backends are built from it, and the decode processes get its torch-free
    projection (`decode_spec()`, a `DecodeSpec`), derived field by field.
    """

    resize_size: int = 256
    crop_size: int = 224
    geometry: str = "center_crop"
    input_size: tuple[int, int] | None = None
    """Model input (height, width); None = crop_size x crop_size."""
    pad_value: int = 114
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    channels_last: bool = False
    jpeg_draft: bool = True
    draft_min_ratio: float = 2.0
    max_image_pixels: int = 50_000_000
    max_batch: int = 1
    """Largest batch run() will be given (TorchServe's batchSize); larger ones are split."""
    hw_decoder_load: float = 0.65
    gpu_cache_limit_mb: int = 256
    keep_images: bool = False
    """Also return each item's decoded image (`Batch.images`): EXIF-oriented RGB uint8 [3, H, W] at
    full resolution on `device`, decoded once with the model input made from it (no JPEG draft
    decoding). A cascade crops its second stage from them (handlers/tasks/cascade.py)."""

    @classmethod
    def from_config(
        cls, cfg: PreprocessConfig, device: torch.device, channels_last: bool = False,
        max_batch: int = 1,
    ) -> PreprocessSpec:
        """The spec of handler.preprocess: every field named like a config key is copied; the
        rest come from the worker (device, layout, batch size) or are converted (dtype, input_size)."""
        same = {f.name: getattr(cfg, f.name) for f in fields(cls) if f.name in _CONFIG_COPIED}
        return cls(
            **same,
            input_size=cfg.input_hw,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            dtype=DTYPES[cfg.dtype],
            device=device,
            channels_last=channels_last,
            max_batch=max(1, max_batch),
        )

    @property
    def size(self) -> tuple[int, int]:
        """The model input's (height, width)."""
        if self.input_size:
            height, width = self.input_size
            return height, width
        return self.crop_size, self.crop_size

    def plan(self, width: int, height: int, fmt: str = "") -> Geometry:
        """The geometry of an oriented (width, height) image under this spec's mode."""
        h, w = self.size
        return plan(self.geometry, width, height, (w, h), self.resize_size, fmt)

    def decode_spec(self) -> DecodeSpec:
        """The torch-free part a decode process needs (see DecodeSpec for why it exists)."""
        return decode_spec(self)


# PreprocessSpec fields that PreprocessConfig holds under the same name and meaning.
_CONFIG_COPIED = frozenset({
    "resize_size", "crop_size", "geometry", "pad_value", "interpolation", "jpeg_draft",
    "draft_min_ratio", "max_image_pixels", "hw_decoder_load", "gpu_cache_limit_mb",
})


class Normaliser:
    """(x/255 - mean)/std as one multiply and one subtract, constants cached per device."""

    def __init__(self, spec: PreprocessSpec, dtype: torch.dtype = torch.float32) -> None:
        std = torch.tensor(spec.std, dtype=torch.float32)
        mean = torch.tensor(spec.mean, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).to(dtype)
        self._shift = (mean / std).view(1, 3, 1, 1).to(dtype)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise an NCHW tensor of 0..255 values in place; returns it."""
        if x.device not in self._on_device:
            self._on_device[x.device] = (self._scale.to(x.device), self._shift.to(x.device))
        scale, shift = self._on_device[x.device]
        return x.mul_(scale).sub_(shift)


@dataclass
class Batch:
    """A backend's result for N input items.

    `tensor` holds one row per successful item, in input order; `rows[k]` is the input index of row
    k. `geometry[i]` and `errors[i]` are per input item (exactly one of them is None).
    """

    tensor: torch.Tensor | None
    rows: list[int]
    geometry: list[Geometry | None]
    errors: list[RequestError | None]
    images: list[torch.Tensor | None] = field(default_factory=list)
    """With `spec.keep_images`: per input item its decoded image (uint8 [3, H, W] on the device,
    oriented, full resolution; None for a failed item). Empty otherwise."""


class Preprocessor(Protocol):
    """What a backend's `create` returns; the handler uses nothing else."""

    name: str
    """The backend's registry name (registry.py)."""
    fallback_items: int
    """Items so far that this backend sent to the CPU path (a GPU decoder refused them); the
    PreprocessFallbacks metric is its growth per batch. Always 0 for the `cpu` backend."""

    def run(self, items: list[bytes]) -> Batch:
        """Decode and preprocess `items` (encoded images) into one Batch, in input order."""
        ...

    def close(self) -> None:
        """Release threads, processes and device buffers; the preprocessor is unusable after."""
        ...

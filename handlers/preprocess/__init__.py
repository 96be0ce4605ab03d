"""Preprocess backends: encoded image bytes -> one model-ready tensor, per-item geometry and errors.

Every backend module (`cpu`, `torchvision_gpu`, `dali`, `cvcuda`) exposes the same names:

    NAME: str
    availability(device) -> str | None     # None when usable, else why not (with an install hint)
    create(spec, threads, processes=0, decode_timeout_s=10.0) -> Preprocessor
                                           # an object with run(items) -> Batch and close()

and meets the same numerical contract against the CPU reference for each geometry mode
(`geometry.py`): center_crop = torchvision's Resize(resize_size, antialias=True) ->
CenterCrop(input) -> ToTensor -> Normalize; letterbox and stretch = Pillow's antialiased resize of
the whole image to the planned size, pasted on a pad_value canvas for letterbox.
`create_preprocessor(name, spec, threads)` picks one; `auto` takes the best available on the device.
`processes` > 0 (handler.pipeline.decode_processes) runs the CPU decoding (the `cpu` backend, the
others' CPU fallbacks) in that many decode processes (decode_pool.py) instead of `threads`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..config import PreprocessConfig
from ..errors import ConfigError, RequestError
from .geometry import GEOMETRY_MODES, Geometry, plan

__all__ = ["GEOMETRY_MODES", "Batch", "Geometry", "Normaliser", "PreprocessSpec", "Preprocessor",
           "backend_module", "create_preprocessor", "resolve_backend"]

# Best first: `auto` takes the first one available on the worker's device.
_BACKEND_MODULES = {
    "cpu": "handlers.preprocess.cpu",
    "torchvision": "handlers.preprocess.torchvision_gpu",
    "dali": "handlers.preprocess.dali",
    "cvcuda": "handlers.preprocess.cvcuda",
}
# On a GPU: DALI (hardware JPEG decoder + fused resize/normalise), then CV-CUDA, then torchvision's
# nvJPEG (always installed with torchvision). On a CPU the `cpu` backend is the fast one: the others
# run there (dali as a CPU pipeline, torchvision with libjpeg-turbo) but without draft decoding.
_AUTO_ORDER_GPU: tuple[str, ...] = ("dali", "cvcuda", "torchvision")
_AUTO_ORDER_CPU = ("cpu",)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class PreprocessSpec:
    """What the model needs: output geometry, normalisation, dtype, device and memory layout."""

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

    @classmethod
    def from_config(
        cls, cfg: PreprocessConfig, device: torch.device, channels_last: bool = False,
        max_batch: int = 1,
    ) -> PreprocessSpec:
        return cls(
            resize_size=cfg.resize_size,
            crop_size=cfg.crop_size,
            geometry=cfg.geometry,
            input_size=cfg.input_hw,
            pad_value=cfg.pad_value,
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            interpolation=cfg.interpolation,
            dtype=_DTYPES[cfg.dtype],
            device=device,
            channels_last=channels_last,
            jpeg_draft=cfg.jpeg_draft,
            draft_min_ratio=cfg.draft_min_ratio,
            max_image_pixels=cfg.max_image_pixels,
            max_batch=max(1, max_batch),
            hw_decoder_load=cfg.hw_decoder_load,
            gpu_cache_limit_mb=cfg.gpu_cache_limit_mb,
        )

    @property
    def size(self) -> tuple[int, int]:
        """The model input's (height, width)."""
        return tuple(self.input_size) if self.input_size else (self.crop_size, self.crop_size)  # type: ignore[return-value]

    def plan(self, width: int, height: int, fmt: str = "") -> Geometry:
        """The geometry of an oriented (width, height) image under this spec's mode."""
        h, w = self.size
        return plan(self.geometry, width, height, (w, h), self.resize_size, fmt)


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


class Preprocessor(Protocol):
    name: str
    #: Items so far that this backend sent to the CPU path (a GPU decoder refused them); the
    #: PreprocessFallbacks metric is its growth per batch.
    fallback_items: int

    def run(self, items: list[bytes]) -> Batch: ...

    def close(self) -> None: ...


def backend_module(name: str):
    if name not in _BACKEND_MODULES:
        known = ", ".join(["auto", *_BACKEND_MODULES])
        raise ConfigError(
            f"handler.preprocess.backend: {name!r} is not available in this version "
            f"(known: {known})"
        )
    return importlib.import_module(_BACKEND_MODULES[name])


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend to use for `name` on `device`; raises ConfigError naming why one is unusable."""
    if name != "auto":
        reason = backend_module(name).availability(device)
        if reason is not None:
            raise ConfigError(f"handler.preprocess.backend: {name!r} cannot run here: {reason}")
        return name
    order = _AUTO_ORDER_GPU + _AUTO_ORDER_CPU if device.type == "cuda" else _AUTO_ORDER_CPU
    for candidate in order:
        if backend_module(candidate).availability(device) is None:
            return candidate
    raise ConfigError("handler.preprocess.backend: no preprocess backend is available")


def create_preprocessor(
    name: str, spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0,
) -> Preprocessor:
    """The preprocessor of backend `name` (or `auto`): CPU decoding on `threads` threads, or in
    `processes` decode processes (each item given `decode_timeout_s` before its process is killed)."""
    chosen = resolve_backend(name, spec.device)
    return backend_module(chosen).create(spec, threads, processes, decode_timeout_s)

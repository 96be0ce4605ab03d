"""The preprocess backends by name: the one list config validation, `auto` and the profiler read.

Each backend is a sibling module of this one that exposes the same names (`BackendModule`):

    NAME: str
    availability(device) -> str | None     # None when usable, else why not (with an install hint)
    create(spec, threads, processes=0, decode_timeout_s=10.0) -> Preprocessor   (contract.py)

Importing this module imports neither torch nor any backend (handlers/config.py reads
`BACKEND_CHOICES` from it); a backend's module is imported when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol, cast

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .contract import Preprocessor, PreprocessSpec

__all__ = ["AUTO", "BACKEND_CHOICES", "BACKEND_NAMES", "BackendModule", "availabilities", "backend_module",
           "create_preprocessor", "resolve_backend"]

AUTO = "auto"
# name -> the module (in this package) that implements it.
_MODULES = {
    "cpu": "cpu",
    "torchvision": "torchvision_gpu",
    "dali": "dali",
    "cvcuda": "cvcuda",
}
BACKEND_NAMES: tuple[str, ...] = tuple(_MODULES)
"""Every backend this version has."""
BACKEND_CHOICES: tuple[str, ...] = (AUTO, *BACKEND_NAMES)
"""What handler.preprocess.backend accepts."""

# Best first: `auto` takes the first one available on the worker's device. On a GPU: DALI (hardware
# JPEG decoder + fused resize/normalise), then CV-CUDA, then torchvision's nvJPEG (always installed
# with torchvision). On a CPU the `cpu` backend is the fast one: the others run there (dali as a CPU
# pipeline, torchvision with libjpeg-turbo) but without draft decoding.
_AUTO_ORDER_GPU: tuple[str, ...] = ("dali", "cvcuda", "torchvision")
_AUTO_ORDER_CPU: tuple[str, ...] = ("cpu",)


class BackendModule(Protocol):
    """What every backend module exposes."""

    NAME: str

    def availability(self, device: torch.device) -> str | None: ...

    def create(
        self, spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0,
    ) -> Preprocessor: ...


def backend_module(name: str) -> BackendModule:
    """The module of backend `name`, imported now; ConfigError for a name this version lacks."""
    if name not in _MODULES:
        known = ", ".join(BACKEND_CHOICES)
        raise ConfigError(
            f"handler.preprocess.backend: {name!r} is not available in this version "
            f"(known: {known})"
        )
    package = __name__.rpartition(".")[0]
    return cast("BackendModule", importlib.import_module(f"{package}.{_MODULES[name]}"))


def availabilities(device: torch.device) -> dict[str, str | None]:
    """Every backend -> None when usable on `device`, else why not."""
    return {name: backend_module(name).availability(device) for name in BACKEND_NAMES}


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend to use for `name` on `device`; raises ConfigError naming why one is unusable."""
    if name != AUTO:
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

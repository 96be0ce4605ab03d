"""Preprocess: encoded image bytes -> one model-ready tensor, per-item geometry and errors.

The rooms:

    contract.py        the contract every backend meets: PreprocessSpec (the one spec), Preprocessor,
                       Batch, Normaliser, BackendContractError
    registry.py        the backends by name; `auto`; create_preprocessor (torch-free to import)
    geometry.py        how a model-input pixel maps to an original pixel, per geometry mode
    cpu.py             the `cpu` backend, and every other backend's CPU path
    torchvision_gpu.py, dali.py, cvcuda.py
                       the accelerated backends, siblings built on accelerated.py (probe, split,
                       accelerate, fall back to the CPU path, assemble)
    host/              the CPU path's internals: Pillow decode, pinned upload, decode processes

This package re-exports the names its importers use. It imports nothing heavy itself: torch comes
with the first name that needs it (contract.py), so handlers/config.py can read the backend names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .geometry import GEOMETRY_MODES, Geometry
from .registry import (
    BACKEND_CHOICES,
    BACKEND_NAMES,
    availabilities,
    backend_module,
    create_preprocessor,
    resolve_backend,
)

if TYPE_CHECKING:
    from .contract import BackendContractError, Batch, Normaliser, Preprocessor, PreprocessSpec

__all__ = ["BACKEND_CHOICES", "BACKEND_NAMES", "GEOMETRY_MODES", "BackendContractError", "Batch", "Geometry",
           "Normaliser", "PreprocessSpec", "Preprocessor", "availabilities", "backend_module",
           "create_preprocessor", "resolve_backend"]

_FROM_CONTRACT = frozenset({"BackendContractError", "Batch", "Normaliser", "PreprocessSpec", "Preprocessor"})


def __getattr__(name: str) -> Any:
    """The contract's names, imported (with torch) on first use."""
    if name in _FROM_CONTRACT:
        return getattr(importlib.import_module(f"{__name__}.contract"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

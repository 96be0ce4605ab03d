"""The GPU extras in pyproject.toml: each one must install the libraries its backend loads.

A backend that imports fine but cannot find a shared library at run time fails only on a GPU
host, long after `pip install` said yes; these checks read the metadata instead, offline.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]

# extra -> the distributions its backend imports or dlopens.
GPU_EXTRAS = {
    "dali": {"nvidia-dali-cuda120"},
    "cvcuda": {"cvcuda-cu12", "nvidia-nvimgcodec-cu12"},
    "trt": {"torch-tensorrt"},
    "cudf": {"cudf-cu12"},
}
# The versions the cvcuda backend was written and checked against (docs/gpu-verification.md).
TESTED = {"cvcuda-cu12": "0.19.0", "nvidia-nvimgcodec-cu12": "0.9.0.20"}


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 without tomli cannot read pyproject.toml")
    with path.open("rb") as f:
        return tomllib.load(f)


@pytest.fixture(scope="module")
def extras() -> dict[str, dict[str, Requirement]]:
    """Each extra's requirements, by canonical distribution name."""
    declared = _read_toml(ROOT / "pyproject.toml")["project"]["optional-dependencies"]
    return {extra: {canonicalize_name(r.name): r for r in map(Requirement, reqs)} for extra, reqs in declared.items()}


@pytest.mark.parametrize("extra", sorted(GPU_EXTRAS))
def test_gpu_extra_names_the_libraries_its_backend_loads(extras, extra):
    assert extra in extras, f"pyproject.toml has no [{extra}] extra"
    missing = GPU_EXTRAS[extra] - set(extras[extra])
    assert not missing, f"[{extra}] lacks {sorted(missing)} (has {sorted(extras[extra])})"


def _has_upper_bound(req: Requirement) -> bool:
    return any(spec.operator in ("<", "<=", "==", "~=", "===") for spec in req.specifier)


def test_cvcuda_extra_brings_nvjpeg_for_nvimagecodec(extras):
    """nvImageCodec's nvJPEG plugin dlopens libnvjpeg.so.12, which its wheel installs only through
    its `nvjpeg` extra; torch's cu13 wheels ship libnvjpeg.so.13, so without the extra the decoder
    has no GPU JPEG path unless DALI (which asks for nvimgcodec[all]) happens to be installed."""
    codec = extras["cvcuda"]["nvidia-nvimgcodec-cu12"]
    assert "nvjpeg" in codec.extras, f"[cvcuda] needs nvidia-nvimgcodec-cu12[nvjpeg], has {codec}"


@pytest.mark.parametrize("name", sorted(TESTED))
def test_cvcuda_extra_is_bounded_to_the_tested_minor(extras, name):
    req = extras["cvcuda"][name]
    assert _has_upper_bound(req), f"[cvcuda] {req}: no upper bound; these APIs change between minors"
    assert req.specifier.contains(TESTED[name], prereleases=True), f"[cvcuda] {req} excludes tested {TESTED[name]}"
    major, minor = TESTED[name].split(".")[:2]
    next_minor = f"{major}.{int(minor) + 1}.0"
    assert not req.specifier.contains(next_minor, prereleases=True), f"[cvcuda] {req} admits untested {next_minor}"


_HINT = re.compile(r"torchserve-gpu-handlers\[([a-z0-9_,-]+)\]")


def test_install_hints_name_extras_that_exist(extras):
    """Every `pip install 'torchserve-gpu-handlers[X]'` hint in the code names a real extra."""
    hints = {(path.relative_to(ROOT).as_posix(), name)
             for folder in ("handlers", "archiver_scripts")
             for path in (ROOT / folder).rglob("*.py")
             for match in _HINT.finditer(path.read_text(encoding="utf-8"))
             for name in match.group(1).split(",")}
    assert hints, "expected install hints in handlers/ and archiver_scripts/"
    unknown = sorted((path, name) for path, name in hints if name not in extras)
    assert not unknown, f"install hints name extras pyproject.toml lacks: {unknown}"

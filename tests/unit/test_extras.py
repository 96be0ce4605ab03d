"""The GPU extras in pyproject.toml: each one must install the libraries its backend loads, built for
the CUDA major version its name says, and the install hints must name the extra for torch's CUDA.

A backend that imports fine but cannot find a shared library at run time fails only on a GPU
host, long after `pip install` said yes; these checks read the metadata and the sources instead,
offline.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from handlers import extras as hints

ROOT = Path(__file__).resolve().parents[2]

# extra -> the distributions its backend imports or dlopens.
GPU_EXTRAS = {
    "dali": {"nvidia-dali-cuda130"},
    "dali-cu12": {"nvidia-dali-cuda120"},
    "cvcuda": {"cvcuda-cu13", "nvidia-nvimgcodec-cu13"},
    "cvcuda-cu12": {"cvcuda-cu12", "nvidia-nvimgcodec-cu12"},
    "trt": {"torch-tensorrt"},
    "cudf": {"cudf-cu13"},
    "cudf-cu12": {"cudf-cu12"},
}
# The CUDA major each extra is for: plain names follow the pinned torch (CUDA 13), -cu12 the CUDA 12 builds.
CUDA_OF_EXTRA = {extra: 12 if extra.endswith("-cu12") else 13 for extra in GPU_EXTRAS}
# The versions the cvcuda backend was written and checked against (docs/gpu-verification.md).
TESTED = {
    "cvcuda": {"cvcuda-cu13": "0.19.0", "nvidia-nvimgcodec-cu13": "0.9.0.20"},
    "cvcuda-cu12": {"cvcuda-cu12": "0.19.0", "nvidia-nvimgcodec-cu12": "0.9.0.20"},
}

# What each backend loads (the modules that import the library) and which distribution provides each
# import name, per CUDA major. The sources are scanned, so a new import without an extra fails here.
BACKEND_SOURCES = {
    "dali": ["handlers/preprocess/dali.py"],
    "cvcuda": ["handlers/preprocess/cvcuda.py"],
    "cudf": ["handlers/tables.py"],
    "trt": ["handlers/backbone.py", "archiver_scripts/compile.py"],
}
PROVIDERS = {
    "nvidia.dali": {13: "nvidia-dali-cuda130", 12: "nvidia-dali-cuda120"},
    "cvcuda": {13: "cvcuda-cu13", 12: "cvcuda-cu12"},
    "nvidia.nvimgcodec": {13: "nvidia-nvimgcodec-cu13", 12: "nvidia-nvimgcodec-cu12"},
    "cudf": {13: "cudf-cu13", 12: "cudf-cu12"},
    "torch_tensorrt": {13: "torch-tensorrt", 12: "torch-tensorrt"},
}


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


@pytest.mark.parametrize("extra", sorted(GPU_EXTRAS))
def test_gpu_extra_is_built_for_the_cuda_its_name_says(extras, extra):
    """CUDA 13 names (cu13, cuda130) in the plain extras, CUDA 12 names in the -cu12 ones; a library
    for another CUDA than torch's fails to load or brings a second CUDA."""
    want = CUDA_OF_EXTRA[extra]
    for name in extras[extra]:
        flavours = set(re.findall(r"cu(?:da)?(\d\d)", name))
        assert flavours <= {str(want)}, f"[{extra}] is for CUDA {want} but asks for {name}"


def _gpu_imports(path: Path) -> set[str]:
    """The GPU library modules a source file imports (`import x`, `from x import y`,
    `importlib.import_module("x")`), by the names in PROVIDERS."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            names = [str(node.args[0].value)]
        for name in names:
            found |= {lib for lib in PROVIDERS if name == lib or name.startswith(lib + ".")}
    return found


@pytest.mark.parametrize("extra", sorted(GPU_EXTRAS))
def test_gpu_extra_is_exactly_what_its_backend_imports(extras, extra):
    """Scan the backend's sources: every GPU library it imports is in the extra for that CUDA, and the
    extra asks for nothing the backend does not load."""
    backend = extra.removesuffix("-cu12")
    loaded = set().union(*(_gpu_imports(ROOT / source) for source in BACKEND_SOURCES[backend]))
    assert loaded, f"found no GPU library import in {BACKEND_SOURCES[backend]}: is the scan looking at the right files?"
    needed = {PROVIDERS[lib][CUDA_OF_EXTRA[extra]] for lib in loaded}
    declared = set(extras[extra])
    assert needed <= declared, f"[{extra}] lacks {sorted(needed - declared)} for imports {sorted(loaded)}"
    assert declared <= needed, f"[{extra}] asks for {sorted(declared - needed)}, which {backend} never imports"


@pytest.mark.parametrize("library", sorted(PROVIDERS))
def test_installed_provider_really_provides_the_import(library):
    """Where a provider is installed (CI installs [dali]), its files hold the module imported."""
    path = library.replace(".", "/") + "/__init__.py"
    checked = 0
    for dist in set(PROVIDERS[library].values()):
        try:
            files = importlib.metadata.files(dist) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        checked += 1
        assert any(str(f).replace("\\", "/") == path for f in files), f"{dist} does not install {path}"
    if not checked:
        pytest.skip(f"no distribution providing {library} is installed here")


def _has_upper_bound(req: Requirement) -> bool:
    return any(spec.operator in ("<", "<=", "==", "~=", "===") for spec in req.specifier)


@pytest.mark.parametrize("extra", ["cvcuda", "cvcuda-cu12"])
def test_cvcuda_extra_brings_nvjpeg_for_nvimagecodec(extras, extra):
    """nvImageCodec's nvJPEG plugin dlopens libnvjpeg, which its wheel installs only through its
    `nvjpeg` extra (nvidia-nvjpeg 13.x for cu13, nvidia-nvjpeg-cu12 for cu12); without it the decoder
    has no GPU JPEG path unless DALI (which asks for nvimgcodec[all]) happens to be installed."""
    codec = next(r for name, r in extras[extra].items() if name.startswith("nvidia-nvimgcodec"))
    assert "nvjpeg" in codec.extras, f"[{extra}] needs {codec.name}[nvjpeg], has {codec}"


@pytest.mark.parametrize(("extra", "name"), [(e, n) for e, tested in sorted(TESTED.items()) for n in sorted(tested)])
def test_cvcuda_extra_is_bounded_to_the_tested_minor(extras, extra, name):
    req = extras[extra][name]
    tested = TESTED[extra][name]
    assert _has_upper_bound(req), f"[{extra}] {req}: no upper bound; these APIs change between minors"
    assert req.specifier.contains(tested, prereleases=True), f"[{extra}] {req} excludes tested {tested}"
    major, minor = tested.split(".")[:2]
    next_minor = f"{major}.{int(minor) + 1}.0"
    assert not req.specifier.contains(next_minor, prereleases=True), f"[{extra}] {req} admits untested {next_minor}"


_HINT = re.compile(r"torchserve-gpu-handlers\[([a-z0-9_,-]+)\]")


def test_install_hints_name_extras_that_exist(extras):
    """Every `pip install 'torchserve-gpu-handlers[X]'` hint in the code names a real extra."""
    hints_in_code = {(path.relative_to(ROOT).as_posix(), name)
                     for folder in ("handlers", "archiver_scripts")
                     for path in (ROOT / folder).rglob("*.py")
                     for match in _HINT.finditer(path.read_text(encoding="utf-8"))
                     for name in match.group(1).split(",")}
    assert hints_in_code, "expected install hints in handlers/ and archiver_scripts/"
    unknown = sorted((path, name) for path, name in hints_in_code if name not in extras)
    assert not unknown, f"install hints name extras pyproject.toml lacks: {unknown}"


def test_hint_table_matches_pyproject(extras):
    """handlers/extras.py's table (what the hints say) and pyproject.toml (what pip installs) agree."""
    for library, variants in hints.EXTRAS.items():
        for major, (extra, dists) in variants.items():
            assert extra in extras, f"handlers/extras.py names [{extra}], which pyproject.toml lacks"
            said = {canonicalize_name(Requirement(d).name): Requirement(d).extras for d in dists}
            assert set(said) == set(extras[extra]), f"[{extra}]: hint says {sorted(said)}, pyproject {sorted(extras[extra])}"
            for name, wanted in said.items():
                assert wanted == extras[extra][name].extras, f"[{extra}] {name}: extras {wanted} vs pyproject's"
            if library != "trt":
                assert CUDA_OF_EXTRA[extra] == major, f"CUDA {major} hint points at [{extra}]"


@pytest.mark.parametrize(("cuda", "suffix"), [("13.0", ""), ("13.2", ""), ("12.8", "-cu12"), ("12.4", "-cu12"),
                                              (None, "")])
@pytest.mark.parametrize("library", ["dali", "cvcuda", "cudf"])
def test_hint_names_the_extra_for_torchs_cuda(extras, library, cuda, suffix):
    hint = hints.install_hint(library, cuda)
    named = _HINT.findall(hint)
    assert named == [library + suffix], hint
    assert named[0] in extras
    if cuda is None:
        assert "CPU-only" in hint, hint
    else:
        assert cuda in hint, hint


def test_trt_hint_is_one_extra_for_every_cuda():
    assert _HINT.findall(hints.install_hint("trt", "13.0")) == ["trt"]
    cu12 = hints.install_hint("trt", "12.8")
    assert _HINT.findall(cu12) == ["trt"] and "CUDA 12 torch" in cu12, cu12


def test_backend_reports_the_extra_for_the_running_torch(monkeypatch):
    """A missing library's reason names the running torch's extra (faked: CUDA 12.8, DALI absent)."""
    from handlers.preprocess import cvcuda, dali

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "cvcuda", None)
    reason = dali.availability(torch.device("cpu"))
    assert reason and "[dali-cu12]" in reason and "nvidia-dali-cuda120" in reason, reason
    reason = cvcuda.availability(torch.device("cuda"))
    assert reason and "[cvcuda-cu12]" in reason and "cvcuda-cu12" in reason, reason
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    reason = dali.availability(torch.device("cpu"))
    assert reason and "'torchserve-gpu-handlers[dali]'" in reason and "nvidia-dali-cuda130" in reason, reason

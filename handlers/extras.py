"""Install hints for the optional GPU libraries, named for the CUDA of the torch that is running.

NVIDIA publishes each GPU library once per CUDA major version (`nvidia-dali-cuda130` and
`nvidia-dali-cuda120`, `cvcuda-cu13` and `cvcuda-cu12`, ...), and a library built for another CUDA
than torch's either fails to load or brings a second copy of the CUDA libraries. pyproject.toml has
one extra per library and CUDA major: the plain name (`dali`) for CUDA 13, the default of the
pinned torch wheels, and a `-cu12` variant (`dali-cu12`) for CUDA 12 builds of torch.
`tests/unit/test_extras.py` holds this table and pyproject.toml to each other.

Nothing here runs at import: torch is asked for its CUDA version only when a hint is built.
"""

from __future__ import annotations

PACKAGE = "torchserve-gpu-handlers"

#: extra -> CUDA major -> (extra name, the distributions it installs). Kept equal to pyproject.toml.
EXTRAS: dict[str, dict[int, tuple[str, tuple[str, ...]]]] = {
    "dali": {13: ("dali", ("nvidia-dali-cuda130",)), 12: ("dali-cu12", ("nvidia-dali-cuda120",))},
    "cvcuda": {
        13: ("cvcuda", ("cvcuda-cu13", "nvidia-nvimgcodec-cu13[nvjpeg]")),
        12: ("cvcuda-cu12", ("cvcuda-cu12", "nvidia-nvimgcodec-cu12[nvjpeg]")),
    },
    "cudf": {13: ("cudf", ("cudf-cu13",)), 12: ("cudf-cu12", ("cudf-cu12",))},
    # One distribution name for every CUDA: each CUDA build of torch-tensorrt is published under the
    # same name by the index that serves the matching torch build (the default index has CUDA 13's).
    "trt": {13: ("trt", ("torch-tensorrt",)), 12: ("trt", ("torch-tensorrt",))},
}
DEFAULT_CUDA = 13  # the CUDA of the pinned torch wheels (torch 2.14.1's default build)
RUNNING = "running"  # `cuda=RUNNING`: ask the running torch (the default); None means a CPU-only torch


def torch_cuda() -> str | None:
    """`torch.version.cuda` of the running torch: '13.0', '12.8', or None for a CPU-only build."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def cuda_major(cuda: str | None) -> int | None:
    try:
        return int(str(cuda).split(".")[0]) if cuda else None
    except ValueError:
        return None


def extra_for(library: str, cuda: str | None = RUNNING) -> tuple[str, tuple[str, ...]]:
    """(extra name, distributions) of `library` ('dali', 'cvcuda', 'cudf', 'trt') for torch's `cuda`
    (default: the running torch's); the CUDA 13 extra when torch has no CUDA or one no extra is built for."""
    variants = EXTRAS[library]
    major = cuda_major(torch_cuda() if cuda == RUNNING else cuda)
    return variants.get(major, variants[DEFAULT_CUDA]) if major is not None else variants[DEFAULT_CUDA]


def install_hint(library: str, cuda: str | None = RUNNING) -> str:
    """`pip install 'torchserve-gpu-handlers[X]' (dists; for torch's CUDA N)` for the running torch."""
    cuda = torch_cuda() if cuda == RUNNING else cuda
    extra, dists = extra_for(library, cuda)
    major = cuda_major(cuda)
    if major is None:
        why = f"torch here is a CPU-only build; this is the CUDA {DEFAULT_CUDA} extra"
    elif major in EXTRAS[library]:
        why = f"for torch's CUDA {cuda}"
    else:
        why = f"no extra is built for torch's CUDA {cuda}; this is the CUDA {DEFAULT_CUDA} one"
    hint = f"pip install '{PACKAGE}[{extra}]' ({', '.join(dists)}; {why})"
    if library == "trt" and major is not None and major != DEFAULT_CUDA:
        hint += f", with torch-tensorrt taken from the package index that served your CUDA {major} torch"
    return hint

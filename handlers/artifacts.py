"""Compiled-artifact metadata and the choice of artifact for a worker's device.

`tsgpu compile` writes `<artifact>.json` beside each artifact: backend, precision, input spec,
device and compute capability, library versions, weight hash, validation result. An archive may
carry several (e.g. TensorRT engines for two GPU architectures plus a CPU AOTInductor package);
`choose` picks the best one that fits this worker and explains every refusal.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

METADATA_VERSION = 1
# Best first. ExportedPrograms and eager state dicts move between devices; the others do not.
BACKEND_RANK = {"tensorrt": 0, "aoti": 1, "export": 2, "eager": 3}
PORTABLE = {"export", "eager"}


def metadata_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".json")


def library_versions() -> dict[str, str | None]:
    """Versions that decide whether a compiled artifact can load here."""
    versions: dict[str, str | None] = {"torch": torch.__version__, "python": platform.python_version()}
    for module in ("torch_tensorrt", "tensorrt"):
        versions[module] = _module_version(module)
    return versions


def _module_version(name: str) -> str | None:
    from importlib import metadata

    dist = {"torch_tensorrt": "torch-tensorrt", "tensorrt": "tensorrt"}[name]
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def device_info(device: torch.device) -> dict[str, Any]:
    """The build device as `tsgpu compile` records it. For a CPU, `capability` is the list of
    instruction-set extensions Inductor compiles generated code for on this host (AOTInductor
    packages contain that machine code: an AVX-512 package dies with SIGILL on an AVX2-only host)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": [major, minor]}
    if device.type == "cpu":
        return {"type": "cpu", "name": cpu_model_name(), "arch": platform.machine(), "capability": inductor_cpu_isa()}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "capability": None}


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Extensions torch can test for on this host without a compiler (cpuinfo), by Inductor's names.
_CPU_PROBES = {
    "avx2": "_is_avx2_supported", "avx512": "_is_avx512_supported", "avx512_vnni": "_is_vnni_supported",
    "avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported",
    "amx_fp16": "_is_amx_fp16_supported",
}


def inductor_cpu_isa() -> list[str]:
    """Extensions Inductor targets on this host, e.g. ["avx512", "avx512_vnni", "avx512_bf16"];
    [] where it generates portable code (or has no C++ compiler to probe with)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()
    except Exception:  # no compiler, or an Inductor without this module: nothing ISA-specific is built
        return []
    names = [n for n in str(isa).split() if n != "INVALID_VEC_ISA"]
    if getattr(isa, "_is_avx512_bf16_supported", False):  # Inductor then adds -mavx512bf16
        names.append("avx512_bf16")
    return names


def missing_cpu_features(required: list[str]) -> list[str]:
    """Which of `required` this CPU lacks (names torch cannot probe are taken as present)."""
    missing = []
    for name in required:
        probe = getattr(torch.cpu, _CPU_PROBES.get(name, ""), None)
        if probe is not None and not probe():
            missing.append(name)
    return missing


@dataclass(frozen=True)
class ArtifactInfo:
    file: str
    meta: dict[str, Any]

    @property
    def backend(self) -> str:
        return self.meta.get("backend", "")

    @classmethod
    def read(cls, artifact: Path) -> ArtifactInfo | None:
        path = metadata_path(artifact)
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except ValueError as exc:
            raise ModelLoadError(f"{path.name}: not valid JSON ({exc})") from None
        return cls(artifact.name, meta)


def refusal(info: ArtifactInfo, device: torch.device, versions: dict[str, str | None]) -> str | None:
    """Why `info` cannot run on `device` with these library versions (None if it can)."""
    backend, meta = info.backend, info.meta
    built = meta.get("device", {})
    if backend not in BACKEND_RANK:
        return f"unknown backend {backend!r}"
    if backend not in PORTABLE and built.get("type") != device.type:
        return f"built for {built.get('type')}, this worker runs on {device.type}"
    if device.type == "cuda" and backend in ("tensorrt", "aoti"):
        here = list(torch.cuda.get_device_capability(device))
        there = built.get("capability")
        hw_compatible = backend == "tensorrt" and meta.get("hardware_compatible") and here >= [8, 0]
        if there != here and not hw_compatible:
            return f"built for compute capability {there}, this GPU is {here}"
    if device.type == "cpu" and backend == "aoti":
        arch = built.get("arch")
        if arch and arch != platform.machine():
            return f"built for {arch}, this host is {platform.machine()}"
        missing = missing_cpu_features(built.get("capability") or [])
        if missing:
            return (f"built for a CPU with {', '.join(built['capability'])}; this CPU lacks {', '.join(missing)} "
                    "(its generated code would crash with an illegal instruction)")
    built_versions = meta.get("versions", {})
    needed = {"aoti": ("torch",), "tensorrt": ("torch", "torch_tensorrt", "tensorrt")}.get(backend, ())
    for lib in needed:
        have, want = versions.get(lib), built_versions.get(lib)
        if lib == "torch":
            have, want = _minor(have), _minor(want)
        if have != want:
            return f"built with {lib} {want}, this host has {have or 'none'}"
    return None


def choose(candidates: list[ArtifactInfo], device: torch.device) -> tuple[ArtifactInfo, list[str]]:
    """The best artifact for `device`, and one line per candidate saying what happened to it."""
    versions = library_versions()
    lines, fitting = [], []
    for info in candidates:
        reason = refusal(info, device, versions)
        lines.append(f"{info.file} ({info.backend}): {'fits' if reason is None else 'refused: ' + reason}")
        if reason is None:
            fitting.append(info)
    if not fitting:
        raise ModelLoadError(
            f"no artifact in this archive can run on {device}:\n  " + "\n  ".join(lines)
            + "\nbuild one for this device with `tsgpu compile` and re-archive"
        )
    best = min(fitting, key=lambda i: BACKEND_RANK[i.backend])
    return best, lines


def _minor(version: str | None) -> str | None:
    return ".".join(version.split("+")[0].split(".")[:2]) if version else None

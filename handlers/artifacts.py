"""Compiled-artifact metadata and the choice of artifact for a worker's device.

`tsgpu compile` writes `<artifact>.json` beside each artifact: backend, precision, input spec,
device and compute capability, library versions, weight hash, validation result. An archive may
carry several (e.g. TensorRT engines for two GPU architectures plus a CPU AOTInductor package);
`choose` picks the best one that fits this worker and explains every refusal.
"""

from __future__ import annotations

import json
import platform
import sys
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


def device_info(device: torch.device, cpu_target: str = "native") -> dict[str, Any]:
    """The build device as `tsgpu compile` records it. For a GPU, `capability` is the compute
    capability. For a CPU it is the list of CPU flags the generated code may use (None: unknown):
    on Linux x86-64 Inductor compiles AOTInductor packages with `-march=native` unless told
    otherwise, so a package built on an AVX-512 host dies with SIGILL on an AVX2-only one
    (`cpu_target` picks a portable level instead)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": [major, minor]}
    if device.type == "cpu":
        return {"type": "cpu", "name": cpu_model_name(), "arch": platform.machine(), "target": cpu_target,
                "capability": cpu_requirements(cpu_target)}
    return {"type": device.type, "name": platform.processor() or platform.machine(), "capability": None}


def cpu_model_name() -> str:
    for line in _cpuinfo_lines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# The x86-64 level a CPU package can target instead of the build host (`tsgpu compile
# --cpu-target`): the /proc/cpuinfo flags it needs, and the vector width Inductor's kernels then use.
_X86_V2 = ["cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"]
_X86_V3 = _X86_V2 + ["abm", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"]
CPU_TARGETS: dict[str, tuple[list[str], int]] = {"x86-64-v3": (_X86_V3, 256)}
# Extensions a compiler may emit under -march=native. The other flags describe the machine (or
# system instructions generated code never uses) and differ between hosts that run the same code.
_X86_CODE_FLAGS = set(_X86_V3) | {
    "aes", "pclmulqdq", "vpclmulqdq", "vaes", "gfni", "sha_ni", "sse4a", "fma4", "xop", "tbm",
    "3dnowprefetch", "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma",
    "avx512vbmi", "avx512_vbmi2", "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16",
    "avx512_fp16", "avx512_vp2intersect", "avx_vnni", "avx_vnni_int8", "avx_ifma", "avx_ne_convert",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
}
_ARM_NON_CODE_FLAGS = {"evtstrm", "cpuid"}  # Arm Features entries that are not instructions


def _cpuinfo_lines() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


# torch's CPUID names -> /proc/cpuinfo names, for the extensions both know.
_CPUID_TO_CPUINFO = {
    "avx": "avx", "avx2": "avx2", "fma3": "fma", "fma4": "fma4", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2",
    "lzcnt": "abm", "popcnt": "popcnt", "ssse3": "ssse3", "sse4_1": "sse4_1", "sse4_2": "sse4_2", "sse4a": "sse4a",
    "aes": "aes", "sha": "sha_ni", "avx512_f": "avx512f", "avx512_bw": "avx512bw", "avx512_cd": "avx512cd",
    "avx512_dq": "avx512dq", "avx512_vl": "avx512vl", "avx512_ifma": "avx512ifma", "avx512_vbmi": "avx512vbmi",
    "avx512_vbmi2": "avx512_vbmi2", "avx512_vnni": "avx512_vnni", "avx512_bitalg": "avx512_bitalg",
    "avx512_vpopcntdq": "avx512_vpopcntdq", "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16",
    "avx512_vp2intersect": "avx512_vp2intersect", "avx_vnni": "avx_vnni", "avx_vnni_int8": "avx_vnni_int8",
    "avx_ne_convert": "avx_ne_convert", "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
    "amx_fp16": "amx_fp16",
}


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags (x86 `flags`, Arm `Features`), or None where /proc/cpuinfo is absent.
    Where torch's own CPUID probe says an extension is missing, it is dropped: what the process can
    execute wins over what /proc/cpuinfo says (they differ under an emulator such as qemu-user)."""
    flags = None
    for line in _cpuinfo_lines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            break
    if flags is None:
        return None
    try:
        caps = dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):  # a torch without the CPUID probe
        caps = {}
    return flags - {_CPUID_TO_CPUINFO[name] for name, have in caps.items() if name in _CPUID_TO_CPUINFO and have is False}


def cpu_requirements(target: str = "native") -> list[str] | None:
    """The CPU flags code built for `target` on this host needs (None: cannot tell here)."""
    if target in CPU_TARGETS:
        return sorted(CPU_TARGETS[target][0])
    if target != "native":
        raise ValueError(f"unknown CPU target {target!r}: choose native or {', '.join(CPU_TARGETS)}")
    flags = cpu_flags()
    if flags is None:
        return None
    if platform.machine() in ("x86_64", "AMD64"):
        return sorted(flags & _X86_CODE_FLAGS)
    return sorted(flags - _ARM_NON_CODE_FLAGS)


def cpu_target_supported(target: str) -> str | None:
    """Why `tsgpu compile --cpu-target TARGET` cannot build here (None if it can): the option exists
    for GCC/Clang on Linux x86-64, and the package is validated by running it on the build host."""
    if target == "native":
        return None
    if target not in CPU_TARGETS:
        return f"unknown CPU target {target!r}: choose native or {', '.join(CPU_TARGETS)}"
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return f"applies to Linux x86-64 hosts (this is {sys.platform} {platform.machine()})"
    missing = sorted(set(CPU_TARGETS[target][0]) - (cpu_flags() or set()))
    if missing:
        return f"this host lacks {', '.join(missing)}, so it cannot run (and validate) {target} code"
    return None


def native_cpu_precision(precision: str) -> bool:
    """Whether this CPU has matrix instructions for `precision` (AVX512-BF16 / AMX-BF16 for bf16,
    AVX512-FP16 / AMX-FP16 for fp16); without them oneDNN emulates it, slower than fp32. True where
    it cannot tell (no /proc/cpuinfo)."""
    needs = {"bf16": {"avx512_bf16", "amx_bf16"}, "fp16": {"avx512_fp16", "amx_fp16"}}.get(precision)
    flags = cpu_flags()
    return precision == "fp32" or flags is None or bool(needs and needs & flags)


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
        have = cpu_flags()
        missing = sorted(set(built.get("capability") or []) - have) if have is not None else []
        if missing:
            fix = "rebuild on this CPU"
            if platform.machine() == "x86_64":
                fix += " or with `tsgpu compile --cpu-target x86-64-v3`"
            return (f"built for {built.get('target', 'native')} on a CPU with instructions this CPU lacks "
                    f"({', '.join(missing)}): its code would crash with an illegal instruction; {fix}, "
                    "or pack an export artifact beside it")
    built_versions = meta.get("versions", {})
    needed = {"aoti": ("torch",), "tensorrt": ("torch", "torch_tensorrt", "tensorrt")}.get(backend, ())
    for lib in needed:
        ours, want = versions.get(lib), built_versions.get(lib)
        if lib == "torch":
            ours, want = _minor(ours), _minor(want)
        if ours != want:
            return f"built with {lib} {want}, this host has {ours or 'none'}"
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

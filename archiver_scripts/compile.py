"""`tsgpu compile`: model -> surgery -> compiled artifact + metadata JSON, with an engine cache.

    tsgpu compile --model torchvision:resnet50 --backend auto --device cpu --batch 1,8,32 --output build/

Backends, best first: `tensorrt` (Torch-TensorRT dynamo path, CUDA only), `aoti` (torch.export +
AOTInductor, CPU or CUDA), `export` (a plain ExportedProgram), `eager` (a state dict plus the code
that builds the model). `auto` tries them in that order for the device and reports each fallback
with its reason. Every artifact is validated against the eager model on sample inputs (max abs
difference reported and checked against a tolerance) before it is written.

The cache (default `~/.cache/tsgpu/artifacts`, or `$TSGPU_CACHE_DIR`) is keyed by weight hash, input
spec, precision, backend, device type and compute capability, library versions and surgery
options, so an artifact is never reused on another GPU architecture or library version. A repeated
compile is a cache hit: the artifact is copied and re-validated, not rebuilt.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from handlers.artifacts import (
    CPU_TARGETS,
    METADATA_VERSION,
    cpu_target_supported,
    device_info,
    library_versions,
    metadata_path,
    native_cpu_precision,
)
from handlers.extras import install_hint

from .surgery import PassReport, _first_tensor, run_passes

BACKENDS = ("tensorrt", "aoti", "export", "eager")
ARTIFACT_FORMAT = {"tensorrt": "exported_program", "aoti": "aoti", "export": "exported_program", "eager": "state_dict"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Max abs difference allowed against eager fp32, as a fraction of the largest reference output.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 8e-2}


class CompileError(RuntimeError):
    """A backend could not produce a valid artifact; the message says why."""


@dataclass
class CompileOptions:
    model: str
    output: Path
    name: str = ""
    weights: str | None = None
    num_classes: int | None = None
    backend: str = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    batch: tuple[int, int, int] = (1, 8, 32)
    input_size: tuple[int, int] | int = (224, 224)
    """(height, width) of the model input; one int means a square. Always (h, w) once constructed."""
    channels_last: bool = False
    hardware_compatible: bool = False
    cpu_target: str = "native"  # aoti on CPU: native (this host's instructions) or x86-64-v3
    surgery: bool = True
    cache_dir: Path | None = None
    use_cache: bool = True
    tolerance: float | None = None

    def __post_init__(self) -> None:
        self.input_size = input_hw(self.input_size)


def input_hw(size: tuple[int, int] | list[int] | int | str) -> tuple[int, int]:
    """(height, width) from `224`, `(480, 640)` or the `--input-size` text `480,640`."""
    if isinstance(size, str):
        return parse_input_size(size)
    sides = [size] * 2 if isinstance(size, int) else list(size)
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sides):
        raise CompileError(f"--input-size {size!r}: expected a positive side (224) "
                           "or (height, width) such as (480, 640)")
    return sides[0], sides[1]


@dataclass
class CompileResult:
    artifact: Path
    meta: dict[str, Any]
    fallbacks: list[str] = field(default_factory=list)


# --- loading the model --------------------------------------------------------------------------


def load_model(spec: str, weights: str | None = None, num_classes: int | None = None) -> tuple[nn.Module, dict[str, str]]:
    """`torchvision:NAME` or `file.py:factory_or_class`, optionally with a state dict; returns the
    eval-mode model and how to rebuild it (for eager artifacts)."""
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        kwargs: dict[str, Any] = {"num_classes": num_classes} if num_classes else {}
        try:
            builder = torchvision.models.get_model_builder(name)
        except ValueError as exc:
            raise CompileError(f"--model {spec}: {exc}") from None
        if "weights_backbone" in inspect.signature(builder).parameters:
            # detection/segmentation builders fetch ImageNet backbone weights by default: never
            # download at build time (the user's --weights hold the whole model)
            kwargs["weights_backbone"] = None
        model = builder(weights=None, **kwargs)
        source = {"kind": "torchvision", "name": name, "kwargs": json.dumps(kwargs)}
    else:
        path_part, sep, attr = spec.partition(":")
        path = Path(path_part)
        if not sep or not path.suffix == ".py" or not attr:
            raise CompileError(f"--model {spec!r}: expected torchvision:NAME or file.py:factory")
        if not path.is_file():
            raise CompileError(f"--model {spec}: {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"_tsgpu_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        factory = getattr(module, attr, None)
        if factory is None:
            raise CompileError(f"--model {spec}: {path.name} defines no {attr!r}")
        model = factory()
        if not isinstance(model, nn.Module):
            raise CompileError(f"--model {spec}: {attr}() returned {type(model).__name__}, not an nn.Module")
        source = {"kind": "file", "path": str(path.resolve()), "attr": attr}
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.eval(), source


def weight_hash(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


# --- backends -----------------------------------------------------------------------------------


def _export(model: nn.Module, sample: torch.Tensor, batch: tuple[int, int, int]):
    (param,) = list(inspect.signature(model.forward).parameters)[:1] or ["x"]
    if batch[0] == batch[2]:
        return torch.export.export(model, (sample[: batch[0]],))
    dim = torch.export.Dim("batch", min=batch[0], max=batch[2])
    return torch.export.export(model, (_two_rows(sample),), dynamic_shapes={param: {0: dim}})


def _two_rows(sample: torch.Tensor) -> torch.Tensor:
    """An example with at least 2 rows: export specialises a size-1 dimension to 1."""
    if sample.shape[0] >= 2:
        return sample
    return sample.expand(2, *sample.shape[1:]).contiguous(memory_format=_layout(sample))


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format


def build_export(model, sample, opts, path: Path, device: torch.device) -> Callable:
    program = _export(model, sample, opts.batch)
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def build_aoti(model, sample, opts, path: Path, device: torch.device) -> Callable:
    program = _export(model, sample, opts.batch)
    # freezing: weights become constants, so Inductor folds BatchNorm and prepacks conv weights.
    configs: dict[str, Any] = {"freezing": True}
    if device.type == "cpu" and opts.cpu_target != "native":
        # Inductor compiles with -march=native by default: name the level instead, and the vector
        # width its kernels use, so the package runs on every CPU of that level.
        if not hasattr(torch._inductor.config.cpp, "march"):
            raise CompileError(f"--cpu-target {opts.cpu_target}: this torch's Inductor has no cpp.march setting")
        configs.update({"cpp.march": opts.cpu_target, "cpp.simdlen": CPU_TARGETS[opts.cpu_target][1]})
    torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=configs)
    return load_aoti(path, device)


def load_aoti(path: Path, device: torch.device) -> Callable:
    """Load an AOTInductor package onto `device`: by default it loads onto the *current* CUDA
    device, which is not cuda:N unless someone set it (`device_index` exists in torch 2.14)."""
    load = torch._inductor.aoti_load_package
    if device.type == "cuda" and "device_index" in inspect.signature(load).parameters:
        return load(str(path), device_index=device.index)
    return load(str(path))


def build_tensorrt(model, sample, opts, path: Path, device: torch.device) -> Callable:
    # UNVERIFIED: no GPU with TensorRT was available when this was written (docs/gpu-verification.md).
    if device.type != "cuda":
        raise CompileError("TensorRT needs a CUDA device (--device cuda)")
    try:
        import torch_tensorrt
    except ImportError:
        raise CompileError(f"torch-tensorrt is not installed: {install_hint('trt')}") from None
    program = _export(model, sample, opts.batch)
    shape = tuple(sample.shape[1:])
    inputs = [torch_tensorrt.Input(
        min_shape=(opts.batch[0], *shape), opt_shape=(opts.batch[1], *shape), max_shape=(opts.batch[2], *shape),
        dtype=sample.dtype,
    )]
    compiled = torch_tensorrt.dynamo.compile(
        program, **trt_compile_kwargs(torch_tensorrt.dynamo.compile, inputs, sample.dtype, opts.hardware_compatible,
                                      device))
    torch_tensorrt.save(compiled, str(path), **trt_save_kwargs(torch_tensorrt.save, sample, opts.batch))
    return torch.export.load(str(path)).module()


def trt_compile_kwargs(compile_fn: Callable, inputs: list, dtype: torch.dtype, hardware_compatible: bool,
                       device: torch.device | None = None) -> dict[str, Any]:
    """Keyword arguments for this Torch-TensorRT's `dynamo.compile`, found from its signature:
    `arg_inputs` or (older) `inputs`; `enabled_precisions` where it still exists (2.14.0 has none:
    the precision follows the model's dtype); `hardware_compatible` where it exists; `device` where
    one is given (left out, it builds on `torch.cuda.current_device()`)."""
    params = inspect.signature(compile_fn).parameters
    kwargs: dict[str, Any] = {"arg_inputs" if "arg_inputs" in params else "inputs": inputs}
    if device is not None and "device" in params:
        kwargs["device"] = device
    if "enabled_precisions" in params:
        kwargs["enabled_precisions"] = {dtype}
    if "hardware_compatible" in params:
        kwargs["hardware_compatible"] = hardware_compatible
    elif hardware_compatible:
        raise CompileError("this torch-tensorrt has no hardware_compatible option")
    return kwargs


def trt_save_kwargs(save_fn: Callable, sample: torch.Tensor, batch: tuple[int, int, int]) -> dict[str, Any]:
    """Keyword arguments for `torch_tensorrt.save` that keep the batch dimension dynamic in the saved
    ExportedProgram: the same Dim as the export (explicit `dynamic_shapes` where the signature has
    it, as 2.14.0's does), and an example with at least 2 rows."""
    params = inspect.signature(save_fn).parameters
    dynamic = batch[0] != batch[2]
    if dynamic:
        sample = _two_rows(sample)
    kwargs: dict[str, Any] = {"output_format": "exported_program",
                              "arg_inputs" if "arg_inputs" in params else "inputs": [sample]}
    if dynamic and "dynamic_shapes" in params:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=batch[0], max=batch[2])},)
    return kwargs


BUILDERS = {"tensorrt": build_tensorrt, "aoti": build_aoti, "export": build_export}


def _eager_artifact(model: nn.Module, source: dict[str, str], opts: CompileOptions, out_dir: Path, stem: str) -> tuple[Path, dict]:
    weights = out_dir / f"{stem}.pt"
    torch.save(model.state_dict(), str(weights))
    if source["kind"] == "torchvision":
        code = out_dir / f"{stem}_model.py"
        code.write_text(
            '"""Builds the model for the eager artifact beside it (generated by tsgpu compile)."""\n\n'
            "import torchvision\n\n\n"
            f"def build():\n    return torchvision.models.get_model({source['name']!r}, weights=None, "
            f"**{json.loads(source['kwargs'])!r})\n"
        )
        return weights, {"model_source": code.name, "model_class": f"{code.name}:build"}
    code = out_dir / Path(source["path"]).name
    if Path(source["path"]).resolve() != code.resolve():
        shutil.copyfile(source["path"], code)
    return weights, {"model_source": code.name, "model_class": f"{code.name}:{source['attr']}"}


# --- validation and cache -----------------------------------------------------------------------


def validate(run: Callable, reference: nn.Module, opts: CompileOptions, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    sizes = sorted({opts.batch[0], opts.batch[1], opts.batch[2]})
    generator = torch.Generator().manual_seed(0)
    worst, scale = 0.0, 1.0
    with torch.inference_mode():
        for n in sizes:
            x = torch.randn((n, 3, *opts.input_size), generator=generator).to(device)
            ref = _first_tensor(reference(x.float() if dtype != torch.float32 else x)).float()
            xin = x.to(dtype)
            if opts.channels_last:
                xin = xin.contiguous(memory_format=torch.channels_last)
            got = _first_tensor(run(xin)).float()
            worst = max(worst, (got - ref).abs().max().item())
            scale = max(scale, ref.abs().max().item())
    tolerance = opts.tolerance if opts.tolerance is not None else TOLERANCE[opts.precision] * scale
    return {"max_abs_diff": worst, "tolerance": tolerance, "batch_sizes": sizes, "passed": worst <= tolerance}


def default_cache_dir() -> Path:
    return Path(os.environ.get("TSGPU_CACHE_DIR") or Path.home() / ".cache" / "tsgpu" / "artifacts")


def cache_key(whash: str, opts: CompileOptions, backend: str, device: dict, versions: dict) -> str:
    material = {
        "v": METADATA_VERSION, "weights": whash, "backend": backend, "precision": opts.precision,
        "batch": list(opts.batch), "input_size": list(opts.input_size), "channels_last": opts.channels_last,
        "surgery": opts.surgery, "hardware_compatible": opts.hardware_compatible, "cpu_target": opts.cpu_target,
        "device": device["type"], "capability": device["capability"], "versions": versions,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


# --- the command --------------------------------------------------------------------------------


def backend_order(backend: str, device: torch.device) -> list[str]:
    if backend != "auto":
        if backend not in BACKENDS:
            raise CompileError(f"--backend {backend!r}: choose one of auto, {', '.join(BACKENDS)}")
        return [backend]
    return list(BACKENDS) if device.type == "cuda" else ["aoti", "export", "eager"]


def resolve_device(text: str) -> torch.device:
    """`cpu`, `cuda` (the current device, made explicit) or `cuda:N`, checked against this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise CompileError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise CompileError(f"--device {text}: CUDA is not available on this machine")
    index = torch.cuda.current_device() if device.index is None else device.index
    count = torch.cuda.device_count()
    if index >= count:
        raise CompileError(f"--device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def _on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Make cuda:N the current device for the whole compile: Torch-TensorRT, Inductor and the CUDA
    runtime fall back to the current device wherever a device is not passed explicitly."""
    return torch.cuda.device(device.index) if device.type == "cuda" else contextlib.nullcontext()


def compile_model(opts: CompileOptions, log: Callable[[str], None] = print) -> CompileResult:
    started = time.perf_counter()
    device = resolve_device(opts.device)
    with _on_device(device):
        return _compile_on(device, opts, log, started)


def _compile_on(device: torch.device, opts: CompileOptions, log: Callable[[str], None],
                started: float) -> CompileResult:
    if opts.precision not in DTYPES:
        raise CompileError(f"--precision {opts.precision!r}: choose fp32, fp16 or bf16")
    lo, opt, hi = opts.batch
    if not 1 <= lo <= opt <= hi:
        raise CompileError(f"--batch {lo},{opt},{hi}: need 1 <= min <= opt <= max")
    if opts.cpu_target != "native":
        problem = cpu_target_supported(opts.cpu_target) or (None if device.type == "cpu" else "applies to CPU builds")
        if problem:
            raise CompileError(f"--cpu-target {opts.cpu_target}: {problem}")
    dtype = DTYPES[opts.precision]
    order = backend_order(opts.backend, device)

    if device.type == "cpu" and not native_cpu_precision(opts.precision):
        log(f"  warning: this CPU has no native {opts.precision} matrix instructions (oneDNN emulates them): "
            f"expect {opts.precision} to be slower than fp32 here, and on serving hosts like this one")
    log(f"[1/4] loading {opts.model}")
    original, source = load_model(opts.model, opts.weights, opts.num_classes)
    whash = weight_hash(original)
    name = opts.name or _default_name(opts.model)
    original.to(device)  # in place: validation compares against it on the target device
    sample = torch.randn((opt, 3, *opts.input_size), generator=torch.Generator().manual_seed(1)).to(device)

    log("[2/4] surgery" + ("" if opts.surgery else " skipped (--no-surgery)"))
    if opts.surgery:
        model, reports = run_passes(copy.deepcopy(original), sample, opts.channels_last, log)
    else:
        model, reports = copy.deepcopy(original), []
    model = model.to(device=device, dtype=dtype)
    typed_sample = sample.to(dtype)
    if opts.channels_last:
        typed_sample = typed_sample.contiguous(memory_format=torch.channels_last)

    versions = library_versions()
    dev = device_info(device, opts.cpu_target)
    cache_root = opts.cache_dir or default_cache_dir()
    opts.output.mkdir(parents=True, exist_ok=True)
    fallbacks: list[str] = []
    target = f", code for {dev['target']} CPUs" if dev["type"] == "cpu" else ""
    where = f"{device} ({dev['name']})" if device.type == "cuda" else dev["type"]
    h, w = opts.input_size
    log(f"[3/4] compiling: trying {' -> '.join(order)} for {where} ({opts.precision}, batch {lo}/{opt}/{hi}, "
        f"input {h}x{w}{target})")
    for backend in order:
        t0 = time.perf_counter()
        stem = f"{name}.{backend}-{dev['type']}"
        try:
            result = _one_backend(backend, model, original, source, typed_sample, opts, device, dtype, whash,
                                  dev, versions, cache_root, stem, reports, log)
        except Exception as exc:  # each backend's own failure is a fallback, reported, never hidden
            reason = f"{backend}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            fallbacks.append(reason)
            log(f"  fallback: {reason}")
            continue
        result.fallbacks = fallbacks
        v = result.meta["validation"]
        log(f"[4/4] {result.artifact} ({backend}, {'cache hit' if result.meta['cache']['hit'] else 'built'} in "
            f"{time.perf_counter() - t0:.1f}s; max abs diff vs eager {v['max_abs_diff']:.3g} <= {v['tolerance']:.3g}); "
            f"total {time.perf_counter() - started:.1f}s")
        return result
    raise CompileError("every backend failed:\n  " + "\n  ".join(fallbacks))


def _one_backend(backend, model, original, source, sample, opts, device, dtype, whash, dev, versions,
                 cache_root: Path, stem: str, reports: list[PassReport], log) -> CompileResult:
    out_dir = opts.output
    if backend == "eager":
        # The eager fallback serves the original module (surgery changes its structure, so its
        # state dict would not fit the code that rebuilds it).
        artifact, extra = _eager_artifact(original.to(device), source, opts, out_dir, stem)
        # nn.Module.to works in place: cast a copy, or the reference itself would change dtype.
        validation = validate(copy.deepcopy(original).to(device=device, dtype=dtype), original, opts, device, dtype)
        meta = _metadata(backend, artifact, opts, dev, versions, whash, [], validation, {"hit": False, "key": None})
        meta.update(extra)
        return _finish(artifact, meta)

    key = cache_key(whash, opts, backend, dev, versions)
    suffix = ".pt2"
    artifact = out_dir / f"{stem}{suffix}"
    cached = cache_root / key / f"artifact{suffix}"
    hit = opts.use_cache and cached.is_file()
    if hit:
        log(f"  cache hit {key} ({cache_root})")
        shutil.copyfile(cached, artifact)
        run = _load_artifact(backend, artifact, device)
    else:
        with tempfile.TemporaryDirectory(prefix="tsgpu-compile-") as tmp:
            built = Path(tmp) / f"artifact{suffix}"
            log(f"  building {backend} (this can take minutes) ...")
            run = BUILDERS[backend](model, sample, opts, built, device)
            validation = validate(run, original, opts, device, dtype)
            if not validation["passed"]:
                raise CompileError(f"validation failed: max abs diff {validation['max_abs_diff']:.3g} > tolerance {validation['tolerance']:.3g}")
            shutil.copyfile(built, artifact)
            if opts.use_cache:
                (cache_root / key).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(built, cached)
    validation = validate(run, original, opts, device, dtype)
    if not validation["passed"]:
        raise CompileError(f"validation failed: max abs diff {validation['max_abs_diff']:.3g} > tolerance {validation['tolerance']:.3g}")
    meta = _metadata(backend, artifact, opts, dev, versions, whash, reports, validation, {"hit": hit, "key": key})
    return _finish(artifact, meta)


def _load_artifact(backend: str, path: Path, device: torch.device) -> Callable:
    if backend == "aoti":
        return load_aoti(path, device)
    if backend == "tensorrt":
        import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops before loading)
    return torch.export.load(str(path)).module()


def _metadata(backend, artifact, opts, dev, versions, whash, reports, validation, cache) -> dict[str, Any]:
    return {
        "metadata_version": METADATA_VERSION,
        "file": artifact.name,
        "backend": backend,
        "artifact_format": ARTIFACT_FORMAT[backend],
        "precision": opts.precision,
        "input": {
            "shape": [3, *opts.input_size],
            "dtype": str(DTYPES[opts.precision]).replace("torch.", ""),
            "batch": {"min": opts.batch[0], "opt": opts.batch[1], "max": opts.batch[2]},
            "channels_last": opts.channels_last,
        },
        "device": dev,
        "hardware_compatible": opts.hardware_compatible if backend == "tensorrt" else False,
        "versions": versions,
        "weight_hash": whash,
        "source_model": opts.model,
        "surgery": [r.to_dict() for r in reports],
        "validation": validation,
        "cache": cache,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _finish(artifact: Path, meta: dict[str, Any]) -> CompileResult:
    metadata_path(artifact).write_text(json.dumps(meta, indent=2))
    return CompileResult(artifact, meta)


def _default_name(spec: str) -> str:
    tail = spec.split(":", 1)[1] if spec.startswith("torchvision:") else Path(spec.partition(":")[0]).stem
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in tail)


def parse_input_size(text: str) -> tuple[int, int]:
    """`--input-size`: `224` (a square) or `480,640` (height,width) -> (height, width)."""
    try:
        sides = [int(p) for p in text.split(",")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise CompileError(f"--input-size {text!r}: expected one positive side (224) or HEIGHT,WIDTH (480,640)")
    return sides[0], sides[-1]


def parse_batch(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) == 1:
        parts = [1, parts[0], parts[0]]
    if len(parts) != 3:
        raise CompileError(f"--batch {text!r}: expected MIN,OPT,MAX (e.g. 1,8,32) or one number")
    return parts[0], parts[1], parts[2]

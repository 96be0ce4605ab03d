"""Load the model artifact for this worker's device, optimise it for inference and warm it up.

Formats (detected from the file's contents when `handler.model.format` is `auto`):
- `torchscript`: a `torch.jit.save` file (`.pt`); frozen at load, channels-last on CPU;
- `exported_program`: a `torch.export.save` file (`.pt2`);
- `aoti`: an AOTInductor package (`.pt2` from `aoti_compile_and_package`), bound to the device
  it was compiled for;
- `eager`: `model.py:ClassName` plus a state dict, loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifacts import ArtifactInfo, choose, library_versions, refusal
from .config import ModelConfig
from .errors import ConfigError, ModelLoadError
from .extras import install_hint

logger = logging.getLogger(__name__)


@dataclass
class Backbone:
    """A loaded, inference-ready model and what the preprocess stage must feed it."""

    module: Callable[..., Any]
    format: str
    path: Path
    device: torch.device
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    info: ArtifactInfo | None = None
    """Metadata from `tsgpu compile`, when the artifact has it."""

    def __call__(self, x: torch.Tensor) -> Any:
        n, least = x.shape[0], self.min_batch
        if least is None or n >= least:
            return self.module(x)
        # A static-batch artifact (compiled for exactly `least` rows): pad with zeros, keep n rows.
        pad = x.new_zeros((least - n, *x.shape[1:])).contiguous(memory_format=_layout(x))
        return _first_rows(self.module(torch.cat([x, pad])), n)

    @property
    def max_batch(self) -> int | None:
        return self._batch("max")

    @property
    def min_batch(self) -> int | None:
        """Smallest batch the artifact takes (None: any); smaller batches are padded up to it."""
        least = self._batch("min")
        return least if least and least > 1 else None

    def _batch(self, key: str) -> int | None:
        return self.info.meta.get("input", {}).get("batch", {}).get(key) if self.info else None

    def describe(self) -> str:
        layout = "channels-last" if self.channels_last else "NCHW"
        backend = f" [{self.info.backend}, {self.info.meta.get('precision')}]" if self.info else ""
        return f"{self.format} model {self.path.name}{backend} on {self.device} ({layout})"


def _layout(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _first_rows(outputs: Any, n: int) -> Any:
    """The first n rows of every tensor in a model's outputs (tensor, tuple, list or dict)."""
    if isinstance(outputs, torch.Tensor):
        return outputs[:n]
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(_first_rows(o, n) for o in outputs)
    if isinstance(outputs, dict):
        return {k: _first_rows(v, n) for k, v in outputs.items()}
    return outputs


def detect_format(path: Path) -> str:
    """Tell an artifact's format from its contents; raises ModelLoadError when unknown."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path.name} is not a torch.export, AOTInductor, TorchScript or state-dict file "
            f"(not a zip archive); re-save it with torch.export.save or torch.jit.save"
        )
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any("/data/aotinductor/" in n for n in names):
        return "aoti"
    if any(n.endswith("/models/model.json") or "serialized_exported_program" in n for n in names):
        return "exported_program"
    if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "state_dict"
    raise ModelLoadError(f"{path.name}: unrecognised torch archive layout (first entries: {names[:5]})")


_FORMAT_OF = {"aoti": "aoti", "exported_program": "exported_program", "state_dict": "eager", "torchscript": "torchscript"}
_DTYPE_OF = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_backbone(model_dir: Path, model_file: str, cfg: ModelConfig, device: torch.device) -> Backbone:
    """Load the configured artifact (or the best of `cfg.artifacts`) for `device`."""
    _register_torchvision_ops()
    info = _select_artifact(model_dir, model_file, cfg, device)
    if info is not None:
        model_file = info.file
        fmt = _FORMAT_OF.get(info.meta.get("artifact_format", ""), "auto")
        cfg = dataclasses.replace(cfg, format=fmt, model_class=info.meta.get("model_class", cfg.model_class))
        if info.backend == "tensorrt":
            try:
                import torch_tensorrt  # noqa: F401  (registers TensorRT ops before the program loads)
            except ImportError:
                raise ModelLoadError(
                    f"{info.file} is a TensorRT artifact: {install_hint('trt')} "
                    f"(torch-tensorrt {info.meta.get('versions', {}).get('torch_tensorrt')})"
                ) from None
    path = (model_dir / model_file).resolve()
    fmt = cfg.format
    detected = detect_format(path)
    if fmt == "auto":
        if detected == "state_dict":
            if not cfg.model_class:
                raise ConfigError(
                    f"{path.name} is a state dict: set handler.model.model_class to "
                    f"'model.py:ClassName' (tsgpu archive --model-class) so it can be loaded"
                )
            fmt = "eager"
        else:
            fmt = detected
    elif fmt == "eager" and detected != "state_dict":
        raise ConfigError(f"handler.model.format is 'eager' but {path.name} is a {detected} file, not a state dict")
    elif fmt != "eager" and fmt != detected:
        raise ConfigError(f"handler.model.format is {fmt!r} but {path.name} is a {detected} file")

    loader = _LOADERS[fmt]
    started = time.perf_counter()
    backbone = loader(path, cfg, device, model_dir)
    if info is not None:
        spec = info.meta.get("input", {})
        backbone.info = info
        backbone.dtype = _DTYPE_OF.get(spec.get("dtype", "float32"), backbone.dtype)
        module = backbone.module
        if backbone.format == "eager" and isinstance(module, torch.nn.Module) and _param_dtype(module) != backbone.dtype:
            module.to(backbone.dtype)  # an eager artifact keeps fp32 weights; run it as compiled
        backbone.channels_last = bool(spec.get("channels_last", backbone.channels_last))
    logger.info("loaded %s in %.1fs", backbone.describe(), time.perf_counter() - started)
    return backbone


def _select_artifact(model_dir: Path, model_file: str, cfg: ModelConfig, device: torch.device) -> ArtifactInfo | None:
    if cfg.artifacts:
        candidates = []
        for name in cfg.artifacts:
            info = ArtifactInfo.read(model_dir / name)
            if info is None:
                raise ModelLoadError(f"handler.model.artifacts: {name} has no {name}.json beside it in the archive")
            candidates.append(info)
        best, lines = choose(candidates, device)
        for line in lines:
            logger.info("artifact %s", line)
        logger.info("artifact chosen for %s: %s (%s)", device, best.file, best.backend)
        return best
    info = ArtifactInfo.read(model_dir / model_file)
    if info is not None:
        reason = refusal(info, device, library_versions())
        if reason is not None:
            raise ModelLoadError(f"{model_file} cannot run on this worker: {reason}; build one with `tsgpu compile`")
    return info


def warm_up(backbone: Backbone, batch_sizes: Sequence[int], input_size: int | tuple[int, int],
            runs: int = 2) -> float:
    """Run the model on zeros at each batch size so no real request pays first-call costs.

    `input_size` is the model input's (height, width), or one int for a square. TorchScript's
    profiling executor optimises a graph over its first runs, so each size runs `runs` times.
    Returns the seconds spent.
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    started = time.perf_counter()
    with torch.inference_mode():
        for size in sorted(set(batch_sizes)):
            x = torch.zeros((size, 3, height, width), dtype=backbone.dtype, device=backbone.device)
            if backbone.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for _ in range(runs):
                backbone(x)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize(backbone.device)
    return time.perf_counter() - started


# --- loaders -----------------------------------------------------------------------------------


def _has_conv(module: torch.nn.Module) -> bool:
    return any(p.dim() == 4 for p in module.parameters())


def _load_torchscript(path: Path, cfg: ModelConfig, device: torch.device, model_dir: Path) -> Backbone:
    module = torch.jit.load(str(path), map_location=device)
    module.eval()
    channels_last = cfg.channels_last and device.type == "cpu" and _has_conv(module)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    if cfg.freeze:
        try:
            module = torch.jit.freeze(module)
        except Exception as exc:  # freezing is an optimisation; a model that resists it still serves
            logger.warning("torch.jit.freeze failed for %s, serving unfrozen: %s", path.name, exc)
    return Backbone(module, "torchscript", path, device, _param_dtype(module), channels_last)


def _load_exported_program(path: Path, cfg: ModelConfig, device: torch.device, model_dir: Path) -> Backbone:
    program = torch.export.load(str(path))
    module = program.module()
    try:
        module = module.to(device)
    except Exception as exc:
        raise ModelLoadError(f"{path.name}: cannot move the exported program to {device}: {exc}") from exc
    return Backbone(module, "exported_program", path, device, _param_dtype(module), False)


def _load_aoti(path: Path, cfg: ModelConfig, device: torch.device, model_dir: Path) -> Backbone:
    built_for = _aoti_device(path)
    if built_for and built_for != device.type:
        raise ModelLoadError(
            f"{path.name} is an AOTInductor package compiled for {built_for}, but this worker runs "
            f"on {device}; archive an artifact for {device.type} (tsgpu compile) or change the worker's device"
        )
    try:
        runner = torch._inductor.aoti_load_package(str(path))
    except Exception as exc:
        raise ModelLoadError(f"{path.name}: could not load AOTInductor package: {exc}") from exc
    return Backbone(runner, "aoti", path, device, torch.float32, False)


def _load_eager(path: Path, cfg: ModelConfig, device: torch.device, model_dir: Path) -> Backbone:
    file_name, _, class_name = cfg.model_class.partition(":")
    source = (model_dir / file_name).resolve()
    if not source.is_file():
        raise ModelLoadError(f"handler.model.model_class: {file_name} is not in the archive (looked in {model_dir})")
    module_name = f"_tsgpu_model_{source.stem}"
    spec = importlib.util.spec_from_file_location(module_name, source)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {source}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = mod
    spec.loader.exec_module(mod)
    cls = getattr(mod, class_name, None)
    if cls is None:
        raise ModelLoadError(f"handler.model.model_class: {file_name} defines no {class_name!r}")
    model = cls()
    try:
        state = torch.load(str(path), map_location=device, weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"{path.name}: not loadable as a plain state dict with weights_only=True ({exc}); "
            f"save it with torch.save(model.state_dict(), ...)"
        ) from exc
    model.load_state_dict(state)
    model.to(device).eval()
    channels_last = cfg.channels_last and device.type == "cpu" and _has_conv(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Backbone(model, "eager", path, device, _param_dtype(model), channels_last)


def _register_torchvision_ops() -> None:
    """TorchScript and exported programs may call torchvision's operators (torchvision::nms in a
    detector exported with NMS inside, roi_align...), which exist only once torchvision's C
    extension is loaded. Load just that library (milliseconds) rather than `import torchvision.ops`,
    which pulls in torch._dynamo and added about 3 s of CPU to every worker start; at load, not at
    import, so importing this module has no side effects."""
    try:
        if hasattr(torch.ops.torchvision, "nms"):
            return
        spec = importlib.util.find_spec("torchvision")
        locations = list(spec.submodule_search_locations or []) if spec else []
        libraries = sorted(p for loc in locations for p in Path(loc).glob("_C*.so"))
        if libraries:
            torch.ops.load_library(str(libraries[0]))
            return
        import torchvision.ops  # noqa: F401  (no extension file found: let torchvision load it)
    except Exception as exc:  # torchvision is a dependency; a broken install should not hide the model's error
        logger.debug("torchvision's operators not loaded (%s): models that use them will not load", exc)


def _param_dtype(module: Any) -> torch.dtype:
    try:
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    except (AttributeError, RuntimeError):
        pass
    return torch.float32


def _aoti_device(path: Path) -> str | None:
    """The device type an AOTInductor package was compiled for, from its metadata (None if unknown)."""
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith("_metadata.json") and "/aotinductor/" in name:
                try:
                    meta = json.loads(zf.read(name))
                except ValueError:
                    continue
                value = meta.get("AOTI_DEVICE_KEY")
                if isinstance(value, str):
                    return value
    return None


_LOADERS = {
    "torchscript": _load_torchscript,
    "exported_program": _load_exported_program,
    "aoti": _load_aoti,
    "eager": _load_eager,
}

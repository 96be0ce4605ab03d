"""Typed, validated handler configuration from model-config.yaml's `handler:` section.

Every key has a default, so an empty section is valid. An unknown key or a bad value raises
`ConfigError` naming the full key path, what was received and what is accepted; the handler raises
it from `initialize`, so the model fails to load with that message instead of serving wrongly.

    handler:
      preprocess: {backend: auto, resize_size: 256, crop_size: 224}
      classifier: {top_k: 5}          # a task's own section (handlers/tasks/classifier.py)

This module knows no task: `HandlerConfig` holds the sections every handler shares, and each task
module adds its own by subclassing it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .errors import ConfigError
from .fetch import UrlConfig
from .preprocess.registry import BACKEND_CHOICES
from .video.config import VideoConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PREPROCESS_BACKENDS = BACKEND_CHOICES  # the preprocess registry's names (handlers/preprocess/registry.py)
MODEL_FORMATS = ("auto", "torchscript", "exported_program", "aoti", "eager")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
DTYPES = ("float32", "float16", "bfloat16")
GEOMETRY_MODES = ("center_crop", "letterbox", "stretch")
MEDIA = ("image", "video")


class ImageSize(tuple):
    """A (height, width) size written in YAML as one int (square) or as [height, width]; () = unset."""


@dataclass(frozen=True)
class InputConfig:
    """How request rows become encoded image bytes."""

    max_bytes: int = 32 * 1024 * 1024
    """Largest encoded image accepted, after base64 decoding (413 above it)."""
    json_keys: tuple[str, ...] = ("data", "b64")
    """JSON body keys that may carry base64 image bytes."""

    def validate(self, path: str) -> None:
        check_positive(self.max_bytes, f"{path}.max_bytes")
        if not self.json_keys:
            raise ConfigError(f"{path}.json_keys: needs at least one key, got an empty list")


@dataclass(frozen=True)
class PreprocessConfig:
    """Decode, map the image onto the model input (`geometry`), normalise.

    The default is torchvision's ImageNet eval: resize the shorter side + center crop."""

    backend: str = "auto"
    geometry: str = "center_crop"
    """center_crop (resize_size then crop) | letterbox (fit, pad with pad_value) | stretch."""
    input_size: ImageSize = ImageSize()
    """Model input as one int (square) or [height, width]; unset = crop_size x crop_size."""
    pad_value: int = 114
    """letterbox: 0..255 value of the padding (Ultralytics uses 114), before normalisation."""
    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    jpeg_draft: bool = True
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is much larger than needed."""
    draft_min_ratio: float = 2.0
    """Draft decoding keeps at least this many source pixels per output pixel (per axis)."""
    max_image_pixels: int = 50_000_000
    """Per-image width*height limit; above it the item is a 413 (decompression-bomb guard)."""
    decode_threads: int = 0
    """Threads decoding one batch in parallel; 0 = the worker's CPU budget."""
    dtype: str = "float32"
    hw_decoder_load: float = 0.65
    """dali on a GPU: share of JPEG data sent to the hardware decoder (A100/H100), the rest to CUDA."""
    gpu_cache_limit_mb: int = 256
    """cvcuda: bound on CV-CUDA's tensor cache per device (it grows with distinct shapes otherwise)."""

    def validate(self, path: str) -> None:
        check_choice(self.backend, PREPROCESS_BACKENDS, f"{path}.backend")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ConfigError(f"{path}.hw_decoder_load: must be within 0..1, got {self.hw_decoder_load}")
        check_positive(self.gpu_cache_limit_mb, f"{path}.gpu_cache_limit_mb")
        check_choice(self.geometry, GEOMETRY_MODES, f"{path}.geometry")
        check_positive(self.resize_size, f"{path}.resize_size")
        check_positive(self.crop_size, f"{path}.crop_size")
        if not 0 <= self.pad_value <= 255:
            raise ConfigError(f"{path}.pad_value: must be within 0..255, got {self.pad_value}")
        if self.geometry == "center_crop":
            key, largest = ("input_size", max(self.input_size)) if self.input_size else ("crop_size", self.crop_size)
            if largest > self.resize_size:
                raise ConfigError(
                    f"{path}.{key}: {largest} is larger than resize_size "
                    f"{self.resize_size}; the crop must fit inside the resized image"
                )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigError(f"{path}.{name}: needs 3 numbers (R, G, B), got {list(value)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{path}.std: every value must be > 0, got {list(self.std)}")
        check_choice(self.interpolation, INTERPOLATIONS, f"{path}.interpolation")
        if self.draft_min_ratio < 1.0:
            raise ConfigError(
                f"{path}.draft_min_ratio: must be >= 1.0, got {self.draft_min_ratio}"
            )
        check_positive(self.max_image_pixels, f"{path}.max_image_pixels")
        if self.decode_threads < 0:
            raise ConfigError(f"{path}.decode_threads: must be >= 0, got {self.decode_threads}")
        check_choice(self.dtype, DTYPES, f"{path}.dtype")

    @property
    def input_hw(self) -> tuple[int, int]:
        """The model input's (height, width)."""
        return (self.input_size[0], self.input_size[1]) if self.input_size else (self.crop_size, self.crop_size)


@dataclass(frozen=True)
class ModelConfig:
    """Which artifact to load and how."""

    file: str = ""
    """Artifact path inside the archive; empty = the manifest's serializedFile."""
    artifacts: tuple[str, ...] = ()
    """Several compiled artifacts (each with its .json from tsgpu compile): the worker loads the
    best one that fits its device."""
    format: str = "auto"
    model_class: str = ""
    """For format eager: 'model.py:ClassName' (the state dict is the artifact)."""
    channels_last: bool = True
    """Run convolutional models in channels-last layout on CPU (faster with oneDNN)."""
    freeze: bool = True
    """Freeze TorchScript modules at load (constant-folds weights; inference only)."""
    warmup: bool = True

    def validate(self, path: str) -> None:
        check_choice(self.format, MODEL_FORMATS, f"{path}.format")
        if self.model_class and ":" not in self.model_class:
            raise ConfigError(
                f"{path}.model_class: expected 'file.py:ClassName', got {self.model_class!r}"
            )
        if self.artifacts and self.file:
            raise ConfigError(f"{path}: set either file or artifacts, not both")
        if self.format == "eager" and not self.model_class:
            raise ConfigError(f"{path}.model_class: required when {path}.format is 'eager'")


@dataclass(frozen=True)
class TableConfig:
    """handlers/tables.py: results as a DataFrame (cuDF on a GPU worker, pandas otherwise)."""

    enabled: bool = False
    rules: str = ""
    """A rules CSV shipped in the archive (--extra-files rules.csv); "" = no rules."""
    engine: str = "auto"
    """auto (cudf on a GPU worker where installed, else pandas) | pandas | cudf."""
    counts: bool = True
    """Add `"counts": {label: n}` (after the rules and postprocess_table) to each response."""

    def validate(self, path: str) -> None:
        check_choice(self.engine, ("auto", "pandas", "cudf"), f"{path}.engine")


@dataclass(frozen=True)
class PipelineConfig:
    """handlers/pipeline.py: overlapped stages inside one worker, and decoding in processes."""

    micro_batch: int = 0
    """Split each TorchServe batch into micro-batches of this many items and overlap their stages
    (read/fetch/decode/upload of k+1 while k runs forward/postprocess); 0 = off (one pass)."""
    decode_processes: int = 0
    """CPU decoding (the cpu backend and the GPU backends' CPU fallbacks) in this many processes
    writing into shared memory; 0 = decode threads inside the worker."""
    decode_timeout_s: float = 10.0
    """A decode process that takes longer than this on one item is killed and replaced; the item is
    retried once in a fresh process, then answered 400."""

    def validate(self, path: str) -> None:
        if self.micro_batch < 0:
            raise ConfigError(f"{path}.micro_batch: must be >= 0 (0 = off), got {self.micro_batch}")
        if self.decode_processes < 0:
            raise ConfigError(f"{path}.decode_processes: must be >= 0 (0 = threads), got {self.decode_processes}")
        if self.decode_timeout_s <= 0:
            raise ConfigError(f"{path}.decode_timeout_s: must be > 0 seconds, got {self.decode_timeout_s}")


@dataclass(frozen=True)
class HandlerConfig:
    """The `handler:` section of model-config.yaml that every handler shares.

    A task adds its own section by subclassing (handlers/tasks/: e.g. `detector:` in
    `ObjectDetectorConfig`), and a handler validates with its `config_class`."""

    threads: int = 0
    """torch intra-op threads per worker; 0 = this worker's share of the host's CPUs."""
    malloc_trim_seconds: float = 10.0
    """Return freed heap memory to the OS at most this often (glibc); 0 = never."""
    inputs: InputConfig = field(default_factory=InputConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    table: TableConfig = field(default_factory=TableConfig)
    url: UrlConfig = field(default_factory=UrlConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    media: str = "image"
    """What a request carries: image (one image) | video (a clip; handlers/video/serve.py, docs/video.md)."""
    video: VideoConfig = field(default_factory=VideoConfig)
    """`handler.video` (handlers/video/config.py): decoder, frame batch, sampling, limits; read when
    media is video."""

    def validate(self, path: str) -> None:
        check_choice(self.media, MEDIA, f"{path}.media")
        if self.threads < 0:
            raise ConfigError(f"{path}.threads: must be >= 0, got {self.threads}")
        if self.malloc_trim_seconds < 0:
            raise ConfigError(f"{path}.malloc_trim_seconds: must be >= 0, got {self.malloc_trim_seconds}")

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None, path: str = "handler") -> HandlerConfig:
        """Build and validate from a parsed YAML mapping (None or {} gives the defaults)."""
        return _build(cls, section or {}, path)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def with_task_defaults(section: Mapping[str, Any] | None, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`section` over a task's `defaults` (its handler's `task_defaults`; nested keys merged; the
    user's values win).

    A user who sizes a center crop (`crop_size`, or `geometry: center_crop`) without `input_size`
    means that crop: the task's default `input_size` is then dropped rather than left to win."""
    defaults = _deep_copy(defaults)
    user_pre = (section or {}).get("preprocess") or {}
    if isinstance(user_pre, Mapping) and "input_size" not in user_pre and (
        "crop_size" in user_pre or user_pre.get("geometry") == "center_crop"
    ):
        defaults.get("preprocess", {}).pop("input_size", None)
    return _merge(defaults, section or {})


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = _deep_copy(value) if isinstance(value, Mapping) else value
    return base


def load_handler_config(
    model_yaml_config: Mapping[str, Any] | None, config_class: type[HandlerConfig] = HandlerConfig
) -> HandlerConfig:
    """The handler config of a whole model-config.yaml mapping (its `handler:` key).

    `config_class` may be a subclass of HandlerConfig that adds a task's own section.
    """
    section = (model_yaml_config or {}).get("handler")
    if section is not None and not isinstance(section, Mapping):
        raise ConfigError(f"handler: expected a mapping of keys, got {type(section).__name__}")
    return config_class.from_mapping(section)


def apply_overrides(section: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `dotted.key=value` strings (values parsed as YAML) to a copy of a handler section.

    >>> apply_overrides({}, ["preprocess.resize_size=320", "classifier.top_k=3"])
    {'preprocess': {'resize_size': 320}, 'classifier': {'top_k': 3}}
    """
    result: dict[str, Any] = _deep_copy(section)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--config {item!r}: expected key=value, e.g. classifier.top_k=3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config {item!r}: value is not valid YAML ({exc})") from None
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--config {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return result


# --- parsing machinery -------------------------------------------------------------------------


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; known keys: {', '.join(sorted(known))}"
        )
    kwargs = {name: _coerce(hints[name], data[name], f"{path}.{name}") for name in data}
    obj = cls(**kwargs)
    obj.validate(path)
    return obj


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not issubclass(hint, HandlerConfig) and hasattr(hint, "from_mapping"):
            return hint.from_mapping(value if value is not None else {}, path)  # a section that parses itself
        return _build(hint, value if value is not None else {}, path)
    if hint is ImageSize:
        return _image_size(value, path)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if typing.get_origin(hint) is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        # YAML reads `3: 0.5` with an int key: keys are kept as strings (ids and labels alike).
        return {str(k): _coerce(value_hint, v, f"{path}.{k}") for k, v in value.items()}
    if typing.get_origin(hint) is tuple:
        (item_hint, _) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return tuple(_coerce(item_hint, v, f"{path}[{i}]") for i, v in enumerate(value))
    if typing.get_origin(hint) is list:
        (item_hint,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(item_hint, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        # `X | None`: YAML's null (or ~) leaves it unset, anything else must be an X.
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _coerce(inner, value, path)
    raise TypeError(f"config field {path} has an unsupported type {hint!r}")  # our bug, not user's


def _image_size(value: Any, path: str) -> ImageSize:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return ImageSize()  # unset: the crop size
    if isinstance(value, int) and not isinstance(value, bool):
        size = (value, value)
    elif (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        size = (value[0], value[1])
    else:
        raise ConfigError(f"{path}: expected an integer or [height, width], got {value!r}")
    if min(size) <= 0:
        raise ConfigError(f"{path}: sizes must be > 0, got {list(value) if isinstance(value, (list, tuple)) else value}")
    return ImageSize(size)


def check_unit_interval(value: float, path: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{path}: must be within 0..1, got {value}")


def check_positive(value: int, path: str) -> None:
    if value <= 0:
        raise ConfigError(f"{path}: must be > 0, got {value}")


def check_choice(value: str, choices: tuple[str, ...], path: str) -> None:
    if value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}")


def _deep_copy(section: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in section.items()}


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value

"""`handler.video`: how a video archive decodes and samples clips, and the limits that guard it.

Torch-free (a decode process imports it). `VideoConfig` is the archive's section; `SamplingConfig`
is both its `sampling:` subsection and a request's `"sampling"` object, which `request_sampling`
lays over the archive's defaults and checks against the limits:

    handler:
      video:
        decoder: auto                  # auto | torchcodec | pyav
        frame_batch: 16
        sampling: {mode: fps, fps: 1.0, start_s: 0, end_s: null, max_frames: null}
        max_bytes: 268435456           # 413 naming handler.video.max_bytes above it
        decode_timeout_s: 60

Which frame a target time selects (every mode; docs/video.md repeats it): the frame *displayed* at
that time, i.e. the last frame whose presentation time is <= t (the first frame for a t before it).
Two targets that select the same frame give it once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, InvalidInput, PayloadTooLarge

__all__ = [
    "DECODERS", "DEFAULT_CODECS", "DEFAULT_CONTAINERS", "SAMPLING_MODES", "SamplingConfig", "VideoConfig",
    "request_sampling",
]

DECODERS = ("auto", "torchcodec", "pyav")
SAMPLING_MODES = ("uniform", "fps", "every_n", "keyframes", "timestamps")
DEFAULT_CODECS = ("h264", "hevc", "vp8", "vp9", "av1", "mpeg4", "mjpeg")
"""FFmpeg decoder names accepted by default (a stream in any other codec is a 415)."""
DEFAULT_CONTAINERS = ("mp4", "mov", "matroska", "webm", "avi")
"""FFmpeg demuxer names accepted by default; a demuxer matches when any of its aliases is listed
(FFmpeg's "mov,mp4,m4a,3gp,3g2,mj2" matches "mp4"). Images (jpeg_pipe, png_pipe, gif...) are not.
"mpegts" is not a default: torchcodec 0.17's exact mode returned the wrong frames on a test MPEG-TS
clip (PyAV decodes it right: add it with `decoder: pyav`)."""

_PATH = "handler.video"


@dataclass(frozen=True)
class SamplingConfig:
    """Which frames of a clip are sampled: `handler.video.sampling`, and a request's `"sampling"`."""

    mode: str = "uniform"
    """uniform | fps | every_n | keyframes | timestamps."""
    frames: int = 16
    """uniform: this many target times evenly spread over [start_s, end_s) (centres of equal slices)."""
    fps: float = 1.0
    """fps: target times start_s, start_s + 1/fps, ... before end_s."""
    n: int = 30
    """every_n: every n-th frame (presentation order) from the first frame at or after start_s."""
    timestamps: tuple[float, ...] = ()
    """timestamps: target times in seconds (sorted and deduplicated; those outside [start_s, end_s) dropped)."""
    start_s: float = 0.0
    end_s: float | None = None
    """End of the sampled range (exclusive); None = the clip's end."""
    max_frames: int | None = None
    """Keep at most this many sampled frames (the first in time; `truncated: true` when it cut);
    None = no cap below handler.video.max_sampled_frames (more than that is a 413)."""

    def validate(self, path: str = f"{_PATH}.sampling") -> None:
        _check_sampling(self, path, ConfigError)


@dataclass(frozen=True)
class VideoConfig:
    """`handler.video`: decoder choice, batching, default sampling and limits (see the module docstring)."""

    decoder: str = "auto"
    """auto (torchcodec where it imports with the installed torch, else PyAV) | torchcodec | pyav."""
    frame_batch: int = 16
    """Frames decoded and run through the model together (one chunk)."""
    stream: bool = False
    per_frame_embeddings: bool = False
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_bytes: int = 256 * 2**20
    max_duration_s: float = 600.0
    max_frame_pixels: int = 8_294_400
    """Displayed width x height of one frame (3840 x 2160)."""
    max_sampled_frames: int = 512
    max_decoded_frames: int = 18_000
    """Frames actually decoded for one request, including those between a keyframe and a target
    (600 s at 30 fps: decoding every frame of the longest allowed clip once)."""
    decode_timeout_s: float = 60.0
    """Wall time one request's decoding may take (summed over its chunks); past it the decode
    process is killed and the request answered 408 `decode_timeout`."""
    codecs: tuple[str, ...] = DEFAULT_CODECS
    containers: tuple[str, ...] = DEFAULT_CONTAINERS
    decode_threads: int = 0
    """FFmpeg decoding threads in the decode process (PyAV and torchcodec CPU); 0 = FFmpeg's choice."""

    def validate(self, path: str = _PATH) -> None:
        if self.decoder not in DECODERS:
            raise ConfigError(f"{path}.decoder: {self.decoder!r} is not one of {', '.join(DECODERS)}")
        for name in ("frame_batch", "max_bytes", "max_frame_pixels", "max_sampled_frames", "max_decoded_frames"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("max_duration_s", "decode_timeout_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{path}.{name}: must be a number of seconds > 0, got {value}")
        if self.decode_threads < 0:
            raise ConfigError(f"{path}.decode_threads: must be >= 0 (0 = FFmpeg's choice), got {self.decode_threads}")
        for name in ("codecs", "containers"):
            if not getattr(self, name):
                raise ConfigError(f"{path}.{name}: needs at least one name, got an empty list")
        self.sampling.validate(f"{path}.sampling")
        cap = self.sampling.max_frames
        if cap is not None and cap > self.max_sampled_frames:
            raise ConfigError(
                f"{path}.sampling.max_frames: {cap} is above {path}.max_sampled_frames={self.max_sampled_frames}"
            )

    @classmethod
    def from_mapping(cls, section: Mapping[str, Any] | None, path: str = _PATH) -> VideoConfig:
        """Build and validate from a parsed YAML mapping (None or {} gives the defaults); ConfigError
        names the key, what was received and what is accepted."""
        data = dict(_mapping(section or {}, path, ConfigError))
        _reject_unknown(data, cls, path, ConfigError)
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            key = f"{path}.{name}"
            if name == "sampling":
                kwargs[name] = _sampling_from(SamplingConfig(), value or {}, key, ConfigError)
            elif name in ("codecs", "containers"):
                kwargs[name] = _names(value, key)
            else:
                kwargs[name] = _coerce(_FIELD_KINDS[name], value, key, ConfigError)
        cfg = cls(**kwargs)
        cfg.validate(path)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def request_sampling(obj: Any, cfg: VideoConfig) -> SamplingConfig:
    """A request's `"sampling"` JSON object laid over the archive's `handler.video.sampling`.

    Bad keys or values are InvalidInput (400) naming the key; a `max_frames` above
    handler.video.max_sampled_frames, or more `timestamps` than it, is PayloadTooLarge (413) naming it.
    None (no "sampling" in the request) gives the archive's defaults.
    """
    if obj is None:
        return cfg.sampling
    data = _mapping(obj, "sampling", InvalidInput)
    _reject_unknown(data, SamplingConfig, "sampling", InvalidInput)
    sampling = _sampling_from(cfg.sampling, data, "sampling", InvalidInput)
    _check_sampling(sampling, "sampling", InvalidInput)
    limit = cfg.max_sampled_frames
    if sampling.max_frames is not None and sampling.max_frames > limit:
        raise PayloadTooLarge(
            f"sampling.max_frames={sampling.max_frames} is above handler.video.max_sampled_frames={limit}"
        )
    if sampling.mode == "timestamps" and len(sampling.timestamps) > limit and sampling.max_frames is None:
        raise PayloadTooLarge(
            f"sampling.timestamps has {len(sampling.timestamps)} times, above "
            f"handler.video.max_sampled_frames={limit}; send fewer or set sampling.max_frames"
        )
    return sampling


# --- checking -----------------------------------------------------------------------------------

_FIELD_KINDS = {
    "mode": str, "frames": int, "fps": float, "n": int, "timestamps": "floats", "start_s": float,
    "end_s": "float?", "max_frames": "int?", "decoder": str, "frame_batch": int, "stream": bool,
    "per_frame_embeddings": bool, "max_bytes": int, "max_duration_s": float, "max_frame_pixels": int,
    "max_sampled_frames": int, "max_decoded_frames": int, "decode_timeout_s": float, "decode_threads": int,
}


def _check_sampling(s: SamplingConfig, path: str, error: type[Exception]) -> None:
    if s.mode not in SAMPLING_MODES:
        raise error(f"{path}.mode: {s.mode!r} is not one of {', '.join(SAMPLING_MODES)}")
    if s.frames <= 0:
        raise error(f"{path}.frames: must be > 0, got {s.frames}")
    if not (s.fps > 0 and math.isfinite(s.fps)):
        raise error(f"{path}.fps: must be a number > 0, got {s.fps}")
    if s.n <= 0:
        raise error(f"{path}.n: must be > 0, got {s.n}")
    if not (s.start_s >= 0 and math.isfinite(s.start_s)):
        raise error(f"{path}.start_s: must be a number of seconds >= 0, got {s.start_s}")
    if s.end_s is not None and not (s.end_s > s.start_s and math.isfinite(s.end_s)):
        raise error(f"{path}.end_s: must be a number of seconds > start_s={s.start_s}, got {s.end_s}")
    if s.max_frames is not None and s.max_frames <= 0:
        raise error(f"{path}.max_frames: must be > 0 (or null for no cap), got {s.max_frames}")
    bad = [t for t in s.timestamps if not (t >= 0 and math.isfinite(t))]
    if bad:
        raise error(f"{path}.timestamps: every time must be a number of seconds >= 0, got {bad[0]}")
    if s.mode == "timestamps" and not s.timestamps:
        raise error(f"{path}.timestamps: mode 'timestamps' needs a non-empty list of seconds")


def _sampling_from(base: SamplingConfig, data: Any, path: str, error: type[Exception]) -> SamplingConfig:
    data = _mapping(data, path, error)
    _reject_unknown(data, SamplingConfig, path, error)
    values = {name: _coerce(_FIELD_KINDS[name], value, f"{path}.{name}", error) for name, value in data.items()}
    return dataclasses.replace(base, **values)


def _mapping(data: Any, path: str, error: type[Exception]) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise error(f"{path}: expected an object of keys, got {data!r}"[:300])
    return data


def _reject_unknown(data: Mapping[str, Any], cls: type, path: str, error: type[Exception]) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - known)
    if unknown:
        raise error(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(repr(k) for k in unknown)}; known keys: {', '.join(sorted(known))}"[:500])


def _coerce(kind: Any, value: Any, path: str, error: type[Exception]) -> Any:
    if kind in ("float?", "int?"):
        return None if value is None else _coerce(float if kind == "float?" else int, value, path, error)
    if kind == "floats":
        if not isinstance(value, (list, tuple)):
            raise error(f"{path}: expected a list of seconds, got {value!r}"[:300])
        return tuple(_coerce(float, v, f"{path}[{i}]", error) for i, v in enumerate(value))
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise error(f"{path}: expected true or false, got {value!r}"[:300])
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise error(f"{path}: expected an integer, got {value!r}"[:300])
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise error(f"{path}: expected a number, got {value!r}"[:300])
    if isinstance(value, str):
        return value
    raise error(f"{path}: expected a string, got {value!r}"[:300])


def _names(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{path}: expected a list of FFmpeg names, got {value!r}")
    return tuple(v.lower() for v in value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value

"""A clip's container, video stream, frame table and limits, read with PyAV before anything is sampled.

`probe` runs inside the decode process (child.py) on the client's bytes: it demuxes every packet of
the video stream (no decoding) to build the FrameTable, decodes the first frame only (its rotation,
and proof that the stream decodes at all; not counted in a clip's decoded frames), and checks what
can be checked before decoding:

    not a video (no demuxer takes it, an image, no video stream)       415 unsupported_media_type
    container or codec not in handler.video.containers / .codecs       415
    a video container whose header or index cannot be read             400 invalid_input
    width x height above handler.video.max_frame_pixels                413 naming the key
    duration above handler.video.max_duration_s                        413 naming the key

A stream that ends early (a demux error, corrupt packets, or fewer seconds than its header says: a cut
upload) is not an error here: the table holds the frames that can be read and `damaged` is set, so
the response says `"truncated": true` instead of presenting them as the whole clip.

Torch-free.
"""

from __future__ import annotations

import io
import itertools
import statistics
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from ..errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from .config import VideoConfig
from .sampling import FrameTable

__all__ = ["MAX_TABLE_FPS", "VideoInfo", "looks_like_video", "probe"]

MAX_TABLE_FPS = 240
"""A clip with more frames than this many per second of handler.video.max_duration_s is refused (413)
before its table grows further: tiny frames at absurd rates would otherwise cost memory, not pixels."""


@dataclass(frozen=True)
class VideoInfo:
    """What a response says about the clip; width and height are DISPLAYED pixels (rotation applied)."""

    duration_s: float
    fps: float
    width: int
    height: int
    rotation: int
    """Clockwise degrees (0, 90, 180, 270) the player turns the coded frames; frames come out turned."""
    codec: str
    container: str

    def to_response(self, decoder: str) -> dict[str, Any]:
        return {"duration_s": round(self.duration_s, 6), "fps": round(self.fps, 6), "width": self.width,
                "height": self.height, "rotation": self.rotation, "codec": self.codec, "decoder": decoder}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def looks_like_video(data: bytes) -> str | None:
    """The container family the first bytes announce (mp4, matroska, avi, mpegts), or None."""
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"):
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    if len(data) > 188 and data[0] == 0x47 and data[188] == 0x47:
        return "mpegts"
    return None


def probe(data: bytes, cfg: VideoConfig) -> tuple[VideoInfo, FrameTable, bool]:
    """(info, frame table, damaged) of a clip; raises the RequestErrors of the module docstring."""
    import av

    container = _open(av, data)
    try:
        stream = _video_stream(container)
        fmt = _allowed_container(container.format.name, cfg)
        codec = _allowed_codec(stream, cfg)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > cfg.max_frame_pixels:
            raise PayloadTooLarge(f"frames of {width}x{height} = {width * height} pixels are above "
                                  f"handler.video.max_frame_pixels={cfg.max_frame_pixels}")
        header_end = _header_end_s(container, stream)
        if header_end is not None and header_end > cfg.max_duration_s:
            raise PayloadTooLarge(f"the clip lasts {header_end:.1f} s, above handler.video.max_duration_s="
                                  f"{cfg.max_duration_s:g}")
        table, damaged = _frame_table(av, container, stream, cfg)
    finally:
        container.close()
    rotation = _first_frame_rotation(av, data)
    if table.duration_s > cfg.max_duration_s:
        raise PayloadTooLarge(f"the clip lasts {table.duration_s:.1f} s, above handler.video.max_duration_s="
                              f"{cfg.max_duration_s:g}")
    if header_end is not None and header_end - table.end_s > _tail_tolerance_s(table):
        damaged = True  # fewer seconds than the header announces: a cut upload
    if rotation % 180:
        width, height = height, width
    fps = len(table) / table.duration_s if table.duration_s > 0 else 0.0
    info = VideoInfo(table.duration_s, fps, width, height, rotation, codec, fmt)
    return info, table, damaged


def _open(av: Any, data: bytes) -> Any:
    try:
        return av.open(io.BytesIO(data), mode="r")
    except av.error.FFmpegError as exc:
        family = looks_like_video(data)
        if family is not None:
            raise InvalidInput(f"corrupt or incomplete video: its {family} header or index cannot be read "
                               f"({exc.strerror or exc})") from None
        raise UnsupportedMediaType("not a video: no video container recognises these bytes") from None


def _video_stream(container: Any) -> Any:
    if not container.streams.video:
        raise UnsupportedMediaType(f"not a video: the {container.format.name} data has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return stream


def _allowed_container(name: str, cfg: VideoConfig) -> str:
    aliases = name.lower().split(",")
    for allowed in cfg.containers:
        if allowed in aliases:
            return allowed
    raise UnsupportedMediaType(f"container {name!r} is not allowed (handler.video.containers: "
                               f"{', '.join(cfg.containers)})")


def _allowed_codec(stream: Any, cfg: VideoConfig) -> str:
    codec = stream.codec_context.codec
    names = {codec.name.lower(), getattr(codec, "canonical_name", codec.name).lower()}
    for allowed in cfg.codecs:
        if allowed in names:
            return allowed
    raise UnsupportedMediaType(f"video codec {sorted(names)[0]!r} is not allowed (handler.video.codecs: "
                               f"{', '.join(cfg.codecs)})")


def _header_end_s(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float((stream.duration + (stream.start_time or 0)) * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE
    return None


def _first_frame_rotation(av: Any, data: bytes) -> int:
    """Decode the first frame (a fresh open: no seek back): its display rotation (clockwise, a multiple
    of 90) and proof the stream decodes; a stream whose first frame does not decode is corrupt (400)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        try:
            for frame in container.decode(stream):
                ccw = float(getattr(frame, "rotation", 0) or 0)
                return int(round(-ccw / 90.0)) % 4 * 90
        except av.error.FFmpegError as exc:
            raise InvalidInput(f"corrupt video stream: its first frame does not decode ({exc.strerror or exc})") from None
    raise InvalidInput("corrupt or empty video stream: no frame decodes")


def _frame_table(av: Any, container: Any, stream: Any, cfg: VideoConfig) -> tuple[FrameTable, bool]:
    """Every packet's pts and keyframe flag (demux only); damaged when demuxing stopped on an error or
    met corrupt packets."""
    cap = int(MAX_TABLE_FPS * cfg.max_duration_s)
    entries: dict[int, tuple[bool, int]] = {}
    damaged = False
    try:
        for packet in container.demux(stream):
            if packet.pts is None or packet.size == 0:
                continue
            if packet.is_corrupt:
                damaged = True
                continue
            entries[packet.pts] = (packet.is_keyframe, packet.duration or 0)
            if len(entries) > cap:
                raise PayloadTooLarge(f"the clip has more than {cap} frames ({MAX_TABLE_FPS} per second of "
                                      f"handler.video.max_duration_s={cfg.max_duration_s:g})")
    except av.error.FFmpegError:
        damaged = True
    if not entries:
        raise InvalidInput("corrupt or empty video stream: no frame can be read")
    pts = sorted(entries)
    steps = [b - a for a, b in itertools.pairwise(pts)]
    last_duration = entries[pts[-1]][1] or (int(statistics.median(steps)) if steps else 1)
    table = FrameTable(tuple(pts), tuple(entries[p][0] for p in pts), Fraction(stream.time_base),
                       pts[-1] + last_duration)
    return table, damaged


def _tail_tolerance_s(table: FrameTable) -> float:
    """How far short of its header's duration a stream may end without counting as cut: two frames
    (muxers round durations) and at least 50 ms."""
    step = table.duration_s / max(len(table), 1)
    return max(0.05, 2 * step)

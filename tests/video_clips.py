"""Video clips made in the tests, with their ground truth: PyAV encodes them in memory.

Every clip is a few KB..MB of bytes plus what a decoder must find in it:

* `Clip.pts_s`: the presentation time of every frame, in presentation order (VFR clips: irregular);
* `Clip.colours[i]`: the background colour of frame i (it changes at known times, `colour_at`);
* `Clip.boxes[i]`: the moving box of frame i, (x0, y0, x1, y1) in *displayed* pixels (`box_at`);
* `Clip.keyframes`: indices of the frames encoded as keyframes (a fixed GOP);
* the displayed size and the rotation (clockwise degrees the player applies; the coded frames are
  stored un-rotated so that applying it shows the intended picture), and a marker square in the
  displayed top-left corner, so orientation can be checked on the pixels.

Makers: `h264_clip` (mp4, B-frames), `hevc_clip` (mp4, B-frames), `vp9_clip` (webm), `vfr_clip` (irregular pts), `mpegts_clip`, `rotated_clip`
(display matrix 90/180/270), `truncated_clip` / `corrupt_clip` (damaged variants), `not_a_video`,
`image_bytes` (a PNG: a real image, not a video), `long_1080p_clip` (the memory test's clip, fast to
encode: flat content, ultrafast x264). Colours are chosen far apart so lossy coding cannot confuse them.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

COLOURS: tuple[tuple[int, int, int], ...] = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40))
BOX_COLOUR = (250, 250, 250)
MARKER_COLOUR = (250, 0, 250)
MARKER = 16  # the marker square's side in displayed pixels (top-left corner)
BOX = (32, 24)  # the moving box's (width, height) in displayed pixels


@dataclass
class Clip:
    data: bytes
    pts_s: list[float]
    colours: list[tuple[int, int, int]]
    boxes: list[tuple[int, int, int, int]]
    keyframes: list[int]
    width: int  # displayed
    height: int  # displayed
    rotation: int = 0  # clockwise degrees applied for display
    codec: str = "h264"
    container: str = "mp4"
    duration_s: float = 0.0
    colour_period_s: float = 1.0
    extra: dict = field(default_factory=dict)

    def frame_at(self, t: float) -> int:
        """The frame displayed at time t: the last frame with pts <= t (the first for t before it)."""
        i = int(np.searchsorted(np.asarray(self.pts_s), t + 1e-6, side="right")) - 1
        return max(i, 0)


def colour_at(t: float, period_s: float = 1.0) -> tuple[int, int, int]:
    """The background colour shown at time t: COLOURS cycled every `period_s` seconds."""
    return COLOURS[int(t // period_s + 1e-9) % len(COLOURS)]


def box_at(t: float, duration_s: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The moving box at time t in displayed pixels: from the top-left to the bottom-right corner
    (leaving the marker free) over the clip's duration; even coordinates (4:2:0 chroma)."""
    bw, bh = BOX
    frac = min(max(t / duration_s, 0.0), 1.0) if duration_s > 0 else 0.0
    x0 = MARKER * 2 + int((width - bw - MARKER * 2 - 2) * frac) // 2 * 2
    y0 = MARKER * 2 + int((height - bh - MARKER * 2 - 2) * frac) // 2 * 2
    return (x0, y0, x0 + bw, y0 + bh)


def draw(t: float, duration_s: float, width: int, height: int, period_s: float = 1.0) -> np.ndarray:
    """The displayed picture at time t: background colour, marker square (top-left), moving box."""
    img = np.empty((height, width, 3), dtype=np.uint8)
    img[:] = colour_at(t, period_s)
    img[:MARKER, :MARKER] = MARKER_COLOUR
    x0, y0, x1, y1 = box_at(t, duration_s, width, height)
    img[y0:y1, x0:x1] = BOX_COLOUR
    return img


def to_coded(displayed: np.ndarray, rotation: int) -> np.ndarray:
    """The coded frame whose display (rotated `rotation` degrees clockwise) is `displayed`."""
    # displayed = rot_cw(coded, r)  =>  coded = rot_ccw(displayed, r); np.rot90 turns counterclockwise
    return np.ascontiguousarray(np.rot90(displayed, k=(rotation // 90) % 4))


def encode(
    pts: Sequence[int],
    time_base: Fraction,
    *,
    width: int = 160,
    height: int = 120,
    codec: str = "libx264",
    container: str = "mp4",
    rotation: int = 0,
    gop: int = 12,
    bframes: int = 2,
    period_s: float = 1.0,
    duration_s: float | None = None,
    faststart: bool = False,
    picture: Callable[[float, float, int, int, float], np.ndarray] = draw,
) -> Clip:
    """Encode frames at `pts` (in `time_base` units) showing `picture(t, ...)` in displayed pixels."""
    import av

    pts = list(pts)
    times = [float(p * time_base) for p in pts]
    last = times[-1] + (times[-1] - times[-2] if len(times) > 1 else 0.04)
    duration = duration_s if duration_s is not None else last
    coded_w, coded_h = (height, width) if rotation % 180 else (width, height)
    buf = io.BytesIO()
    tmp = tempfile.NamedTemporaryFile(suffix="." + container) if faststart else None  # faststart rewrites the file
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(tmp.name if tmp else buf, "w", format=container, options=options) as out:
        stream = out.add_stream(codec)
        stream.width, stream.height, stream.pix_fmt = coded_w, coded_h, "yuv420p"
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        stream.codec_context.framerate = Fraction(len(pts), 1) / Fraction(last).limit_denominator(1000)
        stream.codec_context.options = _codec_options(codec, gop, bframes)
        if rotation:
            # set_display_rotation takes counterclockwise degrees; ours are the player's clockwise turn
            stream.set_display_rotation(-rotation % 360 if -rotation % 360 <= 180 else -rotation % 360 - 360)
        for p, t in zip(pts, times, strict=True):
            frame = av.VideoFrame.from_ndarray(to_coded(picture(t, duration, width, height, period_s), rotation),
                                               format="rgb24")
            frame.pts, frame.time_base = p, time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    if tmp is not None:
        with tmp:
            buf = io.BytesIO(open(tmp.name, "rb").read())
    return Clip(
        data=buf.getvalue(), pts_s=times, colours=[colour_at(t, period_s) for t in times],
        boxes=[box_at(t, duration, width, height) for t in times],
        keyframes=list(range(0, len(pts), gop)), width=width, height=height, rotation=rotation,
        codec="vp9" if "vp9" in codec else "h264" if "264" in codec else codec, container=container,
        duration_s=duration, colour_period_s=period_s,
    )


def _codec_options(codec: str, gop: int, bframes: int) -> dict[str, str]:
    if codec == "libx264":
        return {"preset": "veryfast", "crf": "12",
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:b-pyramid=none"}
    if codec == "libx265":
        return {"preset": "veryfast", "crf": "12",
                "x265-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bframes}:log-level=error"}
    if codec == "libvpx-vp9":
        return {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b": "0", "g": str(gop),
                "keyint_min": str(gop), "lag-in-frames": "0"}
    return {"g": str(gop)}


# --- the makers -------------------------------------------------------------------------------


def h264_clip(seconds: float = 3.0, fps: int = 10, width: int = 160, height: int = 120, gop: int = 12,
              bframes: int = 2, faststart: bool = False) -> Clip:
    """mp4, H.264 with B-frames, constant frame rate (time base 1/fps*... exact: 1/(fps*100))."""
    tb = Fraction(1, fps * 100)
    return encode([i * 100 for i in range(int(seconds * fps))], tb, width=width, height=height, gop=gop,
                  bframes=bframes, faststart=faststart)


def hevc_clip(seconds: float = 3.0, fps: int = 10) -> Clip:
    """mp4, HEVC (x265) with B-frames."""
    tb = Fraction(1, fps * 100)
    clip = encode([i * 100 for i in range(int(seconds * fps))], tb, codec="libx265")
    clip.codec = "hevc"
    return clip


def vp9_clip(seconds: float = 3.0, fps: int = 10, width: int = 160, height: int = 120, gop: int = 12) -> Clip:
    """webm, VP9 (webm's time base is 1/1000 s)."""
    tb = Fraction(1, 1000)
    return encode([round(i * 1000 / fps) for i in range(int(seconds * fps))], tb, width=width, height=height,
                  codec="libvpx-vp9", container="webm", gop=gop, bframes=0)


VFR_STEPS_MS = (40, 40, 100, 20, 60, 200, 40, 80)


def vfr_clip(seconds: float = 3.0, codec: str = "libx264", container: str = "mp4") -> Clip:
    """Variable frame rate: frame durations cycle through VFR_STEPS_MS (20..200 ms), so index/fps
    is wrong for almost every frame and only true pts give the right time."""
    pts, t = [], 0
    while t < seconds * 1000:
        pts.append(t)
        t += VFR_STEPS_MS[len(pts) % len(VFR_STEPS_MS)]
    return encode(pts, Fraction(1, 1000), codec=codec, container=container, gop=8)


def rotated_clip(rotation: int, seconds: float = 1.0, fps: int = 10, width: int = 160, height: int = 96,
                 container: str = "mp4") -> Clip:
    """A clip whose display matrix rotates it `rotation` degrees clockwise (displayed width x height)."""
    tb = Fraction(1, fps * 100)
    codec = "libx264" if container == "mp4" else "libvpx-vp9"
    return encode([i * 100 for i in range(int(seconds * fps))], tb, width=width, height=height,
                  rotation=rotation, codec=codec, container=container)


def truncated_clip(keep: float = 0.6, faststart: bool = True, container: str = "mp4") -> tuple[Clip, bytes]:
    """(the whole clip, its first `keep` of the bytes). mp4 with faststart: the index comes first, so the
    cut file opens and its tail is missing; without it the cut file has no index (unreadable). webm: the
    header (with the duration) comes first and the clusters follow: a cut file opens, its tail missing."""
    clip = vp9_clip(seconds=4.0) if container == "webm" else h264_clip(seconds=4.0, faststart=faststart)
    return clip, clip.data[: int(len(clip.data) * keep)]


def corrupt_clip(seed: int = 0) -> tuple[Clip, bytes]:
    """(the clip, its bytes with the middle third overwritten by noise)."""
    clip = h264_clip(seconds=4.0, faststart=True)
    data = bytearray(clip.data)
    n = len(data)
    rng = np.random.default_rng(seed)
    data[n // 3: 2 * n // 3] = rng.integers(0, 256, 2 * n // 3 - n // 3, dtype=np.uint8).tobytes()
    return clip, bytes(data)


def not_a_video() -> bytes:
    return b"this is not a video, just some text that no demuxer takes for one\n" * 20


def image_bytes() -> bytes:
    """A PNG: FFmpeg opens it (image2 demuxer), but it is an image, not a video container."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(draw(0.0, 1.0, 64, 48)).save(out, format="PNG")
    return out.getvalue()


def mpeg4_avi_clip(seconds: float = 1.0) -> Clip:
    """MPEG-4 part 2 in AVI: allowed by default, disallowed by a codecs list of h264 only."""
    return encode([i for i in range(int(seconds * 10))], Fraction(1, 10), codec="mpeg4", container="avi",
                  bframes=0)


def mpegts_clip(seconds: float = 3.0, fps: int = 10) -> Clip:
    """H.264 with B-frames in MPEG-TS: no index, so seeks land by timestamp search (often a GOP late),
    and the muxer shifts every pts by the B-frame delay (the file's first frame is at 0.1 s here)."""
    tb = Fraction(1, 90000)
    return encode([i * 90000 // fps for i in range(int(seconds * fps))], tb, container="mpegts")


def long_1080p_clip(seconds: float = 120.0, fps: int = 30, gop: int = 250) -> bytes:
    """A long 1920x1080 H.264 clip for the memory test, encoded fast: a flat colour per second with a
    small moving box, written straight as YUV planes (no per-frame RGB conversion), ultrafast x264.
    About 1 s per 10 s of clip on one core of this host."""
    import av

    width, height = 1920, 1080
    tb = Fraction(1, fps)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.options = {"preset": "ultrafast", "crf": "30",
                                        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        frame = av.VideoFrame(width, height, "yuv420p")
        y, u, v = (np.frombuffer(p, dtype=np.uint8).reshape(-1, p.line_size) for p in frame.planes)
        for i in range(int(seconds * fps)):
            second = i // fps
            y[:] = 60 + (second * 37) % 150
            u[:] = 128 + (second * 11) % 60 - 30
            v[:] = 128
            x = (i * 8) % (width - 64)
            y[500:564, x:x + 64] = 235
            frame.pts = i
            frame.time_base = tb
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()

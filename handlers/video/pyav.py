"""The PyAV decoder: seek to the keyframe before each sampled frame, decode forward, keep the target.

PyAV's wheels bundle FFmpeg, so this decoder works wherever the `video` extra installs. It decodes
only what the plan needs: for each target frame (ascending), `sampling.seek_for` says whether to seek
to its keyframe or to decode on from the previous target; every frame FFmpeg hands back counts
against handler.video.max_decoded_frames (413 past it).

On the way from a keyframe to a target, FFmpeg is told to drop non-reference frames presented
before the target (`skip_frame = NONREF` while such packets are fed): no target is one of them
(targets come in ascending order, the target itself and later frames are always decoded), and no
other frame refers to them, so the target's pixels are the same as with every frame decoded. On
x264's default B-frame pyramid this decodes about half the frames of a mid-GOP walk (1 fps, keyint
60: 495 of 930). The decoded-frame count still counts the skipped frames (see `decoded`), so
handler.video.max_decoded_frames limits the same walk as before.

Frames are matched by their pts (the FrameTable's, from the same packets), come out as RGB, and
are turned by the clip's rotation (PyAV reports the display matrix, `frame.rotation`, but does not
apply it), so they are in displayed orientation like torchcodec's. They are written straight into
the caller's [n, 3, H, W] uint8 array (the shared frames of the decode process).

A seek that lands past its target (MPEG-TS has no index: FFmpeg seeks by searching timestamps and
can land a GOP late) is retried from the keyframe before; if that overshoots too, the clip is decoded
forward from its start without further seeks (`_recover`).

A packet FFmpeg refuses to decode is a corrupt stream: InvalidInput (400) naming the time. A target
the stream ends before is left out (the caller marks the response truncated).

Torch-free (runs in the decode process).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import InvalidInput, PayloadTooLarge
from .sampling import FrameTable, seek_for

__all__ = ["PyAVDecoder"]

THREAD_TYPE = "SLICE"
"""FFmpeg's threading for the decoder. SLICE, measured by benchmarks/video_decode.py (60 s 1080p H.264, keyint 60,
1 fps): 2.74 CPU-s against 3.22 with AUTO and 3.32 with FRAME. Frame threads are flushed and refilled at every
seek and decode frames ahead of the one looked for; x264's single-slice frames give slice threads nothing to
split, so SLICE is in effect one thread per clip (the decode process takes one of the worker's CPUs)."""
SKIP_NONREF = True
"""Let FFmpeg drop non-reference frames presented before the frame being looked for."""


class PyAVDecoder:
    """One clip opened for decoding the frames of a plan, chunk by chunk, in ascending order."""

    name = "pyav"

    def __init__(self, data: bytes, table: FrameTable, rotation: int, max_decoded_frames: int,
                 threads: int = 0, damaged: bool = False) -> None:
        import av

        self._av = av
        self.table = table
        self.rotation = rotation
        self.max_decoded_frames = max_decoded_frames
        self.decoded = 0
        """Frames the decode walk has passed so far (what max_decoded_frames limits): every frame FFmpeg
        returned, targets or not, plus the non-reference frames it was told to skip on the way to a target
        (counted from the gaps between returned frames' table positions), so the count and its limit are
        those of a walk that decodes every frame."""
        self.returned = 0
        """Frames FFmpeg actually decoded and returned (the work done; <= decoded)."""
        self._index = {p: i for i, p in enumerate(table.pts)}
        self._last = -1  # table position of the last frame returned since the last seek (counting gaps)
        self._want: int | None = None  # the pts being looked for: packets before it may skip non-ref frames
        self._skip_fed = 0  # packets fed with skipping on, not yet matched to a gap in the returned frames
        self._data = data
        self._threads = threads
        # a damaged clip (probe: cut or damaged tail) keeps frame threads: they let a cut last packet end the
        # stream (its frames left out, the response truncated) where a slice-threaded decode fails on it (400)
        self._thread_type = "AUTO" if damaged else THREAD_TYPE
        self._container = av.open(io.BytesIO(data), mode="r")
        self._stream = self._open_stream()
        self._frames: Iterator[Any] | None = None
        self._pending: Any | None = None  # decoded past a target that did not come: the next target's?
        self._pos = -1  # the last target decoded (index into the table)
        self._seekable = True  # False once a seek overshot twice: decode forward only

    def decode_into(self, indices: list[int], out: np.ndarray) -> list[int]:
        """Decode frames `indices` (ascending, after every earlier call's) into out[0..]; returns the
        indices decoded, in order (those the stream does not deliver -- a cut tail, a lost packet --
        are left out, and the caller marks the response truncated)."""
        done: list[int] = []
        for target in indices:
            frame = self._decode(target)
            if frame is not None:
                self._write(frame, out[len(done)])
                done.append(target)
        return done

    def close(self) -> None:
        self._frames = None
        self._container.close()

    # -- internals ---------------------------------------------------------------------------------

    def _decode(self, target: int) -> Any | None:
        """The target's frame, or None when the stream does not deliver a frame with its pts."""
        key = seek_for(self.table, self._pos, target) if self._seekable else None
        if key is not None:
            self._seek(key)
        want = self.table.pts[target]
        frame = self._next_at_or_after(want)
        if key is not None and (frame is None or frame.pts > want):
            frame = self._recover(key, want, frame)
        self._pos = target
        if frame is None or frame.pts != want:
            return None  # a later frame stays pending: it may be the next target's
        self._pending = None
        return frame

    def _recover(self, key: int, want: int, frame: Any | None) -> Any | None:
        """After a seek to `key` that landed past `want` or at the end: containers without an index
        (MPEG-TS) seek by searching timestamps and can land a GOP late. Try the keyframe before; if
        that overshoots too, stop seeking for this clip and decode forward from the start of the file
        (correct for any container; still bounded by max_decoded_frames). None: the stream ends first."""
        if key > 0:
            self._seek(self.table.keyframe_before(key - 1))
            frame = self._next_at_or_after(want)
            if frame is None or frame.pts == want:
                return frame  # found, or the stream ends before `want` (a cut tail)
        elif frame is None:
            return None
        self._seekable = False
        self._rewind()
        return self._next_at_or_after(want)

    def _seek(self, key: int) -> None:
        self._container.seek(self.table.pts[key], stream=self._stream, backward=True, any_frame=False)
        self._frames = self._decoded_frames()
        self._pending = None
        self._last, self._skip_fed = key - 1, 0

    def _open_stream(self) -> Any:
        stream = self._container.streams.video[0]
        stream.thread_type = self._thread_type
        stream.codec_context.thread_count = self._threads
        return stream

    def _rewind(self) -> None:
        """Back to the first byte: reopen the container (no seek can overshoot that)."""
        self._container.close()
        self._container = self._av.open(io.BytesIO(self._data), mode="r")
        self._stream = self._open_stream()
        self._frames = self._decoded_frames()
        self._pending = None
        self._last, self._skip_fed = -1, 0

    def _next_at_or_after(self, pts: int) -> Any | None:
        """The first decoded frame with pts >= `pts` (kept pending until a target takes it)."""
        if self._pending is not None and self._pending.pts >= pts:
            return self._pending
        self._pending = None
        assert self._frames is not None  # a seek comes first
        self._want = pts
        try:
            for frame in self._frames:
                if frame.pts is not None and frame.pts >= pts:
                    self._pending = frame
                    return frame
        finally:
            self._want = None
        return None

    def _decoded_frames(self) -> Iterator[Any]:
        codec = self._stream.codec_context
        codec.skip_frame, skipping = "DEFAULT", False  # a walk given up before its target may have left NONREF
        for packet in self._container.demux(self._stream):
            # a frame presented before the one looked for is never a target (targets come in ascending
            # order): if no other frame refers to it (non-reference), FFmpeg may drop it undecoded
            skip = SKIP_NONREF and self._want is not None and packet.pts is not None and packet.pts < self._want
            if skip != skipping:
                codec.skip_frame = "NONREF" if skip else "DEFAULT"
                skipping = skip
            self._skip_fed += skip
            try:
                frames = packet.decode()
            except self._av.error.FFmpegError as exc:
                at = float(packet.pts * self.table.time_base) if packet.pts is not None else None
                where = f" near {at:.3f} s" if at is not None else ""
                raise InvalidInput(f"corrupt video stream{where}: FFmpeg cannot decode it "
                                   f"({exc.strerror or exc})") from None
            for frame in frames:
                self._count(frame)
                if self.decoded > self.max_decoded_frames:
                    raise PayloadTooLarge(
                        f"decoding this sampling needs more than handler.video.max_decoded_frames="
                        f"{self.max_decoded_frames} frames; sample fewer frames or a shorter range"
                    )
                yield frame

    def _count(self, frame: Any) -> None:
        """One frame returned: count it, and the frames FFmpeg skipped before it: the gap since the previous
        frame's table position, at most the packets fed with skipping on since then (a seek that lands
        late, MPEG-TS, leaves a gap nothing was skipped in)."""
        self.returned += 1
        self.decoded += 1
        at = self._index.get(frame.pts) if frame.pts is not None else None
        if at is None:
            return
        skipped = min(max(0, at - self._last - 1), self._skip_fed)
        self.decoded += skipped
        self._skip_fed -= skipped
        self._last = max(self._last, at)

    def _write(self, frame: Any, out: np.ndarray) -> None:
        rgb = frame.to_ndarray(format="rgb24")  # [h, w, 3], coded orientation
        turned = np.rot90(rgb, k=-(self.rotation // 90)) if self.rotation else rgb  # rot90: counterclockwise
        if turned.shape[:2] != out.shape[1:]:
            raise InvalidInput(f"the video's frame size changed mid-stream ({turned.shape[1]}x{turned.shape[0]}, "
                               f"was {out.shape[2]}x{out.shape[1]}); such clips are not supported")
        np.copyto(out, turned.transpose(2, 0, 1))

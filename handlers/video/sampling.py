"""Which frames a sampling selects, and what decoding them costs: pure functions over a frame table.

A clip's `FrameTable` lists every frame's presentation time (true pts, from the demuxed packets, so
variable-frame-rate clips are timed right) and whether it is a keyframe, in presentation order; a
frame's *index* is its position in that order. `make_plan` turns a `SamplingConfig` into the frame
indices to decode; `decode_steps` says, for each of them, whether a decoder seeks to the keyframe
before it or decodes forward from where it stands, and `decode_cost` counts the frames that walk
decodes (what handler.video.max_decoded_frames limits).

Which frame a target time t selects, in every mode: the frame displayed at t, i.e. the last frame
whose pts <= t (+1 microsecond, so float rounding of a computed t never picks the frame before);
a t before the first frame selects the first frame. Target times live in the sampled range
[start, end): start = max(start_s, first pts), end = min(end_s, end of the last frame). Targets that
select the same frame give it once, so a mode can return fewer frames than it asked for.

    uniform     `frames` targets at the centres of equal slices of [start, end)
    fps         start, start + 1/fps, start + 2/fps, ... < end
    every_n     the frames with pts in [start, end), every n-th from the first of them
    keyframes   the keyframes with pts in [start, end)
    timestamps  the given times in [start, end) (others dropped), sorted

`max_frames` keeps the first max_frames sampled frames in time order and marks the plan truncated;
without it, a plan of more than handler.video.max_sampled_frames frames is a 413.

Torch-free (a decode process imports it).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from ..errors import InvalidInput, PayloadTooLarge
from .config import SamplingConfig

__all__ = ["PTS_EPSILON_S", "FrameTable", "SamplePlan", "decode_cost", "decode_steps", "make_plan", "seek_for"]

PTS_EPSILON_S = 1e-6


@dataclass(frozen=True)
class FrameTable:
    """Every frame of one video stream in presentation order."""

    pts: tuple[int, ...]
    """Presentation times in `time_base` units, ascending."""
    keyframe: tuple[bool, ...]
    time_base: Fraction
    end_pts: int
    """Where the last frame stops being displayed (its pts + its duration)."""
    pts_s: tuple[float, ...] = field(init=False, repr=False, compare=False)
    """Presentation times in seconds (pts x time_base)."""
    keyframes: tuple[int, ...] = field(init=False, repr=False, compare=False)
    """Indices of the keyframes."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "pts_s", tuple(float(p * self.time_base) for p in self.pts))
        object.__setattr__(self, "keyframes", tuple(i for i, k in enumerate(self.keyframe) if k))

    def __len__(self) -> int:
        return len(self.pts)

    @property
    def begin_s(self) -> float:
        return self.pts_s[0] if self.pts else 0.0

    @property
    def end_s(self) -> float:
        return float(self.end_pts * self.time_base)

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end_s - self.begin_s)

    def frame_at(self, t: float) -> int:
        """The frame displayed at time t (see the module docstring)."""
        return max(bisect.bisect_right(self.pts_s, t + PTS_EPSILON_S) - 1, 0)

    def keyframe_before(self, index: int) -> int:
        """The last keyframe at or before frame `index` (0 when none is flagged: decode from the start)."""
        k = bisect.bisect_right(self.keyframes, index) - 1
        return self.keyframes[k] if k >= 0 else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the decode process sends the table to the worker."""
        return {"pts": list(self.pts), "keyframe": [int(k) for k in self.keyframe],
                "time_base": [self.time_base.numerator, self.time_base.denominator], "end_pts": self.end_pts}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameTable:
        num, den = d["time_base"]
        return cls(tuple(int(p) for p in d["pts"]), tuple(bool(k) for k in d["keyframe"]),
                   Fraction(int(num), int(den)), int(d["end_pts"]))


@dataclass(frozen=True)
class SamplePlan:
    """The frames one request decodes: indices into the FrameTable, in presentation order."""

    mode: str
    indices: tuple[int, ...]
    pts_s: tuple[float, ...]
    truncated: bool = False
    """True when max_frames cut the plan."""

    @property
    def count(self) -> int:
        return len(self.indices)


def make_plan(table: FrameTable, sampling: SamplingConfig, max_sampled_frames: int) -> SamplePlan:
    """The frames `sampling` selects in `table` (see the module docstring); 413 when there are more
    than `max_sampled_frames` and no `max_frames` cap."""
    if not len(table):
        raise InvalidInput("the video stream has no decodable frames")
    start = max(sampling.start_s, table.begin_s)
    end = min(sampling.end_s if sampling.end_s is not None else math.inf, table.end_s)
    indices = _select(table, sampling, start, end) if end > start else []
    indices = sorted(set(indices))
    truncated = False
    if sampling.max_frames is not None and len(indices) > sampling.max_frames:
        indices, truncated = indices[: sampling.max_frames], True
    elif len(indices) > max_sampled_frames:
        raise PayloadTooLarge(
            f"sampling mode {sampling.mode!r} selects {len(indices)} frames, above "
            f"handler.video.max_sampled_frames={max_sampled_frames}; lower the rate, narrow start_s/end_s "
            f"or set sampling.max_frames"
        )
    return SamplePlan(sampling.mode, tuple(indices), tuple(table.pts_s[i] for i in indices), truncated)


def _select(table: FrameTable, s: SamplingConfig, start: float, end: float) -> list[int]:
    if s.mode == "uniform":
        step = (end - start) / s.frames
        return [table.frame_at(start + (k + 0.5) * step) for k in range(s.frames)]
    if s.mode == "fps":
        count = math.ceil((end - start) * s.fps - 1e-9)
        return [table.frame_at(start + k / s.fps) for k in range(count)]
    first, stop = _range_indices(table, start, end)
    if s.mode == "every_n":
        return list(range(first, stop, s.n))
    if s.mode == "keyframes":
        return [k for k in table.keyframes if first <= k < stop]
    return [table.frame_at(t) for t in sorted(set(s.timestamps)) if start - PTS_EPSILON_S <= t < end]


def _range_indices(table: FrameTable, start: float, end: float) -> tuple[int, int]:
    """[first, stop): the frames whose pts lie in [start, end)."""
    first = bisect.bisect_left(table.pts_s, start - PTS_EPSILON_S)
    stop = bisect.bisect_left(table.pts_s, end - PTS_EPSILON_S)
    return first, stop


def seek_for(table: FrameTable, pos: int, target: int) -> int | None:
    """The keyframe a decoder standing after frame `pos` (-1: nothing decoded yet) seeks to before
    decoding `target`, or None when it decodes forward.

    It decodes forward when the target's keyframe is at or before `pos` (a seek would skip nothing);
    otherwise, and before the first target, and for a target at or before `pos`, it seeks."""
    key = table.keyframe_before(target)
    return key if pos < 0 or key > pos or target <= pos else None


def decode_steps(table: FrameTable, indices: tuple[int, ...] | list[int]) -> list[tuple[int | None, int]]:
    """For each target index (ascending): (keyframe index to seek to, or None to decode forward, target)."""
    steps: list[tuple[int | None, int]] = []
    pos = -1
    for i in indices:
        steps.append((seek_for(table, pos, i), i))
        pos = i
    return steps


def decode_cost(table: FrameTable, indices: tuple[int, ...] | list[int]) -> int:
    """Frames decoded by the walk of `decode_steps` (presentation order; B-frame reordering aside)."""
    cost, pos = 0, -1
    for seek, i in decode_steps(table, indices):
        cost += i - seek + 1 if seek is not None else i - pos
        pos = i
    return cost

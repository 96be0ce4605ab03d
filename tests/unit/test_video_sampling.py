"""handler.video config, a request's "sampling", and which frames each sampling mode selects.

Pure: frame tables are written out here (constant and variable frame rates), and every expected
index comes from the rule the docs state -- the frame displayed at t is the last frame whose
pts <= t -- applied by brute force, not by the code under test.
"""

from __future__ import annotations

from fractions import Fraction

import pytest

from handlers.errors import ConfigError, InvalidInput, PayloadTooLarge
from handlers.video.config import SamplingConfig, VideoConfig, request_sampling
from handlers.video.sampling import FrameTable, decode_cost, decode_steps, make_plan

VFR_MS = [0, 40, 140, 160, 220, 420, 460, 540, 580, 620, 720, 740, 800, 1000, 1040, 1120]


def cfr_table(frames: int = 100, fps: int = 10, gop: int = 12) -> FrameTable:
    """`frames` frames at `fps` (time base 1/(100 fps)), a keyframe every `gop`."""
    return FrameTable(tuple(i * 100 for i in range(frames)), tuple(i % gop == 0 for i in range(frames)),
                      Fraction(1, fps * 100), frames * 100)


def vfr_table() -> FrameTable:
    return FrameTable(tuple(VFR_MS), tuple(i % 4 == 0 for i in range(len(VFR_MS))), Fraction(1, 1000), 1200)


def displayed_at(pts_s: list[float], t: float) -> int:
    """Brute force: the last frame with pts <= t (+1 microsecond; the first frame for t before it)."""
    best = 0
    for i, p in enumerate(pts_s):
        if p <= t + 1e-6:
            best = i
    return best


def plan(table: FrameTable, max_sampled: int = 512, **kw) -> tuple[int, ...]:
    return make_plan(table, SamplingConfig(**kw), max_sampled).indices


# --- which frame a time selects -----------------------------------------------------------------


def test_frame_at_is_the_frame_displayed_at_t():
    table = vfr_table()
    seconds = [p / 1000 for p in VFR_MS]
    for t in [0.0, 0.039, 0.04, 0.139998, 0.1399999, 0.14, 0.15, 0.5, 1.0, 1.119, 1.12, 5.0]:
        assert table.frame_at(t) == displayed_at(seconds, t), t
    assert table.frame_at(-1.0) == 0  # before the first frame: the first frame
    # a computed time a hair below a frame's pts (float rounding) still selects that frame; 2 us is not a hair
    assert table.frame_at(0.14 - 1e-9) == 2
    assert table.frame_at(0.14 - 2e-6) == 1


def test_table_times_and_duration():
    table = vfr_table()
    assert table.pts_s[2] == 0.14
    assert table.duration_s == 1.2
    assert table.keyframes == (0, 4, 8, 12)
    assert table.keyframe_before(11) == 8
    assert FrameTable.from_dict(table.to_dict()) == table


# --- every mode, CFR ---------------------------------------------------------------------------


def test_uniform_takes_the_centres_of_equal_slices():
    # 10 s clip, 4 frames: targets 1.25, 3.75, 6.25, 8.75 s -> frames 12, 37, 62, 87
    assert plan(cfr_table(), mode="uniform", frames=4) == (12, 37, 62, 87)


def test_fps_steps_from_start():
    assert plan(cfr_table(), mode="fps", fps=2.0) == tuple(range(0, 100, 5))


def test_fps_above_the_clip_rate_gives_each_frame_once():
    assert plan(cfr_table(frames=20), mode="fps", fps=35.0) == tuple(range(20))


def test_every_n():
    assert plan(cfr_table(), mode="every_n", n=7) == tuple(range(0, 100, 7))


def test_keyframes():
    assert plan(cfr_table(), mode="keyframes") == tuple(range(0, 100, 12))


def test_timestamps_sorted_deduplicated_and_out_of_range_dropped():
    assert plan(cfr_table(), mode="timestamps", timestamps=(3.33, 0.05, 3.31, 20.0)) == (0, 33)


def test_start_and_end_apply_to_every_mode():
    t = cfr_table()
    assert plan(t, mode="fps", fps=1.0, start_s=2.5, end_s=5.5) == (25, 35, 45)
    assert plan(t, mode="uniform", frames=3, start_s=2.0, end_s=5.0) == (25, 35, 45)
    assert plan(t, mode="every_n", n=10, start_s=2.05, end_s=5.0) == (21, 31, 41)
    assert plan(t, mode="keyframes", start_s=1.0, end_s=5.0) == (12, 24, 36, 48)
    assert plan(t, mode="timestamps", timestamps=(1.0, 4.0, 6.0), start_s=2.0, end_s=5.0) == (40,)


def test_end_past_the_clip_is_the_clip_end_and_an_empty_range_gives_no_frames():
    t = cfr_table()
    assert plan(t, mode="fps", fps=1.0, start_s=8.0, end_s=100.0) == (80, 90)
    assert plan(t, mode="fps", fps=1.0, start_s=50.0) == ()


def test_max_frames_keeps_the_first_and_marks_truncated():
    result = make_plan(cfr_table(), SamplingConfig(mode="every_n", n=1, max_frames=5), 512)
    assert result.indices == (0, 1, 2, 3, 4)
    assert result.truncated
    assert result.pts_s == (0.0, 0.1, 0.2, 0.3, 0.4)
    assert not make_plan(cfr_table(), SamplingConfig(mode="every_n", n=50, max_frames=5), 512).truncated


def test_more_than_max_sampled_frames_is_413_naming_the_key():
    with pytest.raises(PayloadTooLarge, match=r"handler\.video\.max_sampled_frames=10"):
        make_plan(cfr_table(), SamplingConfig(mode="every_n", n=1), 10)


def test_empty_table_is_400():
    with pytest.raises(InvalidInput):
        make_plan(FrameTable((), (), Fraction(1, 10), 0), SamplingConfig(), 512)


# --- every mode, VFR: times are pts, never index / fps ------------------------------------------


@pytest.mark.parametrize("fps", [1.0, 4.0, 10.0, 25.0])
def test_fps_on_vfr_selects_by_true_pts(fps):
    table = vfr_table()
    seconds = [p / 1000 for p in VFR_MS]
    expected = sorted({displayed_at(seconds, k / fps) for k in range(100) if k / fps < 1.2})
    assert list(plan(table, mode="fps", fps=fps)) == expected
    # index / average fps would be wrong: the average rate is 16 / 1.2 s
    naive = sorted({min(int(k / fps * 16 / 1.2), 15) for k in range(100) if k / fps < 1.2})
    if fps == 4.0:
        assert naive != expected


def test_uniform_and_timestamps_on_vfr():
    table = vfr_table()
    seconds = [p / 1000 for p in VFR_MS]
    assert list(plan(table, mode="uniform", frames=6)) == sorted({displayed_at(seconds, (k + 0.5) * 0.2) for k in range(6)})
    assert plan(table, mode="timestamps", timestamps=(0.15, 0.7, 1.05)) == (
        displayed_at(seconds, 0.15), displayed_at(seconds, 0.7), displayed_at(seconds, 1.05))
    assert make_plan(table, SamplingConfig(mode="timestamps", timestamps=(0.15,)), 512).pts_s == (0.14,)


# --- what decoding a plan costs ----------------------------------------------------------------


def test_decode_walk_seeks_to_the_keyframe_before_each_target_or_decodes_on():
    table = cfr_table(frames=1000, gop=250)
    assert decode_steps(table, [100, 600, 900]) == [(0, 100), (500, 600), (750, 900)]
    assert decode_cost(table, [100, 600, 900]) == 101 + 101 + 151
    # within one GOP it decodes on instead of seeking back to the keyframe
    assert decode_steps(table, [10, 20]) == [(0, 10), (None, 20)]
    assert decode_cost(table, [10, 20]) == 21
    # every 10th frame with GOP 250: each frame up to the last target is decoded at most once, and at
    # each keyframe (250, 500, 750) the walk seeks over the 9 frames after the previous target
    assert decode_cost(table, list(range(0, 1000, 10))) == 991 - 3 * 9


# --- config and a request's "sampling" ---------------------------------------------------------


def test_defaults_are_valid_and_sized_for_production():
    cfg = VideoConfig()
    cfg.validate()
    assert (cfg.max_bytes, cfg.max_duration_s, cfg.max_frame_pixels, cfg.max_sampled_frames) == (
        256 * 2**20, 600.0, 3840 * 2160, 512)
    assert VideoConfig.from_mapping(None) == cfg
    assert VideoConfig.from_mapping(cfg.to_dict()) == cfg


def test_config_from_mapping():
    cfg = VideoConfig.from_mapping({"decoder": "pyav", "sampling": {"mode": "fps", "fps": 2, "end_s": 10},
                                    "codecs": ["H264"], "frame_batch": 8})
    assert cfg.sampling == SamplingConfig(mode="fps", fps=2.0, end_s=10.0)
    assert cfg.codecs == ("h264",)


@pytest.mark.parametrize("section, key", [
    ({"decoder": "decord"}, "handler.video.decoder"),
    ({"frame_batch": 0}, "handler.video.frame_batch"),
    ({"max_bytes": -1}, "handler.video.max_bytes"),
    ({"decode_timeout_s": 0}, "handler.video.decode_timeout_s"),
    ({"codecs": []}, "handler.video.codecs"),
    ({"sampling": {"mode": "random"}}, "handler.video.sampling.mode"),
    ({"sampling": {"fps": "fast"}}, "handler.video.sampling.fps"),
    ({"sampling": {"max_frames": 1000}}, "handler.video.sampling.max_frames"),
    ({"sampling": {"start_s": 5, "end_s": 2}}, "handler.video.sampling.end_s"),
    ({"max_pixels": 5}, "handler.video: unknown key 'max_pixels'"),
])
def test_config_errors_name_the_key(section, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        VideoConfig.from_mapping(section)


def test_request_sampling_overrides_the_archive_defaults():
    cfg = VideoConfig.from_mapping({"sampling": {"mode": "fps", "fps": 2, "max_frames": 50}})
    assert request_sampling(None, cfg) is cfg.sampling
    s = request_sampling({"mode": "timestamps", "timestamps": [3, 1.5]}, cfg)
    assert s == SamplingConfig(mode="timestamps", fps=2.0, timestamps=(3.0, 1.5), max_frames=50)
    assert request_sampling({"start_s": 1, "end_s": None}, cfg).end_s is None


@pytest.mark.parametrize("obj, key", [
    ({"mode": "random"}, "sampling.mode"),
    ({"frames": 0}, "sampling.frames"),
    ({"fps": -1}, "sampling.fps"),
    ({"n": 1.5}, "sampling.n"),
    ({"timestamps": "1,2"}, "sampling.timestamps"),
    ({"timestamps": [1, -2]}, "sampling.timestamps"),
    ({"mode": "timestamps"}, "sampling.timestamps"),
    ({"start_s": 3, "end_s": 1}, "sampling.end_s"),
    ({"max_frames": 0}, "sampling.max_frames"),
    ({"every": 3}, "sampling: unknown key 'every'"),
    ("fps", "sampling: expected an object"),
])
def test_bad_request_sampling_is_400_naming_the_key(obj, key):
    with pytest.raises(InvalidInput, match=key.replace(".", r"\.")) as info:
        request_sampling(obj, VideoConfig())
    assert info.value.code == 400


def test_request_sampling_over_the_limits_is_413_naming_the_key():
    cfg = VideoConfig(max_sampled_frames=8)
    with pytest.raises(PayloadTooLarge, match=r"handler\.video\.max_sampled_frames=8"):
        request_sampling({"max_frames": 9}, cfg)
    with pytest.raises(PayloadTooLarge, match=r"handler\.video\.max_sampled_frames=8"):
        request_sampling({"mode": "timestamps", "timestamps": list(range(9))}, cfg)
    # with a cap the long list is cut, not refused
    assert request_sampling({"mode": "timestamps", "timestamps": list(range(9)), "max_frames": 4}, cfg).max_frames == 4

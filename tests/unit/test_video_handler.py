"""Video archives served in-process (FakeContext): clips made by tests/video_clips.py, models whose
right answer is known (tests/video_models.py), so the test checks labels at the right pts_s, boxes
in displayed pixels on a rotated clip and the per-task summaries, not only the schema.

Also: the frame preprocessing's numerical contract against the reference, the config and archive
wiring of `media: video`, request parsing (raw, multipart, base64 JSON, URL, per-request sampling),
streaming lines, and every input error answered with its 4xx.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from archiver_scripts import samples
from handlers.config import HandlerConfig
from handlers.errors import ConfigError, InvalidInput, ModelLoadError
from handlers.preprocess import PreprocessSpec
from handlers.preprocess.frames import FramePreprocessor
from handlers.testing import FakeContext, FakeRequest, json_request, multipart_request, raw_request, run_handler
from handlers.video import serve
from tests import video_clips, video_models
from tests.helpers import CPU_MAX_TOL, CPU_MEAN_TOL
from tests.reference import reference_mode_tensor

# --- tolerances (docs/video.md states them) -----------------------------------------------------------
# Boxes: the detector's edge threshold puts a box edge within half a model-input pixel of the drawn
# edge; H.264 ringing and the decoder's chroma upsampling move it by up to about one more.
BOX_TOL_INPUT_PX = 1.5
# Embeddings: a frame's vector against the one computed from the drawn (uncompressed) picture (H.264
# moves the flat colours by 1-2 levels); the summary's mean of vectors pointing different ways is
# shorter than each of them, so the same per-frame error turns it further.
EMBED_COS_TOL = 1e-3
SUMMARY_COS_TOL = 5e-3


# --- the frames -> model input contract ---------------------------------------------------------------


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("mode, size", [("center_crop", None), ("letterbox", (192, 256)), ("stretch", (160, 160))])
@pytest.mark.parametrize("picture", ["astronaut", "wide"])
def test_frames_meet_the_preprocess_contract(mode, size, picture):
    """The same pixels through FramePreprocessor and through the reference (torchvision/Pillow on a
    lossless PNG): the torchvision backend's CPU tolerance, in every geometry mode."""
    image = samples.photos()["astronaut"] if picture == "astronaut" else samples.mosaic(400, 180)
    spec = PreprocessSpec(geometry=mode, input_size=size)
    frames = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    got, geometry = FramePreprocessor(spec).run(frames.expand(2, -1, -1, -1))
    want = reference_mode_tensor(_png(image), mode, spec.size)
    assert geometry.original_size == (image.shape[1], image.shape[0]) and geometry.mode == mode
    for row in got:
        diff = (row - want).abs()
        assert float(diff.mean()) < CPU_MEAN_TOL and float(diff.max()) < CPU_MAX_TOL, (mode, picture)


@pytest.mark.gpu
@pytest.mark.parametrize("mode, size", [("center_crop", None), ("letterbox", (192, 256)), ("stretch", (160, 160))])
def test_frames_on_cuda_meet_the_gpu_contract(mode, size):
    """UNVERIFIED until run on a GPU: frames already on the device (as NVDEC leaves them) through the same
    code, against the reference, within the torchvision backend's stated CUDA tolerance."""
    from tests.helpers import GPU_MAX_TOL, GPU_MEAN_TOL

    image = samples.mosaic(400, 180)
    spec = PreprocessSpec(geometry=mode, input_size=size, device=torch.device("cuda"))
    frames = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous().cuda()
    got, _ = FramePreprocessor(spec).run(frames)
    assert got.device.type == "cuda"
    diff = (got[0].cpu() - reference_mode_tensor(_png(image), mode, spec.size)).abs()
    assert float(diff.mean()) < GPU_MEAN_TOL and float(diff.max()) < GPU_MAX_TOL


def test_frames_follow_the_models_dtype_and_layout():
    spec = PreprocessSpec(dtype=torch.float16, channels_last=True)
    out, _ = FramePreprocessor(spec).run(torch.zeros(3, 3, 120, 160, dtype=torch.uint8))
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.float16
    assert out.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match=r"uint8 \[n, 3, H, W\]"):
        FramePreprocessor(spec).run(torch.zeros(3, 120, 160))


# --- config and archive wiring ------------------------------------------------------------------------


def test_media_and_the_video_section_in_every_tasks_config():
    from handlers.tasks import TASK_HANDLERS, task_handler

    for task in TASK_HANDLERS:
        cfg = task_handler(task).config_class.from_mapping(
            {"media": "video", "video": {"frame_batch": 4, "sampling": {"mode": "fps", "fps": 2, "end_s": None}}})
        assert cfg.media == "video" and cfg.video.frame_batch == 4 and cfg.video.sampling.fps == 2.0
    assert HandlerConfig.from_mapping({}).media == "image"
    with pytest.raises(ConfigError, match=r"handler.media: 'audio' is not one of image, video"):
        HandlerConfig.from_mapping({"media": "audio"})
    with pytest.raises(ConfigError, match=r"handler.video.frame_batch: must be > 0"):
        HandlerConfig.from_mapping({"video": {"frame_batch": 0}})
    cfg = HandlerConfig.from_mapping({"media": "video", "video": {"sampling": {"mode": "timestamps",
                                                                              "timestamps": [0.5, 1]}}})
    assert HandlerConfig.from_mapping(cfg.to_dict()) == cfg


def test_split_sampling_from_every_request_form():
    sampling = {"mode": "fps", "fps": 2}
    assert serve.split_sampling({"body": {"data": "eA==", "sampling": sampling}}) == ({"body": {"data": "eA=="}},
                                                                                        sampling)
    assert serve.split_sampling({"data": b"clip", "sampling": json.dumps(sampling).encode()}) == ({"data": b"clip"},
                                                                                                 sampling)
    assert serve.split_sampling({"body": b"clip"}) == ({"body": b"clip"}, None)
    with pytest.raises(InvalidInput, match="'sampling' field is not valid JSON"):
        serve.split_sampling({"data": b"clip", "sampling": b"{nope"})


# --- handlers on FakeContext ---------------------------------------------------------------------------


def start(directory: Path, task: str, model_class: str, labels: dict[str, str] | None = None,
          **section: Any):
    """An initialised handler of `task` over a model of tests/video_models.py, media video: (handler, ctx)."""
    from handlers.tasks import task_handler

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(video_models.__file__, directory / "video_models.py")
    torch.save({}, directory / "weights.pt")  # the models have no parameters
    if labels:
        (directory / "index_to_name.json").write_text(json.dumps(labels))
    config = {"media": "video", "threads": 1,
              "model": {"file": "weights.pt", "format": "eager", "model_class": f"video_models.py:{model_class}"},
              **section}
    ctx = FakeContext(directory, handler_config=config)
    handler = task_handler(task)()
    handler.initialize(ctx)
    return handler, ctx


def clip_json(data: bytes, sampling: dict[str, Any] | None = None) -> FakeRequest:
    body: dict[str, Any] = {"data": base64.b64encode(data).decode("ascii")}
    if sampling is not None:
        body["sampling"] = sampling
    return json_request(body)


def ask(handler, ctx, request: FakeRequest):
    (response,) = run_handler(handler, ctx, [request])
    return response


def top_label(frame: dict[str, Any]) -> str:
    return frame["predictions"][0]["label"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return start(tmp_path_factory.mktemp("video-cls"), "image-classification", "ColourClassifier",
                 video_models.COLOUR_LABELS, classifier={"top_k": 4}, video={"frame_batch": 4})


@pytest.fixture(scope="module")
def clip3s():
    return video_clips.h264_clip(seconds=3.0, fps=10)


def test_classifier_labels_each_frame_at_its_true_time(classifier, clip3s):
    handler, ctx = classifier
    response = ask(handler, ctx, clip_json(clip3s.data, {"mode": "fps", "fps": 2}))
    assert response.status == 200 and response.content_type == "application/json", response.body
    body = response.body
    assert list(body) == ["video", "sampling", "frames", "summary"]
    video = body["video"]
    assert set(video) == {"duration_s", "fps", "width", "height", "rotation", "codec", "decoder"}
    assert (video["width"], video["height"], video["rotation"], video["codec"]) == (160, 120, 0, "h264")
    assert video["decoder"] == "cpu" and video["fps"] == pytest.approx(10.0) and video["duration_s"] == pytest.approx(3.0)
    assert body["sampling"] == {"mode": "fps", "frames": 6, "truncated": False}
    targets = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    for frame, t in zip(body["frames"], targets, strict=True):
        i = clip3s.frame_at(t)
        assert frame["index"] == i and frame["pts_s"] == pytest.approx(clip3s.pts_s[i], abs=1e-6)
        want = video_models.COLOUR_LABELS[str(video_clips.COLOURS.index(video_clips.colour_at(frame["pts_s"])))]
        assert top_label(frame) == want and frame["predictions"][0]["probability"] > 0.99, (t, frame)
    assert [top_label(f) for f in body["frames"]] == ["red", "red", "green", "green", "blue", "blue"]


def test_classifier_summary_is_the_top_k_of_the_mean_probability(classifier, clip3s):
    handler, ctx = classifier
    # 3 red frames, 2 green, 1 blue: mean probabilities 1/2, 1/3, 1/6 (each frame is ~certain)
    sampling = {"mode": "timestamps", "timestamps": [0.2, 0.4, 0.6, 1.5, 1.7, 2.5]}
    body = ask(handler, ctx, clip_json(clip3s.data, sampling)).body
    summary = body["summary"]["predictions"]
    assert [p["label"] for p in summary] == ["red", "green", "blue", "yellow"]
    assert [p["probability"] for p in summary] == pytest.approx([1 / 2, 1 / 3, 1 / 6, 0], abs=2e-3)
    per_frame = np.array([[next(p["probability"] for p in f["predictions"] if p["label"] == name)
                           for name in ("red", "green", "blue", "yellow")] for f in body["frames"]])
    assert [p["probability"] for p in summary] == pytest.approx(per_frame.mean(axis=0).tolist(), abs=1e-5)


def test_raw_multipart_and_archive_default_sampling(classifier, clip3s):
    handler, ctx = classifier
    raw = ask(handler, ctx, raw_request(clip3s.data))
    assert raw.status == 200 and raw.body["sampling"] == {"mode": "uniform", "frames": 16, "truncated": False}
    form = ask(handler, ctx, multipart_request({"data": clip3s.data, "sampling": json.dumps({"mode": "every_n", "n": 10})}))
    assert form.status == 200 and [f["index"] for f in form.body["frames"]] == [0, 10, 20]
    assert [top_label(f) for f in form.body["frames"]] == ["red", "green", "blue"]


def test_max_frames_cuts_and_says_so(classifier, clip3s):
    handler, ctx = classifier
    body = ask(handler, ctx, clip_json(clip3s.data, {"mode": "fps", "fps": 10, "max_frames": 5})).body
    assert body["sampling"] == {"mode": "fps", "frames": 5, "truncated": True}
    assert [f["index"] for f in body["frames"]] == [0, 1, 2, 3, 4]


def test_variable_frame_rate_times_are_the_frames_own(classifier):
    clip = video_clips.vfr_clip(seconds=3.0)
    handler, ctx = classifier
    body = ask(handler, ctx, clip_json(clip.data, {"mode": "timestamps", "timestamps": [0.45, 1.05, 2.33]})).body
    for frame, t in zip(body["frames"], [0.45, 1.05, 2.33], strict=True):
        i = clip.frame_at(t)
        assert frame["index"] == i and frame["pts_s"] == pytest.approx(clip.pts_s[i], abs=1e-6)
        want = video_clips.COLOURS.index(video_clips.colour_at(clip.pts_s[i]))
        assert top_label(frame) == video_models.COLOUR_LABELS[str(want)]


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    return start(tmp_path_factory.mktemp("video-det"), "object-detection", "WhiteBoxDetector",
                 video_models.BOX_LABELS, preprocess={"input_size": 320}, video={"frame_batch": 3},
                 detector={"output_format": "xyxy_score_class"})


@pytest.mark.parametrize("rotation", [90, 270])
def test_detector_boxes_in_displayed_pixels_of_a_rotated_clip(detector, rotation):
    clip = video_clips.rotated_clip(rotation, seconds=1.0, fps=10, width=160, height=96)
    handler, ctx = detector
    body = ask(handler, ctx, clip_json(clip.data, {"mode": "every_n", "n": 3})).body
    video = body["video"]
    assert (video["width"], video["height"], video["rotation"]) == (160, 96, rotation)
    scale = 320 / 160  # letterbox: model-input pixels per displayed pixel
    assert [f["index"] for f in body["frames"]] == [0, 3, 6, 9]
    for frame in body["frames"]:
        assert frame["image_size"] == [160, 96]
        (det,) = frame["detections"]
        assert det["label"] == "box" and det["score"] == pytest.approx(0.9)
        want = clip.boxes[frame["index"]]
        assert det["box"] == pytest.approx(list(want), abs=BOX_TOL_INPUT_PX / scale), (frame["index"], want)
    assert body["summary"] == {"classes": [{"class_id": 0, "label": "box", "frames": 4, "max_score": 0.9,
                                            "first_s": 0.0, "last_s": pytest.approx(clip.pts_s[9], abs=1e-6)}]}


def test_segmentation_summary_counts_frames_and_mean_area(tmp_path_factory):
    from pycocotools import mask as mask_utils

    handler, ctx = start(tmp_path_factory.mktemp("video-seg"), "semantic-segmentation", "WhiteSegmenter",
                         video_models.SEGMENT_LABELS, preprocess={"input_size": 320}, video={"frame_batch": 4})
    clip = video_clips.h264_clip(seconds=1.0, fps=10)
    body = ask(handler, ctx, clip_json(clip.data, {"mode": "uniform", "frames": 4})).body
    assert body["sampling"]["frames"] == 4
    box_area = 32 * 24
    for frame in body["frames"]:
        by_label = {s["label"]: s for s in frame["segments"]}
        got = mask_utils.decode({"size": by_label["box"]["mask"]["size"],
                                 "counts": by_label["box"]["mask"]["counts"].encode()}).astype(bool)
        want = np.zeros((120, 160), bool)
        x0, y0, x1, y1 = clip.boxes[frame["index"]]
        want[y0:y1, x0:x1] = True
        assert (got & want).sum() / (got | want).sum() > 0.9
    areas = [next(s["area"] for s in f["segments"] if s["label"] == "box") for f in body["frames"]]
    assert body["summary"] == {"classes": [
        {"class_id": 0, "label": "background", "frames": 4, "mean_area": pytest.approx(160 * 120 - np.mean(areas))},
        {"class_id": 1, "label": "box", "frames": 4, "mean_area": pytest.approx(np.mean(areas))},
    ]}
    assert np.mean(areas) == pytest.approx(box_area, rel=0.1)


def _expected_vector(clip: video_clips.Clip, index: int) -> np.ndarray:
    """ColourMeans of the drawn (uncompressed) picture through the reference preprocessing."""
    picture = video_clips.draw(clip.pts_s[index], clip.duration_s, clip.width, clip.height, clip.colour_period_s)
    x = reference_mode_tensor(_png(picture), "center_crop", (224, 224))
    v = x.mean(dim=(1, 2)).numpy()
    return v / np.linalg.norm(v)


def test_embedding_summary_is_the_normalised_mean_and_frames_leave_vectors_out(tmp_path_factory):
    handler, ctx = start(tmp_path_factory.mktemp("video-emb"), "image-embedding", "ColourMeans")
    clip = video_clips.h264_clip(seconds=2.0, fps=10)
    body = ask(handler, ctx, clip_json(clip.data, {"mode": "fps", "fps": 2})).body
    assert all(set(f) == {"index", "pts_s"} for f in body["frames"])
    summary = body["summary"]
    assert summary["dim"] == 3 and abs(np.linalg.norm(summary["embedding"]) - 1) < 1e-6
    want = np.mean([_expected_vector(clip, f["index"]) for f in body["frames"]], axis=0)
    cos = float(np.dot(summary["embedding"], want / np.linalg.norm(want)))
    assert cos > 1 - SUMMARY_COS_TOL, cos


def test_per_frame_embeddings_in_the_tasks_encoding(tmp_path_factory):
    handler, ctx = start(tmp_path_factory.mktemp("video-emb2"), "image-embedding", "ColourMeans",
                         embedder={"encoding": "base64", "dtype": "float16"},
                         video={"per_frame_embeddings": True})
    clip = video_clips.h264_clip(seconds=2.0, fps=10)
    body = ask(handler, ctx, clip_json(clip.data, {"mode": "fps", "fps": 2})).body

    def vector(obj: dict[str, Any]) -> np.ndarray:
        assert obj["dtype"] == "float16" and obj["dim"] == 3
        return np.frombuffer(base64.b64decode(obj["embedding_b64"]), "<f2").astype(np.float64)

    frames = np.stack([vector(f) for f in body["frames"]])
    for frame, v in zip(body["frames"], frames, strict=True):
        assert float(np.dot(v, _expected_vector(clip, frame["index"]))) > 1 - EMBED_COS_TOL
    mean = frames.mean(axis=0)
    assert vector(body["summary"]) == pytest.approx(mean / np.linalg.norm(mean), abs=2e-3)  # float16: ~3 digits


# --- input errors: each its own 4xx, and the worker goes on ----------------------------------------------


def test_bad_clips_get_their_4xx(classifier):
    handler, ctx = classifier
    cases = {
        "text": (video_clips.not_a_video(), 415, "unsupported_media_type"),
        "png": (video_clips.image_bytes(), 415, "unsupported_media_type"),
        "corrupt": (video_clips.corrupt_clip()[1], 400, "invalid_input"),
        "no_index": (video_clips.truncated_clip(faststart=False)[1], 400, "invalid_input"),
        "empty": (b"", 400, "invalid_input"),
    }
    for name, (data, code, kind) in cases.items():
        response = ask(handler, ctx, raw_request(data))
        assert response.status == code and response.body["type"] == kind, (name, response.body)
        assert response.body["code"] == code and response.body["message"]
    bad_sampling = ask(handler, ctx, clip_json(b"x", {"mode": "sometimes"}))
    assert bad_sampling.status == 400 and "sampling.mode" in bad_sampling.body["message"]
    # a cut upload whose index survives: the readable frames, flagged as not the whole clip
    cut = ask(handler, ctx, raw_request(video_clips.truncated_clip(keep=0.6, faststart=True)[1]))
    assert cut.status == 200 and cut.body["sampling"]["truncated"] is True
    assert ask(handler, ctx, raw_request(video_clips.h264_clip(seconds=1.0).data)).status == 200


def test_limits_answer_413_naming_the_key(tmp_path_factory):
    handler, ctx = start(tmp_path_factory.mktemp("video-limits"), "image-classification", "ColourClassifier",
                         video_models.COLOUR_LABELS,
                         video={"max_duration_s": 2.5, "max_sampled_frames": 8, "max_bytes": 5000})
    cases = [
        (raw_request(video_clips.h264_clip(seconds=3.0).data), "handler.video.max_bytes"),
        (clip_json(video_clips.h264_clip(seconds=2.0).data, {"mode": "fps", "fps": 10}),
         "handler.video.max_sampled_frames"),
        (clip_json(video_clips.h264_clip(seconds=2.0).data, {"mode": "fps", "fps": 1, "max_frames": 9}),
         "handler.video.max_sampled_frames"),
    ]
    for request, key in cases:
        response = ask(handler, ctx, request)
        assert response.status == 413 and key in response.body["message"], response.body
    long_clip = video_clips.h264_clip(seconds=3.0, width=64, height=48)
    assert len(long_clip.data) < 5000
    response = ask(handler, ctx, raw_request(long_clip.data))
    assert response.status == 413 and "handler.video.max_duration_s" in response.body["message"]


def test_a_decode_past_the_timeout_is_a_4xx_and_the_next_clip_is_served(tmp_path_factory, monkeypatch):
    # A decode that hangs, by the decode process's test aid (a clip prefixed with a fault directive, honoured
    # only when the process starts with FAULTS_ENV set): a slow clip would race the host's speed.
    from handlers.preprocess.host.child import FAULTS_ENV
    from handlers.video import process

    process.shutdown()
    monkeypatch.setenv(FAULTS_ENV, str(tmp_path_factory.mktemp("video-faults")))
    handler, ctx = start(tmp_path_factory.mktemp("video-timeout"), "image-classification", "ColourClassifier",
                         video_models.COLOUR_LABELS, video={"decode_timeout_s": 1.0, "decoder": "pyav"})
    hangs = b"TSGPU-FAULT:hang\n" + video_clips.h264_clip(seconds=1.0).data
    response = ask(handler, ctx, clip_json(hangs, {"mode": "every_n", "n": 1}))
    assert response.status == 408 and response.body["type"] == "decode_timeout", response.body
    assert "handler.video.decode_timeout_s" in response.body["message"]
    fine = ask(handler, ctx, clip_json(video_clips.h264_clip(seconds=1.0).data, {"mode": "uniform", "frames": 2}))
    assert fine.status == 200 and fine.body["sampling"]["frames"] == 2
    process.shutdown()  # the next tests' decode processes start without the test aid


# --- streaming --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streamer(tmp_path_factory):
    return start(tmp_path_factory.mktemp("video-stream"), "object-detection", "WhiteBoxDetector",
                 video_models.BOX_LABELS, preprocess={"input_size": 320},
                 video={"frame_batch": 2, "stream": True}, detector={"output_format": "xyxy_score_class"})


def stream(handler, ctx, request: FakeRequest, monkeypatch) -> tuple[Any, list[dict[str, Any]]]:
    """(the final response, every line sent before it), lines sent through send_intermediate."""
    sent: list[str] = []
    monkeypatch.setattr(serve, "send_intermediate", lambda context, text: sent.append(text))
    response = ask(handler, ctx, request)
    return response, [json.loads(line) for line in sent]


def test_streaming_sends_video_frames_and_summary_lines(streamer, monkeypatch):
    handler, ctx = streamer
    clip = video_clips.h264_clip(seconds=1.0, fps=10)
    response, lines = stream(handler, ctx, clip_json(clip.data, {"mode": "every_n", "n": 2}), monkeypatch)
    assert response.status == 200 and response.content_type == "application/x-ndjson"
    final = json.loads(response.body)
    assert [line["type"] for line in lines] == ["video", "frames", "frames", "frames"] and final["type"] == "summary"
    assert lines[0]["video"]["width"] == 160 and lines[0]["sampling"] == {"mode": "every_n", "frames": 5,
                                                                          "truncated": False}
    frames = [f for line in lines[1:] for f in line["frames"]]
    assert [len(line["frames"]) for line in lines[1:]] == [2, 2, 1]
    assert [f["index"] for f in frames] == [0, 2, 4, 6, 8]
    for frame in frames:
        assert frame["detections"][0]["box"] == pytest.approx(list(clip.boxes[frame["index"]]), abs=1.0)
    assert final["sampling"] == {"mode": "every_n", "frames": 5, "truncated": False}
    assert final["summary"]["classes"][0]["frames"] == 5


def test_streaming_a_cut_upload_says_truncated_from_the_first_line(streamer, monkeypatch):
    handler, ctx = streamer
    cut = video_clips.truncated_clip(keep=0.6, faststart=True)[1]
    response, lines = stream(handler, ctx, clip_json(cut, {"mode": "every_n", "n": 5}), monkeypatch)
    final = json.loads(response.body)
    assert lines[0]["type"] == "video" and lines[0]["sampling"]["truncated"] is True
    assert final["type"] == "summary" and final["sampling"]["truncated"] is True


def test_streaming_errors_before_the_first_line_keep_their_status(streamer, monkeypatch):
    handler, ctx = streamer
    response, lines = stream(handler, ctx, raw_request(video_clips.truncated_clip(faststart=False)[1]), monkeypatch)
    assert lines == [] and response.status == 400 and response.content_type == "application/json"
    assert response.body["type"] == "invalid_input"
    response, lines = stream(handler, ctx, raw_request(video_clips.not_a_video()), monkeypatch)
    assert lines == [] and response.status == 415


def test_streaming_a_failure_after_the_first_line_ends_with_an_error_line(streamer, monkeypatch):
    handler, ctx = streamer
    # frames 0 and 1 decode, frame 2 lies in the damaged bytes (tests/video_clips.py corrupt_clip)
    response, lines = stream(handler, ctx, clip_json(video_clips.corrupt_clip()[1], {"mode": "every_n", "n": 1}),
                             monkeypatch)
    assert response.status == 200 and [line["type"] for line in lines] == ["video", "frames"]
    final = json.loads(response.body)
    assert final["type"] == "error" and final["error"]["code"] == 400 and final["error"]["type"] == "invalid_input"
    # a failure that is not the client's (here: the model) also ends the stream, and the worker goes on
    calls = {"n": 0}
    forward = handler.forward

    def failing(x):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return forward(x)

    monkeypatch.setattr(handler, "forward", failing)
    clip = video_clips.h264_clip(seconds=1.0)
    response, lines = stream(handler, ctx, clip_json(clip.data, {"mode": "every_n", "n": 2}), monkeypatch)
    final = json.loads(response.body)
    assert [line["type"] for line in lines] == ["video", "frames"] and final["type"] == "error"
    assert final["error"] == {"code": 500, "type": "internal_error", "message": "RuntimeError: boom"}
    monkeypatch.setattr(handler, "forward", forward)
    response, lines = stream(handler, ctx, clip_json(clip.data, {"mode": "every_n", "n": 5}), monkeypatch)
    assert json.loads(response.body)["type"] == "summary"


# --- URLs, load-time checks, archives ----------------------------------------------------------------------


def test_a_clip_by_url_goes_through_the_fetcher(tmp_path_factory):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    clip = video_clips.h264_clip(seconds=1.0)

    class Origin(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(clip.data)))
            self.end_headers()
            self.wfile.write(clip.data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/clip.mp4"
    try:
        allowed, ctx = start(tmp_path_factory.mktemp("video-url"), "image-classification", "ColourClassifier",
                             video_models.COLOUR_LABELS, url={"allowed_networks": ["127.0.0.1/32"]})
        response = ask(allowed, ctx, json_request({"url": url, "sampling": {"mode": "uniform", "frames": 2}}))
        assert response.status == 200 and response.body["sampling"]["frames"] == 2
        refused = ask(*classifier_pair(tmp_path_factory), json_request({"url": url}))
        assert refused.status == 403  # loopback is not public: the SSRF rules of handlers.fetch
    finally:
        server.shutdown()


def classifier_pair(tmp_path_factory):
    return start(tmp_path_factory.mktemp("video-url-default"), "image-classification", "ColourClassifier",
                 video_models.COLOUR_LABELS)


def test_a_video_archive_refuses_a_batch_size_above_one(tmp_path):
    from handlers.tasks.classifier import ImageClassifier

    start(tmp_path / "ok", "image-classification", "ColourClassifier")
    ctx = FakeContext(tmp_path / "ok", batch_size=4, handler_config={
        "media": "video", "model": {"file": "weights.pt", "format": "eager",
                                    "model_class": "video_models.py:ColourClassifier"}})
    with pytest.raises(ModelLoadError, match="TorchServe batchSize is 4: video archives are served at batchSize 1"):
        ImageClassifier().initialize(ctx)


def test_tsgpu_archive_media_video(tmp_path):
    import zipfile

    import yaml

    from archiver_scripts.archive import ArchiveError, build_archive
    from archiver_scripts.cli import main

    shutil.copy(video_models.__file__, tmp_path / "video_models.py")
    torch.save({}, tmp_path / "weights.pt")
    notes: list[str] = []
    mar = build_archive("vdet", tmp_path / "weights.pt", tmp_path / "store", task="object-detection",
                        model_class=f"{tmp_path / 'video_models.py'}:WhiteBoxDetector", media="video",
                        config=["video.frame_batch=8"], log=notes.append)
    with zipfile.ZipFile(mar) as zf:
        cfg = yaml.safe_load(zf.read("model-config.yaml"))
    assert cfg["batchSize"] == 1 and cfg["handler"]["media"] == "video" and cfg["handler"]["video"] == {"frame_batch": 8}
    assert any("max_request_size" in n and "6,553,500" in n for n in notes)
    with pytest.raises(ArchiveError, match=r"--batch-size 8: video archives are served at TorchServe batchSize 1"):
        build_archive("vdet", tmp_path / "weights.pt", tmp_path / "store", media="video", batch_size=8, force=True,
                      model_class=f"{tmp_path / 'video_models.py'}:WhiteBoxDetector", log=notes.append)
    with pytest.raises(ConfigError, match=r"handler.video.sampling.mode: 'often' is not one of"):
        build_archive("vdet", tmp_path / "weights.pt", tmp_path / "store", media="video", force=True,
                      config=["video.sampling.mode=often"],
                      model_class=f"{tmp_path / 'video_models.py'}:WhiteBoxDetector", log=notes.append)
    code = main(["archive", "--name", "v2", "--model", str(tmp_path / "weights.pt"), "--media", "video",
                 "--model-class", f"{tmp_path / 'video_models.py'}:ColourClassifier", "--batch-size", "4",
                 "--export-path", str(tmp_path / "store")])
    assert code == 2
    image = build_archive("img", tmp_path / "weights.pt", tmp_path / "store", log=notes.append,
                          model_class=f"{tmp_path / 'video_models.py'}:ColourClassifier")
    with zipfile.ZipFile(image) as zf:
        cfg = yaml.safe_load(zf.read("model-config.yaml"))
    assert cfg["batchSize"] == 8 and "media" not in cfg["handler"]


def test_a_users_own_task_serves_clips_with_an_empty_summary(tmp_path):
    from handlers.base import VisionHandler

    class MeanColour(VisionHandler):
        """A task written before video existed: no video_summary of its own."""

        def postprocess(self, outputs, geometry):
            return [{"means": [round(v, 3) for v in row.tolist()]} for row in outputs]

    start(tmp_path, "image-embedding", "ColourMeans")  # writes the model directory
    ctx = FakeContext(tmp_path, handler_config={"media": "video", "model": {
        "file": "weights.pt", "format": "eager", "model_class": "video_models.py:ColourMeans"}})
    handler = MeanColour()
    handler.initialize(ctx)
    body = ask(handler, ctx, clip_json(video_clips.h264_clip(seconds=1.0).data, {"mode": "uniform", "frames": 2})).body
    assert body["summary"] == {} and [set(f) for f in body["frames"]] == [{"index", "pts_s", "means"}] * 2


@pytest.mark.gpu
def test_a_clip_classified_on_a_cuda_worker(tmp_path):
    """UNVERIFIED until run on a GPU: the whole video path on cuda:0 (NVDEC where torchcodec loads with
    CUDA, else CPU decoding and one upload per frame batch); the labels are those of the CPU test."""
    pytest.importorskip("av")
    from handlers.tasks.classifier import ImageClassifier

    start(tmp_path, "image-classification", "ColourClassifier", video_models.COLOUR_LABELS)
    ctx = FakeContext(tmp_path, gpu_id=0, handler_config={"media": "video", "model": {
        "file": "weights.pt", "format": "eager", "model_class": "video_models.py:ColourClassifier"}})
    handler = ImageClassifier()
    handler.initialize(ctx)
    assert handler.device.type == "cuda"
    clip = video_clips.h264_clip(seconds=3.0, fps=10)
    body = ask(handler, ctx, clip_json(clip.data, {"mode": "every_n", "n": 10})).body
    assert [top_label(f) for f in body["frames"]] == ["red", "green", "blue"]
    print("decoder on the CUDA worker:", body["video"]["decoder"])


def test_torch_leaves_a_cpu_to_the_decode_process(tmp_path):
    from handlers.runtime import available_cpus

    before = torch.get_num_threads()
    try:
        start(tmp_path, "image-classification", "ColourClassifier", threads=0)
        assert torch.get_num_threads() == max(1, available_cpus() - 1)
        start(tmp_path / "set", "image-classification", "ColourClassifier", threads=2)
        assert torch.get_num_threads() == 2  # handler.threads set: taken as given
    finally:
        torch.set_num_threads(before)

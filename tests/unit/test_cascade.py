"""Cascades (handlers/tasks/cascade.py) with known-answer models (tests/cascade_models.py): the
decoded images the preprocess backends keep, the crop regions, the crops the second model sees
against Pillow's crop of the reference decode, and the per-box results against the second model run
on that crop alone.

Stated tolerances (docs/tasks/cascade.md), normalised units (one 8-bit level ~ 0.0175):
    crop seen by the second model vs torchvision/Pillow on the reference decode's crop:
        max <= two 8-bit levels (CROP_MAX_TOL), mean < CROP_MEAN_TOL
    embedding of a box vs the second model on the reference crop alone (both L2-normalised):
        max abs difference < EMBEDDING_TOL
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision import transforms as T

from handlers.config import HandlerConfig
from handlers.errors import ConfigError, ModelLoadError
from handlers.preprocess import create_preprocessor
from handlers.preprocess.contract import PreprocessSpec
from handlers.tasks.cascade import MAX_ASPECT, Cascade, CascadeHandlerConfig, Crop, crop_region, resolve_classes
from handlers.testing import FakeContext, raw_request
from tests import cascade_models as cm
from tests.helpers import ONE_LEVEL, dali_or_skip, exif_rotated, photo_jpegs

CROP_MAX_TOL = 2 * ONE_LEVEL + 1e-4  # torch's uint8 antialiased resize vs Pillow's: a level, two at rare pixels
CROP_MEAN_TOL = 0.005
EMBEDDING_TOL = 2e-3
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

BOXES = {"red": (100, 80, 400, 300), "blue": (500, 100, 700, 500), "yellow": (60, 380, 300, 560)}


# -- references, written independently of handlers/ ---------------------------------------------------


def reference_decode(data: bytes) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")


def reference_crop(image: Image.Image, box: tuple[int, int, int, int], mode: str = "center_crop",
                   hw: tuple[int, int] = (224, 224), resize: int = 256) -> torch.Tensor:
    """A crop of the reference decode as an image archive of the second task would see it."""
    crop = image.crop(box)
    height, width = hw
    if mode == "center_crop":
        crop = T.CenterCrop((height, width))(T.Resize(resize, antialias=True)(crop))
    elif mode == "stretch":
        crop = crop.resize((width, height), Image.Resampling.BILINEAR)
    else:  # letterbox, Ultralytics' rounding
        w0, h0 = crop.size
        r = min(height / h0, width / w0)
        new_w, new_h = min(width, max(1, round(w0 * r))), min(height, max(1, round(h0 * r)))
        canvas = Image.new("RGB", (width, height), (114, 114, 114))
        canvas.paste(crop.resize((new_w, new_h), Image.Resampling.BILINEAR),
                     (int(round((width - new_w) / 2 - 0.1)), int(round((height - new_h) / 2 - 0.1))))
        crop = canvas
    return T.Normalize(MEAN, STD)(T.ToTensor()(crop))


def reference_embedding(image: Image.Image, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The second model run on the reference crop alone, L2-normalised as the embedder task does."""
    with torch.inference_mode():
        return F.normalize(cm.embedder()(reference_crop(image, box)[None]), dim=1)[0]


# -- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("cascade-models")
    cm.export_models(directory)
    (directory / "index_to_name.json").write_text(json.dumps(cm.LABELS))
    (directory / "cascade_index_to_name.json").write_text(json.dumps(cm.LABELS))
    return directory


def start(models: Path, cascade: dict | None = None, backend: str = "cpu", batch_size: int = 4, **section) -> Cascade:
    config = {"model": {"file": "colour_boxes.pt2"}, "preprocess": {"backend": backend},
              "cascade": {"model": {"file": "region_means.pt2"}, **(cascade or {})}, **section}
    handler = Cascade()
    handler.initialize(FakeContext(models, handler_config=config, batch_size=batch_size))
    return handler


def serve(handler: Cascade, items: list[bytes]) -> list:
    ctx = FakeContext(handler.model_dir, batch_size=len(items))
    rows = ctx.start_batch([raw_request(b) for b in items])
    return [ctx.response(i, body) for i, body in enumerate(handler.handle(rows, ctx))]


@pytest.fixture(scope="module")
def embedding_cascade(models) -> Cascade:
    return start(models)


class Recorder:
    """Wraps the second model: keeps every batch it is given."""

    def __init__(self, module) -> None:
        self.module, self.seen = module, []

    def __call__(self, x):
        self.seen.append(x.clone())
        return self.module(x)


# -- the preprocess contract: keep_images ---------------------------------------------------------------


def _items() -> list[bytes]:
    photos = photo_jpegs()
    return [photos["1080p"], b"not an image", exif_rotated(6), cm.encode(cm.scene(800, 600, BOXES), "PNG"),
            photos["portrait"][:5000]]


def test_cpu_backend_keeps_the_full_resolution_oriented_decode():
    items = _items()
    spec = PreprocessSpec(geometry="letterbox", input_size=(640, 640), jpeg_draft=False, max_batch=8)
    kept = create_preprocessor("cpu", PreprocessSpec(**{**spec.__dict__, "keep_images": True}), threads=2).run(items)
    plain = create_preprocessor("cpu", spec, threads=2).run(items)
    assert [e is None for e in kept.errors] == [True, False, True, True, False]
    assert [i is None for i in kept.images] == [False, True, False, False, True]
    for data, image in zip(items, kept.images, strict=True):
        if image is not None:  # Pillow's own decode, oriented: the same pixels exactly
            assert image.dtype == torch.uint8 and image.shape[0] == 3
            assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(np.asarray(reference_decode(data))))
    assert kept.rows == plain.rows and torch.equal(kept.tensor, plain.tensor)  # the model input is unchanged
    assert plain.images == []


def test_torchvision_backend_keeps_its_decode_and_the_cpu_path_keeps_the_rest():
    items = _items()
    pre = create_preprocessor("torchvision", PreprocessSpec(geometry="letterbox", input_size=(640, 640),
                                                            keep_images=True, max_batch=8), threads=2)
    batch = pre.run(items)
    assert pre.fallback_items == 2  # the PNG, and the truncated JPEG nvJPEG/libjpeg refused (400 there)
    assert [i is None for i in batch.images] == [False, True, False, False, True]
    for data, image in zip(items, batch.images, strict=True):
        if image is not None:
            ref = torch.from_numpy(np.asarray(reference_decode(data))).permute(2, 0, 1)
            assert image.shape == ref.shape
            assert (image.int() - ref.int()).abs().max() <= 2  # libjpeg-turbo both; PNG exact


def test_dali_backend_with_keep_images_decodes_on_the_cpu_path():
    dali_or_skip()
    items = _items()
    pre = create_preprocessor("dali", PreprocessSpec(geometry="letterbox", input_size=(640, 640),
                                                     keep_images=True, max_batch=8), threads=2)
    batch = pre.run(items)
    assert pre.fallback_items == 4  # every item past the probe: DALI does not hand back its decode
    assert [i is None for i in batch.images] == [False, True, False, False, True]


def test_keep_images_refuses_decode_processes():
    with pytest.raises(ConfigError, match="decode_processes"):
        create_preprocessor("cpu", PreprocessSpec(keep_images=True), threads=1, processes=2)


# -- crop regions, classes, config ------------------------------------------------------------------------


def test_crop_region_pads_rounds_outwards_and_stays_inside():
    assert crop_region((10.2, 20.7, 30.5, 40.0), 0.0, 100, 100) == (10, 20, 31, 40)
    assert crop_region((10, 20, 30, 40), 0.5, 100, 100) == (0, 10, 40, 50)  # 10 px each side in x, 10 in y
    assert crop_region((90, 90, 100, 100), 0.5, 100, 100) == (85, 85, 100, 100)
    assert crop_region((100, 50, 100, 52), 0.0, 100, 100) == (99, 50, 100, 52)  # a clipped sliver: one pixel


def test_crop_region_widens_slivers_to_the_largest_aspect():
    left, top, right, bottom = crop_region((50, 0, 51, 400), 0.0, 200, 400)
    assert (top, bottom) == (0, 400) and right - left == 400 // MAX_ASPECT
    assert crop_region((0, 10, 1, 110), 0.0, 3, 400)[::2] == (0, 3)  # the image is narrower than 100 / 8


def test_resolve_classes_by_id_and_label():
    labels = {0: "red", 1: "green", 2: "red"}
    assert resolve_classes((), labels) is None
    assert resolve_classes(("red", "1"), labels) == {0, 1, 2}
    with pytest.raises(ConfigError, match=r"handler\.cascade\.classes: 'purple'"):
        resolve_classes(("purple",), labels)


@pytest.mark.parametrize(("section", "match"), [
    ({"cascade": {"model": {"file": "e.pt2"}, "task": "object-detection"}}, r"handler\.cascade\.task"),
    ({"cascade": {"model": {"file": "e.pt2"}, "crop_pad": -1}}, r"handler\.cascade\.crop_pad"),
    ({"cascade": {"model": {"file": "e.pt2"}, "preprocess": {"std": [0, 1, 1]}}}, r"handler\.cascade\.preprocess\.std"),
    ({"cascade": {"model": {"file": "e.pt2"}, "embedder": {"dtype": "int8"}}}, r"handler\.cascade\.embedder\.dtype"),
])
def test_config_errors_name_the_key(section, match):
    with pytest.raises(ConfigError, match=match):
        CascadeHandlerConfig.from_mapping(section)
    assert isinstance(CascadeHandlerConfig.from_mapping({"cascade": {"model": {"file": "e.pt2"}}}), HandlerConfig)


# -- crops against the reference decode --------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return photo_jpegs()


@pytest.mark.parametrize(("mode", "names"), [
    ("center_crop", ("1080p", "portrait", "small")),
    pytest.param("center_crop", ("4k",), marks=pytest.mark.slow),
    pytest.param("stretch", ("1080p", "portrait", "small"), marks=pytest.mark.slow),
    pytest.param("letterbox", ("1080p", "portrait", "small"), marks=pytest.mark.slow),
])
def test_device_crops_match_pillow_crops_of_the_reference_decode(models, photos, mode, names):
    handler = start(models, {"preprocess": {"geometry": mode, "input_size": 224}})
    worst_mean = worst_max = 0.0
    for name in names:
        data = photos[name]
        [image] = handler.preprocessor.inner.run([data]).images
        pil = reference_decode(data)
        w, h = pil.size
        boxes = [crop_region(b, 0.0, w, h) for b in [(w * 0.1, h * 0.2, w * 0.5, h * 0.9),
                                                     (w * 0.6, h * 0.05, w * 0.98, h * 0.3),
                                                     (3, 4, 40, 30), (w * 0.3, h * 0.3, w * 0.32, h * 0.7)]]
        x = handler.crop_batch([image], [Crop(0, k, b) for k, b in enumerate(boxes)])
        for k, box in enumerate(boxes):
            diff = (x[k].float() - reference_crop(pil, box, mode)).abs()
            worst_mean, worst_max = max(worst_mean, diff.mean().item()), max(worst_max, diff.max().item())
    print(f"{mode}: crop vs reference mean {worst_mean:.5f} max {worst_max:.5f}")
    assert worst_max <= CROP_MAX_TOL and worst_mean < CROP_MEAN_TOL


# -- the whole handler ---------------------------------------------------------------------------------------


def _scene(width: int = 800, height: int = 600) -> tuple[np.ndarray, bytes]:
    image = cm.scene(width, height, BOXES)
    return image, cm.encode(image)


def test_embedding_cascade_mixed_batch(embedding_cascade):
    _, jpeg = _scene()
    rotated = cm.encode(cm.scene(800, 600, BOXES), exif_orientation=8)
    png = cm.encode(cm.scene(800, 600, BOXES), "PNG")
    responses = serve(embedding_cascade, [jpeg, b"junk", rotated, png[:200], png])
    assert [r.status for r in responses] == [200, 415, 200, 400, 200]
    assert responses[1].body["type"] == "unsupported_media_type"
    worst = 0.0
    for r, data in ((responses[0], jpeg), (responses[2], rotated), (responses[4], png)):
        body = r.body
        assert body["image_size"] == [800, 600]
        assert [d["label"] for d in body["detections"]] == ["red", "blue", "yellow"]  # best score first
        pil = reference_decode(data)
        for det in body["detections"]:
            drawn = BOXES[det["label"]]
            assert det["box"] == pytest.approx(list(drawn), abs=2.5)  # 1.25 px per model pixel + JPEG edges
            assert det["crop_box"] == list(crop_region(tuple(det["box"]), 0.0, 800, 600))
            assert det["dim"] == 48
            got = torch.tensor(det["embedding"])
            worst = max(worst, (got - reference_embedding(pil, tuple(det["crop_box"]))).abs().max().item())
    print(f"embedding vs the second model on the reference crop alone: max abs {worst:.2e}")
    assert worst < EMBEDDING_TOL


def test_second_model_sees_reference_crops_in_one_batch(models):
    handler = start(models, {"crop_pad": 0.1})
    recorder = Recorder(handler.second.module)
    handler.second.module = recorder
    _, jpeg = _scene()
    portrait = cm.encode(cm.scene(600, 900, {"green": (50, 600, 500, 850), "magenta": (20, 20, 200, 500)}), exif_orientation=6)
    responses = serve(handler, [jpeg, portrait])
    assert [r.status for r in responses] == [200, 200]
    [batch] = recorder.seen  # every crop of both images: one run of the second model
    crops = [(data, d["crop_box"]) for data, r in ((jpeg, responses[0]), (portrait, responses[1]))
             for d in r.body["detections"]]
    assert batch.shape == (len(crops), 3, 224, 224) == (5, 3, 224, 224)
    assert responses[1].body["image_size"] == [600, 900]
    for row, (data, box) in zip(batch, crops, strict=True):
        diff = (row - reference_crop(reference_decode(data), tuple(box))).abs()
        assert diff.max() <= CROP_MAX_TOL and diff.mean() < CROP_MEAN_TOL


@pytest.mark.slow
def test_classification_cascade_filters_and_classifies_each_box(models):
    handler = start(models, {"task": "image-classification", "model": {"file": "colour_classifier.pt2"},
                             "classes": ["red", "1", "yellow", "magenta"], "min_score": 0.55, "max_crops": 2,
                             "include_unmatched": True, "classifier": {"top_k": 2},
                             "preprocess": {"mean": [0, 0, 0], "std": [1, 1, 1], "geometry": "stretch"}})
    boxes = {**BOXES, "green": (450, 520, 790, 590), "magenta": (720, 20, 790, 90)}
    [r] = serve(handler, [cm.encode(cm.scene(800, 600, boxes))])
    dets = r.body["detections"]
    # scores: red .9, green .8, blue .7, yellow .6, magenta .5; blue is not a wanted class, magenta
    # is under min_score, and max_crops 2 stops before yellow.
    assert [(d["label"], "predictions" in d) for d in dets] == [
        ("red", True), ("green", True), ("blue", False), ("yellow", False), ("magenta", False)]
    for d in dets[:2]:
        assert d["predictions"][0]["label"] == d["label"] and len(d["predictions"]) == 2
    handler_only_kept = start(models, {"task": "image-classification", "model": {"file": "colour_classifier.pt2"},
                                       "classes": ["blue"]})
    [r] = serve(handler_only_kept, [cm.encode(cm.scene(800, 600, boxes))])
    assert [d["label"] for d in r.body["detections"]] == ["blue"]


@pytest.mark.slow
def test_torchvision_backend_gives_the_cpu_answers(models, embedding_cascade):
    handler = start(models, backend="torchvision")
    _, jpeg = _scene()
    items = [jpeg, cm.encode(cm.scene(800, 600, BOXES), exif_orientation=6), b"junk"]
    ours, theirs = serve(handler, items), serve(embedding_cascade, items)
    assert handler.preprocessor.fallback_items == 0
    assert [r.status for r in ours] == [r.status for r in theirs] == [200, 200, 415]
    for a, b in zip(ours[:2], theirs[:2], strict=True):
        assert [d["crop_box"] for d in a.body["detections"]] == [d["crop_box"] for d in b.body["detections"]]
        for da, db in zip(a.body["detections"], b.body["detections"], strict=True):
            assert np.abs(np.array(da["embedding"]) - np.array(db["embedding"])).max() < EMBEDDING_TOL


def test_micro_batches_and_chunked_second_model_give_the_same_answers(models, embedding_cascade):
    items = [_scene()[1], b"junk", cm.encode(cm.scene(640, 480, {"red": (10, 10, 200, 300)})), _scene(1280, 720)[1]]
    expected = serve(embedding_cascade, items)
    pipelined = start(models, {"crop_batch": 2}, pipeline={"micro_batch": 2})  # second model: chunks of 2 crops
    recorder = Recorder(pipelined.second.module)
    pipelined.second.module = recorder
    got = serve(pipelined, items)
    assert max(len(x) for x in recorder.seen) == 2 and len(recorder.seen) >= 4
    assert [r.status for r in got] == [r.status for r in expected] == [200, 415, 200, 200]
    for a, b in zip(got, expected, strict=True):
        if a.status == 200:
            assert [d["crop_box"] for d in a.body["detections"]] == [d["crop_box"] for d in b.body["detections"]]
            for da, db in zip(a.body["detections"], b.body["detections"], strict=True):
                assert np.abs(np.array(da["embedding"]) - np.array(db["embedding"])).max() < 1e-5
    assert not pipelined.preprocessor._images  # nothing left behind


def test_base64_float16_encoding_follows_the_embedder_keys(models):
    handler = start(models, {"embedder": {"encoding": "base64", "dtype": "float16"}})
    [r] = serve(handler, [_scene()[1]])
    det = r.body["detections"][0]
    assert det["dtype"] == "float16" and det["dim"] == 48 and "embedding" not in det
    import base64

    vec = np.frombuffer(base64.b64decode(det["embedding_b64"]), "<f2")
    ref = reference_embedding(reference_decode(_scene()[1]), tuple(det["crop_box"])).numpy()
    assert np.abs(vec.astype(np.float32) - ref).max() < EMBEDDING_TOL + 1e-3  # + float16 rounding


def test_a_cascade_without_a_second_model_fails_the_load_naming_the_flag(models):
    handler = Cascade()
    config = {"model": {"file": "colour_boxes.pt2"}, "preprocess": {"backend": "cpu"}}
    with pytest.raises(ConfigError, match=r"handler\.cascade\.model\.file: .*--second-model"):
        handler.initialize(FakeContext(models, handler_config=config))


def test_second_model_input_mismatch_fails_the_load_naming_the_keys(models, tmp_path):
    for f in models.iterdir():
        shutil.copy(f, tmp_path / f.name)
    with pytest.raises(ModelLoadError, match=r"\[1, 3, 160, 160\].*handler\.cascade\.preprocess\.input_size"):
        start(tmp_path, {"preprocess": {"crop_size": 160}})
    # exported for at most 64 rows: 8 x 16 crops = 128 is refused at warm-up, naming crop_batch
    with pytest.raises(ModelLoadError, match=r"\[128, 3, 224, 224\].*handler\.cascade\.crop_batch"):
        start(tmp_path, batch_size=8)
    assert start(tmp_path, {"crop_batch": 64}, batch_size=8).crop_chunk() == 64


# -- tsgpu archive --task cascade -------------------------------------------------------------------------


def test_archive_ships_both_models_and_the_cascade_section(models, tmp_path):
    import zipfile

    import yaml

    from archiver_scripts.archive import ArchiveError, build_archive

    quiet = lambda message: None  # noqa: E731
    det, emb = models / "colour_boxes.pt2", models / "region_means.pt2"
    mar = build_archive("boxes", det, tmp_path, task="cascade", second_model=emb, second_task="image-classification",
                        config=["cascade.max_crops=3"], log=quiet)
    with zipfile.ZipFile(mar) as zf:
        names = set(zf.namelist())
        section = yaml.safe_load(zf.read("model-config.yaml"))["handler"]
    assert {"colour_boxes.pt2", "region_means.pt2"} <= names
    assert section["cascade"] == {"model": {"file": "region_means.pt2"}, "task": "image-classification", "max_crops": 3}
    assert section["preprocess"]["geometry"] == "letterbox"  # the detector's defaults
    with pytest.raises(ArchiveError, match="--second-model"):
        build_archive("x", det, tmp_path, task="cascade", log=quiet)
    with pytest.raises(ArchiveError, match="only for --task cascade"):
        build_archive("x", det, tmp_path, task="object-detection", second_model=emb, log=quiet)
    with pytest.raises(ArchiveError, match="must differ"):
        build_archive("x", det, tmp_path, task="cascade", second_model=det, log=quiet)

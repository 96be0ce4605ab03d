"""offline/annotate.py: results drawn where they belong on the image as displayed (EXIF applied).

Known scenes: a saturated red rectangle at a known place in an image stored sideways with an EXIF
orientation tag (tests/helpers.py `encode_case`). Pictures are PNG, so drawn pixels are compared
exactly: a box outline has the class's palette colour, a mask is torchvision's alpha blend of it.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools import mask as coco

from handlers.testing import raw_request, run_handler
from offline import annotate
from tests.helpers import eager, encode_case, model_dir_with, start_detector

# (upright width, height, red rectangle in displayed pixels, EXIF orientation of the stored file)
EXIF6 = (900, 600, (100, 350, 330, 520), 6)
EXIF8 = (600, 900, (380, 90, 560, 260), 8)
RED_BOX_COLOUR = annotate.PALETTE[2]  # class 2 = red_box


def displayed(data: bytes) -> np.ndarray:
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def extent_of(picture: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the pixels of exactly `colour`, inclusive."""
    ys, xs = np.nonzero((picture == np.array(colour, dtype=np.uint8)).all(axis=2))
    assert len(xs), f"no pixel of colour {colour} was drawn"
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def outside(picture: np.ndarray, box: tuple[int, int, int, int], margin: int) -> np.ndarray:
    """A mask of the pixels more than `margin` away from `box`."""
    h, w = picture.shape[:2]
    x1, y1, x2, y2 = box
    keep = np.ones((h, w), dtype=bool)
    keep[max(0, y1 - margin): y2 + margin + 1, max(0, x1 - margin): x2 + margin + 1] = False
    return keep


def detection(box: tuple[float, ...], size: tuple[int, int]) -> dict:
    return {"image_size": list(size),
            "detections": [{"class_id": 2, "label": "red_box", "score": 0.9, "box": list(box)}]}


@pytest.mark.parametrize("case", [EXIF6, EXIF8], ids=["exif6", "exif8"])
def test_a_box_is_drawn_on_the_displayed_image_where_the_response_puts_it(tmp_path, case):
    width, height, box, orientation = case
    data = encode_case(width, height, box, orientation)
    assert Image.open(io.BytesIO(data)).size == (height, width)  # stored sideways
    out = tmp_path / "pic.png"

    assert annotate.annotate_image(data, json.dumps(detection(box, (width, height))), out)

    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (height, width, 3)  # displayed size and orientation
    # PIL draws the outline on the box's pixel rows/columns x1..x2, y1..y2 inclusive.
    assert extent_of(picture, RED_BOX_COLOUR) == box
    x1, y1, x2, y2 = box
    line = annotate._line_width(annotate.displayed_image(data))
    for y in (y1 + (y2 - y1) // 3, y1 + 2 * (y2 - y1) // 3):  # left and right edges, clear of the label
        assert (picture[y, x1:x1 + line] == RED_BOX_COLOUR).all() and (picture[y, x2 - line + 1:x2 + 1] == RED_BOX_COLOUR).all()
    assert (picture[y1, x1 + 1:x2] == RED_BOX_COLOUR).all() and (picture[y2, x1:x2 + 1] == RED_BOX_COLOUR).all()
    # The label is drawn inside the box; everything else is the displayed image, untouched.
    plain = displayed(data)
    away = outside(picture, box, 1)
    assert (picture[away] == plain[away]).all()
    assert (picture[y1 + line:y1 + 30, x1 + line:x1 + 120] != plain[y1 + line:y1 + 30, x1 + line:x1 + 120]).any()


def test_the_real_detectors_answer_lands_on_the_red_rectangle(tmp_path):
    """End to end: the red-box detector's own response on an EXIF-rotated JPEG, drawn."""
    width, height, box, orientation = EXIF8
    data = encode_case(width, height, box, orientation)
    (tmp_path / "model").mkdir()
    directory = model_dir_with(tmp_path / "model")
    handler, ctx = start_detector(directory, {"model": eager("RedBoxXyxy"), "preprocess": {"backend": "cpu"}})
    [response] = run_handler(handler, ctx, [raw_request(data)])
    assert response.status == 200, response.body

    out = tmp_path / "out" / "pic.png"
    assert annotate.annotate_image(data, response.body, out)
    drawn = extent_of(np.asarray(Image.open(out).convert("RGB")), RED_BOX_COLOUR)
    # The detector's box is within a few pixels of the drawn rectangle (tests/unit/test_detector.py
    # states 0.5 + 0.6 * original px per input px, < 2 px here); drawing truncates to whole pixels.
    assert max(abs(a - b) for a, b in zip(drawn, box, strict=True)) <= 3, (drawn, box)


def rle(mask: np.ndarray) -> dict:
    encoded = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


def blend(plain: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    """torchvision's draw_segmentation_masks: image * (1 - alpha) + colour * alpha, to uint8."""
    a = annotate.MASK_ALPHA
    return (plain.astype(np.float32) * (1 - a) + np.array(colour, dtype=np.float32) * a).astype(np.uint8)


@pytest.mark.parametrize("form", ["rle", "png"])
def test_a_semantic_mask_is_blended_exactly_where_it_is_in_the_displayed_image(tmp_path, form):
    width, height, box, orientation = EXIF6
    data = encode_case(width, height, box, orientation)
    x1, y1, x2, y2 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[y1:y2, x1:x2] = True
    if form == "rle":
        response = {"image_size": [width, height],
                    "segments": [{"class_id": 1, "label": "red", "area": int(mask.sum()), "mask": rle(mask)}]}
    else:
        label_map = np.where(mask, 1, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(label_map, "L").save(buf, "PNG")
        response = {"image_size": [width, height], "label_map_png": base64.b64encode(buf.getvalue()).decode(),
                    "classes": [{"class_id": 1, "label": "red", "area": int(mask.sum())}]}
    out = tmp_path / "seg.png"
    assert annotate.annotate_image(data, response, out)

    picture = np.asarray(Image.open(out).convert("RGB")).astype(int)
    plain = displayed(data)
    expected = blend(plain, annotate.PALETTE[1]).astype(int)
    inner = np.zeros_like(mask)
    inner[y1 + 2:y2 - 2, x1 + 2:x2 - 2] = True  # clear of the thin extent outline
    inner[y1:y1 + 40, x1:x1 + 120] = False      # and of its label on its patch
    assert np.abs(picture[inner] - expected[inner]).max() <= 1  # rounding of the blend
    # The extent outline is one pixel wide on the mask's edge, in the class colour.
    assert extent_of(picture.astype(np.uint8), annotate.PALETTE[1]) == (x1, y1, x2, y2)
    away = outside(picture, box, 1)
    assert (picture[away] == plain[away]).all()


def test_instances_draw_mask_and_box(tmp_path):
    width, height, box, orientation = EXIF8
    data = encode_case(width, height, box, orientation)
    x1, y1, x2, y2 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[y1 + 10:y2 - 10, x1 + 10:x2 - 10] = True
    response = {"image_size": [width, height], "instances": [
        {"class_id": 2, "label": "red_box", "score": 0.8, "box": list(box), "mask": rle(mask), "area": int(mask.sum())}]}
    out = tmp_path / "inst.png"
    assert annotate.annotate_image(data, response, out)
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert extent_of(picture, RED_BOX_COLOUR) == box
    expected = blend(displayed(data), RED_BOX_COLOUR).astype(int)
    assert np.abs(picture[y2 - 40:y2 - 12, x2 - 40:x2 - 12].astype(int) - expected[y2 - 40:y2 - 12, x2 - 40:x2 - 12]).max() <= 1


def test_keypoints_are_drawn_at_their_points_and_joined_by_the_skeleton(tmp_path):
    width, height, box, orientation = EXIF6
    data = encode_case(width, height, box, orientation)
    points = [[700.0, 100.0, 0.9], [800.0, 100.0, None], [750.0, 250.0, 0.1]]  # the third is not drawn
    response = {"image_size": [width, height], "skeleton": [[0, 1], [1, 2]], "instances": [
        {"class_id": 5, "label": "person", "score": 0.9, "box": [650, 50, 850, 300], "keypoints": points}]}
    out = tmp_path / "kp.png"
    assert annotate.annotate_image(data, response, out)
    picture = np.asarray(Image.open(out).convert("RGB"))
    colour = np.array(annotate.PALETTE[5], dtype=np.uint8)
    # the points: discs of the class colour (radius line width + 1 = 3) ...
    assert (picture[100, 698] == colour).all() and (picture[100, 802] == colour).all()
    # ... joined by torchvision's skeleton line (white: draw_keypoints takes no line colour)
    assert (picture[100, 720:780] == 255).all()
    # the point scored 0.1 is not drawn, nor the edge to it: the image is untouched there
    plain = displayed(data)
    assert (picture[240:260, 740:760] == plain[240:260, 740:760]).all()
    assert (picture[120:230, 760:790] == plain[120:230, 760:790]).all()


def test_a_response_for_the_undisplayed_orientation_is_refused(tmp_path):
    width, height, box, orientation = EXIF6
    data = encode_case(width, height, box, orientation)
    with pytest.raises(annotate.AnnotateError, match=r"image_size \[600, 900\] is not the displayed size \[900, 600\]"):
        annotate.annotate_image(data, detection(box, (height, width)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_nothing_to_draw_writes_nothing(tmp_path):
    data = encode_case(*EXIF6)
    classification = {"predictions": [{"index": 0, "label": "cat", "probability": 0.9}]}
    assert not annotate.annotate_image(data, classification, tmp_path / "c.png")
    assert not list(tmp_path.iterdir())


def test_pictures_are_named_after_their_inputs(tmp_path):
    names = annotate.picture_names([str(tmp_path / "a" / "cat.jpg"), str(tmp_path / "a" / "cat.png"),
                                    str(tmp_path / "b" / "c" / "dog.JPEG")])
    assert list(names.values()) == ["a/cat.jpg.png", "a/cat.png", "b/c/dog.JPEG.png"]


def test_rows_are_drawn_or_skipped_by_reason(tmp_path):
    from offline.job import InputRef

    width, height, box, orientation = EXIF6
    good = tmp_path / "in" / "good.jpg"
    good.parent.mkdir()
    good.write_bytes(encode_case(width, height, box, orientation))
    corrupt = tmp_path / "in" / "corrupt.jpg"
    corrupt.write_bytes(b"not an image")
    body = json.dumps(detection(box, (width, height)))
    inputs = {str(good): InputRef(str(good), "file"), str(corrupt): InputRef(str(corrupt), "file"),
              "http://127.0.0.1/x.jpg": InputRef("http://127.0.0.1/x.jpg", "url", "http://127.0.0.1/x.jpg")}
    rows = [(str(good), 200, body), (str(corrupt), 400, '{"code": 400}'), ("http://127.0.0.1/x.jpg", 200, body),
            (str(corrupt), 200, body)]
    summary = annotate.annotate_rows(rows, inputs, tmp_path / "out")
    assert summary.written == 1
    assert dict(summary.skipped) == {"error 400": 1, "not a file input": 1, "unreadable (AnnotateError)": 1}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["good.jpg.png"]
    assert "annotated 1 image(s)" in str(summary)


@pytest.mark.slow
def test_tsgpu_annotate_runs_the_archive_and_draws_its_boxes(tmp_path):
    """`tsgpu annotate ARCHIVE.mar IMAGE... --out DIR` end to end, in its own process (the archive's
    handler is loaded as a TorchServe worker loads it, which rewires `handlers` imports)."""
    import subprocess
    import sys
    from pathlib import Path

    from archiver_scripts.archive import build_archive
    from tests import detection_models, segmentation_models
    from tests.helpers import DETECTOR_LABELS

    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(DETECTOR_LABELS))
    model = segmentation_models.save_exported(detection_models.RedBoxYolo(), tmp_path / "det.pt2", (320, 320))
    archive = build_archive("detect", model, tmp_path / "store", task="object-detection", labels=labels,
                            config=["preprocess.input_size=[320,320]"], log=lambda message: None)
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    cases = {"sub/exif6.jpg": EXIF6, "exif8.jpg": EXIF8}
    for name, (width, height, box, orientation) in cases.items():
        (images / name).write_bytes(encode_case(width, height, box, orientation))
    (images / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "pictures"
    done = subprocess.run([sys.executable, "-m", "archiver_scripts.cli", "annotate", str(archive),
                           *(str(images / n) for n in [*cases, "broken.jpg"]), "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "annotated 2 image(s)" in done.stdout and "1 error 415" in done.stdout, done.stdout  # not an image: 415
    for name, (width, height, box, _) in cases.items():
        picture = np.asarray(Image.open(out / f"{name}.png").convert("RGB"))
        assert picture.shape == (height, width, 3)
        # the detector's box (within its tolerance: 0.5 + 0.6 * original px per input px, < 3 px here)
        drawn = extent_of(picture, RED_BOX_COLOUR)
        assert max(abs(a - b) for a, b in zip(drawn, box, strict=True)) <= 3, (name, drawn, box)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["exif8.jpg.png", "sub/exif6.jpg.png"]

"""InstanceSegmenter: two overlapping objects of different classes, whose masks must land on the
drawn pixels of the original (EXIF-oriented) image, from Ultralytics' yolo_seg form and
torchvision's Mask R-CNN form (tests/instance_models.py finds the drawn red and blue shapes).

Tolerance of a mask, stated once (docs/tasks/instance-segmentation.md): a mask edge may move by a
band of t original pixels around the drawn edge, t = 0.5 + s / scale, where scale is model-input
pixels per original pixel and s the model-input pixels one cell of the mask map spans at most
halfway (yolo_seg prototypes at 1/4 of the input: s = 2 + 1 for the resize's blur; Mask R-CNN
masks at the input's resolution: s = 1). For a shape of area A and boundary length P:
IoU >= (A - t P) / (A + t P). Boxes: every edge within 0.5 + 0.6 / scale, as the detector's.
"""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from archiver_scripts import samples
from handlers.errors import ModelLoadError
from handlers.preprocess.geometry import plan_letterbox
from handlers.tasks.instances import InstanceSegmenter, detect_format, unwrap_seg
from handlers.tasks.masks import box_crop, crop_rle
from handlers.testing import FakeContext, raw_request, run_handler
from tests import instance_models

coco_mask = pytest.importorskip("pycocotools.mask", reason="pycocotools is not installed (COCO RLE masks)")

LABELS = {"0": "background", "1": "red", "2": "blue"}
# (name, upright width, height, red box, blue box (drawn over the red), EXIF orientation)
CASES = [
    ("landscape", 1280, 720, (200, 150, 600, 500), (450, 350, 800, 650), 1),
    ("portrait", 720, 1280, (100, 300, 500, 800), (350, 650, 650, 1100), 1),
    ("exif6", 900, 600, (100, 80, 500, 400), (380, 250, 700, 560), 6),
    ("exif8", 600, 900, (60, 100, 400, 500), (250, 380, 560, 800), 8),
    ("4k", 3840, 2160, (2900, 300, 3500, 700), (3300, 500, 3700, 1000), 1),
]
_STORED_TURNS = {1: 0, 6: 1, 8: -1}  # np.rot90 turns that EXIF orientation o turns upright


def scene(width: int, height: int, red: tuple[int, ...], blue: tuple[int, ...]) -> np.ndarray:
    gray = samples.mosaic(width, height).mean(axis=2).astype(np.uint8)
    image = np.repeat(gray[..., None], 3, axis=2)
    image[red[1]:red[3], red[0]:red[2]] = (255, 0, 0)
    image[blue[1]:blue[3], blue[0]:blue[2]] = (0, 0, 255)
    return image


def encode(width: int, height: int, red: tuple[int, ...], blue: tuple[int, ...], orientation: int) -> bytes:
    stored = np.ascontiguousarray(np.rot90(scene(width, height, red, blue), k=_STORED_TURNS[orientation]))
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(stored).save(buf, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    data = buf.getvalue()
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert shown.size == (width, height)  # the fixture: a standard EXIF reader shows it upright
    return data


def drawn_masks(width: int, height: int, red: tuple[int, ...], blue: tuple[int, ...]) -> dict[int, np.ndarray]:
    masks = {c: np.zeros((height, width), bool) for c in (1, 2)}
    masks[1][red[1]:red[3], red[0]:red[2]] = True
    masks[2][blue[1]:blue[3], blue[0]:blue[2]] = True
    masks[1] &= ~masks[2]  # the blue shape is drawn over the red one
    return masks


def decode_rle(rle: dict) -> np.ndarray:
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def boundary(mask: np.ndarray) -> int:
    """Pixel edges between mask and non-mask (the image border counts)."""
    padded = np.pad(mask, 1).astype(np.int8)
    return int(np.abs(np.diff(padded, axis=0)).sum() + np.abs(np.diff(padded, axis=1)).sum())


def model_dir(tmp_path, model: str):
    shutil.copy(instance_models.__file__, tmp_path / "instance_models.py")
    torch.save({}, tmp_path / "weights.pt")
    (tmp_path / "index_to_name.json").write_text(json.dumps(LABELS))
    return {"file": "weights.pt", "format": "eager", "model_class": f"instance_models.py:{model}"}


def start(tmp_path, model: str, batch_size: int = 1, **instances):
    config = {"model": model_dir(tmp_path, model), "preprocess": {"backend": "cpu"}, "instances": instances}
    ctx = FakeContext(tmp_path, handler_config=config, batch_size=batch_size)
    handler = InstanceSegmenter()
    handler.initialize(ctx)
    return handler, ctx


@pytest.fixture(scope="module")
def case_images() -> list[bytes]:
    return [encode(w, h, red, blue, o) for _, w, h, red, blue, o in CASES]


# -- COCO RLE from a crop ---------------------------------------------------------------------------


@pytest.mark.parametrize("left, top, w, h", [(3, 2, 5, 4), (0, 0, 7, 9), (0, 0, 12, 9), (11, 8, 1, 1), (4, 0, 3, 9)])
def test_crop_rle_equals_pycocotools_on_the_full_mask(left, top, w, h):
    rng = np.random.default_rng(left * 100 + top * 10 + w)
    crop = rng.random((h, w)) > 0.4
    crop[:, 0] = True  # a run that may continue across a column (full-height crops)
    full = np.zeros((9, 12), np.uint8)
    full[top:top + h, left:left + w] = crop
    want = coco_mask.encode(np.asfortranarray(full))
    got = crop_rle(crop, left, top, 12, 9, coco_mask)
    assert got == {"size": [9, 12], "counts": want["counts"].decode("ascii")}
    assert (decode_rle(got) == full.astype(bool)).all()


def test_box_crop_samples_only_inside_the_box_and_maps_through_the_letterbox():
    g = plan_letterbox(200, 100, (100, 100))  # scale 0.5, content rows 25..75 of the input
    values = torch.zeros(100, 100)
    values[35:45, 20:40] = 1.0  # input (20, 35)-(40, 45) = original (40, 20)-(80, 40)
    crop = box_crop(values, g, (30.0, 10.0, 70.0, 50.0), 0.5)
    assert crop.shape == (40, 40)
    rows, cols = np.nonzero(crop.numpy())
    # cropped to the box: x stops at 70 (original), y spans the drawn 20..40
    assert (cols.min() + 30, cols.max() + 31, rows.min() + 10, rows.max() + 11) == (40, 70, 20, 40)


def test_box_crop_never_mixes_in_the_letterbox_padding():
    # A map at 1/4 of a 100x100 input: the content (rows 25..75 of the input) is cells 6..19 (25/4
    # and 75/4 rounded as Ultralytics crops its prototypes); the padding cells say "object".
    g = plan_letterbox(200, 100, (100, 100))
    values = torch.full((25, 25), 1000.0)
    values[6:19] = -10.0  # the content: no object anywhere
    # Original row 0 lies at cell 5.81: bilinear weights of 0.19 on the padding cell 5 would give
    # +180 there; clamped to the content's first cell centre it reads -10.
    crop = box_crop(values, g, (0.0, 0.0, 200.0, 100.0), 0.5, logits=True)
    assert crop.shape == (100, 200) and not crop.any()  # the top and bottom rows stay empty


# -- through the handler ----------------------------------------------------------------------------


def exported_seg(directory) -> dict:
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(instance_models.YoloSeg(), (torch.zeros(2, 3, 640, 640),),
                                  dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(directory / "seg.pt2"))
    return {"file": "seg.pt2"}


@pytest.mark.parametrize("form, stride", [("yolo_seg", 3.0), ("torchvision", 1.0)])
def test_masks_of_two_overlapping_objects_land_on_the_drawn_pixels(tmp_path, case_images, form, stride):
    if form == "yolo_seg":
        model_dir(tmp_path, "YoloSeg")
        config = {"model": exported_seg(tmp_path), "preprocess": {"backend": "cpu"}}
        ctx = FakeContext(tmp_path, handler_config=config, batch_size=len(CASES))
        handler = InstanceSegmenter()
        handler.initialize(ctx)
    else:
        handler, ctx = start(tmp_path, "MaskRcnn", batch_size=len(CASES))
    assert handler.output_format == form  # auto recognised it at warm-up
    responses = run_handler(handler, ctx, [raw_request(b) for b in case_images])
    for (name, w, h, red, blue, _), response in zip(CASES, responses, strict=True):
        assert response.status == 200, (name, response.body)
        body = response.body
        assert body["image_size"] == [w, h]
        # the shifted red duplicate was removed by NMS; different classes overlap and both stay
        assert [(i["class_id"], i["label"], i["score"]) for i in body["instances"]] == [(1, "red", 0.9), (2, "blue", 0.8)]
        scale = min(640 / w, 640 / h)
        want = drawn_masks(w, h, red, blue)
        for inst, drawn_box in zip(body["instances"], (red, blue), strict=True):
            tol = 0.5 + 0.6 / scale
            assert max(abs(a - b) for a, b in zip(inst["box"], drawn_box, strict=True)) <= tol, (name, inst["box"])
            got = decode_rle(inst["mask"])
            assert inst["mask"]["size"] == [h, w] and inst["area"] == int(got.sum())
            truth = want[inst["class_id"]]
            t = 0.5 + stride / scale
            area, perimeter = truth.sum(), boundary(truth)
            bound = (area - t * perimeter) / (area + t * perimeter)
            iou = (got & truth).sum() / (got | truth).sum()
            print(f"{form} {name} {inst['label']}: IoU {iou:.4f} (bound {bound:.4f})")
            assert iou >= bound, (name, inst["label"], iou, bound)
            # cropped to its box: nothing outside it
            x1, y1, x2, y2 = inst["box"]
            ys, xs = np.nonzero(got)
            assert xs.min() >= int(x1) and xs.max() < x2 + 1 and ys.min() >= int(y1) and ys.max() < y2 + 1


def test_a_bad_item_gets_its_own_error(tmp_path, case_images):
    handler, ctx = start(tmp_path, "MaskRcnn", batch_size=3)
    responses = run_handler(handler, ctx, [raw_request(case_images[0]), raw_request(b"not an image"),
                                           raw_request(case_images[2])])
    assert [r.status for r in responses] == [200, 415, 200]
    assert responses[1].body["type"] == "unsupported_media_type"
    assert len(responses[0].body["instances"]) == 2 and responses[2].body["image_size"] == [900, 600]


def test_class_thresholds_max_detections_and_mask_threshold(tmp_path, case_images):
    handler, ctx = start(tmp_path, "YoloSeg", class_thresholds={"blue": 0.85})
    [response] = run_handler(handler, ctx, [raw_request(case_images[0])])
    assert [i["label"] for i in response.body["instances"]] == ["red"]  # blue's 0.8 < its own 0.85
    handler, ctx = start(tmp_path, "YoloSeg", max_detections=1)
    [response] = run_handler(handler, ctx, [raw_request(case_images[0])])
    assert [i["label"] for i in response.body["instances"]] == ["red"]
    # mask_threshold: the prototype logit is (share - 0.5) * 16; at 0.99 a cell must be ~79% red
    areas = {}
    for threshold in (0.5, 0.99):
        handler, ctx = start(tmp_path, "YoloSeg", mask_threshold=threshold)
        [response] = run_handler(handler, ctx, [raw_request(case_images[0])])
        areas[threshold] = response.body["instances"][0]["area"]
    assert areas[0.99] < areas[0.5]


def test_nothing_found_gives_an_empty_list(tmp_path):
    handler, ctx = start(tmp_path, "YoloSeg")
    plain = samples.encode(np.full((300, 400, 3), 128, np.uint8), "JPEG")
    [response] = run_handler(handler, ctx, [raw_request(plain)])
    assert response.body == {"image_size": [400, 300], "instances": []}


def test_output_forms_and_unwrapping():
    pred, protos = torch.zeros(1, 4 + 80 + 32, 100), torch.zeros(1, 32, 40, 40)
    assert detect_format(unwrap_seg((pred, protos))) == "yolo_seg"
    assert unwrap_seg(((pred, protos), {"feats": []}))[1] is protos  # Ultralytics 8.4 eager
    assert unwrap_seg((pred, ([], torch.zeros(1, 32, 100), protos)))[1] is protos  # older eager
    with pytest.raises(ModelLoadError, match=r"\[1, 84, 100\].*handler\.instances\.output_format"):
        detect_format(torch.zeros(1, 84, 100))


def test_a_wrong_output_fails_the_model_load(tmp_path):
    with pytest.raises(ModelLoadError, match=r"output_format is yolo_seg but the model returned a list"):
        start(tmp_path, "MaskRcnn", output_format="yolo_seg")
    (tmp_path / "labels").mkdir()
    with pytest.raises(ModelLoadError, match=r"none of the output forms"):
        start(tmp_path / "labels", "YoloPose")


MASKRCNN_SOURCE = '''
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn


class Segmenter(nn.Module):
    """torchvision's Mask R-CNN (ResNet-50 FPN), 2 classes + background, random weights, small input."""

    def __init__(self):
        super().__init__()
        self.model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                           min_size=160, max_size=160, box_score_thresh=0.0)

    def forward(self, x):
        return self.model(x)
'''


@pytest.mark.slow
def test_a_real_mask_rcnn_with_random_weights(tmp_path):
    import importlib.util

    (tmp_path / "mrcnn.py").write_text(MASKRCNN_SOURCE)
    spec = importlib.util.spec_from_file_location("_mrcnn_for_weights", tmp_path / "mrcnn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    torch.save(module.Segmenter().state_dict(), tmp_path / "mrcnn.pt")
    (tmp_path / "index_to_name.json").write_text(json.dumps(LABELS))
    config = {"model": {"file": "mrcnn.pt", "format": "eager", "model_class": "mrcnn.py:Segmenter", "warmup": False},
              "preprocess": {"backend": "cpu", "input_size": 160},
              "instances": {"score_threshold": 0.0, "max_detections": 5, "mask_threshold": 0.3}}
    ctx = FakeContext(tmp_path, handler_config=config, batch_size=2)
    handler = InstanceSegmenter()
    handler.initialize(ctx)
    sizes = [(300, 200), (200, 300)]
    images = [samples.encode(samples.mosaic(w, h, offset=i)) for i, (w, h) in enumerate(sizes)]
    responses = run_handler(handler, ctx, [raw_request(b) for b in images])
    assert handler.output_format == "torchvision"
    for response, (w, h) in zip(responses, sizes, strict=True):
        assert response.status == 200 and response.body["image_size"] == [w, h]
        found = response.body["instances"]
        assert 1 <= len(found) <= 5
        assert [i["score"] for i in found] == sorted((i["score"] for i in found), reverse=True)
        for inst in found:
            got = decode_rle(inst["mask"])
            assert got.shape == (h, w) and inst["area"] == int(got.sum())
            assert 1 <= inst["class_id"] <= 2
            x1, y1, x2, y2 = inst["box"]
            ys, xs = np.nonzero(got)
            if len(xs):
                assert xs.min() >= int(x1) and xs.max() < x2 + 1 and ys.min() >= int(y1) and ys.max() < y2 + 1


def ultralytics_postprocess(model_file, task: str, handler, ctx, image: bytes, **settings):
    """Our response for `image`, and Ultralytics' predictor's `postprocess` of the very model input
    and raw output our handler had: (our body, their Results)."""
    from PIL import Image
    from ultralytics import RTDETR, YOLO

    seen = []
    forward = handler.forward
    handler.forward = lambda x: seen.append((x, forward(x))) or seen[-1][1]
    [response] = run_handler(handler, ctx, [raw_request(image)])
    assert response.status == 200, response.body
    bgr = np.ascontiguousarray(np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))[..., ::-1])
    model = RTDETR(str(model_file)) if task == "rtdetr" else YOLO(str(model_file), task=task)
    model.predict(bgr, imgsz=seen[0][0].shape[-1], device="cpu", verbose=False, **settings)  # sets up its predictor
    x, out = seen[0]
    return response.body, model.predictor.postprocess(out, x, [bgr])[0]


@pytest.mark.slow
def test_an_ultralytics_yolo_seg_export(tmp_path):
    pytest.importorskip("ultralytics", reason="ultralytics is not installed (a test extra)")
    model_file, _ = instance_models.ultralytics_export("yolo11n-seg.yaml", 160, tmp_path, class_bias=-4.0)
    (tmp_path / "index_to_name.json").write_text(json.dumps({str(i): f"c{i}" for i in range(80)}))
    config = {"model": {"file": model_file.name}, "preprocess": {"backend": "cpu", "input_size": 160}}
    ctx = FakeContext(tmp_path, handler_config=config)
    handler = InstanceSegmenter()
    handler.initialize(ctx)
    assert handler.output_format == "yolo_seg"
    image = samples.encode(samples.mosaic(320, 240), "JPEG", quality=95)  # 2x the 160x120 content: no rounding
    body, theirs = ultralytics_postprocess(model_file, "segment", handler, ctx, image, conf=0.25, iou=0.45,
                                           max_det=100, retina_masks=True)
    found = body["instances"]
    assert len(found) >= 1 and len(found) == len(theirs.boxes)
    for inst, box, cls, conf, mask in zip(found, theirs.boxes.xyxy.tolist(), theirs.boxes.cls.tolist(),
                                          theirs.boxes.conf.tolist(), theirs.masks.data.numpy().astype(bool),
                                          strict=True):
        assert inst["class_id"] == int(cls) and inst["score"] == pytest.approx(conf, abs=1e-5)
        assert inst["box"] == pytest.approx(box, abs=0.01)
        got = decode_rle(inst["mask"])
        # the same pixels but for the box's one-pixel frame, where Ultralytics' crop (x1 <= i < x2) and
        # the centre rule differ (docs/tasks/instance-segmentation.md)
        inner = np.zeros_like(got)
        x1, y1, x2, y2 = inst["box"]
        inner[int(y1) + 1:int(np.ceil(y2)) - 1, int(x1) + 1:int(np.ceil(x2)) - 1] = True
        assert ((got ^ mask) & inner).sum() <= 0.01 * max(1, (mask & inner).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["YoloSeg", "MaskRcnn"])
def test_post_processing_on_cuda_matches_cpu(tmp_path, model):
    handler, _ = start(tmp_path, model)
    g = plan_letterbox(1280, 720, (640, 640))  # content rows 140..500 of the input
    x = torch.full((1, 3, 640, 640), 0.45)
    x[0, :, 180:300, 100:300] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    x[0, :, 250:400, 250:420] = torch.tensor([0.0, 0.0, 1.0])[:, None, None]
    net = getattr(instance_models, model)()
    on_cpu = handler.postprocess(net(x), [g])
    on_gpu = handler.postprocess(net(x.cuda()), [g])
    assert on_cpu == on_gpu and len(on_cpu[0]["instances"]) == 2


def test_config_errors_name_the_key(tmp_path):
    from handlers.errors import ConfigError

    with pytest.raises(ConfigError, match=r"handler\.instances\.mask_threshold: must be within 0..1, got 1.5"):
        start(tmp_path, "YoloSeg", mask_threshold=1.5)
    with pytest.raises(ConfigError, match=r"handler\.instances\.class_thresholds\.green: not a class id"):
        start(tmp_path, "YoloSeg", class_thresholds={"green": 0.5})

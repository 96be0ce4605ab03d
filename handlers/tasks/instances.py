"""Instance segmentation: one box, class, score and mask per object, in the original image's pixels.

Response body for each request (200):

    {"image_size": [width, height],
     "instances": [{"class_id": 1, "label": "bottle", "score": 0.91, "box": [x1, y1, x2, y2],
                    "mask": {"size": [height, width], "counts": "<COCO compressed RLE>"},
                    "area": 5120}, ...]}

sorted by score (6 decimals), at most `handler.instances.max_detections` per image; boxes as the
object detector answers them (original pixels, EXIF orientation applied, clipped, 2 decimals);
`mask` is what `pycocotools.mask.encode` returns for the whole original image (`counts` as a str),
`area` its number of pixels. A mask holds the pixels of the object's box whose mask probability is
above `handler.instances.mask_threshold` (default 0.5); an object with no such pixel is left out
(as Ultralytics' predictor leaves it out), after max_detections.

Model outputs (`handler.instances.output_format`; `auto` decides from the first output):

    yolo_seg     (predictions [B, 4+C+M, N], prototypes [B, M, h, w]): Ultralytics' segmentation
                 export (cx, cy, w, h in model-input pixels, C class scores, M mask coefficients per
                 candidate; prototypes over the model input, usually at 1/4 of it); NMS runs here
    torchvision  list of B dicts with boxes [K, 4], labels [K], scores [K], masks [K, 1, H, W]
                 (torchvision's Mask R-CNN in eval mode: probabilities pasted over the model
                 input); no NMS here unless nms: always

Thresholds, per-class thresholds, NMS and max_detections are the object detector's
(handlers/tasks/detector.py, the same keys under `handler.instances`), run on the model's device
for the whole batch. Masks are assembled on the device too: for yolo_seg each kept object's
coefficients times its image's prototypes, sigmoid; each object's map is then sampled only inside
its box in original pixels (handlers/tasks/masks.py). Two transfers reach the host per batch: the
kept objects' rows, then every mask crop at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ..base import VisionHandler
from ..config import HandlerConfig, check_unit_interval
from ..errors import ModelLoadError
from ..labels import LABELS_FILE, load_archive_labels
from ..preprocess import Geometry
from .detector import DetectionParams, DetectorConfig, decode, describe, keep_candidates
from .masks import box_crop, box_region, coco_mask, crop_rle, to_host

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("yolo_seg", "torchvision")
_OPTION = "handler.instances.output_format"
_FORMS = "yolo_seg (predictions [B, 4+C+M, N], prototypes [B, M, h, w]) or torchvision list[dict(boxes, labels, scores, masks)]"
_TASK = "instance segmentation"


@dataclass(frozen=True)
class InstancesConfig(DetectorConfig):
    """`handler.instances`: the object detector's keys (thresholds, NMS, max_detections; its
    detr_activation does not apply) plus the mask threshold."""

    output_formats: ClassVar[tuple[str, ...]] = OUTPUT_FORMATS

    mask_threshold: float = 0.5
    """A pixel belongs to the mask when its probability is above this."""

    def validate(self, path: str) -> None:
        super().validate(path)
        check_unit_interval(self.mask_threshold, f"{path}.mask_threshold")


@dataclass(frozen=True)
class InstanceSegmenterConfig(HandlerConfig):
    """The `handler:` section of an instance-segmentation archive."""

    instances: InstancesConfig = field(default_factory=InstancesConfig)


# -- recognising the model's output ----------------------------------------------------------------


def _is_torchvision(outputs: Any, key: str) -> bool:
    return isinstance(outputs, (list, tuple)) and len(outputs) > 0 and all(
        isinstance(o, dict) and {"boxes", "labels", "scores", key} <= set(o) for o in outputs
    )


def unwrap_seg(outputs: Any) -> Any:
    """(predictions, prototypes) out of what a segmentation model returned, or `outputs` as it was.

    Ultralytics' exports return (predictions, prototypes); its eager modules ((predictions,
    prototypes), extras) in 8.4 and (predictions, (features, coefficients, prototypes)) before."""
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2:
        first, second = outputs
        if isinstance(first, (tuple, list)) and len(first) == 2 and all(isinstance(t, torch.Tensor) for t in first):
            return tuple(first)
        if isinstance(first, torch.Tensor) and isinstance(second, (tuple, list)) and second \
                and isinstance(second[-1], torch.Tensor) and second[-1].dim() == 4:
            return first, second[-1]
    return outputs


def _is_yolo_seg(outputs: Any) -> bool:
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == 2):
        return False
    pred, protos = outputs
    return (isinstance(pred, torch.Tensor) and isinstance(protos, torch.Tensor) and pred.dim() == 3
            and protos.dim() == 4 and pred.shape[1] >= 5 + protos.shape[1])


def detect_format(outputs: Any) -> str:
    if _is_torchvision(outputs, "masks"):
        return "torchvision"
    if _is_yolo_seg(outputs):
        return "yolo_seg"
    raise ModelLoadError(
        f"{_TASK}: {_OPTION} is auto and the model returned {describe(outputs)}, which is none of the "
        f"output forms {_FORMS}; export the model in one of them and set {_OPTION}"
    )


def check_output(outputs: Any, output_format: str, batch: int, num_labels: int) -> None:
    """ModelLoadError, naming the shape and the option, unless `outputs` is `output_format` for `batch` images."""
    fits = _is_yolo_seg(outputs) if output_format == "yolo_seg" else _is_torchvision(outputs, "masks")
    if not fits:
        raise ModelLoadError(
            f"{_TASK}: {_OPTION} is {output_format} but the model returned {describe(outputs)}; expected "
            f"{_FORMS}: set {_OPTION} to the form the model returns (or auto)"
        )
    rows = [len(outputs)] if output_format == "torchvision" else [len(outputs[0]), len(outputs[1])]
    if any(r != batch for r in rows):
        raise ModelLoadError(f"{_TASK}: the model returned {describe(outputs)} for a batch of {batch} images; "
                             f"the first dimension must be the batch")
    if output_format == "yolo_seg":
        classes = outputs[0].shape[1] - 4 - outputs[1].shape[1]
        if num_labels and classes != num_labels:
            raise ModelLoadError(
                f"{_TASK}: the model returned {describe(outputs)}, read as yolo_seg [B, 4+C+M, N] with M = "
                f"{outputs[1].shape[1]} prototypes and so C = {classes} classes, but the archive's {LABELS_FILE} "
                f"has {num_labels} labels: give one label per class (index 0..C-1)"
            )


# -- the objects of a batch ------------------------------------------------------------------------


@dataclass
class Objects:
    """A batch's kept objects: rows on the host, per-object extras still on the device."""

    rows: list[tuple[int, int, float, tuple[float, float, float, float]]]
    """(image, class id, score, (x1, y1, x2, y2) original pixels, clipped), grouped by image, best first."""
    source: torch.Tensor
    """[K] int64: each object's position in the concatenation of every image's candidates."""


def keep_objects(decoded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], geometry: list[Geometry],
                 params: DetectionParams, nms: bool) -> Objects:
    """The detector's thresholds, NMS and max_detections on the device; the kept rows reach the
    host in one transfer."""
    c = keep_candidates(decoded, geometry, params, nms)
    table = torch.cat([c.image[:, None].double(), c.classes[:, None].double(), c.scores[:, None].double(),
                       c.clipped.double()], dim=1).cpu().tolist()
    rows = [(int(i), int(k), s, (x1, y1, x2, y2)) for i, k, s, x1, y1, x2, y2 in table]
    return Objects(rows, c.source)


def object_entry(labels: dict[int, str], class_id: int, score: float, box: tuple[float, ...]) -> dict[str, Any]:
    """The detector's fields of one object in a response."""
    return {"class_id": class_id, "label": labels.get(class_id, str(class_id)), "score": round(score, 6),
            "box": [round(v, 2) for v in box]}


def nms_family(output_format: str) -> str:
    """The detector form whose NMS rule an output form follows (raw Ultralytics heads: yolo)."""
    return "yolo" if output_format.startswith("yolo") else output_format


# -- masks -----------------------------------------------------------------------------------------


def mask_crops(outputs: Any, output_format: str, objects: Objects, geometry: list[Geometry],
               threshold: float) -> list[torch.Tensor]:
    """Each object's bool mask inside its box region, on the device (handlers/tasks/masks.py)."""
    crops: list[torch.Tensor] = []
    if output_format == "torchvision":
        masks = torch.cat([o["masks"].reshape(-1, *o["masks"].shape[-2:]) for o in outputs])
        for (image, _, _, box), src in zip(objects.rows, objects.source.tolist(), strict=True):
            crops.append(box_crop(masks[src], geometry[image], box, threshold))
        return crops
    pred, protos = outputs
    b, m, h, w = protos.shape
    coeffs = pred[:, pred.shape[1] - m:].transpose(1, 2).reshape(-1, m).float()  # [B*N, M]
    start = 0
    for image in range(b):
        stop = start
        while stop < len(objects.rows) and objects.rows[stop][0] == image:
            stop += 1
        if stop > start:  # coefficients @ prototypes: this image's objects' mask logits [K_i, h, w]
            logits = (coeffs[objects.source[start:stop]] @ protos[image].float().reshape(m, h * w)).reshape(-1, h, w)
            for k in range(start, stop):
                crops.append(box_crop(logits[k - start], geometry[image], objects.rows[k][3], threshold, logits=True))
        start = stop
    return crops


# -- the handler -----------------------------------------------------------------------------------


class InstanceSegmenter(VisionHandler):
    """Boxes and COCO RLE masks in original pixels from Ultralytics yolo_seg or torchvision Mask R-CNN outputs."""

    task = "instance-segmentation"
    config_class = InstanceSegmenterConfig
    config: InstanceSegmenterConfig
    # The whole image letterboxed at 0..1 scale, as YOLO-seg and Mask R-CNN expect.
    task_defaults = {"preprocess": {"geometry": "letterbox", "input_size": 640,
                                    "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}
    # No result table: its rows are flat columns, and each object carries a mask (a dict).
    table = None

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, str] = {}
        self.params = DetectionParams()
        self.output_format: str | None = None

    def load_assets(self, model_dir: Path) -> None:
        self.labels = load_archive_labels(model_dir, logger)
        cfg = self.config.instances
        self.params = DetectionParams.resolve(cfg, self.labels, "handler.instances")
        self.output_format = None if cfg.output_format == "auto" else cfg.output_format
        self._coco = coco_mask(_TASK)

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        outputs = unwrap_seg(outputs)
        if self.output_format is None:
            self.output_format = detect_format(outputs)
            logger.info("%s auto: the model returns %s, read as %s", _OPTION, describe(outputs), self.output_format)
        fmt = self.output_format
        check_output(outputs, fmt, len(geometry), len(self.labels))
        if fmt == "yolo_seg":
            pred, protos = outputs
            decoded = decode(pred[:, : pred.shape[1] - protos.shape[1]], "yolo")
        else:
            decoded = decode(outputs, "torchvision")
        objects = keep_objects(decoded, geometry, self.params, self.params.runs_nms(nms_family(fmt)))
        crops = to_host(mask_crops(outputs, fmt, objects, geometry, self.config.instances.mask_threshold))
        results: list[dict[str, Any]] = [{"image_size": list(g.original_size), "instances": []} for g in geometry]
        for (image, class_id, score, box), crop in zip(objects.rows, crops, strict=True):
            if not crop.any():  # no pixel above the threshold inside its box: left out, as Ultralytics does
                continue
            results[image]["instances"].append(self.instance(class_id, score, box, crop, geometry[image]))
        return list(results)

    def instance(self, class_id: int, score: float, box: tuple[float, float, float, float], crop: np.ndarray,
                 geometry: Geometry) -> dict[str, Any]:
        """One object's entry: the detector's fields, its mask as COCO RLE of the whole image, its area."""
        width, height = geometry.original_size
        left, top, _, _ = box_region(box)
        return {**object_entry(self.labels, class_id, score, box),
                "mask": crop_rle(crop, left, top, width, height, self._coco), "area": int(crop.sum())}

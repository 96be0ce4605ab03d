"""Object detection: decode a detector's outputs, filter, NMS, and answer boxes in original pixels.

Response body for each request (200):

    {"detections": [{"class_id": 3, "label": "car", "score": 0.91, "box": [x1, y1, x2, y2]}, ...],
     "image_size": [width, height]}

Boxes are in pixels of the original image as the client sees it (EXIF orientation applied), clipped
to it, rounded to 2 decimals; detections are sorted by score (6 decimals), at most
`handler.detector.max_detections` per image. `label` comes from the archive's `index_to_name.json`
(the class id as a string when absent).

Model outputs (`handler.detector.output_format`; `auto` decides once, from the first output, at
warm-up, and logs its choice):

    yolo              [B, 4+C, N]: cx, cy, w, h in model-input pixels, then C class scores per
                      candidate (Ultralytics' raw export); NMS runs here
    xyxy_score_class  [B, N, 6]: x1, y1, x2, y2, score, class (models with NMS inside, e.g.
                      Ultralytics end-to-end or `nms=True` exports); no NMS here unless nms: always
    torchvision       list of B dicts with boxes [K, 4] (x1, y1, x2, y2), labels [K], scores [K]
                      (eager torchvision detectors); no NMS here unless nms: always
    detr              logits [B, Q, C] (sigmoid: RT-DETR, D-FINE, RF-DETR, Deformable DETR) or
                      [B, Q, C+1] (softmax with a last "no object" class: DETR) and boxes [B, Q, 4]
                      cx, cy, w, h normalised to the model input, as a tuple (logits, boxes) or a
                      dict with logits/pred_logits and pred_boxes (Hugging Face, D-FINE); stated
                      explicitly it also takes one [B, Q, 6] tensor of normalised cx, cy, w, h,
                      score, class (Ultralytics' RT-DETR export); NMS-free: no NMS here unless
                      nms: always. `handler.detector.detr_activation` (auto: softmax when the
                      logits have one class more than index_to_name.json, else sigmoid)

A stated form is taken as stated (the batch dimension, and for yolo C against the archive's labels
when it has them). Only `auto` guesses, and it reads a 3-D tensor as yolo only when N > 4+C: a yolo
export at a small input size with many classes (64 px, 80 classes: N = 84 = 4+C) needs the option.
`auto` reads two [B, Q, *] tensors (or the dict) whose boxes have a last dimension of 4 as detr; it
reads a single [B, Q, 6] tensor as xyxy_score_class, so Ultralytics' RT-DETR needs `detr` stated.

All post-processing runs on the model's device on the whole batch at once (the candidates of every
image in one set, NMS groups keyed by image and class), and the batch's detections cross to the host
in one transfer at the end.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch

# torchvision is a dependency of this library; importing its ops also registers torchvision::nms with
# torch, which TorchScript models exported with NMS inside (Ultralytics `nms=True`) need to load.
from torchvision.ops import batched_nms

from ..base import VisionHandler
from ..config import HandlerConfig, check_choice, check_positive, check_unit_interval
from ..errors import ConfigError, ModelLoadError
from ..labels import LABELS_FILE, load_archive_labels
from ..preprocess import Geometry
from ..tables import BOX_COLUMNS, TableSpec
from ..video.summary import DetectionSummary, VideoSummary

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("yolo", "xyxy_score_class", "torchvision", "detr")
DETR_ACTIVATIONS = ("auto", "sigmoid", "softmax")
_OPTION = "handler.detector.output_format"
_FORMS = (
    "yolo [B, 4+C, N], xyxy_score_class [B, N, 6], "
    "torchvision list[dict(boxes, labels, scores)] or detr (logits [B, Q, C], boxes [B, Q, 4])"
)
#: Keys under which DETR-family models return their logits and boxes (Hugging Face, D-FINE, RT-DETR).
_DETR_LOGITS = ("logits", "pred_logits")
_DETR_BOXES = ("pred_boxes", "boxes")
# NMS groups are image * _CLASS_SPAN + class: distinct for every (image, class) pair of ids below it.
_CLASS_SPAN = 1 << 24


@dataclass(frozen=True)
class DetectorConfig:
    """`handler.detector`: decoding, thresholds and NMS of detection outputs."""

    output_formats: ClassVar[tuple[str, ...]] = OUTPUT_FORMATS
    """The forms `output_format` may name (a task reading other forms overrides it)."""

    output_format: str = "auto"
    """auto | yolo ([B, 4+C, N] cx,cy,w,h + class scores) | xyxy_score_class ([B, N, 6]) |
    torchvision (list of dicts with boxes, labels, scores) | detr (logits [B, Q, C(+1)], boxes
    [B, Q, 4] normalised cx,cy,w,h)."""
    detr_activation: str = "auto"
    """detr logits to scores: sigmoid (every query x class a candidate: RT-DETR, D-FINE, RF-DETR) |
    softmax (the last class is "no object", each query its best other class: DETR) | auto
    (softmax when the logits have one class more than the archive's labels, else sigmoid)."""
    score_threshold: float = 0.25
    class_thresholds: dict[str, float] = field(default_factory=dict)
    """Per-class minimum score, keyed by class id or label; overrides score_threshold."""
    iou_threshold: float = 0.45
    class_agnostic: bool = False
    """NMS across classes (one box per object whatever its class) instead of per class."""
    nms: str = "auto"
    """auto (only for yolo outputs, which have none) | always | never."""
    max_detections: int = 100

    def runs_nms(self, output_format: str) -> bool:
        """NMS here: always, or for yolo outputs only under auto (the other forms come out of a
        model's own NMS)."""
        return self.nms == "always" or (self.nms == "auto" and output_format == "yolo")

    def validate(self, path: str) -> None:
        check_choice(self.output_format, ("auto", *self.output_formats), f"{path}.output_format")
        check_choice(self.detr_activation, DETR_ACTIVATIONS, f"{path}.detr_activation")
        check_choice(self.nms, ("auto", "always", "never"), f"{path}.nms")
        check_unit_interval(self.score_threshold, f"{path}.score_threshold")
        check_unit_interval(self.iou_threshold, f"{path}.iou_threshold")
        for key, value in self.class_thresholds.items():
            check_unit_interval(value, f"{path}.class_thresholds.{key}")
        check_positive(self.max_detections, f"{path}.max_detections")


@dataclass(frozen=True)
class ObjectDetectorConfig(HandlerConfig):
    """The `handler:` section of a detection archive."""

    detector: DetectorConfig = field(default_factory=DetectorConfig)


class Detection(NamedTuple):
    """One detection on the host: class id, score and (x1, y1, x2, y2) in original pixels."""

    class_id: int
    score: float
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class DetectionParams(DetectorConfig):
    """`handler.detector` as post-processing reads it: class thresholds resolved to class ids."""

    class_thresholds: Mapping[int, float] = field(default_factory=dict)  # type: ignore[assignment]

    @classmethod
    def resolve(cls, config: DetectorConfig, labels: Mapping[int, str], path: str = "handler.detector") -> DetectionParams:
        """`config` with its class_thresholds (keyed by id or label) keyed by class id."""
        # The detector's keys only: a task's section may extend DetectorConfig with its own.
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
        values["class_thresholds"] = resolve_class_thresholds(config.class_thresholds, labels, path)
        return cls(**values)


# -- recognising the model's output ----------------------------------------------------------------


def unwrap_outputs(outputs: Any) -> Any:
    """The detections part of what a model returned.

    Ultralytics' eager models return (predictions, features) and scripted torchvision detectors
    (losses, detections): keep the predictions. A DETR-family output (logits and boxes, as a
    tuple or a dict) comes back as the tuple (logits, boxes).
    """
    detr = detr_pair(outputs)
    if detr is not None:
        return detr
    if isinstance(outputs, (tuple, list)) and len(outputs) == 2 and isinstance(outputs[0], dict) \
            and isinstance(outputs[1], list):
        return outputs[1]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    return outputs


def describe(outputs: Any) -> str:
    """A short description of a model output's type and shape, for error messages."""
    if isinstance(outputs, torch.Tensor):
        return f"a tensor of shape {list(outputs.shape)}"
    if isinstance(outputs, (tuple, list)):
        inner = ", ".join(describe(o) for o in outputs[:3]) + (", ..." if len(outputs) > 3 else "")
        return f"a {type(outputs).__name__} of {len(outputs)} ({inner})"
    if isinstance(outputs, dict):
        return "a dict with " + ", ".join(f"{k}: {describe(v)}" for k, v in outputs.items())
    return f"a {type(outputs).__name__}"


def detr_pair(outputs: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(logits [B, Q, C], boxes [B, Q, 4]) when `outputs` is a DETR-family output, else None.

    A dict (or Hugging Face ModelOutput) with logits/pred_logits and pred_boxes/boxes, or a tuple or
    list whose first two elements are 3-d tensors with the same B and Q, one of them with a last
    dimension of 4 (the boxes; (logits, boxes) when both have 4).
    """
    if isinstance(outputs, Mapping):
        logits = next((outputs[k] for k in _DETR_LOGITS if k in outputs), None)
        boxes = next((outputs[k] for k in _DETR_BOXES if k in outputs), None)
        pair = (logits, boxes)
    elif isinstance(outputs, (tuple, list)) and len(outputs) >= 2:
        first, second = outputs[0], outputs[1]
        is_box = isinstance(second, torch.Tensor) and second.dim() == 3 and second.shape[-1] == 4
        pair = (first, second) if is_box else (second, first)
    else:
        return None
    logits, boxes = pair
    if not all(isinstance(t, torch.Tensor) and t.dim() == 3 for t in pair):
        return None
    assert isinstance(logits, torch.Tensor) and isinstance(boxes, torch.Tensor)
    if boxes.shape[-1] != 4 or logits.shape[:2] != boxes.shape[:2] or logits.shape[-1] < 1:
        return None
    return logits, boxes


def _is_detr(outputs: Any) -> bool:
    """The (logits, boxes) pair, or, stated explicitly, Ultralytics' RT-DETR [B, Q, 6]."""
    return detr_pair(outputs) is not None or _could_be_xyxy(outputs)


def resolve_detr_activation(activation: str, logit_classes: int, num_labels: int) -> str:
    """`detr_activation` auto -> softmax when the logits have one class more than the labels (DETR's
    "no object"), else sigmoid (RT-DETR, D-FINE: one logit per class)."""
    if activation != "auto":
        return activation
    return "softmax" if num_labels and logit_classes == num_labels + 1 else "sigmoid"


def _is_torchvision(outputs: Any) -> bool:
    return isinstance(outputs, (list, tuple)) and all(
        isinstance(o, dict) and {"boxes", "labels", "scores"} <= set(o) for o in outputs
    )


def _is_yolo(outputs: Any) -> bool:
    """[B, 4+C, N] with at least one class: the form as stated, whatever N is."""
    return isinstance(outputs, torch.Tensor) and outputs.dim() == 3 and outputs.shape[1] >= 5


def _could_be_yolo(outputs: Any) -> bool:
    """`auto`'s reading of yolo: also more candidates than channels (N > 4+C), as in every export
    at its usual input size; a smaller N is yolo only when the option says so."""
    return _is_yolo(outputs) and outputs.shape[1] < outputs.shape[2]


def _could_be_xyxy(outputs: Any) -> bool:
    return isinstance(outputs, torch.Tensor) and outputs.dim() == 3 and outputs.shape[2] == 6


def detect_output_format(outputs: Any) -> str:
    """Tell the output format from a (unwrapped) model output; raises ModelLoadError when the shape
    fits none of them or fits two, saying how `auto` read it."""
    if _is_torchvision(outputs) and len(outputs) > 0:
        return "torchvision"
    if detr_pair(outputs) is not None:
        return "detr"
    candidates = [name for name, fits in (("yolo", _could_be_yolo(outputs)),
                                          ("xyxy_score_class", _could_be_xyxy(outputs))) if fits]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise ModelLoadError(
            f"object detector: {_OPTION} is auto and the model returned {describe(outputs)}, which "
            f"reads as yolo [B, 4+C, N] and as xyxy_score_class [B, N, 6]; set {_OPTION} to yolo or "
            f"xyxy_score_class"
        )
    if _is_yolo(outputs):
        _, channels, candidates_n = outputs.shape
        raise ModelLoadError(
            f"object detector: {_OPTION} is auto and the model returned {describe(outputs)}: auto reads "
            f"[B, A, N] as yolo [B, 4+C, N] only when N > A (more candidates than channels), and here "
            f"N = {candidates_n} <= A = {channels}, so it is read as no form; if the model is a yolo "
            f"export ({channels - 4} classes, {candidates_n} candidates), set {_OPTION} to yolo"
        )
    raise ModelLoadError(
        f"object detector: {_OPTION} is auto and the model returned {describe(outputs)}, which is none "
        f"of the output forms {_FORMS}; export the model in one of them and set {_OPTION} "
        f"(auto | {' | '.join(OUTPUT_FORMATS)})"
    )


def check_output(outputs: Any, output_format: str, batch: int, num_labels: int = 0) -> None:
    """Raise ModelLoadError, naming the shape and the option, unless `outputs` is `output_format`
    for a batch of `batch` images.

    A stated form is taken as stated: only its structure is checked (and, for yolo, C against the
    archive's `num_labels` when it has labels), never `auto`'s N > 4+C heuristic.
    """
    fits = {"yolo": _is_yolo, "xyxy_score_class": _could_be_xyxy, "torchvision": _is_torchvision, "detr": _is_detr}
    if output_format not in fits:
        raise ConfigError(f"{_OPTION}: {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if not fits[output_format](outputs):
        raise ModelLoadError(
            f"object detector: {_OPTION} is {output_format} but the model returned {describe(outputs)}; "
            f"expected {_FORMS}: set {_OPTION} to the form the model returns (or auto)"
        )
    pair = detr_pair(outputs) if output_format == "detr" else None
    if (len(pair[0]) if pair is not None else len(outputs)) != batch:
        raise ModelLoadError(
            f"object detector: the model returned {describe(outputs)} for a batch of {batch} images; "
            f"the first dimension must be the batch"
        )
    if output_format == "yolo" and num_labels and outputs.shape[1] - 4 != num_labels:
        raise ModelLoadError(
            f"object detector: the model returned {describe(outputs)}, read as yolo [B, 4+C, N] with "
            f"C = {outputs.shape[1] - 4} classes, but the archive's {LABELS_FILE} has {num_labels} "
            f"labels: give one label per class (index 0..C-1), or check {_OPTION}"
        )


# -- decoding: one (boxes, scores, classes) per image, boxes in model-input pixels ----------------


def decode(
    outputs: Any, output_format: str, input_size: tuple[int, int] = (1, 1), detr_activation: str = "sigmoid",
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each image's candidates (boxes [N, 4] x1, y1, x2, y2 in model-input pixels, scores [N],
    classes [N] int64) on the model's device. `input_size` (width, height) scales detr's normalised
    boxes; `detr_activation` is sigmoid or softmax (resolved, not auto)."""
    if output_format == "detr":
        return _decode_detr(outputs, input_size, detr_activation)
    if output_format == "yolo":
        pred = outputs.float().transpose(1, 2)  # [B, N, 4+C]
        cx, cy, w, h = pred[..., 0], pred[..., 1], pred[..., 2], pred[..., 3]
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        scores, classes = pred[..., 4:].max(dim=-1)  # the best class of each candidate, as Ultralytics
        return list(zip(boxes, scores, classes, strict=True))
    if output_format == "xyxy_score_class":
        pred = outputs.float()
        return list(zip(pred[..., :4], pred[..., 4], pred[..., 5].round().long(), strict=True))
    return [(o["boxes"].float(), o["scores"].float(), o["labels"].long()) for o in outputs]


def _decode_detr(
    outputs: Any, input_size: tuple[int, int], activation: str,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    pair = detr_pair(outputs)
    if pair is None:  # Ultralytics' RT-DETR: [B, Q, 6] cx, cy, w, h (normalised), score, class
        pred = outputs.float()
        boxes, scores, classes = pred[..., :4], pred[..., 4], pred[..., 5].round().long()
    else:
        logits, boxes = pair[0].float(), pair[1].float()
        if activation == "softmax":  # the last class is "no object": each query its best other class
            scores, classes = logits.softmax(-1)[..., :-1].max(-1)
        else:  # every (query, class) pair a candidate, as Hugging Face's RT-DETR post-processing
            b, q, c = logits.shape
            scores = logits.sigmoid().reshape(b, q * c)
            classes = torch.arange(c, device=logits.device).repeat(q).expand(b, -1)
            boxes = boxes[:, :, None, :].expand(b, q, c, 4).reshape(b, q * c, 4)
    width, height = input_size
    cx, cy, w, h = boxes[..., 0] * width, boxes[..., 1] * height, boxes[..., 2] * width, boxes[..., 3] * height
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    return list(zip(xyxy, scores, classes, strict=True))


@dataclass
class _Candidates:
    """Every image's candidates in one set, on the model's device."""

    boxes: torch.Tensor    # [M, 4] original pixels, unclipped (for NMS)
    clipped: torch.Tensor  # [M, 4] original pixels, clipped to the image (for the answer)
    scores: torch.Tensor   # [M]
    classes: torch.Tensor  # [M] int64
    image: torch.Tensor    # [M] int64, row of the batch
    source: torch.Tensor   # [M] int64, position in the concatenation of every image's decoded candidates

    def take(self, index: torch.Tensor) -> _Candidates:
        return _Candidates(self.boxes[index], self.clipped[index], self.scores[index],
                           self.classes[index], self.image[index], self.source[index])


def _gather(decoded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], geometry: list[Geometry]) -> _Candidates:
    # Mapping every candidate (a few thousand boxes, elementwise) costs less than splitting the
    # survivors per image later, which would need their counts on the host.
    boxes, clipped, scores, classes, image = [], [], [], [], []
    for i, ((b, s, c), g) in enumerate(zip(decoded, geometry, strict=True)):
        boxes.append(g.boxes_to_original(b, clip=False))
        clipped.append(g.boxes_to_original(b, clip=True))
        scores.append(s)
        classes.append(c)
        image.append(torch.full_like(c, i))
    flat_classes = torch.cat(classes)
    source = torch.arange(len(flat_classes), device=flat_classes.device)
    return _Candidates(torch.cat(boxes), torch.cat(clipped), torch.cat(scores), flat_classes, torch.cat(image), source)


def _thresholds(classes: torch.Tensor, params: DetectionParams) -> torch.Tensor:
    """The minimum score of each candidate's class."""
    thr = torch.full(classes.shape, params.score_threshold, dtype=torch.float32, device=classes.device)
    for class_id, value in params.class_thresholds.items():
        thr = torch.where(classes == class_id, value, thr)
    return thr


def _nms(c: _Candidates, params: DetectionParams) -> torch.Tensor:
    """Indices kept by NMS within each image (and class unless class_agnostic), best score first."""
    groups = c.image if params.class_agnostic else c.image * _CLASS_SPAN + c.classes
    # batched_nms separates groups by offsetting boxes by group * (largest coordinate + 1): in
    # float64 those offsets leave the coordinates exact, in float32 they would round them off.
    return batched_nms(c.boxes.double(), c.scores.double(), groups, params.iou_threshold)


def _per_image_top(c: _Candidates, order: torch.Tensor, max_detections: int) -> torch.Tensor:
    """`order` (best score first) regrouped by image, keeping at most `max_detections` per image."""
    order = order[torch.argsort(c.image[order], stable=True)]  # by image, score order kept inside
    image = c.image[order]
    rank = torch.arange(len(order), device=order.device) - torch.searchsorted(image, image)
    return order[rank < max_detections]


def select(outputs: Any, geometry: list[Geometry], output_format: str, params: DetectionParams) -> torch.Tensor:
    """The batch's detections as one [K, 7] float64 tensor on the model's device.

    Columns: image row, class id, score, x1, y1, x2, y2 (original pixels, clipped); rows grouped by
    image in batch order, best score first within each image.
    """
    input_size = geometry[0].input_size if geometry else (1, 1)
    decoded = decode(outputs, output_format, input_size, params.detr_activation)
    c = keep_candidates(decoded, geometry, params, params.runs_nms(output_format))
    return torch.cat([
        c.image[:, None].double(), c.classes[:, None].double(), c.scores[:, None].double(), c.clipped.double(),
    ], dim=1)


def keep_candidates(
    decoded: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], geometry: list[Geometry],
    params: DetectionParams, nms: bool,
) -> _Candidates:
    """The decoded candidates that pass their class's threshold, NMS (when `nms`) and
    max_detections, on the model's device: grouped by image in batch order, best score first within
    each; `source` indexes the concatenation of `decoded` (a task's per-candidate extras, such as
    mask coefficients or keypoints, follow it)."""
    c = _gather(decoded, geometry)
    # A score of 0 is no detection (the padding rows of [B, N, 6] outputs), whatever the threshold.
    keep = (c.scores >= _thresholds(c.classes, params)) & (c.scores > 0)
    c = c.take(torch.nonzero(keep).squeeze(1))
    order = _nms(c, params) if nms else torch.argsort(c.scores, descending=True, stable=True)
    return c.take(_per_image_top(c, order, params.max_detections))


def detect(outputs: Any, geometry: list[Geometry], output_format: str, params: DetectionParams) -> list[list[Detection]]:
    """Model outputs for a batch -> each image's detections on the host, best first.

    `outputs` must already be in `output_format` (see `check_output`); `geometry[i]` maps image i's
    model-input pixels to its original pixels.
    """
    rows = select(outputs, geometry, output_format, params).cpu().tolist()  # the one host transfer
    per_image: list[list[Detection]] = [[] for _ in geometry]
    for image, class_id, score, x1, y1, x2, y2 in rows:
        per_image[int(image)].append(Detection(int(class_id), score, (x1, y1, x2, y2)))
    return per_image


# -- config ----------------------------------------------------------------------------------------


def resolve_class_thresholds(
    raw: Mapping[str, float], labels: Mapping[int, str], path: str = "handler.detector",
) -> dict[int, float]:
    """`handler.detector.class_thresholds` keyed by class id: a key that is an integer is an id,
    any other key a label of `index_to_name.json` (every class with that label). A class named both
    by its id and by its label takes the id's value."""
    by_label: dict[str, list[int]] = {}
    for class_id, name in labels.items():
        by_label.setdefault(name, []).append(class_id)
    resolved: dict[int, float] = {}
    by_id: dict[int, float] = {}
    for key, value in raw.items():
        text = str(key).strip()
        if text.lstrip("-").isdigit():
            by_id[int(text)] = value
        elif text in by_label:
            resolved.update({class_id: value for class_id in by_label[text]})
        else:
            known = ", ".join(sorted(by_label)[:10]) + (", ..." if len(by_label) > 10 else "")
            where = f"labels in {LABELS_FILE}: {known}" if by_label else f"the archive has no {LABELS_FILE}"
            raise ConfigError(
                f"{path}.class_thresholds.{key}: not a class id and not a label ({where}); "
                f"key it by class id, e.g. '3', or by one of the labels"
            )
    resolved.update(by_id)
    return resolved


# -- the handler -----------------------------------------------------------------------------------


class ObjectDetector(VisionHandler):
    """Boxes in original pixels from yolo, xyxy_score_class or torchvision detector outputs."""

    task = "object-detection"
    config_class = ObjectDetectorConfig
    config: ObjectDetectorConfig
    # Detectors take the whole image letterboxed at 0..1 scale, as Ultralytics YOLO and
    # torchvision's detection models expect.
    task_defaults = {"preprocess": {"geometry": "letterbox", "input_size": 640,
                                    "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}
    table = TableSpec("detections", ("class_id", "label", "score", *BOX_COLUMNS))

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, str] = {}
        self.params = DetectionParams()
        self.output_format: str | None = None
        """The resolved output form; None until `auto` has seen the first output."""

    def load_assets(self, model_dir: Path) -> None:
        self.labels = load_archive_labels(model_dir, logger)
        cfg = self.config.detector
        self.params = DetectionParams.resolve(cfg, self.labels)
        self.output_format = None if cfg.output_format == "auto" else cfg.output_format

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        outputs = unwrap_outputs(outputs)
        if self.output_format is None:
            self.output_format = detect_output_format(outputs)
            logger.info("%s auto: the model returns %s, read as %s (NMS here: %s)", _OPTION,
                        describe(outputs), self.output_format, self.params.runs_nms(self.output_format))
        check_output(outputs, self.output_format, len(geometry), len(self.labels))
        if self.output_format == "detr" and self.params.detr_activation == "auto":
            pair = detr_pair(outputs)
            activation = resolve_detr_activation("auto", pair[0].shape[-1], len(self.labels)) if pair else "sigmoid"
            logger.info("handler.detector.detr_activation auto: %s (%s, %d labels)", activation,
                        describe(outputs), len(self.labels))
            self.params = dataclasses.replace(self.params, detr_activation=activation)
        per_image = detect(outputs, geometry, self.output_format, self.params)
        return [self.result(dets, g) for dets, g in zip(per_image, geometry, strict=True)]

    def result(self, detections: list[Detection], geometry: Geometry) -> dict[str, Any]:
        """One image's response body."""
        return {
            "detections": [
                {
                    "class_id": d.class_id,
                    "label": self.labels.get(d.class_id, str(d.class_id)),
                    "score": round(d.score, 6),
                    "box": [round(v, 2) for v in d.box],
                }
                for d in detections
            ],
            "image_size": list(geometry.original_size),
        }

    def video_summary(self) -> VideoSummary:
        """A clip's summary: per class, frames seen, best score, first and last time (handlers/video/summary.py)."""
        return DetectionSummary()

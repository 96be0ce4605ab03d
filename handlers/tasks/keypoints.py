"""Keypoints (pose, landmarks): per object a box, class, score and K points in original pixels.

Response body for each request (200):

    {"image_size": [width, height],
     "keypoint_names": ["nose", "left_eye", ...], "skeleton": [[15, 13], [13, 11], ...],
     "instances": [{"class_id": 0, "label": "person", "score": 0.91, "box": [x1, y1, x2, y2],
                    "keypoints": [[x, y, score], ...]}, ...]}

Instances, boxes, thresholds, NMS and max_detections are the object detector's
(handlers/tasks/detector.py; the same keys under `handler.keypoints`). `keypoints` lists the
model's K points in its order, each `[x, y, score]` in original pixels (EXIF orientation applied,
continuous coordinates, clipped to the image as Ultralytics clips them, 2 decimals; score 6
decimals, `null` for models whose points have no score). `keypoint_names` and `skeleton` (pairs of
0-based point indices) come from the archive's `keypoints.json` (`tsgpu archive --extra-files
keypoints.json`), in every response unless `handler.keypoints.schema_in_response: false`; without
the file they are absent.

    keypoints.json   {"names": ["nose", "left_eye", ...], "skeleton": [[15, 13], [13, 11], ...]}

Model outputs (`handler.keypoints.output_format`; `auto` decides from the first output):

    yolo_pose    [B, 4+C+K*D, N]: cx, cy, w, h, C class scores, then K points of D values (x, y in
                 model-input pixels and, for D = 3, a visibility score) per candidate (Ultralytics'
                 pose export, C = 1 for person pose); NMS runs here. K comes from keypoints.json
                 (its names), else from `num_keypoints`, else C from the archive's labels, else C = 1.
    torchvision  list of B dicts with boxes, labels, scores, keypoints [K_obj, K, 3] (x, y,
                 visibility) and keypoints_scores [K_obj, K] (torchvision's Keypoint R-CNN in eval
                 mode; its scores are heatmap logits, not probabilities, answered as they are)

Everything up to the answer runs on the model's device for the whole batch; the kept objects'
boxes and points reach the host in one transfer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..base import VisionHandler
from ..config import HandlerConfig
from ..errors import ConfigError, ModelLoadError
from ..labels import load_archive_labels
from ..preprocess import Geometry
from .detector import DetectionParams, DetectorConfig, decode, describe, keep_candidates
from .instances import nms_family, object_entry

logger = logging.getLogger(__name__)

KEYPOINTS_FILE = "keypoints.json"
OUTPUT_FORMATS = ("yolo_pose", "torchvision")
_OPTION = "handler.keypoints.output_format"
_FORMS = "yolo_pose [B, 4+C+K*D, N] or torchvision list[dict(boxes, labels, scores, keypoints)]"
_TASK = "keypoints"


@dataclass(frozen=True)
class KeypointsConfig(DetectorConfig):
    """`handler.keypoints`: the object detector's keys (its detr_activation does not apply) plus
    how to read the points."""

    output_formats: ClassVar[tuple[str, ...]] = OUTPUT_FORMATS

    num_keypoints: int = 0
    """K for yolo_pose when keypoints.json is absent (0: from the labels, else C = 1)."""
    keypoint_dims: int = 3
    """D for yolo_pose: 3 (x, y, score) or 2 (x, y; scores answered as null)."""
    schema_in_response: bool = True
    """Put keypoints.json's names and skeleton in every response."""

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.keypoint_dims not in (2, 3):
            raise ConfigError(f"{path}.keypoint_dims: must be 2 (x, y) or 3 (x, y, score), got {self.keypoint_dims}")
        if self.num_keypoints < 0:
            raise ConfigError(f"{path}.num_keypoints: must be >= 0, got {self.num_keypoints}")


@dataclass(frozen=True)
class KeypointDetectorConfig(HandlerConfig):
    """The `handler:` section of a keypoints archive."""

    keypoints: KeypointsConfig = field(default_factory=KeypointsConfig)


@dataclass(frozen=True)
class KeypointSchema:
    """keypoints.json: the points' names and the skeleton's links (pairs of 0-based indices)."""

    names: tuple[str, ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()


def load_schema(path: Path) -> KeypointSchema:
    """The archive's keypoints.json, or an empty schema when it has none; ConfigError naming the
    file and the fix on a bad one."""
    if not path.is_file():
        return KeypointSchema()
    fix = 'expected {"names": ["nose", ...], "skeleton": [[0, 1], ...]} (skeleton optional, 0-based indices)'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path.name}: not readable JSON ({exc}); {fix}") from None
    names = data.get("names") if isinstance(data, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path.name}: 'names' must be a non-empty list of strings; {fix}")
    links = data.get("skeleton", [])
    ok = isinstance(links, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(i, int) and 0 <= i < len(names) for i in p)
        for p in links
    )
    if not ok:
        raise ConfigError(f"{path.name}: 'skeleton' must be a list of [i, j] pairs of indices 0..{len(names) - 1} "
                          f"into 'names'; {fix}")
    return KeypointSchema(tuple(names), tuple((int(a), int(b)) for a, b in links))


# -- recognising the model's output ----------------------------------------------------------------


def _is_torchvision(outputs: Any) -> bool:
    return isinstance(outputs, (list, tuple)) and len(outputs) > 0 and all(
        isinstance(o, dict) and {"boxes", "labels", "scores", "keypoints"} <= set(o) for o in outputs
    )


def _is_yolo_pose(outputs: Any) -> bool:
    return isinstance(outputs, torch.Tensor) and outputs.dim() == 3 and outputs.shape[1] >= 7


def unwrap_pose(outputs: Any) -> Any:
    """Ultralytics' eager modules return (predictions, extras): keep the predictions."""
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    return outputs


def detect_format(outputs: Any) -> str:
    if _is_torchvision(outputs):
        return "torchvision"
    if _is_yolo_pose(outputs) and outputs.shape[1] < outputs.shape[2]:
        return "yolo_pose"
    raise ModelLoadError(
        f"{_TASK}: {_OPTION} is auto and the model returned {describe(outputs)}, which is none of the output "
        f"forms {_FORMS} (auto reads [B, A, N] as yolo_pose only when N > A); export the model in one of "
        f"them and set {_OPTION}"
    )


def pose_layout(channels: int, num_keypoints: int, dims: int, num_labels: int) -> tuple[int, int]:
    """(C, K) of a yolo_pose output with `channels` = 4 + C + K * dims; ModelLoadError when they do not add up."""
    if num_keypoints:
        classes = channels - 4 - num_keypoints * dims
        where = f"K = {num_keypoints} points ({KEYPOINTS_FILE} or num_keypoints)"
    else:
        classes = num_labels or 1
        num_keypoints, rest = divmod(channels - 4 - classes, dims)
        where = f"C = {classes} classes ({'index_to_name.json' if num_labels else 'the default'})"
        if rest:
            num_keypoints = 0
    if classes < 1 or num_keypoints < 1 or channels != 4 + classes + num_keypoints * dims:
        raise ModelLoadError(
            f"{_TASK}: yolo_pose [B, 4+C+K*{dims}, N] has {channels} channels, which {where} do not fill; "
            f"ship {KEYPOINTS_FILE} with the points' names, set handler.keypoints.num_keypoints, or check "
            f"handler.keypoints.keypoint_dims"
        )
    return classes, num_keypoints


def check_output(outputs: Any, output_format: str, batch: int) -> None:
    fits = _is_yolo_pose(outputs) if output_format == "yolo_pose" else _is_torchvision(outputs)
    if not fits:
        raise ModelLoadError(
            f"{_TASK}: {_OPTION} is {output_format} but the model returned {describe(outputs)}; expected "
            f"{_FORMS}: set {_OPTION} to the form the model returns (or auto)"
        )
    if len(outputs) != batch:
        raise ModelLoadError(f"{_TASK}: the model returned {describe(outputs)} for a batch of {batch} images; "
                             f"the first dimension must be the batch")


# -- points ----------------------------------------------------------------------------------------


def points_to_original(points: torch.Tensor, image: torch.Tensor, geometry: list[Geometry]) -> torch.Tensor:
    """[K_obj, K, 2] points in model-input pixels of the images `image` [K_obj] -> original pixels,
    clipped to each image, on their device."""
    def column(values: list[float]) -> torch.Tensor:
        return points.new_tensor(values, dtype=torch.float64)[image][:, None]

    sx, sy = column([g.scale[0] for g in geometry]), column([g.scale[1] for g in geometry])
    x = column([g.source[0] for g in geometry]) + (points[..., 0].double() - column([g.target[0] for g in geometry])) / sx
    y = column([g.source[1] for g in geometry]) + (points[..., 1].double() - column([g.target[1] for g in geometry])) / sy
    x = torch.minimum(x.clamp(min=0), column([g.original_size[0] for g in geometry]))
    y = torch.minimum(y.clamp(min=0), column([g.original_size[1] for g in geometry]))
    return torch.stack([x, y], dim=-1)


# -- the handler -----------------------------------------------------------------------------------


class KeypointDetector(VisionHandler):
    """Boxes and keypoints in original pixels from Ultralytics yolo_pose or torchvision Keypoint R-CNN outputs."""

    task = "keypoints"
    config_class = KeypointDetectorConfig
    config: KeypointDetectorConfig
    # The whole image letterboxed at 0..1 scale, as YOLO-pose and Keypoint R-CNN expect.
    task_defaults = {"preprocess": {"geometry": "letterbox", "input_size": 640,
                                    "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}
    # No result table: its rows are flat columns, and each object carries a list of points.
    table = None

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, str] = {}
        self.schema = KeypointSchema()
        self.params = DetectionParams()
        self.output_format: str | None = None

    def load_assets(self, model_dir: Path) -> None:
        self.labels = load_archive_labels(model_dir, logger)
        self.schema = load_schema(model_dir / KEYPOINTS_FILE)
        cfg = self.config.keypoints
        self.params = DetectionParams.resolve(cfg, self.labels, "handler.keypoints")
        self.output_format = None if cfg.output_format == "auto" else cfg.output_format

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        outputs = unwrap_pose(outputs)
        if self.output_format is None:
            self.output_format = detect_format(outputs)
            logger.info("%s auto: the model returns %s, read as %s", _OPTION, describe(outputs), self.output_format)
        fmt = self.output_format
        check_output(outputs, fmt, len(geometry))
        decoded, points = self.split(outputs, fmt)
        if self.schema.names and points.shape[1] != len(self.schema.names):
            raise ModelLoadError(f"{_TASK}: the model returns {points.shape[1]} points per object but the archive's "
                                 f"{KEYPOINTS_FILE} names {len(self.schema.names)}: give one name per point")
        c = keep_candidates(decoded, geometry, self.params, self.params.runs_nms(nms_family(fmt)))
        kept = points[c.source]  # [K_obj, K, 3]
        xy = points_to_original(kept[..., :2], c.image, geometry)
        table = torch.cat([c.image[:, None].double(), c.classes[:, None].double(), c.scores[:, None].double(),
                           c.clipped.double(), torch.cat([xy, kept[..., 2:].double()], -1).flatten(1)], dim=1)
        results = [self.empty(g) for g in geometry]
        dims = 3 if fmt == "torchvision" or self.config.keypoints.keypoint_dims == 3 else 2
        for row in table.cpu().tolist():  # the one host transfer
            image, class_id, score = int(row[0]), int(row[1]), row[2]
            pts = row[7:]
            entry = object_entry(self.labels, class_id, score, tuple(row[3:7]))
            entry["keypoints"] = [[round(pts[i], 2), round(pts[i + 1], 2), round(pts[i + 2], 6) if dims == 3 else None]
                                  for i in range(0, len(pts), 3)]
            results[image]["instances"].append(entry)
        return list(results)

    def split(self, outputs: Any, fmt: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
        """(the detector's decoded candidates, every candidate's points [sum N, K, 3] in model-input
        pixels: x, y and a score, 1 where the model has none)."""
        if fmt == "torchvision":
            points = torch.cat([self._torchvision_points(o) for o in outputs])
            return decode(outputs, "torchvision"), points
        dims = self.config.keypoints.keypoint_dims
        classes, k = pose_layout(outputs.shape[1], len(self.schema.names) or self.config.keypoints.num_keypoints,
                                 dims, len(self.labels))
        raw = outputs[:, 4 + classes:].float().transpose(1, 2).reshape(-1, k, dims)  # [B*N, K, D]
        if dims == 2:
            raw = torch.cat([raw, torch.ones_like(raw[..., :1])], -1)
        return decode(outputs[:, : 4 + classes], "yolo"), raw

    @staticmethod
    def _torchvision_points(o: dict[str, torch.Tensor]) -> torch.Tensor:
        kp = o["keypoints"].float()
        scores = o.get("keypoints_scores")
        score = scores.float()[..., None] if scores is not None else kp[..., 2:3]
        return torch.cat([kp[..., :2], score], -1)

    def empty(self, geometry: Geometry) -> dict[str, Any]:
        """One image's response before its instances."""
        out: dict[str, Any] = {"image_size": list(geometry.original_size)}
        if self.config.keypoints.schema_in_response and self.schema.names:
            out["keypoint_names"] = list(self.schema.names)
            out["skeleton"] = [list(p) for p in self.schema.skeleton]
        out["instances"] = []
        return out

"""Semantic segmentation: per-pixel classes in the original image's pixels, as COCO RLE or a PNG.

The model returns logits `[B, C, H, W]` over the model input (or a dict with them under `out`, as
torchvision's segmentation models do; a tuple's first element also works). On the model's device,
each image's logits become one label map of the original (EXIF-oriented) image's size, through its
`Geometry`: letterbox padding is dropped, and pixels the model never saw (outside a center crop)
belong to no class.

    handler.segmenter.interpolation: nearest   argmax in model-input pixels, then each original
                                               pixel takes the label under its centre (exact)
                                     bilinear  logits resampled bilinearly onto the original grid
                                               (in row chunks, to bound memory), then argmax:
                                               smoother boundaries when the image is larger than
                                               the model input
    handler.segmenter.min_area: 0              drop a class covering fewer original pixels
    handler.segmenter.output: rle | png

Response (200), `output: rle` (the default): one entry per class present, sorted by class id,

    {"image_size": [width, height],
     "segments": [{"class_id": 1, "label": "person", "area": 5120,
                   "mask": {"size": [height, width], "counts": "<COCO compressed RLE>"}}]}

`mask` is what `pycocotools.mask.encode` returns, with `counts` as a str;
`pycocotools.mask.decode({"size": ..., "counts": counts.encode()})` gives the [height, width]
uint8 mask. `output: png`:

    {"image_size": [width, height], "label_map_png": "<base64 PNG>",
     "classes": [{"class_id": 1, "label": "person", "area": 5120}]}

a grayscale PNG of the original size whose pixel values are class ids: 8-bit (mode L) for models
with up to 255 classes, where 255 means "no class"; 16-bit (mode I;16) above that, where 65535
means "no class". Pixels the model did not see and classes dropped by `min_area` carry the
"no class" value.

Labels come from the archive's `index_to_name.json` (the class id as a string when absent).
Only one label map per image crosses from the device to the host (uint8, or int16 above 255
classes); areas, RLE and PNG are computed on the host from it.
"""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..base import VisionHandler
from ..config import HandlerConfig, check_choice
from ..errors import ConfigError, ModelLoadError
from ..labels import load_archive_labels
from ..preprocess import Geometry
from ..video.summary import SegmentationSummary, VideoSummary
from .masks import coco_mask

logger = logging.getLogger(__name__)

#: Bound on the floats of one bilinear chunk of resampled logits ([C, rows, width]).
CHUNK_FLOATS = 64 * 1024 * 1024
#: Most classes a model may have: label maps are int16 on the device above 255 classes.
MAX_CLASSES = 32767
_SHAPE_HINT = (
    "export a model that returns logits [batch, classes, height, width] (or a dict with them under "
    "'out'), or override SemanticSegmenter.forward to return them"
)


def _coco_mask() -> ModuleType:
    return coco_mask("semantic segmentation")


@dataclass(frozen=True)
class SegmenterConfig:
    """`handler.segmenter`: per-pixel classes mapped back to the original image."""

    interpolation: str = "nearest"
    """How logits reach original pixels: nearest (label map) | bilinear (on logits, then argmax)."""
    min_area: int = 0
    """Drop a class whose mask has fewer original pixels than this."""
    output: str = "rle"
    """rle (COCO compressed RLE per class) | png (a base64 PNG label map)."""

    def validate(self, path: str) -> None:
        check_choice(self.interpolation, ("nearest", "bilinear"), f"{path}.interpolation")
        check_choice(self.output, ("rle", "png"), f"{path}.output")
        if self.min_area < 0:
            raise ConfigError(f"{path}.min_area: must be >= 0, got {self.min_area}")


@dataclass(frozen=True)
class SemanticSegmenterConfig(HandlerConfig):
    """The `handler:` section of a semantic-segmentation archive."""

    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)


class SemanticSegmenter(VisionHandler):
    """Per-class masks (COCO RLE) or a PNG label map over a model that returns [B, C, H, W] logits."""

    task = "semantic-segmentation"
    config_class = SemanticSegmenterConfig
    config: SemanticSegmenterConfig
    # ImageNet normalisation (torchvision's segmentation models), but the whole image.
    task_defaults = {"preprocess": {"geometry": "letterbox", "input_size": 520}}

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, str] = {}

    def load_assets(self, model_dir: Path) -> None:
        self.labels = load_archive_labels(model_dir, logger)
        _coco_mask()  # fail the load, not the first request, when it is missing

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        logits = self.logits(outputs, geometry)
        # max(dim).indices is argmax (first index on ties); on CPU it is several times faster.
        labels_in = logits.max(1).indices if self.config.segmenter.interpolation == "nearest" else None
        results = []
        for i, geo in enumerate(geometry):
            if labels_in is not None:
                label_map = nearest_label_map(labels_in[i], geo, logits.shape[1])
            else:
                label_map = bilinear_label_map(logits[i], geo)
            # The one device->host transfer of this image, transposed so that the host array is the
            # Fortran-ordered [height, width] that pycocotools encodes without a copy.
            columns = label_map.t().contiguous().cpu().numpy()
            results.append(self.respond(columns, geo, logits.shape[1]))
        return results

    # -- device side -------------------------------------------------------------------------------

    def logits(self, outputs: Any, geometry: list[Geometry]) -> torch.Tensor:
        """The [B, C, H_in, W_in] logits of the model's outputs; raises ModelLoadError naming the shape."""
        logits = outputs
        if isinstance(outputs, dict):
            if "out" not in outputs:
                raise ModelLoadError(
                    f"semantic segmentation: the model returned a dict with keys {sorted(outputs)} and no "
                    f"'out'; {_SHAPE_HINT}"
                )
            logits = outputs["out"]
        elif isinstance(outputs, (tuple, list)) and outputs:
            logits = outputs[0]
        if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or not logits.is_floating_point():
            got = _describe(logits)
            raise ModelLoadError(f"semantic segmentation expects logits [B, C, H, W], the model returned {got}; {_SHAPE_HINT}")
        n, classes = logits.shape[:2]
        if n != len(geometry):
            raise ModelLoadError(
                f"semantic segmentation: the model returned {n} rows of logits {tuple(logits.shape)} for a "
                f"batch of {len(geometry)} images; {_SHAPE_HINT}"
            )
        if not 1 <= classes <= MAX_CLASSES:
            raise ModelLoadError(
                f"semantic segmentation: logits {tuple(logits.shape)} have {classes} classes; 1..{MAX_CLASSES} are supported"
            )
        in_w, in_h = geometry[0].input_size
        if tuple(logits.shape[2:]) != (in_h, in_w):
            # Models that predict at a stride (SegFormer: 1/4) are upsampled to the model input
            # first, as their own post-processing does; geometry then maps input pixels back.
            logits = F.interpolate(logits, size=(in_h, in_w), mode="bilinear", align_corners=False)
        return logits

    # -- host side ---------------------------------------------------------------------------------

    def respond(self, columns: np.ndarray, geometry: Geometry, classes: int) -> dict[str, Any]:
        """One image's response from its label map, given as the [width, height] C-ordered array."""
        none = no_class(classes)
        flat = columns.reshape(-1)
        counts = np.bincount(flat.view(np.uint16) if flat.dtype == np.int16 else flat, minlength=classes)
        min_area = max(1, self.config.segmenter.min_area)
        present = [c for c in range(classes) if counts[c] >= min_area]
        width, height = geometry.original_size
        if self.config.segmenter.output == "png":
            dropped = [c for c in range(classes) if 0 < counts[c] < min_area]
            return {
                "image_size": [width, height],
                "label_map_png": label_map_png(columns.T, none, dropped),
                "classes": [self._class(c, int(counts[c])) for c in present],
            }
        encode = _coco_mask().encode
        segments = []
        for c in present:
            mask = np.equal(columns, c).view(np.uint8).T  # Fortran-ordered [height, width]
            rle = encode(mask.reshape((height, width, 1), order="F"))[0]
            segments.append({
                **self._class(c, int(counts[c])),
                "mask": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            })
        return {"image_size": [width, height], "segments": segments}

    def _class(self, class_id: int, area: int) -> dict[str, Any]:
        return {"class_id": class_id, "label": self.labels.get(class_id, str(class_id)), "area": area}

    def video_summary(self) -> VideoSummary:
        """A clip's summary: per class, frames present and mean area (handlers/video/summary.py)."""
        return SegmentationSummary()


def no_class(classes: int) -> int:
    """The label-map value of pixels that belong to no class: 255 (uint8) or -1 (int16)."""
    return 255 if classes <= 255 else -1


def _label_dtype(classes: int) -> torch.dtype:
    return torch.uint8 if classes <= 255 else torch.int16


def nearest_label_map(labels_in: torch.Tensor, geometry: Geometry, classes: int) -> torch.Tensor:
    """[H_in, W_in] class ids in model-input pixels -> [height, width] of the original, on the device."""
    small = labels_in.to(_label_dtype(classes))[None]
    return geometry.map_to_original(small, "nearest", fill=no_class(classes))[0]


def bilinear_label_map(logits: torch.Tensor, geometry: Geometry, chunk_floats: int = CHUNK_FLOATS) -> torch.Tensor:
    """[C, H_in, W_in] logits -> bilinear on the original grid -> argmax: [height, width], on the device.

    Rows are resampled in chunks of at most `chunk_floats` logits, so a 4K image with many classes
    needs a bounded amount of memory. Pixels the model did not see come back NaN -> no class.
    """
    classes = logits.shape[0]
    width, height = geometry.original_size
    out = torch.empty((height, width), dtype=_label_dtype(classes), device=logits.device)
    step = max(1, chunk_floats // (classes * width))
    for first in range(0, height, step):
        stop = min(height, first + step)
        chunk = geometry.map_to_original(logits, "bilinear", fill=float("nan"), rows=(first, stop))
        labels = chunk.max(0).indices.to(out.dtype)
        out[first:stop] = labels.masked_fill_(chunk[0].isnan(), no_class(classes))
    return out


def label_map_png(label_map: np.ndarray, none: int, dropped: list[int]) -> str:
    """A [height, width] label map as a base64 PNG: mode L (uint8) or I;16 (int16 as uint16)."""
    from PIL import Image

    pixels = np.array(label_map, order="C")  # a copy: the caller's map stays as it was
    if dropped:
        pixels[np.isin(pixels, dropped)] = none
    # Pillow picks mode L for uint8 and I;16 for uint16 (-1 = no class becomes 65535).
    image = Image.fromarray(pixels.view(np.uint16) if pixels.dtype == np.int16 else pixels)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__

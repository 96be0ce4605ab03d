"""Per-object masks: sampled inside each object's box in original pixels, encoded as COCO RLE.

Instance segmentation (handlers/tasks/instances.py) has one map per kept object over the model
input (Ultralytics' prototype combination at 1/4 of the input, or Mask R-CNN's pasted
probabilities at the input's size). Sampling a whole original-sized map per object would cost
objects x width x height (a 4K image with 100 objects: 3.3 GB of floats), so each object's map is
sampled only over the original pixels its box covers:

    original pixel centre (x + 0.5, y + 0.5) --Geometry--> model-input point --> the map's point
    (the map spans the whole model input at any resolution; bilinear, as Ultralytics' upsampling,
    clamped to the cells that cover the image content, so the letterbox padding is never mixed in)

Pixels whose centre lies outside the box, or that the model never saw (outside a center crop),
are not part of the mask. (Ultralytics' `crop_mask` keeps pixel i when x1 <= i < x2, half a pixel
left of the centre rule: at each box edge the two may differ by one row or column.) The crops of a batch cross to the host in one transfer; on the host
`crop_rle` writes each crop's COCO compressed RLE of the whole image without building a
full-size array (its cost follows the crop, not the image).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..errors import ModelLoadError
from ..preprocess import Geometry


def coco_mask(task: str) -> ModuleType:
    """pycocotools.mask, or ModelLoadError naming the task and the install command."""
    try:
        from pycocotools import mask
    except ImportError as exc:  # a core dependency, but a hand-made environment may lack it
        raise ModelLoadError(f"{task} needs pycocotools for its RLE masks: pip install pycocotools") from exc
    return mask


def box_region(box: tuple[float, float, float, float]) -> tuple[int, int, int, int]:
    """The original pixels a box (x1, y1, x2, y2, continuous, clipped) touches: left, top, right,
    bottom, as whole pixel indices (right and bottom exclusive)."""
    x1, y1, x2, y2 = box
    left, top = math.floor(x1), math.floor(y1)
    return left, top, max(left, math.ceil(x2)), max(top, math.ceil(y2))


def box_crop(
    values: torch.Tensor, geometry: Geometry, box: tuple[float, float, float, float], threshold: float,
    logits: bool = False,
) -> torch.Tensor:
    """One object's mask inside its box: [bottom - top, right - left] bool on `values`' device.

    `values` is [h, w] over the whole model input (any resolution); `threshold` applies to
    probabilities (`logits` = True: sigmoid first); a pixel is in the mask when its value is above
    it, its centre lies inside `box` and the model saw it.
    """
    left, top, right, bottom = box_region(box)
    if right <= left or bottom <= top:
        return torch.zeros((max(0, bottom - top), max(0, right - left)), dtype=torch.bool, device=values.device)
    in_w, in_h = geometry.input_size
    sx, sy = geometry.scale
    dev = values.device
    xs = torch.arange(left, right, device=dev, dtype=torch.float64) + 0.5
    ys = torch.arange(top, bottom, device=dev, dtype=torch.float64) + 0.5
    u = geometry.target[0] + (xs - geometry.source[0]) * sx  # model-input coordinates
    v = geometry.target[1] + (ys - geometry.source[1]) * sy
    map_h, map_w = values.shape
    # Bilinear sampling is separable: along x at the crop's columns, then along y at its rows.
    x0, x1_, fx = _neighbours(u, map_w / in_w, geometry.target[0], geometry.target[2], map_w)
    y0, y1_, fy = _neighbours(v, map_h / in_h, geometry.target[1], geometry.target[3], map_h)
    # Only the map rows the crop reads, found on the host (no device sync): v grows with the row.
    first_row = _lower_cell(geometry.target[1] + (top + 0.5 - geometry.source[1]) * sy, map_h / in_h,
                            geometry.target[1], geometry.target[3])
    last_row = _lower_cell(geometry.target[1] + (bottom - 0.5 - geometry.source[1]) * sy, map_h / in_h,
                           geometry.target[1], geometry.target[3])
    rows = values[first_row:min(last_row + 1, map_h - 1) + 1].float()
    y0, y1_ = y0 - first_row, y1_ - first_row
    across = rows[:, x0] * (1 - fx) + rows[:, x1_] * fx  # [rows, crop width]
    sampled = across[y0] * (1 - fy)[:, None] + across[y1_] * fy[:, None]  # [crop height, crop width]
    # sigmoid(v) > t  <=>  v > log(t / (1 - t)): no sigmoid over the crop
    cut = _logit(threshold) if logits else threshold
    x1, y1, x2, y2 = box
    seen_u = (u >= geometry.target[0]) & (u < geometry.target[2]) & (xs >= x1) & (xs <= x2)
    seen_v = (v >= geometry.target[1]) & (v < geometry.target[3]) & (ys >= y1) & (ys <= y2)
    return (sampled > cut) & seen_v[:, None] & seen_u[None, :]


def _logit(p: float) -> float:
    return -math.inf if p <= 0 else math.inf if p >= 1 else math.log(p / (1 - p))


def _lower_cell(point: float, factor: float, start: int, stop: int) -> int:
    """`_neighbours`' lower cell of one model-input coordinate, on the host."""
    first = round(start * factor)
    last = max(first + 1, round(stop * factor))
    return math.floor(min(max(point * factor, first + 0.5), last - 0.5) - 0.5)


def _neighbours(
    points: torch.Tensor, factor: float, start: int, stop: int, size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model-input coordinates -> (lower cell, upper cell, weight of the upper) for bilinear sampling
    of a map of `size` cells spanning the input (align_corners=False: cell i's centre is i + 0.5),
    clamped to the centres of the cells that cover the content (`start`..`stop` of the input,
    rounded to cells as Ultralytics crops its prototypes): the letterbox padding is never mixed in."""
    first = round(start * factor)
    last = max(first + 1, round(stop * factor))
    centre = (points * factor).clamp(first + 0.5, last - 0.5) - 0.5
    lower = centre.floor()
    weight = (centre - lower).float()
    lower_i = lower.long()
    return lower_i, (lower_i + 1).clamp(max=size - 1), weight


def to_host(crops: list[torch.Tensor]) -> list[np.ndarray]:
    """Every crop on the host, through one device-to-host transfer."""
    if not crops:
        return []
    flat = torch.cat([c.reshape(-1) for c in crops]).cpu().numpy()
    out, start = [], 0
    for c in crops:
        size = c.numel()
        out.append(flat[start:start + size].reshape(tuple(c.shape)))
        start += size
    return out


def crop_rle(crop: np.ndarray, left: int, top: int, width: int, height: int, coco: ModuleType) -> dict[str, Any]:
    """COCO compressed RLE ({"size": [height, width], "counts": str}) of a [height, width] mask that
    is `crop` (bool [h, w]) at (left, top) and empty elsewhere.

    COCO RLE runs down the columns of the whole image; a run inside the crop starts at flat index
    (left + column) * height + top + row, so the runs come from the crop's own column transitions.
    """
    h, w = crop.shape
    cols = np.zeros((w, h + 2), np.int8)
    cols[:, 1:-1] = crop.T
    steps = np.diff(cols, axis=1)
    col_s, row_s = np.nonzero(steps == 1)  # run starts, in column-major order
    col_e, row_e = np.nonzero(steps == -1)  # one past each run's end
    starts = (left + col_s).astype(np.int64) * height + top + row_s
    ends = (left + col_e).astype(np.int64) * height + top + row_e
    if len(starts) > 1:  # a run reaching the image's bottom continues at the next column's top
        touching = starts[1:] == ends[:-1]
        if touching.any():
            starts, ends = starts[np.r_[True, ~touching]], ends[np.r_[~touching, True]]
    bounds = np.empty(2 * len(starts) + 2, np.int64)
    bounds[0], bounds[-1] = 0, width * height
    bounds[1:-1:2], bounds[2:-1:2] = starts, ends
    counts = np.diff(bounds).tolist()
    if len(counts) > 1 and counts[-1] == 0:  # pycocotools writes no empty run after a mask that ends the image
        counts.pop()
    rle = coco.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}

"""Geometry: how a model-input pixel relates to a pixel of the original (EXIF-oriented) image.

Every preprocess mode is one affine map per axis: the region `source` of the original image
(left, top, right, bottom, in original pixels, fractional) is resized to fill the rectangle
`target` (in model-input pixels, whole) of a model input of `input_size`; the rest of the input is
padding (letterbox) and the rest of the original is cut away (center crop).

    center_crop  torchvision's Resize(resize_size) + CenterCrop: source = the crop's box in the
                 original, target = the whole input (classification; the default)
    letterbox    keep the aspect ratio, fit the longer side, pad to input_size with pad_value,
                 centred with Ultralytics' LetterBox rounding: source = the whole image
    stretch      resize to input_size ignoring the aspect ratio: source = the whole image

Coordinates are continuous: pixel (i, j) covers [i, i+1) x [j, j+1), so a box edge maps exactly and
a pixel centre maps to a pixel centre. `to_original` / `boxes_to_original` map points and boxes
from model-input pixels to original pixels; `map_to_original` resamples a model-input-sized map
(mask, logits, label map) onto the original image's pixel grid, with pixels the model never saw
(outside a center crop) set to a fill value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported inside the methods that use it: decode processes (host/child.py) import this
# module to plan geometry and must stay lean (importing torch peaks at ~500 MB of RSS here; Pillow
# and numpy at ~30 MB).

GEOMETRY_MODES = ("center_crop", "letterbox", "stretch")


@dataclass(frozen=True)
class Geometry:
    """One item's transform. Sizes are (width, height); boxes (left, top, right, bottom)."""

    original_size: tuple[int, int]
    input_size: tuple[int, int]
    source: tuple[float, float, float, float]
    """The region of the original image that the model sees, in original pixels."""
    target: tuple[int, int, int, int]
    """Where that region lands in the model input, in model-input pixels (the rest is padding)."""
    mode: str = "center_crop"
    source_format: str = ""

    # -- the affine map ----------------------------------------------------------------------------

    @property
    def scale(self) -> tuple[float, float]:
        """Model-input pixels per original pixel, (x, y)."""
        return (
            (self.target[2] - self.target[0]) / (self.source[2] - self.source[0]),
            (self.target[3] - self.target[1]) / (self.source[3] - self.source[1]),
        )

    @property
    def target_size(self) -> tuple[int, int]:
        """(width, height) of the resized content inside the model input."""
        return self.target[2] - self.target[0], self.target[3] - self.target[1]

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """A point in model-input pixels -> the same point in original pixels (not clipped)."""
        sx, sy = self.scale
        return self.source[0] + (x - self.target[0]) / sx, self.source[1] + (y - self.target[1]) / sy

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """A point in original pixels -> model-input pixels (the inverse of `to_original`)."""
        sx, sy = self.scale
        return self.target[0] + (x - self.source[0]) * sx, self.target[1] + (y - self.source[1]) * sy

    def boxes_to_original(self, boxes: torch.Tensor, clip: bool = True) -> torch.Tensor:
        """[..., 4] boxes (x1, y1, x2, y2) in model-input pixels -> original pixels, on their device.

        With `clip` the boxes are clipped to the image (0..width, 0..height).
        """
        import torch

        sx, sy = self.scale
        scale = boxes.new_tensor([1.0 / sx, 1.0 / sy, 1.0 / sx, 1.0 / sy])
        shift = boxes.new_tensor([
            self.source[0] - self.target[0] / sx, self.source[1] - self.target[1] / sy,
            self.source[0] - self.target[0] / sx, self.source[1] - self.target[1] / sy,
        ])
        out = boxes * scale + shift
        if clip:
            width, height = self.original_size
            out = torch.stack([
                out[..., 0].clamp(0, width), out[..., 1].clamp(0, height),
                out[..., 2].clamp(0, width), out[..., 3].clamp(0, height),
            ], dim=-1)
        return out

    def source_in(self, decoded_size: tuple[float, float] | None = None) -> tuple[float, float, float, float]:
        """`source` in the pixels of the oriented image as decoded: `decoded_size` (width, height) is
        the original's extent there, smaller than `original_size` after JPEG draft decoding (and
        fractional when libjpeg rounded the reduced size up); default: full resolution."""
        if decoded_size is None or decoded_size == self.original_size:
            return self.source
        fx = decoded_size[0] / self.original_size[0]
        fy = decoded_size[1] / self.original_size[1]
        left, top, right, bottom = self.source
        return left * fx, top * fy, right * fx, bottom * fy

    # -- maps --------------------------------------------------------------------------------------

    def map_to_original(
        self, values: torch.Tensor, interpolation: str = "nearest", fill: float = 0,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Resample a [C, H, W] map over the model input onto the original image's pixel grid.

        Returns [C, height, width] (or only original rows `rows` = (first, stop), to bound memory
        for large images), on the map's device. Each original pixel takes the value at its centre's
        position in the model input: `nearest` (exact for label maps; any dtype) or `bilinear`
        (for logits/probabilities; float). Padding is never sampled; original pixels the model did
        not see (outside a center crop) get `fill`.
        """
        if values.dim() != 3 or tuple(values.shape[1:]) != (self.input_size[1], self.input_size[0]):
            raise ValueError(
                f"map_to_original expects a [C, {self.input_size[1]}, {self.input_size[0]}] map "
                f"(the model input's height and width), got {tuple(values.shape)}"
            )
        import torch
        import torch.nn.functional as F

        width, height = self.original_size
        first, stop = rows if rows is not None else (0, height)
        left, top, right, bottom = self.target
        content = values[:, top:bottom, left:right]
        tw, th = self.target_size
        sx, sy = self.scale
        # Centre of each original pixel, in content coordinates (0..tw, 0..th).
        u = (torch.arange(width, device=values.device, dtype=torch.float64) + 0.5 - self.source[0]) * sx
        v = (torch.arange(first, stop, device=values.device, dtype=torch.float64) + 0.5 - self.source[1]) * sy
        inside_u = (u >= 0) & (u < tw)
        inside_v = (v >= 0) & (v < th)
        if interpolation == "nearest":
            iu = u.floor().long().clamp_(0, tw - 1)
            iv = v.floor().long().clamp_(0, th - 1)
            out = content[:, iv[:, None], iu[None, :]]
        elif interpolation == "bilinear":
            gx = (u / tw * 2 - 1).to(torch.float32)
            gy = (v / th * 2 - 1).to(torch.float32)
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
            source = content[None].float()
            out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
            out = out.to(values.dtype) if values.is_floating_point() else out
        else:
            raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
        if not (bool(inside_u.all()) and bool(inside_v.all())):
            seen = inside_v[:, None] & inside_u[None, :]
            out = out.masked_fill(~seen, fill)
        return out


# -- planning: one function per mode, all from the oriented (width, height) ----------------------


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(size) output for a (width, height) image: shorter side -> size."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, crop_w: int, crop_h: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop((crop_h, crop_w)) box (left, top, right, bottom) in a (width, height) image."""
    left = int(round((width - crop_w) / 2.0))
    top = int(round((height - crop_h) / 2.0))
    return left, top, left + crop_w, top + crop_h


def plan_center_crop(width: int, height: int, resize: int, input_size: tuple[int, int], fmt: str = "") -> Geometry:
    """Resize the shorter side to `resize`, then center-crop `input_size` (width, height)."""
    crop_w, crop_h = input_size
    resized_w, resized_h = resized_size(width, height, resize)
    box = center_crop_box(resized_w, resized_h, crop_w, crop_h)
    fx, fy = width / resized_w, height / resized_h
    source = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
    return Geometry((width, height), input_size, source, (0, 0, crop_w, crop_h), "center_crop", fmt)


def plan_letterbox(width: int, height: int, input_size: tuple[int, int], fmt: str = "") -> Geometry:
    """Fit the whole image inside `input_size` keeping its aspect ratio, centred as Ultralytics'
    LetterBox places it (its `round(d -/+ 0.1)` split of an odd padding)."""
    in_w, in_h = input_size
    ratio = min(in_w / width, in_h / height)
    new_w = min(in_w, max(1, int(round(width * ratio))))
    new_h = min(in_h, max(1, int(round(height * ratio))))
    left = int(round((in_w - new_w) / 2 - 0.1))
    top = int(round((in_h - new_h) / 2 - 0.1))
    return Geometry((width, height), input_size, (0.0, 0.0, float(width), float(height)),
                    (left, top, left + new_w, top + new_h), "letterbox", fmt)


def plan_stretch(width: int, height: int, input_size: tuple[int, int], fmt: str = "") -> Geometry:
    in_w, in_h = input_size
    return Geometry((width, height), input_size, (0.0, 0.0, float(width), float(height)),
                    (0, 0, in_w, in_h), "stretch", fmt)


def plan(mode: str, width: int, height: int, input_size: tuple[int, int], resize: int, fmt: str = "") -> Geometry:
    """The geometry of `mode` for an oriented (width, height) image and a model input (width, height)."""
    if mode == "center_crop":
        return plan_center_crop(width, height, resize, input_size, fmt)
    if mode == "letterbox":
        return plan_letterbox(width, height, input_size, fmt)
    if mode == "stretch":
        return plan_stretch(width, height, input_size, fmt)
    raise ValueError(f"geometry mode {mode!r} is not one of {', '.join(GEOMETRY_MODES)}")


def draft_scale(geometry: Geometry, min_ratio: float) -> float:
    """The smallest decode scale (of the full image, per axis) that keeps at least `min_ratio`
    decoded pixels per model-input pixel along both axes."""
    sx, sy = geometry.scale
    return max(sx, sy) * min_ratio


def ceil_size(width: int, height: int, scale: float) -> tuple[int, int]:
    return math.ceil(width * scale), math.ceil(height * scale)

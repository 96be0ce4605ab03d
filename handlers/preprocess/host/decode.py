"""Pillow decoding of one item into a preprocessed crop: the CPU path's per-item work, torch-free.

The `cpu` backend (cpu.py) runs this per item in threads; a decode process (child.py) runs it with
Pillow and numpy only, so nothing here may import torch. Per item:
  1. open with an allow-list of formats; refuse oversized images from the header, before decoding;
  2. JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale (DCT-domain downscaling) when the image is
     much larger than needed, keeping at least `draft_min_ratio` source pixels per output pixel;
  3. apply EXIF orientation, convert any mode (gray, CMYK, palette, alpha, 16-bit) to RGB;
  4. resize only the region that survives the center crop (Pillow's `box`), straight to crop size,
     and write it (padded for letterbox) into the caller's H x W x 3 uint8 slot.

Everything here takes a `DecodeSettings`: a `PreprocessSpec` (contract.py) or its torch-free
projection `DecodeSpec`, the plain data a decode process is sent.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ...errors import InvalidInput, PayloadTooLarge, RequestError, UnsupportedMediaType
from ..geometry import Geometry, ceil_size, draft_scale, plan

__all__ = ["ACCEPTED_FORMATS", "DecodeSettings", "DecodeSpec", "decode_into", "decode_spec", "open_image",
           "orientation", "resample_filter"]

# Formats accepted from clients. An allow-list keeps Pillow from trying every plugin it has on
# hostile bytes (EPS, for one, would run Ghostscript). The JPEG opener also returns MPO files (the
# multi-picture JPEG variant many phones write), reported with format "MPO".
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

# EXIF orientation tag value -> the transpose that undoes it (as PIL.ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG = 0x0112
# "Exif\0\0" + an 8-byte TIFF header + an empty IFD (2-byte count, 4-byte next offset).
_EMPTY_EXIF_BYTES = 6 + 8 + 6


class DecodeSettings(Protocol):
    """What decoding reads from a spec; both `PreprocessSpec` and `DecodeSpec` provide it."""

    @property
    def geometry(self) -> str: ...
    @property
    def size(self) -> tuple[int, int]: ...
    @property
    def resize_size(self) -> int: ...
    @property
    def pad_value(self) -> int: ...
    @property
    def jpeg_draft(self) -> bool: ...
    @property
    def draft_min_ratio(self) -> float: ...
    @property
    def max_image_pixels(self) -> int: ...
    @property
    def interpolation(self) -> str: ...

    def plan(self, width: int, height: int, fmt: str = "") -> Geometry: ...


@dataclass(frozen=True)
class DecodeSpec:
    """The decode settings of a `PreprocessSpec` as plain, JSON-able data.

    Not a second spec: it is derived from the one spec by `decode_spec` (field by field, by name)
    and exists because a decode process must not import torch, which `PreprocessSpec` holds (its
    dtype and device), and is sent its settings as JSON (`to_dict` / `from_dict`).
    """

    geometry: str = "center_crop"
    size: tuple[int, int] = (224, 224)
    """The model input's (height, width)."""
    resize_size: int = 256
    pad_value: int = 114
    jpeg_draft: bool = True
    draft_min_ratio: float = 2.0
    max_image_pixels: int = 50_000_000
    interpolation: str = "bilinear"

    def plan(self, width: int, height: int, fmt: str = "") -> Geometry:
        """The geometry of an oriented (width, height) image under this spec's mode."""
        h, w = self.size
        return plan(self.geometry, width, height, (w, h), self.resize_size, fmt)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodeSpec:
        return cls(**{**data, "size": tuple(data["size"])})


def decode_spec(spec: DecodeSettings) -> DecodeSpec:
    """The DecodeSpec of a PreprocessSpec: each of its fields read by name (a DecodeSpec: itself)."""
    if isinstance(spec, DecodeSpec):
        return spec
    values = {f.name: getattr(spec, f.name) for f in fields(DecodeSpec)}
    return DecodeSpec(**{**values, "size": tuple(values["size"])})


def resample_filter(interpolation: str) -> Image.Resampling:
    """Pillow's filter for handler.preprocess.interpolation."""
    return _RESAMPLE[interpolation]


def open_image(data: bytes, spec: DecodeSettings) -> Image.Image:
    """Open (not decode) an encoded image and check its header against the spec's limits.

    Raises a RequestError subclass for anything wrong with the bytes: 400 empty, 415 not an accepted
    format, 413 too many pixels.
    """
    if not data:
        raise InvalidInput("empty image: the request carried no bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(
            f"image has too many pixels ({exc}); this model accepts at most "
            f"{spec.max_image_pixels} (handler.preprocess.max_image_pixels)"
        ) from None
    except Exception as exc:  # Pillow raises many types for unrecognised bytes
        raise UnsupportedMediaType(
            f"not a supported image format ({len(data)} bytes starting {data[:8]!r}); "
            f"accepted: JPEG, PNG, WebP, GIF, BMP, TIFF"
        ) from exc
    fmt = image.format or ""
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise InvalidInput(f"{fmt} image has an empty size {width}x{height}")
    if width * height > spec.max_image_pixels:
        image.close()
        raise PayloadTooLarge(
            f"{fmt} image is {width}x{height} = {width * height} pixels; this model accepts "
            f"at most {spec.max_image_pixels} (handler.preprocess.max_image_pixels)"
        )
    return image


def decode_into(
    data: bytes, spec: DecodeSettings, resample: Image.Resampling, out: np.ndarray,
    keep: Callable[[np.ndarray], None] | None = None,
) -> Geometry:
    """Decode one encoded image and write its preprocessed crop (H, W, 3 uint8) into `out`.

    With `keep`, the image is decoded at full resolution (no draft) and `keep` is given it as
    decoded (oriented RGB, H x W x 3 uint8) before the crop is resized from it (PreprocessSpec's
    keep_images). Raises a RequestError subclass for anything wrong with the bytes; never anything
    else for bad input (the fuzz tests hold it to that).
    """
    with open_image(data, spec) as image:
        fmt = image.format or ""
        try:
            return _decode_checked(image, fmt, spec, resample, out, keep)
        except RequestError:
            raise
        except Image.DecompressionBombError as exc:
            raise PayloadTooLarge(f"image has too many pixels: {exc}") from None
        except Exception as exc:
            raise InvalidInput(f"could not decode {fmt or 'image'} data: {exc}") from exc


def _decode_checked(
    image: Image.Image, fmt: str, spec: DecodeSettings, resample: Image.Resampling, out: np.ndarray,
    keep: Callable[[np.ndarray], None] | None = None,
) -> Geometry:
    stored = image.size  # full resolution, as stored (draft decoding makes image.size smaller)
    content: tuple[float, float] = stored  # the original's extent in decoded pixels
    if spec.jpeg_draft and keep is None and fmt in ("JPEG", "MPO"):
        # A JPEG's EXIF is parsed at open, so the plan (and the draft scale) can precede decoding.
        scale = draft_scale(_plan_oriented(image, stored, fmt, spec)[1], spec.draft_min_ratio)
        if scale < 0.5:  # libjpeg can reduce by 2, 4 or 8 at least; draft picks the largest that fits
            drafted = image.draft(image.mode, ceil_size(*image.size, scale))
            if drafted is not None:
                # libjpeg rounds the reduced size up (3001 / 4 -> 751 pixels): the original ends at
                # 750.25, which is what draft reports; scaling by the rounded size would squeeze
                # the content by up to one decoded pixel towards the right and bottom.
                content = (drafted[1][2], drafted[1][3])
    # Orientation after load: for other formats Pillow's getexif() may load the image itself and
    # swallow a decoding error, which load() must report.
    image.load()
    turn, geometry = _plan_oriented(image, stored, fmt, spec)
    if turn in _ORIENTATION:
        image = image.transpose(_ORIENTATION[turn])
        if turn >= 5:
            content = (content[1], content[0])
    image = _to_rgb(image)
    if keep is not None:
        keep(np.asarray(image))

    # Resize only the region the model sees, straight to its size in the model input. The decoded
    # image may be smaller than the original (draft): take the region in its pixels.
    left, top, right, bottom = geometry.target
    resized = image.resize((right - left, bottom - top), resample, box=geometry.source_in(content))
    if geometry.target == (0, 0, *geometry.input_size):
        out[...] = np.asarray(resized)
    else:
        out[...] = spec.pad_value
        out[top:bottom, left:right] = np.asarray(resized)
    return geometry


def _plan_oriented(
    image: Image.Image, stored: tuple[int, int], fmt: str, spec: DecodeSettings
) -> tuple[int, Geometry]:
    """The EXIF orientation (unreadable = as stored) and the geometry of the upright image of the
    `stored` (width, height)."""
    turn = orientation(image) or 1
    width, height = stored if turn < 5 else stored[::-1]  # 90-degree turns swap the axes
    return turn, spec.plan(width, height, fmt)


def orientation(image: Image.Image) -> int | None:
    """The EXIF orientation (1..8) of an opened image: 1 when it has no EXIF block or no tag, None
    when it has an EXIF block that Pillow cannot read or an orientation outside 1..8.

    None matters to the GPU decoders, which parse EXIF themselves and may still find a rotation:
    such items take the CPU path (accelerated.py), where the image is used as stored (1)."""
    raw = image.info.get("exif")
    try:
        exif = image.getexif()
        turn = exif.get(_EXIF_ORIENTATION_TAG)
    except Exception:  # a broken EXIF block is no reason to refuse the picture
        return None
    if turn is None:
        # Pillow answers an empty mapping for a block it could not parse: unreadable, unless the
        # block really holds nothing beyond its TIFF header.
        return None if raw and len(exif) == 0 and len(raw) > _EMPTY_EXIF_BYTES else 1
    try:
        turn = int(turn)
    except (TypeError, ValueError):
        return None
    return turn if 1 <= turn <= 8 else None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        # Pillow's convert() clips high-bit-depth values at 255; scale them down instead.
        arr = np.asarray(image)
        peak = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(arr.astype(np.float32) * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    # L, LA, P, PA, RGBA, CMYK, YCbCr, 1...: Pillow converts (alpha dropped, as torchvision's
    # reference `convert("RGB")` does).
    return image.convert("RGB")

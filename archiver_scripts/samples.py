"""Deterministic sample photos for tests, the demo and benchmarks (no downloads).

scikit-image ships a few real photographs inside its wheel; `mosaic` tiles them at native
resolution into larger frames, so a "1080p" or "4K" test image has the pixel statistics of real
photos (edges, texture, noise) rather than of an upscaled thumbnail.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket")


@lru_cache(maxsize=1)
def _load() -> tuple[tuple[str, np.ndarray], ...]:
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError(
            "sample photos need scikit-image: pip install 'torchserve-gpu-handlers[dev]' "
            "(or pip install scikit-image)"
        ) from exc
    return tuple((name, np.ascontiguousarray(getattr(data, name)())) for name in PHOTO_NAMES)


def photos() -> dict[str, np.ndarray]:
    """name -> RGB uint8 array (H, W, 3) of each bundled photo (copies; safe to modify)."""
    return {name: arr.copy() for name, arr in _load()}


def mosaic(width: int, height: int, offset: int = 0) -> np.ndarray:
    """A (height, width, 3) uint8 frame tiled with the photos at native resolution.

    `offset` rotates which photo starts the tiling, to get different frames of the same size.
    """
    tiles = [arr for _, arr in _load()]
    out = np.zeros((height, width, 3), dtype=np.uint8)
    y, i = 0, offset
    while y < height:
        x, row_height = 0, 0
        while x < width:
            tile = tiles[i % len(tiles)]
            i += 1
            h, w = min(tile.shape[0], height - y), min(tile.shape[1], width - x)
            out[y:y + h, x:x + w] = tile[:h, :w]
            x += w
            row_height = max(row_height, h)
        y += row_height
    return out


def encode(array: np.ndarray, fmt: str = "JPEG", quality: int = 90, **pil_kwargs) -> bytes:
    """Encode an RGB/gray array with Pillow (`quality` applies to JPEG and lossy WebP)."""
    from PIL import Image

    buf = io.BytesIO()
    kwargs = dict(pil_kwargs)
    if fmt.upper() in ("JPEG", "WEBP"):
        kwargs.setdefault("quality", quality)
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()

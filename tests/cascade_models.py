"""Known-answer models and scenes for cascades (tests/unit/test_cascade.py, tests/e2e/test_cascade.py,
benchmarks/cascade.py).

    ColourBoxes      a detector: one box per saturated colour present in its 0..1 input (red, green,
                     blue, yellow, magenta = classes 0..4), as xyxy_score_class [B, 8, 6] (3 rows of padding); class c
                     scores 0.9 - 0.1 c, a colour absent scores 0 (no detection)
    ColourClassifier a classifier: logits [B, 5], 10x the share of "colour c" in its 0..1 input: a
                     crop of a colour's box is classified as that colour
    the embedder     tests/segmentation_models.RegionMeans: the channel means of a 4x4 grid of cells
                     ([B, 48]): what it answers for a crop is computable from the crop, and a crop
                     cut from the wrong place or resized wrongly gives another vector

A pixel is "colour c" when its test below exceeds 0.5 (on the scenes' dull background none does);
a box is the extent of its colour's pixels, in model-input pixels (pixel i spans [i, i+1)).
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from tests.segmentation_models import RegionMeans, save_exported

COLOURS = ("red", "green", "blue", "yellow", "magenta")
RGB = {"red": (230, 20, 20), "green": (20, 220, 30), "blue": (20, 20, 230), "yellow": (235, 225, 15),
       "magenta": (225, 20, 220)}
BACKGROUND = (70, 80, 75)
LABELS = {str(i): name for i, name in enumerate(COLOURS)}


def colour_maps(x: torch.Tensor) -> torch.Tensor:
    """[B, 5, H, W]: how strongly each pixel is each colour (above 0.5 = that colour)."""
    r, g, b = x[:, 0].float(), x[:, 1].float(), x[:, 2].float()
    return torch.stack([
        r - torch.maximum(g, b),
        g - torch.maximum(r, b),
        b - torch.maximum(r, g),
        torch.minimum(r, g) - b,
        torch.minimum(r, b) - g,
    ], dim=1)


class ColourBoxes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = colour_maps(x) > 0.5  # [B, 5, H, W]
        height, width = mask.shape[2], mask.shape[3]
        cols, rows = mask.any(dim=2), mask.any(dim=3)  # [B, 5, W], [B, 5, H]
        xs = torch.arange(width, device=x.device, dtype=torch.float32)
        ys = torch.arange(height, device=x.device, dtype=torch.float32)
        x1 = torch.where(cols, xs, float(width)).amin(dim=2)
        x2 = torch.where(cols, xs + 1, 0.0).amax(dim=2)
        y1 = torch.where(rows, ys, float(height)).amin(dim=2)
        y2 = torch.where(rows, ys + 1, 0.0).amax(dim=2)
        found = cols.any(dim=2).float()  # [B, 5]
        classes = torch.arange(5, device=x.device, dtype=torch.float32).expand_as(found)
        scores = (0.9 - 0.1 * classes) * found
        rows = torch.stack([x1 * found, y1 * found, x2 * found, y2 * found, scores, classes], dim=2)
        # Three padding rows (score 0): [B, 8, 6] cannot be read as yolo [B, 4+C, N], so auto is sure.
        return torch.cat([rows, rows.new_zeros(rows.shape[0], 3, 6)], dim=1)


class ColourClassifier(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * (colour_maps(x) > 0.5).float().mean(dim=(2, 3))


def embedder() -> nn.Module:
    return RegionMeans(grid=4)


def export_models(directory: Path, detector_hw: tuple[int, int] = (640, 640),
                  second_hw: tuple[int, int] = (224, 224), max_batch: int = 64) -> dict[str, Path]:
    """The three models exported (torch.export, dynamic batch) into `directory`."""
    return {
        "detector": save_exported(ColourBoxes(), directory / "colour_boxes.pt2", detector_hw, max_batch),
        "embedder": save_exported(embedder(), directory / "region_means.pt2", second_hw, max_batch),
        "classifier": save_exported(ColourClassifier(), directory / "colour_classifier.pt2", second_hw, max_batch),
    }


# -- scenes ------------------------------------------------------------------------------------------


def scene(width: int, height: int, boxes: dict[str, tuple[int, int, int, int]], texture: bool = True,
          background: np.ndarray | None = None) -> np.ndarray:
    """A (height, width, 3) uint8 image: a dull background with a rectangle per colour. With
    `texture`, a smooth gradient inside each rectangle, so that crops have structure to embed.
    `background` (a photo of the same size) is washed out to 40% contrast, where no pixel passes a
    colour test (every test is a difference of channels: at most 0.4)."""
    image = np.empty((height, width, 3), np.uint8)
    image[...] = BACKGROUND
    if background is not None:
        image[...] = (0.4 * background.astype(np.float32) + 0.6 * np.array(BACKGROUND, np.float32)).round()
    for name, (x1, y1, x2, y2) in boxes.items():
        patch = np.empty((y2 - y1, x2 - x1, 3), np.float32)
        patch[...] = RGB[name]
        if texture:  # +-10 levels across the box: stays its colour, but every cell differs
            u = np.linspace(-10, 10, x2 - x1, dtype=np.float32)[None, :, None]
            v = np.linspace(-6, 6, y2 - y1, dtype=np.float32)[:, None, None]
            patch = patch + u + v
        image[y1:y2, x1:x2] = np.clip(patch, 0, 255).round().astype(np.uint8)
    return image


def encode(image: np.ndarray, fmt: str = "JPEG", exif_orientation: int = 1, quality: int = 95) -> bytes:
    """`image` (upright) encoded; with an EXIF orientation the pixels are stored turned so that
    applying the tag gives `image` back."""
    picture = Image.fromarray(image)
    kwargs: dict = {"quality": quality} if fmt == "JPEG" else {}
    if exif_orientation != 1:
        undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
        picture = picture.transpose(undo[exif_orientation])
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    buf = io.BytesIO()
    picture.save(buf, fmt, **kwargs)
    return buf.getvalue()


def random_scenes(n: int, width: int = 1920, height: int = 1080, seed: int = 0,
                  backgrounds: list[np.ndarray] | None = None) -> list[tuple[np.ndarray, dict]]:
    """`n` photo-sized scenes with 1-5 non-overlapping coloured boxes each (the benchmark's set),
    on `backgrounds[i % len]` (washed-out photos) when given."""
    rng = random.Random(seed)
    out = []
    for index in range(n):
        k = rng.randint(1, 5)
        names = rng.sample(COLOURS, k)
        boxes: dict[str, tuple[int, int, int, int]] = {}
        cell_w = width // 5
        for slot, name in zip(rng.sample(range(5), k), names, strict=True):
            w = rng.randint(cell_w // 3, cell_w - 20)
            h = rng.randint(height // 6, height - 40)
            x1 = slot * cell_w + rng.randint(0, cell_w - w - 10)
            y1 = rng.randint(10, height - h - 10)
            boxes[name] = (x1, y1, x1 + w, y1 + h)
        photo = backgrounds[index % len(backgrounds)] if backgrounds else None
        out.append((scene(width, height, boxes, background=photo), boxes))
    return out

"""Deterministic models whose right answer is known, for the segmentation and embedding handlers.

`ColourSegmenter` labels a pixel by its colour in the original 0..1 RGB (it undoes the handler's
mean/std first): strongly red -> `red`, strongly blue -> `blue`, letterbox-padding grey (114) ->
`pad`, anything else -> 0. Its logits are continuous in the colour, so bilinear resampling of them
moves a boundary smoothly, as a real model's would. A handler that let padding through would
report the `pad` class; one that misplaced pixels would miss the drawn shapes.

`RegionMeans` returns the per-channel mean of each cell of a `grid` x `grid` split of the input, a
vector a test computes independently from the reference preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_GREY = 114 / 255


class ColourSegmenter(nn.Module):
    """Logits [B, classes, H, W] from colour rules; `as_dict` returns {"out": ..., "aux": ...}."""

    def __init__(self, classes: int = 4, red: int = 1, blue: int = 2, pad: int = 3,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 as_dict: bool = False) -> None:
        super().__init__()
        assign = torch.zeros(4, classes)
        offset = torch.full((classes,), -10.0)  # classes no rule predicts never win
        for row, cls in enumerate((0, red, blue, pad)):
            assign[row, cls] = 1.0
            offset[cls] = 0.0
        self.register_buffer("assign", assign)
        self.register_buffer("offset", offset.view(1, classes, 1, 1))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        p = x.float() * self.std + self.mean  # back to 0..1 RGB
        r, g, b = p[:, 0], p[:, 1], p[:, 2]
        red = 4.0 * (r - torch.maximum(g, b) - 0.5)  # > 0 where red beats green and blue by 0.5
        blue = 4.0 * (b - torch.maximum(r, g) - 0.5)
        pad = 25.0 * (0.03 - (p - PAD_GREY).abs().amax(1))  # > 0 within 0.03 of the padding grey
        base = torch.stack([torch.zeros_like(r), red, blue, pad], 1)
        logits = torch.einsum("bkhw,kc->bchw", base, self.assign) + self.offset
        if self.as_dict:
            return {"out": logits, "aux": logits}
        return logits


class RegionMeans(nn.Module):
    """[B, 3 * grid * grid] channel means of each grid cell; `keep_dims` gives [B, 3, 1, 1] (grid 1)."""

    def __init__(self, grid: int = 2, keep_dims: bool = False) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.keep_dims = keep_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        return y if self.keep_dims else y.flatten(1)


class CornerPatch(nn.Module):
    """A wrong output for an embedder: [B, 3, 2, 2]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :2, :2]


class ChannelMeanMap(nn.Module):
    """A wrong output for a segmenter: [B, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def save_exported(model: nn.Module, path: Path, input_hw: tuple[int, int], max_batch: int = 16) -> Path:
    """torch.export the model for a fixed input size and a dynamic batch; returns `path`."""
    x = torch.zeros(2, 3, *input_hw)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    program = torch.export.export(model.eval(), (x,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    return path

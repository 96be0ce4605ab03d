"""Models whose right answer on a test clip (tests/video_clips.py) is known, one per task.

Self-contained (imports only torch): tests copy this file into a model directory or an archive and
the handler loads a class from it as an eager model (`handler.model.model_class:
video_models.py:ColourClassifier`, with an empty state dict as the weights).

The clips show a flat background whose colour changes at known times (`video_clips.COLOURS`, one
per `colour_period_s`), a magenta marker square in the displayed top-left corner, and a white box
moving from the top-left to the bottom-right (`video_clips.box_at`, displayed pixels).

    ColourClassifier  logits over COLOUR_LABELS from the frame's mean colour: the background wins
    WhiteBoxDetector  [B, 2, 6] xyxy_score_class: the white box (class 0, score 0.9), from the pixels
                      whose every channel is above WHITE; a frame without white pixels gets none
    WhiteSegmenter    logits [B, 2, H, W]: class 1 ("box") where the pixel is white, else 0
    ColourMeans       [B, 3] channel means of the (normalised) input: an embedding a test computes
                      independently for a flat frame

Thresholds: the background channels are 40 or 200 of 255 (0.16 / 0.78), the box 250 (0.98): a
pixel is "white" when its darkest channel exceeds WHITE = 0.57, the midpoint between the box and
the darkest background channel, so an edge pixel counts when the box covers about half of it and a
box lands on the drawn edge to within about half a model-input pixel (plus the codec's ringing).
"""

from __future__ import annotations

import torch
from torch import nn

#: The clips' background colours (video_clips.COLOURS) in 0..1, in label order.
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40))
COLOUR_LABELS = {"0": "red", "1": "green", "2": "blue", "3": "yellow"}
BOX_LABELS = {"0": "box"}
SEGMENT_LABELS = {"0": "background", "1": "box"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WHITE = 0.57
SCORE = 0.9


def _unnormalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return x.float() * s + m


class ColourClassifier(nn.Module):
    """Logits -40 * squared distance between the frame's mean colour and each background colour
    (inputs ImageNet-normalised, the classifier's default)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("colours", torch.tensor(COLOURS, dtype=torch.float32) / 255.0, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = _unnormalise(x, IMAGENET_MEAN, IMAGENET_STD).mean(dim=(2, 3))  # [B, 3]
        return -40.0 * ((mean[:, None, :] - self.colours[None]) ** 2).sum(-1)


def white_box(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, 4] x1, y1, x2, y2 of the white pixels in model-input pixels, [B] 1.0 where any)."""
    white = x.float().amin(dim=1) > WHITE  # [B, H, W]
    height, width = white.shape[1], white.shape[2]
    cols, rows = white.any(dim=1), white.any(dim=2)
    xs = torch.arange(width, device=x.device, dtype=torch.float32)
    ys = torch.arange(height, device=x.device, dtype=torch.float32)
    x1 = torch.where(cols, xs, float(width)).amin(dim=1)
    x2 = torch.where(cols, xs + 1, 0.0).amax(dim=1)
    y1 = torch.where(rows, ys, float(height)).amin(dim=1)
    y2 = torch.where(rows, ys + 1, 0.0).amax(dim=1)
    found = cols.any(dim=1).float()
    return torch.stack([x1, y1, x2, y2], dim=1) * found[:, None], found


class WhiteBoxDetector(nn.Module):
    """[B, 2, 6] xyxy_score_class: row 0 the white box (class 0), row 1 empty (inputs 0..1, the
    detector's default preprocess)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box, found = white_box(x)
        b = x.shape[0]
        first = torch.cat([box, (SCORE * found)[:, None], torch.zeros(b, 1, device=x.device)], dim=1)
        return torch.stack([first, torch.zeros_like(first)], dim=1)


class WhiteSegmenter(nn.Module):
    """Logits [B, 2, H, W]: class 1 where every channel is above WHITE (inputs ImageNet-normalised,
    the segmenter's default); letterbox padding (grey 114) is background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        darkest = _unnormalise(x, IMAGENET_MEAN, IMAGENET_STD).amin(dim=1)  # [B, H, W]
        box = 20.0 * (darkest - WHITE)
        return torch.stack([torch.zeros_like(box), box], dim=1)


class ColourMeans(nn.Module):
    """[B, 3] channel means of the normalised input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(2, 3))

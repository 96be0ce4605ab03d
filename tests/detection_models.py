"""Detectors whose right answer is known: they find the saturated red rectangle in their input.

Self-contained (imports only torch): tests copy this file into a model directory and the handler
loads a class from it as an eager model (`handler.model.model_class: red_box.py:RedBoxXyxy`).

The input is a 0..1 RGB batch (preprocess mean 0, std 1). A pixel is "red" when
R - max(G, B) > 0.5: on a gray background that difference is exactly the share of the pixel the red
rectangle covers after resizing, so an edge pixel counts when the rectangle covers more than half
of it, and the box (continuous coordinates: pixel i spans [i, i+1)) lands on the drawn edge to within
about half a model-input pixel. The letterbox padding (gray) and the background are never red.

Each class answers the same box in one of the detector output forms:
    RedBoxYolo         [B, 4+C, N] raw (cx, cy, w, h, C class scores); candidate 1 is a copy of
                       the box shifted by 1 px with a lower score, which NMS must remove
    RedBoxXyxy         [B, N, 6] (x1, y1, x2, y2, score, class), NMS already done
    RedBoxTorchvision  list of dicts (boxes, labels, scores), as torchvision detectors in eval mode
"""

from __future__ import annotations

import torch
from torch import nn

RED_CLASS = 2
NUM_CLASSES = 3
SCORE = 0.9


def red_box(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, 4] x1, y1, x2, y2 of the red pixels in model-input pixels, [B] 1.0 where any was found)."""
    x = x.float()
    red = (x[:, 0] - torch.maximum(x[:, 1], x[:, 2])) > 0.5  # [B, H, W]
    height, width = red.shape[1], red.shape[2]
    cols = red.any(dim=1)  # [B, W]
    rows = red.any(dim=2)  # [B, H]
    xs = torch.arange(width, device=x.device, dtype=torch.float32)
    ys = torch.arange(height, device=x.device, dtype=torch.float32)
    x1 = torch.where(cols, xs, float(width)).amin(dim=1)
    x2 = torch.where(cols, xs + 1, 0.0).amax(dim=1)
    y1 = torch.where(rows, ys, float(height)).amin(dim=1)
    y2 = torch.where(rows, ys + 1, 0.0).amax(dim=1)
    found = cols.any(dim=1).float()
    return torch.stack([x1, y1, x2, y2], dim=1) * found[:, None], found


class RedBoxYolo(nn.Module):
    def __init__(self, candidates: int = 16) -> None:
        super().__init__()
        self.candidates = candidates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box, found = red_box(x)
        b = x.shape[0]
        cxcywh = torch.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2,
                              box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], dim=1)  # [B, 4]
        shifted = cxcywh + torch.tensor([1.0, 0.0, 0.0, 0.0], device=x.device)
        scores = torch.zeros(b, NUM_CLASSES, device=x.device)
        scores[:, RED_CLASS] = SCORE
        first = torch.cat([cxcywh, scores * found[:, None]], dim=1)          # [B, 4+C]
        second = torch.cat([shifted, scores * 0.8 * found[:, None]], dim=1)  # a duplicate for NMS
        rest = torch.zeros(b, 4 + NUM_CLASSES, self.candidates - 2, device=x.device)
        return torch.cat([first[:, :, None], second[:, :, None], rest], dim=2)  # [B, 4+C, N]


class RedBoxYoloFewCandidates(RedBoxYolo):
    """RedBoxYolo with N = 4 candidates < 4+C = 7 channels, as a yolo export at a small input size
    with many classes returns: valid yolo that `auto` cannot tell from its shape."""

    def __init__(self) -> None:
        super().__init__(candidates=4)


class RedBoxXyxy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        box, found = red_box(x)
        b = x.shape[0]
        first = torch.cat([box, (SCORE * found)[:, None], torch.full((b, 1), float(RED_CLASS), device=x.device)], dim=1)
        return torch.cat([first[:, None, :], torch.zeros(b, 3, 6, device=x.device)], dim=1)  # [B, 4, 6]


class RedBoxTorchvision(nn.Module):
    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        box, found = red_box(x)
        out = []
        for i in range(x.shape[0]):
            keep = found[i : i + 1] > 0
            out.append({
                "boxes": box[i : i + 1][keep],
                "labels": torch.full((1,), RED_CLASS, dtype=torch.int64, device=x.device)[keep],
                "scores": torch.full((1,), SCORE, device=x.device)[keep],
            })
        return out


class WrongShape(nn.Module):
    """Returns [B, 5]: a classifier's logits, not a detector's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).repeat(1, 2)[:, :5]


class Ambiguous(nn.Module):
    """Returns [B, 5, 6]: yolo with 1 class and 6 candidates, or 5 xyxy_score_class rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3))[:, None, None].expand(-1, 5, 6).contiguous() * 0

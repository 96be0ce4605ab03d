"""Models whose right answer is known, for instance segmentation, keypoints and DETR-form detectors.

Self-contained (imports only torch): tests copy this file into a model directory and the handler
loads a class from it as an eager model, or torch.export them.

The input is a 0..1 RGB batch (preprocess mean 0, std 1). A pixel is red when R - max(G, B) > 0.5
and blue when B - max(R, G) > 0.5 (on a gray background that difference is the share of the pixel
the shape covers after resizing). Each model finds the red and the blue pixels and answers:

    YoloSeg          Ultralytics' segmentation export: (predictions [B, 4+C+M, N], prototypes
                     [B, M, H/4, W/4]); candidate 0 = the red object's box (class RED, score 0.9),
                     candidate 1 = the blue object's box (class BLUE, score 0.8), candidate 2 = the
                     red box shifted by 1 px (score 0.7, NMS removes it); prototype 0 is the red
                     share of each 4x4 cell as a logit, prototype 1 the blue share, so the red
                     object's coefficients (8, 0) give a mask of the red pixels
    MaskRcnn         torchvision's Mask R-CNN eval output: list of dicts (boxes, labels, scores,
                     masks [K, 1, H, W] = each colour's pixels inside its box, as probabilities)
    YoloPose         Ultralytics' pose export [B, 4+1+K*3, N]: the red box (class 0) with K = 5
                     keypoints: its corners (top-left, top-right, bottom-right, bottom-left) and
                     its centre, scores 0.9, 0.8, 0.7, 0.6, 0.5
    KeypointRcnn     torchvision's Keypoint R-CNN eval output with the same 5 points
    DetrSigmoid      (logits [B, Q, C], boxes [B, Q, 4] cx, cy, w, h normalised to the input):
                     query 0 the red box with logit +3 for class RED (sigmoid 0.952574), the others
                     -6 everywhere; query 1 the blue box at +1 for class BLUE (0.731059)
    DetrSoftmax      DETR's form: logits [B, Q, C+1] with a last "no object" class, as a dict
                     {"logits", "pred_boxes"}; query 0: softmax 0.9 for RED
    RtDetrUltra      Ultralytics' RT-DETR export [B, Q, 6]: cx, cy, w, h normalised, score, class

With overlapping shapes the red object's mask is its visible red pixels (the blue shape is drawn
over it) and its box the box of those pixels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RED, BLUE = 1, 2
NUM_CLASSES = 3
PROTO_STRIDE = 4
COEFF = 8.0
KEYPOINT_SCORES = (0.9, 0.8, 0.7, 0.6, 0.5)


def colour_share(x: torch.Tensor, channel: int) -> torch.Tensor:
    """[B, H, W] 1.0 where `channel` beats the other two by more than 0.5, else 0.0."""
    x = x.float()
    others = [c for c in range(3) if c != channel]
    return ((x[:, channel] - torch.maximum(x[:, others[0]], x[:, others[1]])) > 0.5).float()


def bounding_box(share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, 4] x1, y1, x2, y2 in input pixels of the pixels where share > 0, [B] 1.0 where any)."""
    on = share > 0
    height, width = on.shape[1], on.shape[2]
    cols, rows = on.any(dim=1), on.any(dim=2)
    xs = torch.arange(width, device=share.device, dtype=torch.float32)
    ys = torch.arange(height, device=share.device, dtype=torch.float32)
    x1 = torch.where(cols, xs, float(width)).amin(dim=1)
    x2 = torch.where(cols, xs + 1, 0.0).amax(dim=1)
    y1 = torch.where(rows, ys, float(height)).amin(dim=1)
    y2 = torch.where(rows, ys + 1, 0.0).amax(dim=1)
    found = cols.any(dim=1).float()
    return torch.stack([x1, y1, x2, y2], dim=1) * found[:, None], found


def cxcywh(box: torch.Tensor) -> torch.Tensor:
    return torch.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2,
                        box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], dim=1)


def _class_scores(b: int, cls: int, score: float, found: torch.Tensor, classes: int = NUM_CLASSES) -> torch.Tensor:
    scores = torch.zeros(b, classes, device=found.device)
    scores[:, cls] = score
    return scores * found[:, None]


class YoloSeg(nn.Module):
    def __init__(self, candidates: int = 16) -> None:
        super().__init__()
        self.candidates = candidates

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        red, blue = colour_share(x, 0), colour_share(x, 2)
        red_box, red_found = bounding_box(red)
        blue_box, blue_found = bounding_box(blue)
        zeros = torch.zeros(b, device=x.device)
        coeff_red = torch.stack([zeros + COEFF, zeros], dim=1)
        coeff_blue = torch.stack([zeros, zeros + COEFF], dim=1)
        shifted = cxcywh(red_box) + torch.tensor([1.0, 0.0, 0.0, 0.0], device=x.device)
        columns = [
            torch.cat([cxcywh(red_box), _class_scores(b, RED, 0.9, red_found), coeff_red], 1),
            torch.cat([cxcywh(blue_box), _class_scores(b, BLUE, 0.8, blue_found), coeff_blue], 1),
            torch.cat([shifted, _class_scores(b, RED, 0.7, red_found), coeff_red], 1),
        ]
        pred = torch.stack(columns, dim=2)  # [B, 4+C+M, 3]
        rest = torch.zeros(b, pred.shape[1], self.candidates - 3, device=x.device)
        # Prototypes at 1/4 of the input: a cell's colour share s in 0..1 as the logit (s - 0.5) * 2,
        # times the coefficient 8: the mask logit crosses 0 where half the cell is the colour.
        shares = F.avg_pool2d(torch.stack([red, blue], 1), PROTO_STRIDE)
        return torch.cat([pred, rest], dim=2), (shares - 0.5) * 2


class MaskRcnn(nn.Module):
    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = []
        red, blue = colour_share(x, 0), colour_share(x, 2)
        for i in range(x.shape[0]):
            boxes, labels, scores, masks = [], [], [], []
            for share, cls, score in ((red[i : i + 1], RED, 0.9), (blue[i : i + 1], BLUE, 0.8)):
                box, found = bounding_box(share)
                if float(found[0]) > 0:
                    boxes.append(box[0])
                    labels.append(cls)
                    scores.append(score)
                    masks.append(share)  # [1, H, W] probabilities (0 or 1)
            out.append({
                "boxes": torch.stack(boxes) if boxes else torch.zeros(0, 4, device=x.device),
                "labels": torch.tensor(labels, dtype=torch.int64, device=x.device),
                "scores": torch.tensor(scores, dtype=torch.float32, device=x.device),
                "masks": torch.stack(masks) if masks else torch.zeros(0, 1, *x.shape[2:], device=x.device),
            })
        return out


def corner_points(box: torch.Tensor) -> torch.Tensor:
    """[B, 5, 2]: top-left, top-right, bottom-right, bottom-left corners and the centre of each box."""
    x1, y1, x2, y2 = box.unbind(1)
    return torch.stack([torch.stack([x1, y1], 1), torch.stack([x2, y1], 1), torch.stack([x2, y2], 1),
                        torch.stack([x1, y2], 1), torch.stack([(x1 + x2) / 2, (y1 + y2) / 2], 1)], dim=1)


class YoloPose(nn.Module):
    def __init__(self, candidates: int = 32) -> None:
        super().__init__()
        self.candidates = candidates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        box, found = bounding_box(colour_share(x, 0))
        points = corner_points(box)
        scores = torch.tensor(KEYPOINT_SCORES, device=x.device)[None, :, None].expand(b, -1, 1)
        kpts = torch.cat([points, scores], dim=2).reshape(b, -1)  # [B, K*3]: x, y, score per point
        first = torch.cat([cxcywh(box), 0.9 * found[:, None], kpts], dim=1)
        rest = torch.zeros(b, first.shape[1], self.candidates - 1, device=x.device)
        return torch.cat([first[:, :, None], rest], dim=2)  # [B, 4+1+K*3, N]


class KeypointRcnn(nn.Module):
    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        box, found = bounding_box(colour_share(x, 0))
        points = corner_points(box)
        out = []
        for i in range(x.shape[0]):
            keep = found[i : i + 1] > 0
            visible = torch.ones(1, 5, 1, device=x.device)
            out.append({
                "boxes": box[i : i + 1][keep],
                "labels": torch.ones(1, dtype=torch.int64, device=x.device)[keep],
                "scores": torch.full((1,), 0.9, device=x.device)[keep],
                "keypoints": torch.cat([points[i : i + 1], visible], dim=2)[keep],
                "keypoints_scores": torch.tensor([KEYPOINT_SCORES], device=x.device)[keep] * 10,
            })
        return out


def _normalised(box: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    height, width = x.shape[2], x.shape[3]
    return cxcywh(box) / torch.tensor([width, height, width, height], device=x.device, dtype=torch.float32)


class DetrSigmoid(nn.Module):
    def __init__(self, queries: int = 10) -> None:
        super().__init__()
        self.queries = queries

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        red_box, red_found = bounding_box(colour_share(x, 0))
        blue_box, blue_found = bounding_box(colour_share(x, 2))
        logits = torch.full((b, self.queries, NUM_CLASSES), -6.0, device=x.device)
        logits[:, 0, RED] = torch.where(red_found > 0, 3.0, -6.0)
        logits[:, 1, BLUE] = torch.where(blue_found > 0, 1.0, -6.0)
        boxes = torch.full((b, self.queries, 4), 0.5, device=x.device)
        boxes[:, 0] = _normalised(red_box, x)
        boxes[:, 1] = _normalised(blue_box, x)
        return logits, boxes


class DetrSoftmax(nn.Module):
    """DETR: C+1 logits per query, the last "no object"; query 0 gives RED a softmax of 0.9."""

    def __init__(self, queries: int = 10) -> None:
        super().__init__()
        self.queries = queries

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = x.shape[0]
        red_box, red_found = bounding_box(colour_share(x, 0))
        logits = torch.zeros(b, self.queries, NUM_CLASSES + 1, device=x.device)
        logits[:, :, NUM_CLASSES] = 8.0  # every other query: "no object"
        # softmax 0.9 for RED: exp(a) / (exp(a) + 3) = 0.9 with the other three logits at 0
        logits[:, 0, NUM_CLASSES] = torch.where(red_found > 0, 0.0, 8.0)
        logits[:, 0, RED] = math.log(27.0)
        boxes = torch.full((b, self.queries, 4), 0.5, device=x.device)
        boxes[:, 0] = _normalised(red_box, x)
        return {"logits": logits, "pred_boxes": boxes}


class RtDetrUltra(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        red_box, red_found = bounding_box(colour_share(x, 0))
        first = torch.cat([_normalised(red_box, x), 0.9 * red_found[:, None],
                           torch.full((b, 1), float(RED), device=x.device)], dim=1)
        return torch.cat([first[:, None], torch.zeros(b, 4, 6, device=x.device)], dim=1)  # [B, 5, 6]


def ultralytics_export(yaml: str, imgsz: int, workdir, class_bias: float, rtdetr: bool = False):
    """An Ultralytics model built from its YAML with random weights (seed 0), exported to TorchScript:
    (the .torchscript path, the Ultralytics model object). Needs `pip install ultralytics` (imported
    here, not at module import).

    Random weights answer every image alike (each activation fades to a constant through the
    layers), so the batch-norm statistics are calibrated on smooth random images first, and the
    class biases set to `class_bias` (yolo heads), so that outputs vary and some objects pass.
    """
    import os
    from pathlib import Path

    os.environ.setdefault("YOLO_OFFLINE", "1")
    from ultralytics import RTDETR, YOLO

    torch.manual_seed(0)
    model = (RTDETR if rtdetr else YOLO)(yaml)
    net = model.model
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    smooth = F.interpolate(torch.rand(4, 3, imgsz // 16, imgsz // 16), size=(imgsz, imgsz), mode="bilinear")
    net.train()
    with torch.no_grad():
        net(smooth)
    net.eval()
    for branch in getattr(net.model[-1], "cv3", []):
        nn.init.constant_(branch[-1].bias, class_bias)
    cwd = Path.cwd()
    os.chdir(workdir)
    try:
        return Path(workdir) / model.export(format="torchscript", imgsz=imgsz, verbose=False), model
    finally:
        os.chdir(cwd)

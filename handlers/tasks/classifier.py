"""Image classification: softmax top-k, mapped through the archive's `index_to_name.json`.

Response body for each request (200):

    {"predictions": [{"index": 281, "label": "tabby", "probability": 0.8731}, ...]}

sorted by probability, `handler.classifier.top_k` entries (default 5; fewer if the model has fewer
classes). `label` is the index as a string when the archive has no label for it.
`index_to_name.json` maps class index -> name, either `{"0": "tench"}` or the ImageNet form
`{"0": ["n01440764", "tench"]}` (the last element is used).

With `handler.table.enabled`, the top-k rows of the batch then pass through the table stage, which
runs after `postprocess` as part of the request sequence
(handlers/tables.py, docs/tables.md): a rules CSV and the `postprocess_table(df)` hook may drop or
rename predictions, and each response gains `"counts": {label: n}`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base import VisionHandler
from ..config import HandlerConfig, check_positive
from ..labels import load_archive_labels
from ..preprocess import Geometry
from ..tables import TableSpec
from ..video.summary import ClassificationSummary, VideoSummary

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifierConfig:
    """`handler.classifier`: how many classes each response lists."""

    top_k: int = 5

    def validate(self, path: str) -> None:
        check_positive(self.top_k, f"{path}.top_k")


@dataclass(frozen=True)
class ImageClassifierConfig(HandlerConfig):
    """The `handler:` section of a classification archive."""

    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)


class ImageClassifier(VisionHandler):
    """Top-k classifier over a model that returns logits [N, num_classes]."""

    task = "image-classification"
    config_class = ImageClassifierConfig
    config: ImageClassifierConfig
    table = TableSpec("predictions", ("class_id", "label", "score"),
                      renames={"index": "class_id", "probability": "score"})

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, str] = {}

    def load_assets(self, model_dir: Path) -> None:
        self.labels = load_archive_labels(model_dir, logger)

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise RuntimeError(f"image classifier expects logits of shape [N, classes], the model returned {shape}")
        k = min(self.config.classifier.top_k, logits.shape[1])
        probs, indices = torch.softmax(logits.float(), dim=1).topk(k, dim=1)
        results = []
        for row_probs, row_indices in zip(probs.cpu().tolist(), indices.cpu().tolist(), strict=True):
            results.append({
                "predictions": [
                    {"index": i, "label": self.labels.get(i, str(i)), "probability": round(p, 6)}
                    for p, i in zip(row_probs, row_indices, strict=True)
                ]
            })
        return results

    def video_summary(self) -> VideoSummary:
        """A clip's summary: top-k of the mean probability over its frames (handlers/video/summary.py)."""
        return ClassificationSummary(self.labels, self.config.classifier.top_k)

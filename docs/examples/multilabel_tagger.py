"""A new task written as one module: multi-label image tagging (docs/subclassing.md).

A tagging model returns one logit per tag, [B, tags]; each tag is on or off independently
(sigmoid, not softmax). The response lists the tags whose score reaches `handler.tagger.threshold`:

    {"tags": [{"index": 0, "label": "outdoor", "score": 0.880797}, ...]}

Everything about the task is here: its config section (`tagger:`), its defaults, its result table
and its postprocess. Ship it with an archive:

    tsgpu archive --name tagger --model tagger.pt2 --labels tags.json \
        --handler-class multilabel_tagger:MultiLabelTagger --extra-files multilabel_tagger.py \
        --config tagger.threshold=0.7 --export-path model_store

or register it as a built-in task with one line in `handlers/tasks/__init__.py`'s `TASK_HANDLERS`
(`"image-tagging": "handlers.tasks.tagger:MultiLabelTagger"`, after moving this file there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from handlers.base import VisionHandler
from handlers.config import HandlerConfig, check_positive, check_unit_interval
from handlers.labels import load_archive_labels
from handlers.preprocess import Geometry
from handlers.tables import TableSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaggerConfig:
    """`handler.tagger`: which tags a response lists."""

    threshold: float = 0.5
    """A tag is listed when its sigmoid score is at least this."""
    max_tags: int = 20
    """At most this many tags per image, highest score first."""

    def validate(self, path: str) -> None:
        check_unit_interval(self.threshold, f"{path}.threshold")
        check_positive(self.max_tags, f"{path}.max_tags")


@dataclass(frozen=True)
class MultiLabelTaggerConfig(HandlerConfig):
    """The `handler:` section of a tagging archive: the shared sections plus `tagger:`."""

    tagger: TaggerConfig = field(default_factory=TaggerConfig)


class MultiLabelTagger(VisionHandler):
    """Tags whose sigmoid score reaches the threshold, from a model returning logits [B, tags]."""

    task = "image-tagging"
    config_class = MultiLabelTaggerConfig
    config: MultiLabelTaggerConfig
    # Whole image, squashed to the model's square input (taggers look at everything in the frame).
    task_defaults = {"preprocess": {"geometry": "stretch", "input_size": 224}}
    # handler.table: one row per tag, so a rules CSV can drop or rename tags.
    table = TableSpec("tags", ("class_id", "label", "score"), renames={"index": "class_id"})

    def __init__(self) -> None:
        super().__init__()
        self.labels: dict[int, str] = {}

    def load_assets(self, model_dir: Path) -> None:
        self.labels = load_archive_labels(model_dir, logger)

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise RuntimeError(f"tagger expects logits [batch, tags], the model returned {type(logits).__name__}"
                               f"{list(logits.shape) if isinstance(logits, torch.Tensor) else ''}")
        cfg = self.config.tagger
        scores, indices = torch.sigmoid(logits.float()).topk(min(cfg.max_tags, logits.shape[1]), dim=1)
        results = []
        for row_scores, row_indices in zip(scores.cpu().tolist(), indices.cpu().tolist(), strict=True):
            results.append({"tags": [
                {"index": i, "label": self.labels.get(i, str(i)), "score": round(s, 6)}
                for s, i in zip(row_scores, row_indices, strict=True) if s >= cfg.threshold
            ]})
        return results  # the table stage (handler.table) runs after this, on these results

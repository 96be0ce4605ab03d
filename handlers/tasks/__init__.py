"""Task handlers, one module per task, and the registry of tasks.

A task module holds everything about its task: the handler class (a few hooks over
`handlers.base.VisionHandler`), its config section (a dataclass, added to `HandlerConfig` by the
handler's `config_class`), its defaults under `handler:` (`task_defaults`), and its result table's
columns (`table`, a `handlers.tables.TableSpec`). Registering it here is one line in
`TASK_HANDLERS`; `tsgpu archive --task`, config validation and the table stage read this registry.

    classifier.py  ImageClassifier     --task image-classification
    detector.py    ObjectDetector      --task object-detection
    segmenter.py   SemanticSegmenter   --task semantic-segmentation
    embedder.py    ImageEmbedder       --task image-embedding
    instances.py   InstanceSegmenter   --task instance-segmentation (boxes + COCO RLE masks per object)
    keypoints.py   KeypointDetector    --task keypoints (boxes + points per object)
    cascade.py     Cascade             --task cascade (detector + embedder/classifier on device crops)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..base import VisionHandler
    from ..tables import TableSpec

#: `tsgpu archive --task NAME` -> the handler class an archive of that task runs (module:Class).
#: Names only, so that `tsgpu --help` lists the tasks without importing torch.
TASK_HANDLERS: dict[str, str] = {
    "image-classification": "handlers.tasks.classifier:ImageClassifier",
    "object-detection": "handlers.tasks.detector:ObjectDetector",
    "semantic-segmentation": "handlers.tasks.segmenter:SemanticSegmenter",
    "image-embedding": "handlers.tasks.embedder:ImageEmbedder",
    "instance-segmentation": "handlers.tasks.instances:InstanceSegmenter",
    "keypoints": "handlers.tasks.keypoints:KeypointDetector",
    "cascade": "handlers.tasks.cascade:Cascade",
}


def task_handler(task: str) -> type[VisionHandler]:
    """The handler class of a registered task (imports its module)."""
    try:
        target = TASK_HANDLERS[task]
    except KeyError:
        raise KeyError(f"unknown task {task!r} (known: {', '.join(TASK_HANDLERS)})") from None
    module, _, name = target.partition(":")
    cls: type[VisionHandler] = getattr(importlib.import_module(module), name)
    return cls


def table_specs() -> tuple[TableSpec, ...]:
    """Every registered task's result table (tasks without one left out)."""
    specs = (task_handler(task).table for task in TASK_HANDLERS)
    return tuple(spec for spec in specs if spec is not None)

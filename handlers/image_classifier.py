"""Image classification's old import path, kept for existing archives, configs and subclasses.

The task lives in `handlers.tasks.classifier` (one module per task); this module only re-exports it.
"""

from .tasks.classifier import ClassifierConfig, ImageClassifier, ImageClassifierConfig

__all__ = ["ClassifierConfig", "ImageClassifier", "ImageClassifierConfig"]

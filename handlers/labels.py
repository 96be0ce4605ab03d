"""Class labels: the archive's `index_to_name.json`, read the same way at build time and at load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .errors import ConfigError

LABELS_FILE = "index_to_name.json"


def load_labels(path: Path) -> dict[int, str]:
    """Read an index -> name mapping; {} when the file is absent. Raises ConfigError if malformed."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path.name}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: expected a JSON object {{\"0\": \"name\", ...}}, got {type(raw).__name__}")
    labels: dict[int, str] = {}
    for key, value in raw.items():
        try:
            index = int(key)
        except ValueError:
            raise ConfigError(f"{path.name}: key {key!r} is not a class index") from None
        if isinstance(value, list) and value:
            value = value[-1]
        if not isinstance(value, str):
            raise ConfigError(f"{path.name}: label for {key!r} must be a string, got {value!r}")
        labels[index] = value
    return labels


def load_archive_labels(model_dir: Path, logger: logging.Logger) -> dict[int, str]:
    """The archive's labels for a task handler's `load_assets`; warns once when it has none."""
    labels = load_labels(model_dir / LABELS_FILE)
    if not labels:
        logger.warning("%s not found in the archive: labels will be class ids", LABELS_FILE)
    return labels

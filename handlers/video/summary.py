"""Per-clip summaries of a video request: what each task says about the whole clip.

A task's `video_summary()` hook (handlers/tasks/*.py) returns one of these accumulators for each
request; the serve path (serve.py) feeds it every frame batch (`add`: the model's outputs, the
task's per-frame results and the frames' presentation times) and asks for the summary at the end
(`result`). `frame_result` may trim a frame's body (embeddings leave their vectors out unless
`handler.video.per_frame_embeddings`).

    classification  {"predictions": [{"index", "label", "probability"}]}: top-k of the mean softmax
                    probability over the sampled frames (k = handler.classifier.top_k)
    detection       {"classes": [{"class_id", "label", "frames", "max_score", "first_s", "last_s"}]}:
                    per class, the frames with at least one detection of it, its best score, and the
                    presentation times of the first and last of those frames; sorted by class id
    segmentation    {"classes": [{"class_id", "label", "frames", "mean_area"}]}: per class, the frames
                    in which it covers pixels and its mean area (displayed pixels) over those frames
    embedding       the L2-normalised mean of the frame vectors (each L2-normalised first when
                    handler.embedder.normalize), in the task's encoding: {"embedding", "dim"} or
                    {"embedding_b64", "dtype", "dim"}

Accumulators keep running sums only (a class table, or one [C] / [D] float64 vector on the model's
device), so memory does not grow with the number of frames.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

#: Decimals of times and areas in summaries (probabilities and scores keep the tasks' 6).
TIME_DECIMALS = 6
AREA_DECIMALS = 2


class VideoSummary(Protocol):
    """What the serve path needs from a task's summary accumulator."""

    def add(self, outputs: Any, results: list[Any], pts_s: list[float]) -> None:
        """One frame batch: the model's outputs, the task's per-frame results, their times (s)."""
        ...

    def frame_result(self, result: Any) -> dict[str, Any]:
        """A frame's body in the response (the task's result, possibly trimmed)."""
        ...

    def result(self) -> dict[str, Any]:
        """The summary of every frame added so far."""
        ...


class NoSummary:
    """The default for tasks without a summary of their own: `{}`; frames keep their full bodies."""

    def add(self, outputs: Any, results: list[Any], pts_s: list[float]) -> None:
        return None

    def frame_result(self, result: Any) -> dict[str, Any]:
        return dict(result) if isinstance(result, Mapping) else {"result": result}

    def result(self) -> dict[str, Any]:
        return {}


class ClassificationSummary(NoSummary):
    """Top-k of the mean softmax probability over frames, from the model's logits [n, classes]."""

    def __init__(self, labels: Mapping[int, str], top_k: int) -> None:
        self.labels = labels
        self.top_k = top_k
        self.total: torch.Tensor | None = None
        self.frames = 0

    def add(self, outputs: Any, results: list[Any], pts_s: list[float]) -> None:
        logits = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        probs = torch.softmax(logits.float(), dim=1).sum(dim=0, dtype=torch.float64)
        self.total = probs if self.total is None else self.total + probs
        self.frames += logits.shape[0]

    def result(self) -> dict[str, Any]:
        if self.total is None or not self.frames:
            return {"predictions": []}
        mean = self.total / self.frames
        probs, indices = mean.topk(min(self.top_k, mean.shape[0]))
        return {"predictions": [
            {"index": i, "label": self.labels.get(i, str(i)), "probability": round(p, 6)}
            for p, i in zip(probs.cpu().tolist(), indices.cpu().tolist(), strict=True)
        ]}


@dataclass
class _Seen:
    label: str
    frames: int = 0
    max_score: float = 0.0
    first_s: float = float("inf")
    last_s: float = float("-inf")
    area: float = 0.0


class DetectionSummary(NoSummary):
    """Per class: frames with a detection of it, best score, first and last time (from the results)."""

    def __init__(self) -> None:
        self.classes: dict[int, _Seen] = {}

    def add(self, outputs: Any, results: list[Any], pts_s: list[float]) -> None:
        for result, pts in zip(results, pts_s, strict=True):
            best: dict[int, tuple[float, str]] = {}
            for det in result.get("detections", []):
                score = max(det["score"], best.get(det["class_id"], (0.0, ""))[0])
                best[det["class_id"]] = (score, det["label"])
            for class_id, (score, label) in best.items():
                seen = self.classes.setdefault(class_id, _Seen(label))
                seen.frames += 1
                seen.max_score = max(seen.max_score, score)
                seen.first_s = min(seen.first_s, pts)
                seen.last_s = max(seen.last_s, pts)

    def result(self) -> dict[str, Any]:
        return {"classes": [
            {"class_id": c, "label": s.label, "frames": s.frames, "max_score": round(s.max_score, 6),
             "first_s": round(s.first_s, TIME_DECIMALS), "last_s": round(s.last_s, TIME_DECIMALS)}
            for c, s in sorted(self.classes.items())
        ]}


class SegmentationSummary(NoSummary):
    """Per class: frames in which it covers pixels and its mean area over those frames (from the
    results' `segments` (rle) or `classes` (png) entries, after `min_area`)."""

    def __init__(self) -> None:
        self.classes: dict[int, _Seen] = {}

    def add(self, outputs: Any, results: list[Any], pts_s: list[float]) -> None:
        for result in results:
            for entry in result.get("segments", result.get("classes", [])):
                seen = self.classes.setdefault(entry["class_id"], _Seen(entry["label"]))
                seen.frames += 1
                seen.area += entry["area"]

    def result(self) -> dict[str, Any]:
        return {"classes": [
            {"class_id": c, "label": s.label, "frames": s.frames, "mean_area": round(s.area / s.frames, AREA_DECIMALS)}
            for c, s in sorted(self.classes.items())
        ]}


_VECTOR_KEYS = ("embedding", "embedding_b64", "dtype", "dim")
_DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2")}


class EmbeddingSummary(NoSummary):
    """The L2-normalised mean of the frames' vectors, in the embedder's dtype and encoding."""

    def __init__(self, vectors: Callable[[Any, int], torch.Tensor], normalize: bool, dtype: str, encoding: str,
                 per_frame: bool) -> None:
        self.vectors = vectors
        self.normalize = normalize
        self.dtype = dtype
        self.encoding = encoding
        self.per_frame = per_frame
        self.total: torch.Tensor | None = None
        self.frames = 0

    def add(self, outputs: Any, results: list[Any], pts_s: list[float]) -> None:
        vectors = self.vectors(outputs, len(results)).float()
        if self.normalize:
            vectors = F.normalize(vectors, dim=1)
        total = vectors.sum(dim=0, dtype=torch.float64)
        self.total = total if self.total is None else self.total + total
        self.frames += len(results)

    def frame_result(self, result: Any) -> dict[str, Any]:
        body = dict(result)
        if not self.per_frame:
            for key in _VECTOR_KEYS:
                body.pop(key, None)
        return body

    def result(self) -> dict[str, Any]:
        if self.total is None or not self.frames:
            return {}
        mean = F.normalize(self.total / self.frames, dim=0)
        torch_dtype, numpy_dtype = _DTYPES[self.dtype]
        host = mean.to(torch_dtype).cpu().numpy()
        dim = int(host.shape[0])
        if self.encoding == "base64":
            data = host.astype(numpy_dtype, copy=False).tobytes()
            return {"embedding_b64": base64.b64encode(data).decode("ascii"), "dtype": self.dtype, "dim": dim}
        return {"embedding": host.tolist(), "dim": dim}

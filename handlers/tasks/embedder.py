"""Image embeddings: one pooled vector per image, for vector databases.

The model returns `[B, D]` (or `[B, D, 1, 1]`, a pooled feature map; a tuple's first element also
works). On the model's device the vectors are L2-normalised (`handler.embedder.normalize`, default
true) and cast to `handler.embedder.dtype` (float32 | float16); the whole batch then crosses to the
host once.

Response (200), `encoding: list` (the default):

    {"embedding": [0.0123, -0.0456, ...], "dim": 512}

each number being the exact value of the float32 (or float16) element, written as JSON's double:
parsing it back as that dtype gives the same bits. `encoding: base64`:

    {"embedding_b64": "<base64>", "dtype": "float16", "dim": 512}

the vector's little-endian bytes (`numpy.frombuffer(base64.b64decode(s), "<f2")` for float16,
`"<f4"` for float32): 2 or 4 bytes per dimension, about 3x smaller than the list.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..base import VisionHandler
from ..config import HandlerConfig, check_choice
from ..errors import ModelLoadError
from ..preprocess import Geometry
from ..video.summary import EmbeddingSummary, VideoSummary

_DTYPES = {"float32": (torch.float32, "<f4"), "float16": (torch.float16, "<f2")}
_SHAPE_HINT = (
    "export the model up to its pooled features (e.g. replace the classifier head with "
    "torch.nn.Identity()) so that it returns [batch, dim] or [batch, dim, 1, 1]"
)


@dataclass(frozen=True)
class EmbedderConfig:
    """`handler.embedder`: pooled vectors for vector databases."""

    normalize: bool = True
    """L2-normalise each vector."""
    dtype: str = "float32"
    """float32 | float16."""
    encoding: str = "list"
    """list (a JSON list of numbers) | base64 (little-endian bytes)."""

    def validate(self, path: str) -> None:
        check_choice(self.dtype, ("float32", "float16"), f"{path}.dtype")
        check_choice(self.encoding, ("list", "base64"), f"{path}.encoding")


@dataclass(frozen=True)
class ImageEmbedderConfig(HandlerConfig):
    """The `handler:` section of an embedding archive."""

    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)


class ImageEmbedder(VisionHandler):
    """Pooled vectors from a model that returns [B, D] or [B, D, 1, 1]."""

    task = "image-embedding"
    config_class = ImageEmbedderConfig
    config: ImageEmbedderConfig

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        vectors = self.vectors(outputs, len(geometry))
        cfg = self.config.embedder
        if cfg.normalize:
            vectors = F.normalize(vectors.float(), dim=1)
        torch_dtype, numpy_dtype = _DTYPES[cfg.dtype]
        host = vectors.to(torch_dtype).cpu().numpy()  # the batch's one device->host transfer
        dim = int(host.shape[1])
        if cfg.encoding == "base64":
            return [
                {"embedding_b64": base64.b64encode(row.astype(numpy_dtype, copy=False).tobytes()).decode("ascii"),
                 "dtype": cfg.dtype, "dim": dim}
                for row in host
            ]
        return [{"embedding": row, "dim": dim} for row in host.tolist()]

    def vectors(self, outputs: Any, n: int) -> torch.Tensor:
        """The [B, D] vectors of the model's outputs; raises ModelLoadError naming the shape."""
        x = outputs[0] if isinstance(outputs, (tuple, list)) and outputs else outputs
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ModelLoadError(f"image embedding expects float vectors [B, D], the model returned {got}; {_SHAPE_HINT}")
        if x.dim() == 4 and x.shape[2:] == (1, 1):
            x = x.flatten(1)
        if x.dim() != 2 or x.shape[0] != n or x.shape[1] < 1:
            raise ModelLoadError(
                f"image embedding expects [B, D] or [B, D, 1, 1] for a batch of {n}, the model returned "
                f"shape {tuple(x.shape)}; {_SHAPE_HINT}"
            )
        return x

    def video_summary(self) -> VideoSummary:
        """A clip's summary: the L2-normalised mean of its frame vectors, in this task's encoding;
        frames keep their own vectors only with handler.video.per_frame_embeddings."""
        cfg = self.config.embedder
        return EmbeddingSummary(self.vectors, cfg.normalize, cfg.dtype, cfg.encoding,
                                self.config.video.per_frame_embeddings)

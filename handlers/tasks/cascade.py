"""Cascades: detect, then embed or classify every kept box, in one archive and one pass on the device.

    tsgpu archive --task cascade --model detector.pt2 --second-model embedder.pt2 \\
        --second-task image-embedding|image-classification ...

Per TorchServe batch:

  1. decode once: the preprocess backend (any of them) decodes each image and, besides the
     letterboxed detector input, keeps the EXIF-oriented full-resolution RGB image on the device
     (`PreprocessSpec.keep_images`, `Batch.images`);
  2. the detector runs on the letterboxed batch; its outputs become boxes in original pixels exactly
     as an `object-detection` archive makes them (handler.detector.*, tasks/detector.py);
  3. the boxes are filtered (handler.cascade.classes, min_score, at most max_crops per image, best
     first); they cross to the host once, as the detector's answer (the crop regions are plain ints);
  4. each kept box, padded by crop_pad of its size on every side, is cut out of the full-resolution
     image ON THE DEVICE, resized to the second model's input as handler.cascade.preprocess says
     (geometry, sizes, interpolation; the same plan as a whole image gets, geometry.py), rounded to
     8-bit levels, normalised (mean/std, dtype): every crop of every image of the batch in one tensor;
  5. the second model runs once on that tensor (in chunks of handler.cascade.crop_batch, if set), and
     its outputs are read as the `image-embedding` or `image-classification` task reads them
     (handler.cascade.embedder.* / classifier.*: the same encoding, dtype, top_k...);
  6. one response per image: the detector's detections, each with its second-stage keys.

No crop is re-encoded and no image crosses between host and device twice. Response (200):

    {"image_size": [w, h],
     "detections": [{"class_id", "label", "score", "box": [x1, y1, x2, y2],
                     "crop_box": [left, top, right, bottom],     # the pixels the second model saw
                     "embedding": [...], "dim": D                 # image-embedding (or embedding_b64...)
                     | "predictions": [{"index", "label", "probability"}, ...]}, ...]}

Only the kept boxes are listed unless handler.cascade.include_unmatched, which lists every detection
(those not cropped without second-stage keys). The crops are resized with torch's antialiased
interpolation per crop (uint8 on a CPU, float on a GPU), as the torchvision backend resizes whole
images; against Pillow's resize of the same crop of the reference decode they differ by at most two
8-bit levels (tests/unit/test_cascade.py states and asserts the tolerance). On a GPU (unverified,
docs/gpu-verification.md) all of it runs on the worker's current stream; an item that takes the CPU
decode path there uploads its model input and its decoded image, each once.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..backbone import Backbone, load_backbone, warm_up
from ..config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSize,
    ModelConfig,
    PreprocessConfig,
    check_choice,
    check_positive,
    check_unit_interval,
)
from ..errors import ConfigError, ModelLoadError
from ..labels import load_labels
from ..preprocess import Batch, Geometry
from ..preprocess.contract import DTYPES, BackendContractError, Normaliser, PreprocessSpec
from ..preprocess.geometry import center_crop_box, resized_size
from .classifier import ClassifierConfig, ImageClassifier, ImageClassifierConfig
from .detector import ObjectDetector, ObjectDetectorConfig, describe
from .embedder import EmbedderConfig, ImageEmbedder, ImageEmbedderConfig

if TYPE_CHECKING:
    from ..base import VisionHandler
    from ..preprocess import Preprocessor

logger = logging.getLogger(__name__)

SECOND_TASKS = ("image-embedding", "image-classification")
SECOND_LABELS_FILE = "cascade_index_to_name.json"
"""The second model's labels (image-classification), shipped with --extra-files."""
MAX_ASPECT = 8
"""A crop is widened about its centre (within the image) until its long side is at most this many
times its short side: a sliver box (a clipped edge box is 0-1 px wide) would otherwise make a
center-crop resize of size resize_size x (resize_size * aspect)."""

# torch interpolation mode and antialias per handler.cascade.preprocess.interpolation, as the
# torchvision backend resizes whole images (PIL's NEAREST samples pixel centres: nearest-exact).
_MODES = {"bilinear": ("bilinear", True), "bicubic": ("bicubic", True), "nearest": ("nearest-exact", False)}


@dataclass(frozen=True)
class CropConfig:
    """`handler.cascade.preprocess`: the second model's input, made from each crop as a whole image
    of an archive of its task would be made (same keys and meanings as handler.preprocess)."""

    geometry: str = "center_crop"
    input_size: ImageSize = ImageSize()
    resize_size: int = 256
    crop_size: int = 224
    pad_value: int = 114
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    dtype: str = "float32"

    def validate(self, path: str) -> None:
        self.as_preprocess().validate(path)

    def as_preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(
            geometry=self.geometry, input_size=self.input_size, resize_size=self.resize_size,
            crop_size=self.crop_size, pad_value=self.pad_value, mean=self.mean, std=self.std,
            interpolation=self.interpolation, dtype=self.dtype,
        )

    def spec(self, device: torch.device, dtype: torch.dtype | None = None, channels_last: bool = False) -> PreprocessSpec:
        """The crops' PreprocessSpec (planning, normalisation) on `device`, in `dtype` (default: its own)."""
        cfg = self.as_preprocess()
        return PreprocessSpec(
            resize_size=cfg.resize_size, crop_size=cfg.crop_size, geometry=cfg.geometry, input_size=cfg.input_hw,
            pad_value=cfg.pad_value, mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation,
            dtype=dtype or DTYPES[cfg.dtype], device=device, channels_last=channels_last,
        )


@dataclass(frozen=True)
class CascadeConfig:
    """`handler.cascade`: which boxes go to the second model, and the second model itself."""

    task: str = "image-embedding"
    """The second stage's task: image-embedding | image-classification (tsgpu archive --second-task)."""
    classes: tuple[str, ...] = ()
    """Detector classes to crop, by class id or label; empty = every class."""
    min_score: float = 0.0
    """Crop only boxes scoring at least this (on top of handler.detector's thresholds)."""
    max_crops: int = 16
    """At most this many boxes per image (best score first) go to the second model."""
    crop_pad: float = 0.0
    """Widen each box by this share of its width/height on every side before cropping (0.1 = 10%)."""
    crop_batch: int = 0
    """Most crops the second model is given at once (more run in chunks); 0 = its artifact's max
    batch (from tsgpu compile's .json), else all of a batch's crops (up to batchSize x max_crops)."""
    include_unmatched: bool = False
    """List the detections that were not cropped too (without second-stage keys)."""
    labels: str = SECOND_LABELS_FILE
    """The second model's index_to_name.json inside the archive (image-classification)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The second artifact (`file` is set by tsgpu archive --second-model)."""
    preprocess: CropConfig = field(default_factory=CropConfig)
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def validate(self, path: str) -> None:
        check_choice(self.task, SECOND_TASKS, f"{path}.task")
        check_unit_interval(self.min_score, f"{path}.min_score")
        check_positive(self.max_crops, f"{path}.max_crops")
        if self.crop_batch < 0:
            raise ConfigError(f"{path}.crop_batch: must be >= 0 (0 = the artifact's max batch), got {self.crop_batch}")
        if not 0.0 <= self.crop_pad <= 2.0:
            raise ConfigError(f"{path}.crop_pad: must be within 0..2 (a share of the box size), got {self.crop_pad}")


@dataclass(frozen=True)
class CascadeHandlerConfig(ObjectDetectorConfig):
    """The `handler:` section of a cascade archive: a detector's keys plus `cascade:`."""

    cascade: CascadeConfig = field(default_factory=CascadeConfig)


@dataclass(frozen=True)
class Crop:
    """One kept box: its image's row in the batch, its detection's place in the answer, its pixels."""

    image: int
    detection: int
    box: tuple[int, int, int, int]
    """(left, top, right, bottom), whole pixels of the oriented full-resolution image."""


def crop_region(box: tuple[float, float, float, float], pad: float, width: int, height: int) -> tuple[int, int, int, int]:
    """The whole-pixel region cropped for a box (original pixels): padded by `pad` of the box's size
    on each side, rounded outwards, inside the image, at least 1 px, widened about its centre to an
    aspect ratio of at most MAX_ASPECT (where the image allows)."""
    x1, y1, x2, y2 = box
    pw, ph = (x2 - x1) * pad, (y2 - y1) * pad
    left, right = _span(x1 - pw, x2 + pw, width)
    top, bottom = _span(y1 - ph, y2 + ph, height)
    w, h = right - left, bottom - top
    if w * MAX_ASPECT < h:
        left, right = _widen(left, right, math.ceil(h / MAX_ASPECT), width)
    elif h * MAX_ASPECT < w:
        top, bottom = _widen(top, bottom, math.ceil(w / MAX_ASPECT), height)
    return left, top, right, bottom


def _span(low: float, high: float, size: int) -> tuple[int, int]:
    """[low, high) rounded outwards and clipped to [0, size], at least one pixel."""
    a = min(max(math.floor(low), 0), size - 1)
    b = max(min(math.ceil(high), size), a + 1)
    return a, b


def _widen(low: int, high: int, length: int, size: int) -> tuple[int, int]:
    """[low, high) grown about its centre to `length` (at most `size`), shifted to stay inside."""
    length = min(length, size)
    centre = (low + high) / 2
    a = int(round(centre - length / 2))
    a = min(max(a, 0), size - length)
    return a, a + length


def resolve_classes(classes: tuple[str, ...], labels: dict[int, str]) -> frozenset[int] | None:
    """handler.cascade.classes as class ids (None = every class): an integer is an id, anything
    else a label of the detector's index_to_name.json."""
    if not classes:
        return None
    by_label: dict[str, list[int]] = {}
    for class_id, name in labels.items():
        by_label.setdefault(name, []).append(class_id)
    ids: set[int] = set()
    for key in classes:
        text = str(key).strip()
        if text.lstrip("-").isdigit():
            ids.add(int(text))
        elif text in by_label:
            ids.update(by_label[text])
        else:
            known = ", ".join(sorted(by_label)[:10]) or "none: the archive has no index_to_name.json"
            raise ConfigError(
                f"handler.cascade.classes: {key!r} is not a class id and not a detector label (labels: {known}); "
                f"name classes by id, e.g. '3', or by label"
            )
    return frozenset(ids)


class _KeptImages:
    """The preprocess backend, its decoded images kept per item until postprocess takes them.

    The request sequence hands `postprocess` the items' Geometry objects only (and the micro-batch
    pipeline decodes batch k+1 before k is post-processed): each image is filed under its item's
    Geometry object (by identity) and leaves when taken or when that Geometry is gone."""

    def __init__(self, inner: Preprocessor) -> None:
        self.inner = inner
        self.name = inner.name
        self.fallback_items = inner.fallback_items
        self._images: dict[int, torch.Tensor] = {}

    def run(self, items: list[bytes]) -> Batch:
        batch = self.inner.run(items)
        self.fallback_items = self.inner.fallback_items
        for i, g in enumerate(batch.geometry):
            if g is None:
                continue
            image = batch.images[i] if i < len(batch.images) else None
            if image is None:
                raise BackendContractError(
                    f"the {self.name} backend decoded item {i} but kept no image for it (keep_images)"
                )
            self._images[id(g)] = image
            weakref.finalize(g, self._images.pop, id(g), None)
        return batch

    def take(self, geometry: list[Geometry]) -> list[torch.Tensor]:
        try:
            images = [self._images.pop(id(g)) for g in geometry]
        except KeyError:
            raise RuntimeError("cascade: postprocess was given an item its preprocess backend did not decode") from None
        for image in images:
            if image.is_cuda:  # made on the decode stream, read on this one (the micro-batch pipeline): keep
                image.record_stream(torch.cuda.current_stream(image.device))  # its memory until read (unverified)
        return images

    def close(self) -> None:
        self._images.clear()
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Cascade(ObjectDetector):
    """A detector whose kept boxes are cropped on the device and embedded or classified."""

    task = "cascade"
    config_class = CascadeHandlerConfig
    config: CascadeHandlerConfig
    task_defaults = ObjectDetector.task_defaults
    table = None  # type: ignore[assignment]  # detections with vectors: no result table (handler.table)
    keep_images = True

    def __init__(self) -> None:
        super().__init__()
        self.second: Backbone | None = None
        self.crop_spec = PreprocessSpec()
        self.crop_normalise = Normaliser(self.crop_spec)
        self.classes: frozenset[int] | None = None
        self.reader: VisionHandler | None = None
        """The second task's handler, used for its `postprocess` (how its task reads outputs)."""

    # -- loading ----------------------------------------------------------------------------------

    def _load_model(self) -> None:
        cfg = self.config.cascade
        if not cfg.model.file and not cfg.model.artifacts:
            raise ConfigError(
                "handler.cascade.model.file: the second model's artifact is not set; build the archive with "
                "tsgpu archive --task cascade --second-model FILE (or set handler.cascade.model.file)"
            )
        media = getattr(self.config, "media", "image")
        if media != "image":
            raise ConfigError(f"handler.media: {media!r}: a cascade answers images only; use media: image")
        super()._load_model()
        self.second = load_backbone(self.model_dir, cfg.model.file, cfg.model, self.device)

    def _make_preprocessor(self, decode_threads: int) -> PreprocessSpec:
        spec = super()._make_preprocessor(decode_threads)
        assert self.preprocessor is not None and self.second is not None
        self.preprocessor = _KeptImages(self.preprocessor)
        self.crop_spec = self.config.cascade.preprocess.spec(self.device, self.second.dtype, self.second.channels_last)
        self.crop_normalise = Normaliser(self.crop_spec)
        self._check_second_input()
        return spec

    def _check_second_input(self) -> None:
        assert self.second is not None
        info = self.second.info
        shape = (info.meta.get("input", {}).get("shape") if info is not None else None) or []
        if info is not None and len(shape) == 3 and tuple(shape[1:]) != tuple(self.crop_spec.size):
            h, w = shape[1:]
            raise ModelLoadError(
                f"{info.file} (the cascade's second model) was compiled for {h}x{w} inputs but "
                f"handler.cascade.preprocess makes {self.crop_spec.size[0]}x{self.crop_spec.size[1]}: set "
                f"handler.cascade.preprocess.input_size: [{h}, {w}]"
            )

    def load_assets(self, model_dir: Path) -> None:
        super().load_assets(model_dir)
        cfg = self.config.cascade
        self.classes = resolve_classes(cfg.classes, self.labels)
        reader: ImageEmbedder | ImageClassifier
        if cfg.task == "image-embedding":
            reader = ImageEmbedder()
            reader.config = ImageEmbedderConfig(embedder=cfg.embedder)
        else:
            reader = ImageClassifier()
            reader.config = ImageClassifierConfig(classifier=cfg.classifier)
            reader.labels = load_labels(model_dir / cfg.labels)
            if not reader.labels:
                logger.warning("%s not found in the archive: the second model's labels will be class ids", cfg.labels)
        self.reader = reader

    def crop_chunk(self) -> int:
        """The most crops given to the second model at once (handler.cascade.crop_batch)."""
        assert self.second is not None
        most = self.batch_size * self.config.cascade.max_crops
        limit = self.config.cascade.crop_batch or self.second.max_batch
        return min(most, limit) if limit else most

    def _warm_up(self, spec: PreprocessSpec) -> None:
        super()._warm_up(spec)
        assert self.second is not None
        sizes = sorted({1, self.crop_chunk()})
        for size in sizes:  # one size at a time: the error names the one the model refused
            try:
                seconds = warm_up(self.second, [size], self.crop_spec.size)
            except Exception as exc:
                h, w = self.crop_spec.size
                raise ModelLoadError(
                    f"the cascade's second model ({self.second.describe()}) failed on a batch of [{size}, 3, {h}, {w}] "
                    f"crops ({type(exc).__name__}: {str(exc)[:200]}): set handler.cascade.preprocess.input_size "
                    f"(and mean/std/dtype) to the model's input, and handler.cascade.crop_batch to the largest "
                    f"batch it takes (crops beyond it run in chunks; up to batchSize x max_crops = "
                    f"{self.batch_size} x {self.config.cascade.max_crops} per batch)"
                ) from exc
            logger.info("cascade second model warm-up at batch size %d took %.2fs", size, seconds)

    # -- the task ---------------------------------------------------------------------------------

    def postprocess(self, outputs: Any, geometry: list[Geometry]) -> list[Any]:
        assert isinstance(self.preprocessor, _KeptImages)
        images = self.preprocessor.take(geometry)
        answers: list[dict[str, Any]] = super().postprocess(outputs, geometry)  # the detector's answer
        crops = self.plan_crops(answers)
        if crops:
            for crop, extra in zip(crops, self.second_stage(images, crops), strict=True):
                answers[crop.image]["detections"][crop.detection].update(extra)
        if not self.config.cascade.include_unmatched:
            for answer in answers:
                answer["detections"] = [d for d in answer["detections"] if "crop_box" in d]
        return answers

    def plan_crops(self, answers: list[dict[str, Any]]) -> list[Crop]:
        """The crops to run, from each image's detector answer (detections best first; boxes in
        original pixels as answered): each kept detection gets its `crop_box`."""
        cfg = self.config.cascade
        crops: list[Crop] = []
        for image, answer in enumerate(answers):
            width, height = answer["image_size"]
            taken = 0
            for index, detection in enumerate(answer["detections"]):
                if taken == cfg.max_crops:
                    break
                if (self.classes is not None and detection["class_id"] not in self.classes) \
                        or detection["score"] < cfg.min_score:
                    continue
                taken += 1
                box = crop_region(tuple(detection["box"]), cfg.crop_pad, width, height)
                detection["crop_box"] = list(box)
                crops.append(Crop(image, index, box))
        return crops

    def second_stage(self, images: list[torch.Tensor], crops: list[Crop]) -> list[dict[str, Any]]:
        """The second task's result for every crop: one batch cut from the decoded images, one
        (chunked) run of the second model, one read of its outputs."""
        assert self.second is not None and self.reader is not None
        batch = self.crop_batch(images, crops)
        step = self.crop_chunk()
        outputs = [self.second(batch[i:i + step]) for i in range(0, len(crops), step)]
        joined = outputs[0] if len(outputs) == 1 else _concat(outputs)
        results: list[dict[str, Any]] = self.reader.postprocess(joined, [self._crop_geometry(c) for c in crops])
        return results

    def crop_batch(self, images: list[torch.Tensor], crops: list[Crop]) -> torch.Tensor:
        """Every crop as the second model's input: [M, 3, H, W] on the device, normalised, in the
        second model's dtype and layout."""
        for crop in crops:
            _check_image(images[crop.image], crop)
        height, width = self.crop_spec.size
        out = torch.empty((len(crops), 3, height, width), dtype=torch.float32, device=self.crop_spec.device)
        if self.crop_spec.geometry == "letterbox":
            out.fill_(float(self.crop_spec.pad_value))
        for row, crop in enumerate(crops):
            left, top, right, bottom = crop.box
            self._resize_into(images[crop.image][:, top:bottom, left:right], self._crop_geometry(crop), out[row])
        x = self.crop_normalise(out).to(self.crop_spec.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.crop_spec.channels_last else x

    def _crop_geometry(self, crop: Crop) -> Geometry:
        left, top, right, bottom = crop.box
        return self.crop_spec.plan(right - left, bottom - top)

    def _resize_into(self, region: torch.Tensor, plan: Geometry, out: torch.Tensor) -> None:
        """Resize a crop (uint8 [3, h, w]) as `plan` says into `out` (float 0..255), as the
        torchvision backend does for a whole image: the reference's resize, then its crop."""
        if plan.mode == "center_crop":
            resized_w, resized_h = resized_size(*plan.original_size, self.crop_spec.resize_size)
            left, top, right, bottom = center_crop_box(resized_w, resized_h, *plan.input_size)
            out.copy_(self._resize(region, resized_w, resized_h)[0, :, top:bottom, left:right])
            return
        left, top, right, bottom = plan.target
        out[:, top:bottom, left:right] = self._resize(region, right - left, bottom - top)[0]

    def _resize(self, region: torch.Tensor, width: int, height: int) -> torch.Tensor:
        mode, antialias = _MODES[self.crop_spec.interpolation]
        options = {} if mode.startswith("nearest") else {"align_corners": False}
        x = region.unsqueeze(0)
        if mode == "bilinear" and not x.is_cuda:
            # torch's uint8 antialiased bilinear (CPU; written to match Pillow's, ~5x faster than
            # float here): the levels the reference's uint8 resize gives, to within one.
            return F.interpolate(x, size=(height, width), mode=mode, antialias=antialias, **options).float()
        x = F.interpolate(x.to(torch.float32), size=(height, width), mode=mode, antialias=antialias, **options)
        return x.round_().clamp_(0, 255)  # the reference resizes to uint8: the same levels


def _check_image(image: torch.Tensor, crop: Crop) -> None:
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise BackendContractError(
            f"cascade: the preprocess backend kept an image of {describe(image)} ({image.dtype}); "
            f"keep_images promises uint8 [3, H, W]"
        )
    if crop.box[2] > image.shape[2] or crop.box[3] > image.shape[1]:
        raise BackendContractError(
            f"cascade: crop {crop.box} lies outside the kept image {tuple(image.shape[1:])} (H, W): the backend's "
            f"kept image is not the full-resolution oriented one"
        )


def _concat(outputs: list[Any]) -> Any:
    """The second model's chunked outputs joined along the batch (a tensor, or a tuple's first one)."""
    first = [o[0] if isinstance(o, (tuple, list)) else o for o in outputs]
    return torch.cat(first)

"""Pictures of results: each input image as a person sees it, with the archive's answer drawn on it.

`tsgpu batch ... --annotate DIR` (after the job, from its part files, whatever the engine) and
`tsgpu annotate ARCHIVE.mar IMAGE... [--out DIR]` (a few files, run through the archive's own handler
in-process) write one PNG per input image:

- the image at its displayed size and orientation (EXIF orientation applied, as the handlers do, so
  the response's boxes and masks, which are in those pixels, land where they belong);
- named after the input: `DIR/<path relative to the inputs' common folder>.png` (`cat.jpg` ->
  `cat.jpg.png`; an input already named `.png` keeps its name), so two inputs never share a picture;
- boxes, labels and masks drawn with torchvision's own drawing utilities
  (`torchvision.utils.draw_bounding_boxes`, `draw_segmentation_masks`), colours by class id.

What is drawn is decided by the response's shape, one drawer per task (`DRAWERS`): `detections`
(object detection: boxes and "label score"), `segments` / `label_map_png` (semantic segmentation:
masks from the COCO RLE or the PNG label map, each class labelled at its extent) and `instances`
(instance segmentation and keypoints: boxes, labels, per-instance masks, points joined by the
response's `skeleton`, with `torchvision.utils.draw_keypoints`). A new task adds one function and
one entry. Error rows, non-file inputs (URLs, JSON records) and results with nothing to draw
(classification, embeddings) are skipped and counted by reason, never fatal.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from offline.job import InputRef, JobSpec, Shard

#: Truetype font tried for labels (found on the system's font path); torchvision's small bitmap font otherwise.
FONT = "DejaVuSans.ttf"
MASK_ALPHA = 0.45
#: Keypoints with a score at or below this are not drawn (null scores are); 0.5 as Ultralytics' plots.
KEYPOINT_MIN_SCORE = 0.5
#: Colours by class id (class_id % len): distinct, readable on photos.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (0, 0, 128),
)


class AnnotateError(ValueError):
    """An input or response that cannot be drawn; its message names the input and the reason."""


@dataclass
class AnnotateSummary:
    """What `annotate_job` wrote: pictures written, and inputs skipped by reason."""

    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    out_dir: str = ""
    pictures: list[str] = field(default_factory=list)  # paths written, in input order

    def __str__(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return f"annotated {self.written} image(s) into {self.out_dir} (skipped: {skipped})"


# -- the image as displayed -------------------------------------------------------------------------


def displayed_image(data: bytes) -> torch.Tensor:
    """uint8 [3, H, W] RGB of the image as a viewer shows it: EXIF orientation applied."""
    import torch
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            upright = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise AnnotateError(f"not a readable image ({type(exc).__name__}: {exc})") from exc
    return torch.from_numpy(np.asarray(upright).copy()).permute(2, 0, 1).contiguous()


def _colour(class_id: int) -> tuple[int, int, int]:
    return PALETTE[int(class_id) % len(PALETTE)]


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light colours, white on dark ones (Rec. 601 luma)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


@lru_cache(maxsize=1)
def _font_available() -> bool:
    from PIL import ImageFont

    try:
        ImageFont.truetype(FONT, 12)
    except OSError:
        return False
    return True


def _font_size(image: torch.Tensor) -> int:
    return max(12, round(max(image.shape[1:]) / 50))


def _line_width(image: torch.Tensor) -> int:
    return max(2, round(max(image.shape[1:]) / 400))


def _boxes(image: torch.Tensor, boxes: Sequence[Sequence[float]], labels: list[str], class_ids: list[int],
           width: int | None = None) -> torch.Tensor:
    import torch
    from torchvision.utils import draw_bounding_boxes

    if not boxes:
        return image
    font = FONT if _font_available() else None
    colours = [_colour(c) for c in class_ids]
    return draw_bounding_boxes(
        image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), labels=labels, colors=colours,
        width=width or _line_width(image), font=font, font_size=_font_size(image) if font else None,
        fill_labels=True, label_colors=[_text_colour(c) for c in colours],  # text on a patch of the box's colour
    )


def _masks(image: torch.Tensor, masks: list[np.ndarray], class_ids: list[int]) -> torch.Tensor:
    import torch
    from torchvision.utils import draw_segmentation_masks

    if not masks:
        return image
    stacked = torch.from_numpy(np.stack([m.astype(bool) for m in masks]))
    return draw_segmentation_masks(image, stacked, alpha=MASK_ALPHA, colors=[_colour(c) for c in class_ids])


def _rle_mask(rle: Mapping[str, Any]) -> np.ndarray:
    from pycocotools import mask as coco

    counts = rle["counts"]
    return coco.decode({"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str) else counts})


def _extent(mask: np.ndarray) -> list[float] | None:
    """The [x1, y1, x2, y2] box around a mask's pixels (continuous coordinates), None if empty."""
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(rows):
        return None
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


# -- one drawer per task: (image, response) -> image ------------------------------------------------


def _label(entry: Mapping[str, Any], score: bool = True) -> str:
    name = str(entry.get("label", entry.get("class_id", "")))
    return f"{name} {entry['score']:.2f}" if score and "score" in entry else name


def draw_detections(image: torch.Tensor, response: Mapping[str, Any]) -> torch.Tensor:
    """Object detection: each box with "label score"."""
    found = response["detections"]
    return _boxes(image, [d["box"] for d in found], [_label(d) for d in found], [d["class_id"] for d in found])


def draw_semantic(image: torch.Tensor, response: Mapping[str, Any]) -> torch.Tensor:
    """Semantic segmentation (RLE or PNG label map): one mask per class, labelled at its extent."""
    if "segments" in response:
        entries = list(response["segments"])
        masks = [_rle_mask(s["mask"]) for s in entries]
    else:
        from PIL import Image

        label_map = np.asarray(Image.open(io.BytesIO(base64.b64decode(response["label_map_png"]))))
        entries = list(response["classes"])
        masks = [label_map == c["class_id"] for c in entries]
    ids = [e["class_id"] for e in entries]
    image = _masks(image, masks, ids)
    boxes, labels, kept_ids = [], [], []
    for mask, entry, class_id in zip(masks, entries, ids, strict=True):
        box = _extent(mask)
        if box is not None:
            boxes.append(box)
            labels.append(_label(entry, score=False))
            kept_ids.append(class_id)
    return _boxes(image, boxes, labels, kept_ids, width=1)


def draw_instances(image: torch.Tensor, response: Mapping[str, Any]) -> torch.Tensor:
    """Instance segmentation and keypoints: each instance's mask, box, "label score", and its points
    joined by the response's `skeleton`."""
    found = list(response["instances"])
    masked = [i for i in found if "mask" in i]
    image = _masks(image, [_rle_mask(i["mask"]) for i in masked], [i["class_id"] for i in masked])
    image = _boxes(image, [i["box"] for i in found], [_label(i) for i in found], [i["class_id"] for i in found])
    for instance in (i for i in found if i.get("keypoints")):
        image = _keypoints(image, instance, response.get("skeleton"))
    return image


def _keypoints(image: torch.Tensor, instance: Mapping[str, Any], skeleton: Any) -> torch.Tensor:
    """One instance's points (those with no score or a score above KEYPOINT_MIN_SCORE) and skeleton."""
    import torch
    from torchvision.utils import draw_keypoints

    points = instance["keypoints"]
    xy = torch.tensor([[p[0], p[1]] for p in points], dtype=torch.float32)[None]
    visible = torch.tensor([[len(p) < 3 or p[2] is None or p[2] > KEYPOINT_MIN_SCORE for p in points]])
    edges = [(int(a), int(b)) for a, b in skeleton] if skeleton else None
    return draw_keypoints(image, xy, connectivity=edges, colors=_colour(instance["class_id"]),
                          radius=_line_width(image) + 1, width=_line_width(image), visibility=visible)


Drawer = Callable[["torch.Tensor", Mapping[str, Any]], "torch.Tensor"]
#: The response key that identifies a task's result -> its drawer (the first key present wins).
DRAWERS: dict[str, Drawer] = {
    "instances": draw_instances,
    "detections": draw_detections,
    "segments": draw_semantic,
    "label_map_png": draw_semantic,
}


def drawer_for(response: Mapping[str, Any]) -> Drawer | None:
    return next((draw for key, draw in DRAWERS.items() if key in response), None)


def annotate_image(image: bytes, response: str | Mapping[str, Any], out_path: str | Path) -> bool:
    """Draw `response` (the server's JSON body for `image`) on the displayed image and write a PNG to
    `out_path`. False (nothing written) when the response has nothing to draw; AnnotateError when the
    image is unreadable or its displayed size is not the response's `image_size`."""
    from PIL import Image

    body = json.loads(response) if isinstance(response, str) else response
    draw = drawer_for(body) if isinstance(body, Mapping) else None
    if draw is None:
        return False
    pixels = displayed_image(image)
    size = [int(pixels.shape[2]), int(pixels.shape[1])]
    if "image_size" in body and list(body["image_size"]) != size:
        raise AnnotateError(f"the response's image_size {body['image_size']} is not the displayed size {size}")
    drawn = draw(pixels, body)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, "PNG")
    os.replace(tmp, out)  # a reader never sees half a picture
    return True


# -- naming ------------------------------------------------------------------------------------------


def picture_names(paths: Sequence[str]) -> dict[str, str]:
    """input path -> picture path relative to the output folder: the input's path relative to the
    inputs' common folder, with `.png` appended unless it already ends so."""
    if not paths:
        return {}
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    names = {}
    for given, path in zip(paths, absolute, strict=True):
        rel = os.path.relpath(path, root)
        names[given] = rel if rel.lower().endswith(".png") else f"{rel}.png"
    return names


# -- after a batch job ------------------------------------------------------------------------------


def _part_rows(output: str) -> Iterable[tuple[str, int, str]]:
    """(uri, status, response) of every row of the job's part files, in part order."""
    import pyarrow.parquet as pq

    for part in sorted(Path(output).glob("part-*.parquet")):
        table = pq.read_table(part, columns=["uri", "status", "response"])
        yield from zip(*(table.column(c).to_pylist() for c in ("uri", "status", "response")), strict=True)


def annotate_rows(rows: Iterable[tuple[str, int, str]], inputs: Mapping[str, InputRef],
                  out_dir: str | Path) -> AnnotateSummary:
    """Draw each (uri, status, response) whose input is a file; skipped rows are counted by reason."""
    summary = AnnotateSummary(out_dir=str(out_dir))
    names = picture_names([uri for uri, ref in inputs.items() if ref.kind == "file"])
    for uri, status, response in rows:
        ref = inputs.get(uri)
        if status != 200:
            summary.skipped[f"error {status}"] += 1
        elif ref is None or ref.kind != "file":
            summary.skipped["not a file input"] += 1
        else:
            _annotate_one(uri, response, Path(out_dir) / names[uri], summary)
    return summary


def _annotate_one(path: str, response: str, out: Path, summary: AnnotateSummary) -> None:
    try:
        written = annotate_image(Path(path).read_bytes(), response, out)
    except (OSError, AnnotateError) as exc:
        summary.skipped[f"unreadable ({type(exc).__name__})"] += 1
        return
    if written:
        summary.written += 1
        summary.pictures.append(str(out))
    else:
        summary.skipped["nothing to draw"] += 1


def annotate_job(job: JobSpec, shards: Sequence[Shard], out_dir: str | Path) -> AnnotateSummary:
    """`--annotate DIR`: the finished job's rows (read back from its part files, so any engine's
    output works) drawn on their input images. Inputs must be readable from this machine."""
    inputs = {ref.uri: ref for shard in shards for ref in shard.inputs}
    return annotate_rows(_part_rows(job.output), inputs, out_dir)


# -- `tsgpu annotate ARCHIVE.mar IMAGE...` -------------------------------------------------------------


def annotate_files(archive: str | Path, images: Sequence[str | Path], out_dir: str | Path = "annotated",
                   config: Mapping[str, str] | None = None, batch_size: int = 8) -> AnnotateSummary:
    """Run a few image files through the archive's own handler (in this process, as `tsgpu batch`
    does) and draw each answer: the shortcut behind `tsgpu annotate`. Nothing else is written."""
    import tempfile

    from offline.job import JobError, plan_job
    from offline.worker import ArchiveWorker

    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise JobError(f"no such image file: {', '.join(missing[:5])}")
    with tempfile.TemporaryDirectory(prefix="tsgpu-annotate-") as scratch:
        listing = Path(scratch) / "inputs.txt"
        listing.write_text("".join(f"{Path(p).resolve()}\n" for p in images))
        job, shards = plan_job(archive, listing, Path(scratch) / "out", batch_size=batch_size,
                               config=dict(config or {}))
        refs = [ref for shard in shards for ref in shard.inputs]
        rows: list[tuple[str, int, str]] = []
        with ArchiveWorker(job) as worker:
            for start in range(0, len(refs), batch_size):
                rows.extend((r.uri, r.status, r.response) for r in worker.run(refs[start:start + batch_size]))
    return annotate_rows(rows, {ref.uri: ref for ref in refs}, out_dir)

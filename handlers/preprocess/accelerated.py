"""The base of the accelerated preprocess backends (torchvision, dali, cvcuda): probe, split,
accelerate, fall back to the CPU path, assemble.

Every accelerated backend runs the same sequence, so each one only says which items it takes and
how it decodes + resizes them:

  1. probe  every item's header with Pillow (nothing decoded): 400/413/415 come out here, before
     any GPU work, so a hostile item never reaches a GPU decoder, and the geometry (resize size,
     crop box, and the crop's box in original pixels) is planned from the header alone;
  2. split  the items the backend accepts (`accepts`) from the rest (formats or colour modes its
     decoder does not handle, e.g. CMYK JPEG, GIF, 16-bit PNG);
  3. run    the accepted items through the backend (`accelerate`), which returns the normalised
     rows it produced and the positions it could not decode;
  4. fall back: the rest, plus anything the backend refused, go through the CPU backend (same
     numerical contract), so a corrupt item gets its own 4xx from the CPU decoder and a valid
     image the GPU decoder dislikes still succeeds; if the backend fails a whole batch (a DALI
     pipeline error), the whole batch takes this path, logged;
  5. assemble one tensor in input order on the model's device, dtype and layout.

All device work is issued on the current CUDA stream of the model's device, the stream the model
runs on, so preprocessing and inference are ordered without host synchronisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import RequestError
from .contract import BackendContractError, Batch, Normaliser, PreprocessSpec
from .cpu import CpuPreprocessor
from .geometry import Geometry
from .host.decode import open_image, orientation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """One item checked from its header: what it is and where its crop comes from."""

    format: str
    mode: str
    orientation: int | None
    """EXIF orientation 1..8; None when the image has an EXIF block Pillow could not read."""
    geometry: Geometry

    @property
    def source_box(self) -> tuple[float, float, float, float]:
        """The region the model sees (left, top, right, bottom) in the full-resolution, EXIF-oriented image."""
        return self.geometry.source


def plan_item(data: bytes, spec: PreprocessSpec) -> Plan:
    """Read one item's header and plan its geometry. Raises RequestError for bad bytes or limits."""
    with open_image(data, spec) as image:
        fmt, mode = image.format or "", image.mode
        # Pillow's getexif() decodes a whole PNG to look for an eXIf chunk behind the pixels: a
        # second decode, in the worker, of an item the backend may decode anyway. Walk the chunk
        # headers instead; only a PNG that has one is asked.
        turn = 1 if fmt == "PNG" and not png_has_exif(data) else orientation(image)
        width, height = image.size
    if turn is not None and turn >= 5:  # 90-degree turns swap the axes
        width, height = height, width
    return Plan(format=fmt, mode=mode, orientation=turn, geometry=spec.plan(width, height, fmt))


def png_has_exif(data: bytes) -> bool:
    """Whether a PNG has an eXIf chunk, from the chunk headers alone (nothing decompressed).
    A malformed chunk list answers True: let Pillow look, as it would have."""
    position = 8  # the signature
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        if kind == b"eXIf":
            return True
        if kind == b"IEND":
            return False
        position += 12 + length
    return True


class AcceleratedPreprocessor:
    """Base of the accelerated backends: probe, split, accelerate, fall back, assemble.

    Subclasses set `name` and `ACCEPTED` and implement `accelerate(items, plans)`.
    """

    name = "accelerated"
    ACCEPTED: dict[str, tuple[str, ...]] = {}
    """Format -> the Pillow modes of it that the backend's decoder turns into RGB like Pillow."""
    KEEPS_IMAGES = False
    """Whether `accelerate` can hand back its decoded images (`kept`) for spec.keep_images; a backend
    that cannot sends every item to the CPU path when they are asked for."""

    def __init__(
        self, spec: PreprocessSpec, threads: int, processes: int = 0, decode_timeout_s: float = 10.0,
    ) -> None:
        self.spec = spec
        self.normalise = Normaliser(spec)
        # The CPU path decodes in threads, or in decode processes (handler.pipeline.decode_processes).
        self.fallback = CpuPreprocessor(spec, threads, processes, decode_timeout_s)
        self.fallback_items = 0  # items that took the CPU path (tests and logs read it)
        self.failed_batches = 0  # batches the backend failed as a whole
        self.kept: list[torch.Tensor] = []
        """spec.keep_images: `accelerate` leaves here the decoded image (uint8 [3, H, W], oriented,
        on the device) of each row it returned, in row order."""

    # -- hooks -----------------------------------------------------------------------------------

    def accepts(self, plan: Plan) -> bool:
        if self.spec.keep_images and not self.KEEPS_IMAGES:
            return False
        if plan.mode not in self.ACCEPTED.get(plan.format, ()):
            return False
        if plan.orientation is None:
            # An EXIF block Pillow could not read: the geometry was planned upright, but a GPU
            # decoder parses EXIF itself and might still rotate, putting the crop on the wrong
            # axes. The CPU path uses the planned (upright) orientation, consistently.
            return False
        # GPU decoders apply EXIF orientation to JPEGs; for other formats the CPU path keeps it exact.
        return plan.orientation == 1 or plan.format in ("JPEG", "MPO")

    def accelerate(self, items: list[bytes], plans: list[Plan]) -> tuple[torch.Tensor | None, list[int]]:
        """Decode + resize + crop + normalise `items` (all accepted).

        Returns (rows, failed): `rows` holds one normalised row per item not in `failed`, in order,
        on the model's device as float32 or the model's dtype, NCHW in any memory layout;
        `failed` lists the positions (into `items`) to retry on the CPU path. Raising fails the
        batch over to the CPU path as a whole.
        """
        raise NotImplementedError

    def close(self) -> None:
        self.fallback.close()

    # -- the fixed sequence ----------------------------------------------------------------------

    def run(self, items: list[bytes]) -> Batch:
        n = len(items)
        geometry: list[Geometry | None] = [None] * n
        errors: list[RequestError | None] = [None] * n
        images: list[torch.Tensor | None] = [None] * n
        fast: list[int] = []
        plans: list[Plan] = []
        slow: list[int] = []
        for i, data in enumerate(items):
            try:
                plan = plan_item(data, self.spec)
            except RequestError as err:
                errors[i] = err.detach()
                continue
            if self.accepts(plan):
                fast.append(i)
                plans.append(plan)
            else:
                slow.append(i)

        parts: list[tuple[list[int], torch.Tensor]] = []
        if fast:
            self.kept = []
            try:
                rows, failed = self.accelerate([items[i] for i in fast], plans)
            except Exception as exc:  # a backend failing a whole batch must not fail the request
                self.failed_batches += 1
                logger.warning(
                    "%s backend failed a batch of %d (%s: %s); decoding it on the CPU path",
                    self.name, len(fast), type(exc).__name__, exc,
                )
                rows, failed = None, list(range(len(fast)))
            failed_set = set(failed)
            done = []
            for k, i in enumerate(fast):
                if k not in failed_set:
                    done.append(i)
                    geometry[i] = plans[k].geometry
            if done:
                parts.append((done, self._check_rows(rows, len(done))))
                if self.spec.keep_images:
                    for i, image in zip(done, self._check_kept(len(done)), strict=True):
                        images[i] = image
            self.kept = []
            slow = sorted(slow + [fast[k] for k in failed])

        if slow:
            self.fallback_items += len(slow)
            cpu = self.fallback.run([items[i] for i in slow])
            for k, i in enumerate(slow):
                geometry[i], errors[i] = cpu.geometry[k], cpu.errors[k]
                if cpu.images:
                    images[i] = cpu.images[k]
            if cpu.tensor is not None:
                parts.append(([slow[k] for k in cpu.rows], cpu.tensor))

        rows_all = sorted(i for indices, _ in parts for i in indices)
        return Batch(tensor=self._assemble(parts, rows_all), rows=rows_all, geometry=geometry, errors=errors,
                     images=images if self.spec.keep_images else [])

    def _check_kept(self, expected: int) -> list[torch.Tensor]:
        """`accelerate`'s kept images (spec.keep_images), checked: one per row it returned."""
        if len(self.kept) != expected:
            raise BackendContractError(
                f"the {self.name} backend kept {len(self.kept)} decoded images for {expected} rows "
                f"(with spec.keep_images, accelerate() must leave one image per row in `kept`)"
            )
        return self.kept

    def _check_rows(self, rows: torch.Tensor | None, expected: int) -> torch.Tensor:
        """`accelerate`'s rows, checked against the contract: one row per item it did not fail."""
        got = 0 if rows is None else rows.shape[0]
        if rows is None or got != expected:
            raise BackendContractError(
                f"the {self.name} backend returned {got} rows for {expected} items it reported "
                f"decoded (accelerate() must return one row per item not in `failed`)"
            )
        return rows

    def _assemble(self, parts: list[tuple[list[int], torch.Tensor]], rows: list[int]) -> torch.Tensor | None:
        if not parts:
            return None
        spec = self.spec
        memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
        if len(parts) == 1:
            return parts[0][1].to(device=spec.device, dtype=spec.dtype, memory_format=memory_format)
        height, width = spec.size
        out = torch.empty((len(rows), 3, height, width), dtype=spec.dtype, device=spec.device)
        out = out.contiguous(memory_format=memory_format)
        position = {i: r for r, i in enumerate(rows)}
        for indices, tensor in parts:
            index = torch.tensor([position[i] for i in indices], device=spec.device)
            out.index_copy_(0, index, tensor.to(device=spec.device, dtype=spec.dtype))
        return out

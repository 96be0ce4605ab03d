"""Defects of the GPU paths found by reading the pinned libraries' sources (issue 14), each held by a
test that runs without a GPU where the behaviour can be reached on a CPU (DALI's CPU pipeline, a
faked device), plus the GPU half marked `gpu` (benchmarks/gpu_check.sh runs those).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from archiver_scripts import samples
from handlers.preprocess import PreprocessSpec
from handlers.preprocess import cpu as cpu_backend
from handlers.preprocess.cpu import CpuPreprocessor
from handlers.preprocess.host.decode import orientation
from tests.helpers import CPU_MAX_TOL, CPU_MEAN_TOL, bad_and_odd_items, make
from tests.reference import reference_tensor


def _photos() -> list[bytes]:
    photos = samples.photos()
    return [samples.encode(photos[name], "JPEG", quality=90) for name in ("chelsea", "coffee", "rocket", "astronaut")]


def _assert_rows_match_reference(tensor: torch.Tensor, items: list[bytes]) -> None:
    for k, data in enumerate(items):
        diff = (tensor[k].float().cpu() - reference_tensor(data)).abs()
        assert diff.mean().item() < CPU_MEAN_TOL and diff.max().item() < CPU_MAX_TOL, k


# -- 2. DALI's output buffers and the copy out of them ---------------------------------------------


class _Recorder:
    """Stands in for the torch.cuda.Event of the last copy; logs when it is waited on."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def synchronize(self) -> None:
        self.log.append("copy waited")


def test_dali_waits_for_the_last_copy_before_running_again_or_shutting_down():
    """DALI's legacy executor reuses its output buffers at the next run() and frees them at
    shutdown: the pending copy out of them must be waited on first, on every path."""
    pre = make("dali")
    log: list[str] = []

    def spy(pipe):
        run, shutdown = pipe.run, pipe._shutdown
        pipe.run = lambda *a, **k: (log.append("run"), run(*a, **k))[1]
        pipe._shutdown = lambda: (log.append("shutdown"), shutdown())[1]

    spy(pre._pipe)
    items = _photos()[:2]
    pre._copied = _Recorder(log)
    pre.run(items)
    assert log[:2] == ["copy waited", "run"]

    log.clear()
    pre._copied = _Recorder(log)
    pre._rebuild()  # the halving retry path
    assert log == ["copy waited", "shutdown"]

    spy(pre._pipe)
    log.clear()
    pre._copied = _Recorder(log)
    pre.close()
    assert log == ["copy waited", "shutdown"]


def test_dali_back_to_back_runs_and_rebuilds_return_the_right_rows():
    pre = make("dali", max_batch=4)
    first_items = _photos()
    first = pre.run(first_items).tensor
    kept = first.clone()
    items = bad_and_odd_items()
    # truncated JPEGs make DALI fail and rebuild (isolating by name and by halves) mid-batch
    mixed = [items["good"], items["truncated"], first_items[1], items["truncated_tail"], first_items[3]]
    second = pre.run(mixed)
    assert second.rows == [0, 2, 4]
    assert pre.rebuilds >= 2
    _assert_rows_match_reference(second.tensor, [mixed[i] for i in second.rows])
    third = pre.run(first_items[::-1])
    _assert_rows_match_reference(third.tensor, first_items[::-1])
    # the first batch's rows are copies: later runs and rebuilds did not touch them
    assert torch.equal(first, kept)
    _assert_rows_match_reference(first, first_items)


@pytest.mark.gpu
def test_dali_copy_is_complete_before_the_next_run_on_gpu():
    """The copy is queued behind a long kernel on torch's stream; the next run must not reuse the
    buffer before the copy has read it."""
    pre = make("dali", "cuda", max_batch=4)
    items = _photos()
    torch.cuda._sleep(200_000_000)  # ~0.1-0.2 s of GPU time ahead of the copy
    first = pre.run(items[:2]).tensor
    second = pre.run(items[2:]).tensor
    torch.cuda.synchronize()
    for tensor, group in ((first, items[:2]), (second, items[2:])):
        for k, data in enumerate(group):
            diff = (tensor[k].float().cpu() - reference_tensor(data)).abs()
            assert diff.mean().item() < 0.03 and diff.max().item() < 0.5


# -- 4. a typed DALI error must rebuild the pipeline too --------------------------------------------


class _InvalidatingPipe:
    """A real DALI pipeline that fails one run with a typed error (as DALI's ValueError/TypeError/
    IndexError subclasses do) and is then invalid for good, like DALI's own after any error."""

    def __init__(self, pipe, error: type[Exception]) -> None:
        self._pipe, self._error, self._invalid = pipe, error, False

    def feed_input(self, *args, **kwargs):
        if self._invalid:
            raise self._error("Current pipeline object is no longer valid.")
        return self._pipe.feed_input(*args, **kwargs)

    def run(self, *args, **kwargs):
        self._invalid = True
        raise self._error("Critical error in pipeline: a typed DALI error")

    def _shutdown(self):
        return self._pipe._shutdown()


@pytest.mark.parametrize("error", [ValueError, TypeError, IndexError])
def test_a_typed_dali_error_rebuilds_and_later_batches_stay_on_dali(error):
    pre = make("dali", max_batch=4)
    pre._pipe = _InvalidatingPipe(pre._pipe, error)
    items = _photos()
    batch = pre.run(items)
    assert batch.rows == [0, 1, 2, 3]
    assert pre.rebuilds == 1 and pre.failed_batches == 0 and pre.fallback_items == 0
    again = pre.run(items[:2])
    assert again.rows == [0, 1] and pre.fallback_items == 0, "the next batch must be served by DALI"
    _assert_rows_match_reference(batch.tensor, items)


# -- 5. the pinned buffer is what gets uploaded ------------------------------------------------------


class _FakeEvent:
    def __init__(self) -> None:
        self.recorded = 0
        self.waited = 0

    def record(self, stream=None) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        self.waited += 1


@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_upload_hands_the_pinned_uint8_slice_itself_to_the_copy(monkeypatch, channels_last):
    """On a GPU worker the tensor handed to the host->device copy must be the contiguous uint8
    slice of the pinned buffer (a host-side cast, permute-copy or index would be a pageable
    temporary, making the copy staged and synchronous). The device is faked: 'upload' records."""
    uploads: list[torch.Tensor] = []
    events: list[_FakeEvent] = []

    def fake_upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        uploads.append(tensor)
        return tensor.clone()  # what lands on the device: an independent copy

    def new_event() -> _FakeEvent:
        events.append(_FakeEvent())
        return events[-1]

    monkeypatch.setattr(cpu_backend, "upload", fake_upload)
    monkeypatch.setattr(torch.cuda, "Event", new_event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    spec = PreprocessSpec(channels_last=channels_last, jpeg_draft=False)
    pre = CpuPreprocessor(spec, 1)
    pre._pinned = True  # as on a GPU worker; the buffer itself cannot be pinned without CUDA, so
    pre._buffer = torch.empty((8, 224, 224, 3), dtype=torch.uint8)  # stands in for the pinned one
    items = _photos()
    bad = bad_and_odd_items()["truncated"]
    batch = pre.run([items[0], bad, items[1], items[2]])  # a gap: rows 0, 2, 3
    assert batch.rows == [0, 2, 3] and len(uploads) == 1
    sent = uploads[0]
    buffer = pre._buffer
    assert sent.dtype == torch.uint8 and sent.is_contiguous() and sent.shape == (3, 224, 224, 3)
    assert sent.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert sent.data_ptr() == buffer.data_ptr()
    reference = CpuPreprocessor(spec, 1).run([items[0], items[1], items[2]]).tensor
    assert torch.equal(batch.tensor, reference)
    assert batch.tensor.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # the event marks the upload and is waited on before the buffer is written again
    assert events[0].recorded == 1 and events[0].waited == 0
    pre.run([items[3]])
    assert events[0].waited == 1


@pytest.mark.gpu
def test_cpu_upload_on_gpu_is_from_pinned_memory():
    spec = PreprocessSpec(device=torch.device("cuda"), jpeg_draft=False)
    pre = CpuPreprocessor(spec, 1)
    items = _photos()
    out = pre.run(items).tensor
    assert pre._buffer.is_pinned()
    reference = CpuPreprocessor(PreprocessSpec(jpeg_draft=False), 1).run(items).tensor
    assert torch.allclose(out.cpu(), reference, atol=1e-5)


# -- 6. EXIF that Pillow cannot read takes the CPU path ---------------------------------------------


def _jpeg_with_exif(exif_payload: bytes) -> bytes:
    image = Image.fromarray(samples.mosaic(400, 300))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92, exif=exif_payload)
    return buf.getvalue()


def _tiff(magic: bytes, ifd_offset: int, turn: int) -> bytes:
    entry = struct.pack(">HHII", 0x0112, 3, 1, turn << 16)
    return b"Exif\x00\x00" + magic + struct.pack(">I", ifd_offset) + struct.pack(">H", 1) + entry + b"\0\0\0\0"


UNREADABLE_EXIF = {
    "ifd_offset_beyond_the_block": _tiff(b"MM\x00*", 4000, 6),
    "bad_byte_order_mark": _tiff(b"XX\x00*", 8, 6),
    "orientation_out_of_range": _tiff(b"MM\x00*", 8, 9),
}


@pytest.mark.parametrize("name", list(UNREADABLE_EXIF))
def test_jpegs_whose_exif_pillow_cannot_read_take_the_cpu_path(name):
    """A GPU decoder parses EXIF itself and may rotate where Pillow planned upright: such items
    must go to the CPU path, which uses the image as stored, consistently with the plan."""
    data = _jpeg_with_exif(UNREADABLE_EXIF[name])
    readable = _jpeg_with_exif(_tiff(b"MM\x00*", 8, 1))
    pre = make("dali")
    batch = pre.run([readable, data])
    assert batch.rows == [0, 1]
    assert pre.fallback_items == 1, "the unreadable-EXIF JPEG must be decoded on the CPU path"
    cpu = CpuPreprocessor(PreprocessSpec(jpeg_draft=False), 1).run([data])
    assert batch.geometry[1] == cpu.geometry[0] and batch.geometry[1].original_size == (400, 300)
    assert torch.allclose(batch.tensor[1], cpu.tensor[0], atol=1e-6)


def test_readable_exif_still_runs_on_the_gpu_decoder_path():
    data = _jpeg_with_exif(_tiff(b"MM\x00*", 8, 6))
    pre = make("dali")
    batch = pre.run([data])
    assert pre.fallback_items == 0 and batch.geometry[0].original_size == (300, 400)
    image = Image.open(io.BytesIO(data))
    assert orientation(image) == 6
    plain = Image.open(io.BytesIO(samples.encode(np.zeros((8, 8, 3), np.uint8))))
    assert orientation(plain) == 1

"""Decode processes (handler.pipeline.decode_processes): same pixels, geometry and errors as decode
threads; a crashing or hanging decoder costs only its item; nothing outlives the pool."""

from __future__ import annotations

import io
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from archiver_scripts import samples
from handlers.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from handlers.preprocess import PreprocessSpec, create_preprocessor
from handlers.preprocess.cpu import CpuPreprocessor
from handlers.preprocess.host.child import FAULTS_ENV
from handlers.preprocess.host.decode import decode_spec
from handlers.preprocess.host.pool import _BOOTSTRAP, _PACKAGE_ROOT, DecodePool
from tests.helpers import bad_and_odd_items, exif_rotated, make

CRASH = b"TSGPU-FAULT:crash\n"
HANG = b"TSGPU-FAULT:hang\n"
CRASH_ONCE = b"TSGPU-FAULT:crash-once\n"


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _items() -> list[bytes]:
    """Every kind of outcome: photos (incl. one large enough for draft decoding), EXIF-rotated,
    PNG, CMYK, gray, 16-bit, GIF; corrupt, truncated, oversized (413), not an image (415), empty."""
    odd = bad_and_odd_items()
    coffee = Image.fromarray(samples.photos()["coffee"])
    gray = io.BytesIO()
    coffee.convert("L").save(gray, "JPEG")
    wide = (np.asarray(coffee.convert("L"), dtype=np.uint16) * 257).astype("<u2")
    sixteen = io.BytesIO()
    Image.frombytes("I;16", coffee.size, wide.tobytes()).save(sixteen, "PNG")
    noise = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    return [
        samples.encode(samples.mosaic(1920, 1080)), exif_rotated(6), exif_rotated(3),
        odd["png"], odd["cmyk_jpeg"], gray.getvalue(), sixteen.getvalue(), odd["gif"],
        odd["truncated"], odd["truncated_tail"], noise, _png_header_only(12_000, 12_000),
        odd["text"], b"", CRASH + odd["good"], odd["good"],
    ]


@pytest.fixture(scope="module")
def items() -> list[bytes]:
    return _items()


def _outcomes(batch) -> list[tuple]:
    def cause(e) -> str | None:  # kept for logs; object addresses differ between processes
        return re.sub(r"0x[0-9a-f]+", "0x?", e.cause) if getattr(e, "cause", None) else None

    return [None if e is None else (type(e), e.code, e.message, cause(e)) for e in batch.errors]


def _same(a, b) -> None:
    assert _outcomes(a) == _outcomes(b)
    assert a.geometry == b.geometry and a.rows == b.rows
    assert torch.equal(a.tensor, b.tensor)  # byte-identical pixels -> bit-identical floats


@pytest.mark.parametrize("geometry", ["center_crop", "letterbox"])
def test_processes_give_the_same_pixels_geometry_and_errors_as_threads(items, geometry, monkeypatch):
    monkeypatch.delenv(FAULTS_ENV, raising=False)  # the fault aid is off: its bytes are a 415
    spec = PreprocessSpec(geometry=geometry, input_size=(192, 256) if geometry == "letterbox" else None,
                          max_batch=4)  # smaller than the batch: the shared frames must grow
    threads = CpuPreprocessor(spec, 2)
    processes = CpuPreprocessor(spec, 2, processes=2)
    try:
        a, b = threads.run(items), processes.run(items)
        _same(a, b)
        kinds = [type(e) if e else None for e in b.errors]
        assert kinds[:8] == [None] * 8 and kinds[-1] is None
        assert kinds[8:15] == [InvalidInput, InvalidInput, UnsupportedMediaType, PayloadTooLarge,
                               UnsupportedMediaType, InvalidInput, UnsupportedMediaType]
        assert b.geometry[1].original_size == (512, 384)  # the EXIF turn was applied in the child
        _same(threads.run(items[:3]), processes.run(items[:3]))  # a smaller batch reuses the frames
    finally:
        threads.close()
        processes.close()


def test_dali_cpu_fallback_items_decode_in_processes(items):
    threads = make("dali", max_batch=8)
    spec = threads.spec
    processes = create_preprocessor("dali", spec, 2, processes=2)
    try:
        assert processes.fallback._decoders is not None and threads.fallback._decoders is None
        a, b = threads.run(items), processes.run(items)
        _same(a, b)
        # CMYK, 16-bit, GIF and the bad items took the CPU path, in processes
        assert processes.fallback_items == threads.fallback_items >= 4
    finally:
        threads.close()
        processes.close()


@pytest.fixture
def faults(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(FAULTS_ENV, str(tmp_path))
    return tmp_path


def _reference(spec: PreprocessSpec, items: list[bytes]):
    pre = CpuPreprocessor(spec, 1)
    try:
        return pre.run(items)
    finally:
        pre.close()


def test_a_crashing_item_is_retried_once_then_fails_alone(faults, caplog):
    spec = PreprocessSpec(max_batch=4)
    good = bad_and_odd_items()
    plain = [good["good"], good["png"], good["cmyk_jpeg"]]
    pre = CpuPreprocessor(spec, 1, processes=2)
    try:
        before = set(pre._decoders.pids)
        batch = pre.run([plain[0], CRASH + plain[0], plain[1], plain[2]])
        err = batch.errors[1]
        assert isinstance(err, InvalidInput) and err.code == 400
        assert err.message == "the decoder process crashed twice on this item (killed by SIGKILL)"
        assert batch.rows == [0, 2, 3] and batch.errors[0] is batch.errors[2] is batch.errors[3] is None
        assert torch.equal(batch.tensor, _reference(spec, plain).tensor)
        assert pre._decoders.crashes == 2  # the first try and the retry, each in its own process
        after = set(pre._decoders.pids)
        assert len(after) == 2 and len(before & after) == 1  # the crashed slot holds a fresh process
        assert all(not _alive(pid) for pid in before - after)
        crashed = [r.getMessage() for r in caplog.records if "crashed (killed by SIGKILL)" in r.getMessage()]
        assert len(crashed) == 2 and all(r.startswith("decode process pid ") for r in crashed)
    finally:
        pre.close()


def test_an_item_that_crashes_once_succeeds_on_the_retry(faults):
    spec = PreprocessSpec(max_batch=2)
    good = bad_and_odd_items()["good"]
    pre = CpuPreprocessor(spec, 1, processes=1)
    try:
        batch = pre.run([CRASH_ONCE + good, good])
        assert batch.errors == [None, None] and pre._decoders.crashes == 1
        assert torch.equal(batch.tensor, _reference(spec, [good, good]).tensor)
    finally:
        pre.close()


def test_a_hanging_item_is_killed_after_the_timeout_and_the_pool_recovers(faults):
    spec = PreprocessSpec(max_batch=4)
    good = bad_and_odd_items()
    pre = CpuPreprocessor(spec, 1, processes=2, decode_timeout_s=1.0)
    try:
        before = set(pre._decoders.pids)
        started = time.monotonic()
        batch = pre.run([good["good"], HANG + good["good"], good["png"]])
        elapsed = time.monotonic() - started
        assert batch.rows == [0, 2]
        err = batch.errors[1]
        assert isinstance(err, InvalidInput) and err.code == 400
        assert err.message == ("the decoder process took longer than "
                               "handler.pipeline.decode_timeout_s=1s twice on this item")
        assert 2.0 <= elapsed < 20.0  # two timeouts (plus a fresh process's start), no hang
        assert pre._decoders.timeouts == 2
        after = set(pre._decoders.pids)
        assert len(after) == 2 and after != before
        assert all(not _alive(pid) for pid in before - after)
        again = pre.run([good["png"], good["good"]])  # the next batch works on the new processes
        assert again.errors == [None, None]
        assert torch.equal(again.tensor, _reference(spec, [good["png"], good["good"]]).tensor)
    finally:
        pre.close()


def test_hangs_cost_one_retry_per_process_and_batch(faults):
    """Several hanging items must not add up to 2 timeouts each (TorchServe would time the batch out)."""
    spec = PreprocessSpec(max_batch=4)
    good = bad_and_odd_items()["good"]
    pre = CpuPreprocessor(spec, 1, processes=1, decode_timeout_s=0.5)
    try:
        started = time.monotonic()
        batch = pre.run([HANG + good, good, HANG + good, HANG + good])
        elapsed = time.monotonic() - started
        assert batch.rows == [1]
        assert "twice on this item" in batch.errors[0].message
        for err in (batch.errors[2], batch.errors[3]):
            assert isinstance(err, InvalidInput) and "not retried" in err.message
        assert pre._decoders.timeouts == 4  # 2 for the first item, 1 each after: not 6
        assert elapsed < 15.0
    finally:
        pre.close()


_ANSWERS_NONSENSE = r"""
import sys, os, json
from multiprocessing.connection import Connection
c = Connection(int(sys.argv[1]))
c.send_bytes(json.dumps({"ready": os.getpid()}).encode())
c.recv_bytes()
while True:
    c.recv_bytes(); c.recv_bytes()
    c.send_bytes(REPLY)
"""


@pytest.mark.parametrize("reply", [b"not json", b'{"ok": 1}', b'{"error": ["InvalidInput"]}', b"[]", b"x" * 70_000])
def test_a_child_that_answers_nonsense_fails_its_item_not_the_batch(monkeypatch, reply):
    import handlers.preprocess.host.pool as pool_module
    from handlers.preprocess.host.decode import DecodeSpec

    monkeypatch.setattr(pool_module, "_BOOTSTRAP", f"REPLY = {reply!r}\n" + _ANSWERS_NONSENSE)
    with DecodePool(DecodeSpec(size=(32, 32), resize_size=32), 1, capacity=2, timeout_s=5.0) as pool:
        out = pool.decode([b"a", b"b"])
    assert [type(o) for o in out] == [InvalidInput, InvalidInput]
    assert all("malformed reply" in o.message or "crashed" in o.message for o in out)


_STALLS_MID_REPLY = r"""
import sys, os, json, struct, time
from multiprocessing.connection import Connection
c = Connection(int(sys.argv[1]))
c.send_bytes(json.dumps({"ready": os.getpid()}).encode())
c.recv_bytes()
c.recv_bytes(); c.recv_bytes()
os.write(int(sys.argv[1]), struct.pack("!i", 1000) + b"{")  # a reply's length and first byte, then nothing
time.sleep(3600)
"""


def test_a_child_that_stalls_mid_reply_costs_its_item_not_the_worker(monkeypatch):
    import handlers.preprocess.host.pool as pool_module
    from handlers.preprocess.host.decode import DecodeSpec

    monkeypatch.setattr(pool_module, "_BOOTSTRAP", _STALLS_MID_REPLY)
    started = time.monotonic()
    with DecodePool(DecodeSpec(size=(32, 32), resize_size=32), 1, capacity=1, timeout_s=1.0) as pool:
        [out] = pool.decode([b"x"])
    assert isinstance(out, InvalidInput) and "took longer than" in out.message
    assert time.monotonic() - started < 20


def test_children_cannot_shrink_the_shared_frames():
    """A child holds the frames' fd read-write; shrinking the file would SIGBUS the worker."""
    from handlers.preprocess.host.decode import DecodeSpec

    with DecodePool(DecodeSpec(size=(16, 16), resize_size=16), 1, capacity=2) as pool:
        fd = pool._frames.fd
        shrink = subprocess.run([sys.executable, "-c", f"import os; os.ftruncate({fd}, 0)"],
                                pass_fds=(fd,), capture_output=True)
        assert shrink.returncode != 0 and b"PermissionError" in shrink.stderr
        assert int(pool.frames.sum()) >= 0  # still mapped, readable
        pool.reserve(4)  # growing stays allowed
        assert pool.frames.shape[0] == 4


@pytest.mark.gpu
def test_on_a_gpu_the_shared_frames_are_page_locked_and_match_threads(items):
    spec = PreprocessSpec(device=torch.device("cuda"), max_batch=4)
    threads = CpuPreprocessor(spec, 2)
    processes = CpuPreprocessor(spec, 2, processes=2)
    try:
        a, b = threads.run(items), processes.run(items)
        assert processes._registered is not None and processes._buffer.is_pinned()
        assert _outcomes(a) == _outcomes(b) and a.geometry == b.geometry
        assert torch.equal(a.tensor.cpu(), b.tensor.cpu())
    finally:
        threads.close()
        processes.close()


def test_close_leaves_no_process_fd_or_shared_memory_segment():
    shm_before = _shm_entries()
    fds_before = _fds()
    pool = DecodePool(decode_spec(PreprocessSpec()), processes=2, capacity=4)
    pids = pool.pids
    assert [pool.probe(k)["pid"] for k in range(2)] == pids  # started and answering
    assert any("memfd:" in target for target in _fds().values())
    pool.close()
    pool.close()  # idempotent
    assert not any(_alive(pid) for pid in pids)
    assert _fds() == fds_before
    assert _shm_entries() == shm_before


def test_children_are_lean_and_die_with_their_worker(tmp_path):
    """A decode process imports no torch. Started from a worker stand-in (bootstrapped the same
    way, so it is torch-free too) that is then SIGKILLed: its children must end with it and leave
    nothing in /dev/shm."""
    shm_before = _shm_entries()
    script = _BOOTSTRAP.split("from handlers.preprocess.host.child")[0] + (
        "from handlers.preprocess.host.pool import DecodePool\n"
        "from handlers.preprocess.host.decode import DecodeSpec\n"
        "import json, time\n"
        "pool = DecodePool(DecodeSpec(), processes=2, capacity=2)\n"
        "probe = pool.probe(0)\n"
        "print(json.dumps({'pids': pool.pids, 'modules': probe['modules']}), flush=True)\n"
        "time.sleep(600)\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script, "-1", "-1", str(os.getpid()), _PACKAGE_ROOT],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        import json

        report = json.loads(worker.stdout.readline())
        pids = report["pids"]
        assert "torch" not in report["modules"] and "PIL.Image" in report["modules"]
        for pid in pids:
            assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
            rss_mb = _rss_kb(pid) / 1024
            assert rss_mb < 120, f"decode process RSS {rss_mb:.0f} MB: it should hold Pillow + numpy only"
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)
    assert _shm_entries() == shm_before


# -- helpers -------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd listdir itself used
            pass
    return out


def _shm_entries() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_close_waits_for_the_last_upload_before_releasing_the_frames():
    """On a GPU the last upload may still read the (page-locked) shared frames when close() runs."""
    order = []

    class Event:
        def synchronize(self):
            order.append("upload done")

    pre = CpuPreprocessor(PreprocessSpec(max_batch=2), 1, processes=1)
    pre._uploaded = Event()
    pre._unregister = lambda: order.append("unregistered")
    pre.close()
    assert order == ["upload done", "unregistered"]

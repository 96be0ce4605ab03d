"""Decode processes: CPU decoding in a pool of lean child processes that write into shared memory.

With `handler.pipeline.decode_processes: N` the CPU decoding of a batch (the `cpu` backend, and the
GPU backends' CPU fallbacks through it) runs in N child processes instead of threads of the worker,
so no decode work holds the worker's GIL and a decoder that crashes or hangs costs only its items.

How:
  * children are `python -c _BOOTSTRAP` started with subprocess, not multiprocessing: a fork of the
    worker would copy torch's and OpenMP's thread state, and multiprocessing's spawn would import
    the `handlers.preprocess` package (and with it torch) in every child. The bootstrap registers
    stub modules for the `handlers` and `handlers.preprocess` packages, so a child imports only
    this module, pillow_decode.py, geometry.py and errors.py: Pillow and numpy, no torch
    (tests/unit/test_decode_pool.py checks this and measures the child's RSS);
  * decoded pixels: a [capacity, H, W, 3] uint8 array in an anonymous file (`memfd_create`; else a
    /dev/shm file unlinked right after it is created) that the worker maps and hands on without a
    copy and every child maps through an inherited fd; child k writes slot i. Nothing ever has a
    name that outlives its creation, so no segment can leak, even when the worker is SIGKILLed;
  * protocol: one socketpair per child, framed by multiprocessing.connection.Connection. The worker
    sends JSON headers (the DecodeSpec once, then one per item) followed by the item's bytes; the
    child answers JSON: the item's Geometry, or its RequestError's class name and message. JSON, not
    pickle, because a child runs a decoder on hostile bytes and the worker must not unpickle what a
    compromised child might send;
  * the items of a batch are shared out by one driver thread per child pulling from a common
    queue; a driver waits on its socket with the GIL released;
  * a child that dies (EOF) or takes longer than `timeout_s` on one item is killed (SIGKILL),
    reaped and replaced by a fresh process, and the item is retried once there; an item that
    fails the decoder twice gets its own 400 naming the reason. The child is reaped before its
    item is answered, so nothing writes into the shared frames after `decode` returned;
  * children die with the worker: PR_SET_PDEATHSIG(SIGKILL) on Linux (it fires when the *thread*
    that started the child exits, so children are only ever started from one long-lived spawner
    thread), and they exit on EOF of their socket.

Test aid (off unless the environment variable is set when the pool starts): with
`TSGPU_TEST_DECODE_FAULTS=<writable directory>`, an item whose bytes start with
`b"TSGPU-FAULT:crash\\n"` makes the child SIGKILL itself, `b"TSGPU-FAULT:hang\\n"` makes it sleep
forever, and `b"TSGPU-FAULT:crash-once\\n"` crashes it the first time (a marker file in that directory,
keyed by a hash of the item, remembers it) and then decodes the bytes after the newline. Without
the variable such bytes are just not an image (415).
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import logging
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInput, PayloadTooLarge, RequestError, UnsupportedMediaType
from .geometry import Geometry
from .pillow_decode import DecodeSpec, decode_into, resample_filter

logger = logging.getLogger(__name__)

FAULTS_ENV = "TSGPU_TEST_DECODE_FAULTS"
_FAULT_PREFIX = b"TSGPU-FAULT:"
# A fresh child imports Pillow and numpy before it answers; that is not the item's time.
STARTUP_TIMEOUT_S = 60.0
# How long close() lets a child exit on EOF before killing it.
_CLOSE_GRACE_S = 1.0
_PR_SET_PDEATHSIG = 1
# A reply is one small JSON object (a geometry or an error message); anything longer is a broken child.
_MAX_REPLY_BYTES = 64 * 1024
# The directory holding the `handlers` package, for the children's stub packages.
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)

_BOOTSTRAP = """\
import sys, types
sock_fd, frames_fd, parent_pid, root = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path[:] = [p for p in sys.path if p]  # not the worker's cwd (the model directory)
for name, sub in (("handlers", "/handlers"), ("handlers.preprocess", "/handlers/preprocess")):
    stub = types.ModuleType(name)
    stub.__path__ = [root + sub]
    stub.__package__ = name
    sys.modules[name] = stub
from handlers.preprocess.decode_pool import child_main
child_main(sock_fd, frames_fd, parent_pid)
"""

_ERRORS: dict[str, type[RequestError]] = {
    cls.__name__: cls for cls in (RequestError, InvalidInput, PayloadTooLarge, UnsupportedMediaType)
}


class DecodeProcessError(RuntimeError):
    """The pool cannot run at all (a child failed to start): a broken installation, not an item."""


# -- the shared frames ---------------------------------------------------------------------------


class SharedFrames:
    """[capacity, H, W, 3] uint8 frames in an anonymous shared file, mapped into this process."""

    def __init__(self, frame_shape: tuple[int, int, int], capacity: int) -> None:
        self.frame_shape = frame_shape
        self.fd = _anonymous_file()
        self.capacity = 0
        self.nbytes = 0
        self.array: np.ndarray = np.empty((0, *frame_shape), dtype=np.uint8)
        self._map: mmap.mmap | None = None
        self.grow(max(1, capacity))

    def grow(self, capacity: int) -> np.ndarray:
        """Make room for `capacity` frames (never shrinks); returns the (possibly new) array.

        The file grows in place (children remap it on their next item); the old array stays valid
        for whoever still holds it, but shows the new file's first frames only up to its old size.
        """
        if capacity > self.capacity:
            nbytes = capacity * int(np.prod(self.frame_shape))
            os.ftruncate(self.fd, nbytes)
            self._map = mmap.mmap(self.fd, nbytes)  # the old map is unmapped once nothing uses it
            self.array = np.frombuffer(self._map, dtype=np.uint8).reshape(capacity, *self.frame_shape)
            self.capacity, self.nbytes = capacity, nbytes
        return self.array

    def close(self) -> None:
        self.array = np.empty((0, *self.frame_shape), dtype=np.uint8)
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a tensor still views it: unmapped when that one is freed
                pass
            self._map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _anonymous_file() -> int:
    """An fd to a shared-memory file with no name (memfd), or one unlinked at once (/dev/shm)."""
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("tsgpu-decoded-frames", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:  # e.g. a seccomp profile without memfd_create
            pass
        else:
            try:  # children may write pixels but never shrink the file under the worker's map (SIGBUS)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
            except (AttributeError, OSError):
                pass
            return fd
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="tsgpu-frames-", dir=directory)
    os.unlink(path)
    return fd


# -- the pool (worker side) ----------------------------------------------------------------------


@dataclass
class _Child:
    proc: subprocess.Popen
    conn: Connection
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass(frozen=True)
class _Failure:
    """Why a child failed an item: 'crashed' (with how it ended) or 'timeout'."""

    kind: str
    detail: str = ""


@dataclass
class _State:
    """What close() and the finalizer need, kept apart from the pool so the finalizer holds no
    reference to it."""

    frames: SharedFrames
    children: list[_Child | None] = field(default_factory=list)
    executors: list[ThreadPoolExecutor] = field(default_factory=list)
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        live = [c for c in self.children if c is not None]
        for child in live:
            child.conn.close()  # EOF: the child leaves its loop and exits
        deadline = time.monotonic() + _CLOSE_GRACE_S
        for child in live:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(child.proc)
        self.children[:] = [None] * len(self.children)
        for executor in self.executors:
            executor.shutdown(wait=False)
        self.frames.close()


class DecodePool:
    """N decode processes writing decoded frames into `frames`; see the module docstring."""

    def __init__(self, spec: DecodeSpec, processes: int, capacity: int = 1, timeout_s: float = 10.0) -> None:
        if processes < 1:
            raise ValueError(f"handler.pipeline.decode_processes: a pool needs >= 1 process, got {processes}")
        self.spec = spec
        self.processes = processes
        self.timeout_s = float(timeout_s)
        self.crashes = 0  # children lost to a crash or a timeout (tests and logs read them)
        self.timeouts = 0
        self._counting = threading.Lock()  # drivers replace children concurrently
        self._frames = SharedFrames((*spec.size, 3), capacity)
        # Every child is started from this one thread: PR_SET_PDEATHSIG follows the thread that
        # forked, and this one lives as long as the pool.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="decode-spawn")
        self._drivers = ThreadPoolExecutor(processes, thread_name_prefix="decode-driver")
        self._state = _State(self._frames, executors=[self._drivers, self._spawner])
        self._finalizer = weakref.finalize(self, self._state.close)
        try:
            self._state.children.extend(self._spawn() for _ in range(processes))
        except BaseException:
            self.close()
            raise

    # -- public ----------------------------------------------------------------------------------

    @property
    def frames(self) -> np.ndarray:
        """The shared [capacity, H, W, 3] uint8 frames; `decode` writes item i into frame i."""
        return self._frames.array

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self._state.children if c is not None]

    def reserve(self, n: int) -> np.ndarray:
        """Room for a batch of `n`; returns `frames` (a new array when it had to grow)."""
        if self._state.closed:
            raise DecodeProcessError("the decode process pool is closed")
        return self._frames.grow(n)

    def decode(self, items: list[bytes]) -> list[Geometry | RequestError]:
        """Decode `items` into frames 0..n-1; per item its Geometry or its (detached) RequestError."""
        n = len(items)
        self.reserve(n)
        pending = deque(range(n))
        results: list[Geometry | RequestError | None] = [None] * n

        def drive(k: int) -> None:
            # One retry after a timeout per process and batch: several hanging items must not add
            # up (2 timeouts each) past TorchServe's response timeout, which would lose the batch.
            hang_retries = [1]
            while True:
                try:
                    i = pending.popleft()
                except IndexError:
                    return
                results[i] = self._decode_item(k, i, items[i], hang_retries)

        futures = [self._drivers.submit(drive, k) for k in range(min(n, self.processes))]
        wait(futures)
        for future in futures:
            future.result()  # a bug in a driver fails the batch rather than hiding
        return results  # type: ignore[return-value]

    def probe(self, k: int = 0) -> dict[str, Any]:
        """Ask child k what it has loaded: {"pid", "modules"} (tests use it)."""
        child = self._ready_child(k)
        child.conn.send_bytes(_dump({"op": "probe"}))
        if not child.conn.poll(self.timeout_s):
            raise DecodeProcessError(f"decode process {child.pid} did not answer a probe")
        return json.loads(child.conn.recv_bytes())

    def close(self) -> None:
        """EOF to every child, a moment to exit, SIGKILL for stragglers, then the shared file."""
        self._finalizer()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one item --------------------------------------------------------------------------------

    def _decode_item(self, k: int, slot: int, data: bytes, hang_retries: list[int] | None = None) -> Geometry | RequestError:
        failures: list[_Failure] = []
        while len(failures) < 2:
            child = self._ready_child(k)
            outcome = self._ask(child, slot, data)
            if not isinstance(outcome, _Failure):
                try:
                    return _result(outcome)
                except (KeyError, TypeError, ValueError):  # a child that answers nonsense is broken
                    outcome = _Failure("crashed", "it sent a malformed reply")
            failures.append(outcome)
            self._replace(k, child, outcome)
            if outcome.kind == "timeout" and len(failures) == 1 and hang_retries is not None:
                if hang_retries[0] <= 0:
                    return InvalidInput(
                        f"the decoder process took longer than handler.pipeline.decode_timeout_s="
                        f"{self.timeout_s:g}s on this item (not retried: another item of the batch "
                        f"already hung in this process)"
                    )
                hang_retries[0] -= 1
        return InvalidInput(self._twice_message(failures))

    def _ask(self, child: _Child, slot: int, data: bytes) -> dict[str, Any] | _Failure:
        header = {"op": "decode", "slot": slot, "capacity": self._frames.capacity}
        try:
            child.conn.send_bytes(_dump(header))
            child.conn.send_bytes(data)
            if not child.conn.poll(self.timeout_s):
                return _Failure("timeout")
            raw = child.conn.recv_bytes(_MAX_REPLY_BYTES)
        except (BlockingIOError, TimeoutError):  # the socket's own bound: stalled mid-message
            return _Failure("timeout")
        except (EOFError, OSError) as exc:
            if child.proc.poll() is None and isinstance(exc, OSError):  # alive: _replace kills it
                detail = "it sent an oversized reply" if "message length" in str(exc) else f"its socket failed: {exc}"
                return _Failure("crashed", detail)
            return _Failure("crashed", _ended(child.proc))
        try:
            reply = json.loads(raw)
        except ValueError:
            return _Failure("crashed", "it sent a malformed reply")
        return reply if isinstance(reply, dict) else _Failure("crashed", "it sent a malformed reply")

    def _twice_message(self, failures: list[_Failure]) -> str:
        def say(f: _Failure) -> str:
            if f.kind == "timeout":
                return f"took longer than handler.pipeline.decode_timeout_s={self.timeout_s:g}s"
            return f"crashed ({f.detail})"

        first, second = failures
        if first.kind == second.kind == "timeout":
            return f"the decoder process {say(first)} twice on this item"
        if first.kind == second.kind and first.detail == second.detail:
            return f"the decoder process crashed twice on this item ({first.detail})"
        return f"the decoder process failed twice on this item: it {say(first)}, then {say(second)}"

    # -- children --------------------------------------------------------------------------------

    def _ready_child(self, k: int) -> _Child:
        """Child k, started and past its imports; one that died while idle is replaced (that is
        not the next item's fault)."""
        child = self._state.children[k]
        if child is None:
            raise DecodeProcessError("the decode process pool is closed")
        if child.proc.poll() is not None:
            self._replace(k, child, _Failure("crashed", _ended(child.proc)), idle=True)
            child = self._state.children[k]
            assert child is not None
        if not child.ready:
            self._await_ready(child)
        return child

    def _await_ready(self, child: _Child) -> None:
        try:
            if child.conn.poll(STARTUP_TIMEOUT_S):
                hello = json.loads(child.conn.recv_bytes())
                if hello.get("ready") == child.pid:
                    child.ready = True
                    return
        except (EOFError, OSError):
            pass
        how = _ended(child.proc) if child.proc.poll() is not None else f"no answer in {STARTUP_TIMEOUT_S:g}s"
        raise DecodeProcessError(
            f"a decode process (pid {child.pid}) failed to start ({how}); its stderr is in the "
            f"worker log. Set handler.pipeline.decode_processes: 0 to decode in threads"
        )

    def _replace(self, k: int, child: _Child, failure: _Failure, idle: bool = False) -> None:
        _kill(child.proc)  # reaped before the item is answered: no late writes into the frames
        child.conn.close()
        failure = _Failure(failure.kind, failure.detail or _ended(child.proc))
        with self._counting:
            self.crashes += 1
            self.timeouts += failure.kind == "timeout"
        what = (f"took longer than {self.timeout_s:g}s on an item" if failure.kind == "timeout"
                else f"crashed ({failure.detail})")
        logger.warning("decode process pid %d %s%s; starting a fresh one", child.pid, what,
                       " while idle" if idle else "")
        self._state.children[k] = self._spawn()

    def _spawn(self) -> _Child:
        return self._spawner.submit(self._start_child).result()

    def _start_child(self) -> _Child:
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(theirs.fileno()), str(self._frames.fd),
                 str(os.getpid()), _PACKAGE_ROOT],
                pass_fds=(theirs.fileno(), self._frames.fd), stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # Every read and write on the socket is bounded too: a child that stops half-way through a
        # reply (or stops reading an item) fails its item instead of blocking the worker for good.
        bound = struct.pack("ll", int(self.timeout_s) + 1, 0)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
        conn = Connection(ours.detach())
        conn.send_bytes(_dump({"op": "spec", "spec": self.spec.to_dict()}))
        return _Child(proc, conn)


def _result(reply: dict[str, Any]) -> Geometry | RequestError:
    if "ok" in reply:
        g = reply["ok"]
        return Geometry(
            original_size=tuple(g["original_size"]), input_size=tuple(g["input_size"]),
            source=tuple(g["source"]), target=tuple(g["target"]), mode=g["mode"],
            source_format=g["source_format"],
        )
    name, message, cause = reply["error"]
    err = _ERRORS.get(name, InvalidInput)(message)
    if cause is not None:
        err.cause = cause  # as RequestError.detach() keeps it in a thread
    return err


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    proc.wait()


def _ended(proc: subprocess.Popen) -> str:
    """How a child ended: 'killed by SIGKILL', 'exited with status 1'."""
    try:
        code = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # closed its socket but lives on: make it end
        _kill(proc)
        code = proc.returncode
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


def _dump(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


# -- the child -----------------------------------------------------------------------------------


def child_main(sock_fd: int, frames_fd: int, parent_pid: int) -> None:
    """A decode process's loop: decode items into the shared frames until the socket closes."""
    from PIL import Image

    _die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group; the worker ends its children itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(sock_fd)
    Image.init()  # every format plugin, as CpuPreprocessor does
    faults = os.environ.get(FAULTS_ENV) or None
    try:
        conn.send_bytes(_dump({"ready": os.getpid()}))
        _serve(conn, frames_fd, faults)
    except (EOFError, OSError):  # the worker closed the socket (even while we started) or is gone
        return


def _serve(conn: Connection, frames_fd: int, faults: str | None) -> None:
    spec: DecodeSpec | None = None
    frames: np.ndarray | None = None
    while True:
        header = json.loads(conn.recv_bytes())
        op = header["op"]
        if op == "spec":
            spec = DecodeSpec.from_dict(header["spec"])
            resample = resample_filter(spec.interpolation)
        elif op == "decode":
            assert spec is not None, "the pool sends the spec first"
            data = conn.recv_bytes()
            if frames is None or frames.shape[0] < header["capacity"]:
                frames = _map_frames(frames_fd, header["capacity"], spec)
            reply = _decode_reply(data, spec, resample, frames[header["slot"]], faults)
            conn.send_bytes(_dump(reply))
        elif op == "probe":
            conn.send_bytes(_dump({"pid": os.getpid(), "modules": sorted(sys.modules)}))


def _map_frames(fd: int, capacity: int, spec: DecodeSpec) -> np.ndarray:
    shape = (capacity, *spec.size, 3)
    mapped = mmap.mmap(fd, int(np.prod(shape)))
    return np.frombuffer(mapped, dtype=np.uint8).reshape(shape)


def _decode_reply(data: bytes, spec: DecodeSpec, resample: int, out: np.ndarray,
                  faults: str | None) -> dict[str, Any]:
    if faults and data.startswith(_FAULT_PREFIX):
        data = _inject_fault(data, Path(faults))
    try:
        geometry = decode_into(data, spec, resample, out)
    except RequestError as err:
        cause = err.__cause__ or err.__context__
        return {"error": [type(err).__name__, err.message,
                          f"{type(cause).__name__}: {cause}" if cause is not None else None]}
    except Exception as exc:  # decode_into turns bad bytes into RequestError; this is a bug or OOM
        return {"error": ["InvalidInput", f"could not decode image: {type(exc).__name__}: {exc}", None]}
    return {"ok": asdict(geometry)}


def _inject_fault(data: bytes, directory: Path) -> bytes:
    """The test aid of the module docstring; returns the bytes to decode when it does not strike."""
    directive, _, rest = data.partition(b"\n")
    kind = directive[len(_FAULT_PREFIX):].decode("ascii", "replace")
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "crash-once":
        marker = directory / f"crash-once-{hashlib.sha256(data).hexdigest()[:16]}"
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return rest
        os.kill(os.getpid(), signal.SIGKILL)
    return data


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it (or its process) ends (Linux)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # EOF on the socket still ends the child
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)

"""The worker's side of the video decode process: start it, hand it a clip, collect chunks, kill it.

One `DecodeProcess` is one child (child.py) plus the shared file it writes decoded frames into
(handlers/preprocess/host/frames.py's SharedFrames, used here as a flat byte buffer that grows to
frame_batch x 3 x H x W of the largest clip seen). A clip holds a process for its whole life
(`acquire` ... `release`); idle processes are kept for the next clip (at most `MAX_IDLE`), so the
PyAV (and, with the torchcodec decoder, torch) imports are paid once per worker, not per request.

Every wait on the child is bounded by the clip's `Budget` (handler.video.decode_timeout_s, summed over
the probe and every chunk): past it the child is SIGKILLed and reaped and the clip is answered
`DecodeTimeout` (408, type "decode_timeout"); the worker lives and the next clip gets a fresh child.
A child that dies (a decoder crash) fails its clip with a 400 and is replaced the same way.

Children are started the way the image decode processes are (`python -c BOOTSTRAP` with stub
packages, PR_SET_PDEATHSIG from one long-lived spawner thread; see handlers/preprocess/host/pool.py
for why), and talk the same JSON framing (host/protocol.py). Torch-free.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidInput, PayloadTooLarge, RequestError, RequestTimeout, UnsupportedMediaType
from ..preprocess.host.frames import SharedFrames
from ..preprocess.host.pool import _ended, _kill
from ..preprocess.host.protocol import MalformedReply, connect, dump, parse_reply
from .config import VideoConfig
from .probe import VideoInfo
from .sampling import FrameTable

__all__ = ["MAX_IDLE", "STARTUP_TIMEOUT_S", "Budget", "DecodeProcess", "DecodeProcessError", "DecodeTimeout", "acquire", "prestart", "release", "shutdown"]

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0
"""A fresh child imports PyAV (and numpy) before it answers; not a clip's time."""
MAX_IDLE = 2
MAX_REPLY_BYTES = 32 * 2**20
"""Replies are small JSON objects, except the frame table (~16 bytes a frame)."""
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_STUBS = ("handlers", "handlers.video", "handlers.preprocess", "handlers.preprocess.host")

_BOOTSTRAP = f"""\
import sys, types
sock_fd, frames_fd, parent_pid, root = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path[:] = [p for p in sys.path if p]  # not the worker's cwd (the model directory)
for name in {_STUBS!r}:
    stub = types.ModuleType(name)
    stub.__path__ = [root + "/" + name.replace(".", "/")]
    stub.__package__ = name
    sys.modules[name] = stub
from handlers.video.child import child_main
child_main(sock_fd, frames_fd, parent_pid)
"""

_ERRORS: dict[str, type[RequestError]] = {
    cls.__name__: cls for cls in (RequestError, InvalidInput, PayloadTooLarge, UnsupportedMediaType)
}


class DecodeTimeout(RequestTimeout):
    """Decoding a clip took longer than handler.video.decode_timeout_s; its decode process was killed."""

    code = 408
    type = "decode_timeout"


class DecodeProcessError(RuntimeError):
    """A decode process could not start, or its decoder does not load: a broken installation or
    configuration, not a clip."""


class Budget:
    """handler.video.decode_timeout_s for one clip, spent only while waiting on its decoder."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spent = 0.0

    @property
    def left(self) -> float:
        return max(0.0, self.seconds - self.spent)

    def timeout(self, what: str = "its decode process was stopped") -> DecodeTimeout:
        return DecodeTimeout(f"decoding this clip took longer than handler.video.decode_timeout_s="
                             f"{self.seconds:g}s; {what}")


class DecodeProcess:
    """One decode child and its shared frames (see the module docstring)."""

    def __init__(self) -> None:
        self.frames = SharedFrames((1, 1, 1), 1)  # a flat byte buffer: "frames" of one byte
        self.proc, self.conn = _spawner().submit(self._start).result()
        self.ready = False
        self.broken = False
        self.warmed: set[str] = set()  # decoders imported in the child

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return not self.broken and self.proc.poll() is None

    def open(self, data: bytes, cfg: VideoConfig, backend: str, budget: Budget) -> tuple[VideoInfo, FrameTable, bool, str]:
        """Probe the clip and open it with `backend` (auto, torchcodec, pyav, or "probe": probe only);
        (info, frame table, damaged, the backend used). The child resolves auto (torchcodec where it
        loads there), so the worker never imports torchcodec for CPU decoding."""
        self._await_ready()
        if backend in ("auto", "torchcodec") and "torchcodec" not in self.warmed:
            self.warm("torchcodec", Budget(STARTUP_TIMEOUT_S))  # its imports (torch) are not the clip's time
        self._send({"op": "open", "backend": backend, "cfg": cfg.to_dict()}, data)
        ok = self._reply(budget)
        table = FrameTable.from_dict(ok["table"])
        return VideoInfo(**ok["info"]), table, bool(ok["damaged"]), str(ok["backend"])

    def decode(self, indices: list[int], shape: tuple[int, int, int], budget: Budget) -> tuple[list[int], np.ndarray, int]:
        """Frames `indices` of the open clip: (indices decoded, a [n, 3, H, W] view of them in the shared
        frames, valid until the next call; frames decoded so far)."""
        n = len(indices)
        nbytes = n * int(np.prod(shape))
        self.frames.grow(nbytes)
        self._send({"op": "decode", "indices": indices, "shape": [n, *shape], "nbytes": self.frames.capacity})
        ok = self._reply(budget)
        done = [int(i) for i in ok["indices"]]
        view = self.frames.array.reshape(-1)[: len(done) * int(np.prod(shape))].reshape(len(done), *shape)
        return done, view, int(ok["decoded"])

    def warm(self, backend: str, budget: Budget) -> None:
        """Start the child and import `backend`'s decoder in it (torchcodec: torch), before any clip."""
        self._await_ready()
        self._send({"op": "warm", "backend": backend})
        self._reply(budget)
        self.warmed.add(backend)

    def close_clip(self) -> None:
        try:
            self.conn.send_bytes(dump({"op": "close"}))
        except OSError:
            self.broken = True

    def probe_modules(self) -> dict[str, Any]:
        """{"pid", "modules"}: what the child has imported (tests)."""
        self._await_ready()
        self.conn.send_bytes(dump({"op": "probe"}))
        if not self.conn.poll(10):
            raise DecodeProcessError(f"decode process {self.pid} did not answer a probe")
        return dict(json.loads(self.conn.recv_bytes()))

    def release_memory(self) -> None:
        """Give the shared frames' pages back to the OS (they are rewritten by the next clip)."""
        mapped = getattr(self.frames, "_map", None)
        if mapped is not None and hasattr(mmap, "MADV_REMOVE"):
            try:
                mapped.madvise(mmap.MADV_REMOVE)
            except OSError:
                pass

    def kill(self) -> None:
        self.broken = True
        _kill(self.proc)
        self.conn.close()
        self.frames.close()

    # -- internals ---------------------------------------------------------------------------------

    def _start(self) -> tuple[subprocess.Popen, Connection]:
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOTSTRAP, str(theirs.fileno()), str(self.frames.fd), str(os.getpid()),
                 _PACKAGE_ROOT],
                pass_fds=(theirs.fileno(), self.frames.fd), stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return proc, connect(ours, STARTUP_TIMEOUT_S)

    def _await_ready(self) -> None:
        if self.ready:
            return
        try:
            if self.conn.poll(STARTUP_TIMEOUT_S):
                hello = json.loads(self.conn.recv_bytes())
                if hello.get("ready") == self.pid:
                    self.ready = True
                    return
        except (EOFError, OSError):
            pass
        how = _ended(self.proc) if self.proc.poll() is not None else f"no answer in {STARTUP_TIMEOUT_S:g}s"
        self.kill()
        raise DecodeProcessError(f"the video decode process (pid {self.pid}) failed to start ({how}); "
                                 f"its stderr is in the worker log")

    def _send(self, header: dict[str, Any], payload: bytes | None = None) -> None:
        try:
            self.conn.send_bytes(dump(header))
            if payload is not None:
                self.conn.send_bytes(payload)
        except (BlockingIOError, TimeoutError, OSError) as exc:
            self.kill()
            raise InvalidInput(f"the video decode process stopped reading ({exc})") from None

    def _reply(self, budget: Budget) -> dict[str, Any]:
        """The child's answer within the budget: its "ok" object, or its RequestError raised."""
        start = time.monotonic()
        try:
            if not self.conn.poll(budget.left):
                budget.spent += time.monotonic() - start
                logger.warning("video decode process pid %d ran past %gs; killing it", self.pid, budget.seconds)
                self.kill()
                raise budget.timeout()
            raw = self.conn.recv_bytes(MAX_REPLY_BYTES)
        except (EOFError, OSError) as exc:
            self.kill()
            how = _ended(self.proc) if isinstance(exc, EOFError) else f"its socket failed: {exc}"
            raise InvalidInput(f"the video decoder crashed on this clip ({how})") from None
        budget.spent += time.monotonic() - start
        try:
            reply = parse_reply(raw)
        except MalformedReply:
            self.kill()
            raise InvalidInput("the video decode process sent a malformed reply") from None
        if "ok" in reply:
            return dict(reply["ok"])
        if "fatal" in reply:  # the archive's configuration, not the clip: the handler's own error
            raise DecodeProcessError(str(reply["fatal"]))
        name, message, cause = reply["error"]
        err = _ERRORS.get(name, InvalidInput)(message)
        if cause is not None:
            err.cause = cause
        raise err


# --- the worker's idle processes -------------------------------------------------------------------

_lock = threading.Lock()
_idle: list[DecodeProcess] = []
_spawn_executor: ThreadPoolExecutor | None = None


def _spawner() -> ThreadPoolExecutor:
    """The one long-lived thread every child is started from (PR_SET_PDEATHSIG follows the thread)."""
    global _spawn_executor
    with _lock:
        if _spawn_executor is None:
            _spawn_executor = ThreadPoolExecutor(1, thread_name_prefix="video-decode-spawn")
        return _spawn_executor


def acquire() -> DecodeProcess:
    """An idle live decode process, or a fresh one."""
    with _lock:
        while _idle:
            proc = _idle.pop()
            if proc.alive():
                return proc
            proc.kill()
    return DecodeProcess()


def release(proc: DecodeProcess) -> None:
    """Back to the idle list (its clip closed), or ended when broken or when enough are idle."""
    if proc.alive():
        proc.close_clip()
        proc.release_memory()
    with _lock:
        if proc.alive() and len(_idle) < MAX_IDLE:
            _idle.append(proc)
            return
    proc.kill()


def prestart(backend: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Start a decode process with `backend`'s decoder imported and keep it idle, so a worker's first
    clip does not pay for it (a handler's initialize may call it)."""
    proc = acquire()
    try:
        proc.warm(backend, Budget(timeout_s))
    finally:
        release(proc)


def shutdown() -> None:
    """End every idle decode process (tests; a worker's children also die with it)."""
    with _lock:
        idle, _idle[:] = list(_idle), []
    for proc in idle:
        proc.kill()

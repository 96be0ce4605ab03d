"""Supervision of the decode processes: CPU decoding in a pool of lean children writing into shared memory.

With `handler.pipeline.decode_processes: N` the CPU decoding of a batch (the `cpu` backend, and the
GPU backends' CPU fallbacks through it) runs in N child processes instead of threads of the worker,
so no decode work holds the worker's GIL and a decoder that crashes or hangs costs only its items.
This module is the worker's side; the pieces it supervises are its neighbours:

  * child.py: what a child runs. Children are `python -c BOOTSTRAP` started with subprocess, not
    multiprocessing: a fork of the worker would copy torch's and OpenMP's thread state, and
    multiprocessing's spawn would import the `handlers.preprocess` package (and with it torch) in
    every child. The bootstrap registers stub modules for the packages above child.py, so a child
    imports Pillow and numpy, no torch;
  * frames.py: the shared frames the children decode into (slot i = item i), handed on without a copy;
  * protocol.py: the JSON messages over one socketpair per child, every read bounded.

Supervision:
  * the items of a batch are shared out by one driver thread per child pulling from a common
    queue; a driver waits on its socket with the GIL released;
  * a child that dies (EOF) or takes longer than `timeout_s` on one item is killed (SIGKILL),
    reaped and replaced by a fresh process, and the item is retried once there; an item that
    fails the decoder twice gets its own 400 naming the reason. The child is reaped before its
    item is answered, so nothing writes into the shared frames after `decode` returned;
  * children die with the worker: PR_SET_PDEATHSIG(SIGKILL) on Linux (it fires when the *thread*
    that started the child exits, so children are only ever started from one long-lived spawner
    thread), and they exit on EOF of their socket.

Torch-free (a worker stand-in in the tests runs it without torch).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InvalidInput, RequestError
from ..geometry import Geometry
from .decode import DecodeSpec
from .frames import SharedFrames
from .protocol import MAX_REPLY_BYTES, MalformedReply, connect, dump, parse_reply, result_of

__all__ = ["STARTUP_TIMEOUT_S", "DecodePool", "DecodeProcessError"]

logger = logging.getLogger(__name__)

# A fresh child imports Pillow and numpy before it answers; that is not the item's time.
STARTUP_TIMEOUT_S = 60.0
# How long close() lets a child exit on EOF before killing it.
_CLOSE_GRACE_S = 1.0
# The directory holding the `handlers` package, for the children's stub packages.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[3])

_BOOTSTRAP = """\
import sys, types
sock_fd, frames_fd, parent_pid, root = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.path[:] = [p for p in sys.path if p]  # not the worker's cwd (the model directory)
for name in ("handlers", "handlers.preprocess", "handlers.preprocess.host"):
    stub = types.ModuleType(name)
    stub.__path__ = [root + "/" + name.replace(".", "/")]
    stub.__package__ = name
    sys.modules[name] = stub
from handlers.preprocess.host.child import child_main
child_main(sock_fd, frames_fd, parent_pid)
"""


class DecodeProcessError(RuntimeError):
    """The pool cannot run at all (a child failed to start, or the pool is closed): a broken
    installation or a use after close, not an item."""


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
        return [r if r is not None else _unanswered() for r in results]

    def probe(self, k: int = 0) -> dict[str, Any]:
        """Ask child k what it has loaded: {"pid", "modules"} (tests use it)."""
        child = self._ready_child(k)
        child.conn.send_bytes(dump({"op": "probe"}))
        if not child.conn.poll(self.timeout_s):
            raise DecodeProcessError(f"decode process {child.pid} did not answer a probe")
        reply: dict[str, Any] = json.loads(child.conn.recv_bytes())
        return reply

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
                    return result_of(outcome)
                except MalformedReply as exc:  # a child that answers nonsense is broken
                    outcome = _Failure("crashed", str(exc))
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
            child.conn.send_bytes(dump(header))
            child.conn.send_bytes(data)
            if not child.conn.poll(self.timeout_s):
                return _Failure("timeout")
            raw = child.conn.recv_bytes(MAX_REPLY_BYTES)
        except (BlockingIOError, TimeoutError):  # the socket's own bound: stalled mid-message
            return _Failure("timeout")
        except (EOFError, OSError) as exc:
            if child.proc.poll() is None and isinstance(exc, OSError):  # alive: _replace kills it
                detail = "it sent an oversized reply" if "message length" in str(exc) else f"its socket failed: {exc}"
                return _Failure("crashed", detail)
            return _Failure("crashed", _ended(child.proc))
        try:
            return parse_reply(raw)
        except MalformedReply as exc:
            return _Failure("crashed", str(exc))

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
            replaced = self._state.children[k]
            if replaced is None:  # closed while the child was replaced
                raise DecodeProcessError("the decode process pool is closed")
            child = replaced
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
        conn = connect(ours, self.timeout_s)
        conn.send_bytes(dump({"op": "spec", "spec": self.spec.to_dict()}))
        return _Child(proc, conn)


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




def _unanswered() -> RequestError:
    """An item no driver answered: impossible while every driver drains the queue, but an item
    must never come back without an outcome."""
    return InvalidInput("the decode processes returned no result for this item")

"""A decode process: the lean child that decodes items into the shared frames until its socket closes.

Started by the pool (pool.py) as `python -c BOOTSTRAP` with stub packages for `handlers`,
`handlers.preprocess` and `handlers.preprocess.host`, so it imports only this module and its
torch-free neighbours (decode.py, frames.py, protocol.py, ../geometry.py, ../../errors.py):
Pillow and numpy, no torch (tests/unit/test_decode_pool.py checks this and measures its RSS).

It dies with the worker: PR_SET_PDEATHSIG(SIGKILL) on Linux, and it exits on EOF of its socket.

Test aid (off unless the environment variable is set when the pool starts): with
`TSGPU_TEST_DECODE_FAULTS=<writable directory>`, an item whose bytes start with
`b"TSGPU-FAULT:crash\\n"` makes the child SIGKILL itself, `b"TSGPU-FAULT:hang\\n"` makes it sleep
forever, and `b"TSGPU-FAULT:crash-once\\n"` crashes it the first time (a marker file in that directory,
keyed by a hash of the item, remembers it) and then decodes the bytes after the newline. Without
the variable such bytes are just not an image (415).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ...errors import RequestError
from .decode import DecodeSpec, decode_into, resample_filter
from .frames import map_frames
from .protocol import ProtocolError, dump, error_reply, ok_reply

__all__ = ["FAULTS_ENV", "child_main"]

FAULTS_ENV = "TSGPU_TEST_DECODE_FAULTS"
_FAULT_PREFIX = b"TSGPU-FAULT:"
_PR_SET_PDEATHSIG = 1


def child_main(sock_fd: int, frames_fd: int, parent_pid: int) -> None:
    """A decode process's loop: decode items into the shared frames until the socket closes."""
    _die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group; the worker ends its children itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(sock_fd)
    Image.init()  # every format plugin, as CpuPreprocessor does
    faults = os.environ.get(FAULTS_ENV) or None
    try:
        conn.send_bytes(dump({"ready": os.getpid()}))
        _serve(conn, frames_fd, faults)
    except (EOFError, OSError):  # the worker closed the socket (even while we started) or is gone
        return


def _serve(conn: Connection, frames_fd: int, faults: str | None) -> None:
    spec: DecodeSpec | None = None
    resample = resample_filter("bilinear")
    frames: np.ndarray | None = None
    while True:
        header = json.loads(conn.recv_bytes())
        op = header["op"]
        if op == "spec":
            spec = DecodeSpec.from_dict(header["spec"])
            resample = resample_filter(spec.interpolation)
        elif op == "decode":
            if spec is None:
                raise ProtocolError("a decode request came before the spec")
            data = conn.recv_bytes()
            if frames is None or frames.shape[0] < header["capacity"]:
                frames = map_frames(frames_fd, header["capacity"], spec.size)
            reply = _decode_reply(data, spec, resample, frames[header["slot"]], faults)
            conn.send_bytes(dump(reply))
        elif op == "probe":
            conn.send_bytes(dump({"pid": os.getpid(), "modules": sorted(sys.modules)}))


def _decode_reply(data: bytes, spec: DecodeSpec, resample: Image.Resampling, out: np.ndarray,
                  faults: str | None) -> dict[str, Any]:
    if faults and data.startswith(_FAULT_PREFIX):
        data = _inject_fault(data, Path(faults))
    try:
        geometry = decode_into(data, spec, resample, out)
    except RequestError as err:
        return error_reply(err)
    except Exception as exc:  # decode_into turns bad bytes into RequestError; this is a bug or OOM
        return {"error": ["InvalidInput", f"could not decode image: {type(exc).__name__}: {exc}", None]}
    return ok_reply(geometry)


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

"""The video decode process: probes and decodes one clip at a time into the shared frames.

Started by process.py as `python -c BOOTSTRAP` with stub packages above this module (as the image
decode processes are, handlers/preprocess/host/pool.py), so with the PyAV decoder it imports PyAV and
numpy, no torch; the torchcodec decoder imports torch and torchcodec here, once, on its first clip.
It dies with the worker (PR_SET_PDEATHSIG) and exits on EOF of its socket. The worker kills it when
a clip's decoding runs past handler.video.decode_timeout_s, and starts a fresh one for the next clip.

Wire protocol (JSON over a socketpair, multiprocessing.connection framing; never pickle):

    worker -> child   {"op": "open", "backend": auto|torchcodec|pyav|probe, "cfg": VideoConfig.to_dict()}, clip bytes
                      {"op": "decode", "indices": [...], "shape": [n, 3, H, W], "nbytes": size of the shared file}
                      {"op": "close"}                       drop the clip (no reply)
                      {"op": "warm", "backend": name}       import that decoder now: {"ok": {"problem": why not | None}}
                      {"op": "probe"}                       tests: {"pid", "modules"}
    child -> worker   {"ready": pid}                        once, after its imports
                      {"ok": {"info", "table", "damaged", "backend"}}  per open (backend: the one used)
                      {"fatal": message}                    the requested decoder does not load here
                      {"ok": {"indices": [...], "decoded": n}}  per decode: frames 0..len-1 written
                      {"error": [class, message, cause]}    a RequestError (or a decoder failure as 400)

Test aid (off unless TSGPU_TEST_DECODE_FAULTS is set when the process starts, as for the image decode
processes): clip bytes starting with b"TSGPU-FAULT:hang\\n" make a decode request sleep forever, and
b"TSGPU-FAULT:crash\\n" make it SIGKILL itself; the bytes after the newline are the clip.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from ..errors import InvalidInput, RequestError
from ..preprocess.host.child import FAULTS_ENV, _die_with_parent
from ..preprocess.host.protocol import dump, error_reply
from .config import VideoConfig
from .probe import VideoInfo, probe
from .sampling import FrameTable

__all__ = ["child_main"]

_FAULT_PREFIX = b"TSGPU-FAULT:"


class _Clip:
    """The open clip: its decoder and where the shared frames are mapped."""

    def __init__(self, decoder: Any, fault: str | None) -> None:
        self.decoder = decoder
        self.fault = fault


def child_main(sock_fd: int, frames_fd: int, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(sock_fd)
    faults = bool(os.environ.get(FAULTS_ENV))
    import av  # noqa: F401  (imported before "ready": its load time is not a clip's)

    try:
        conn.send_bytes(dump({"ready": os.getpid()}))
        _serve(conn, frames_fd, faults)
    except (EOFError, OSError):
        return


def _serve(conn: Connection, frames_fd: int, faults: bool) -> None:
    clip: _Clip | None = None
    mapped: tuple[int, mmap.mmap] | None = None
    while True:
        header = json.loads(conn.recv_bytes())
        op = header["op"]
        if op == "open":
            data = conn.recv_bytes()
            if clip is not None and clip.decoder is not None:
                clip.decoder.close()
            clip, reply = _open(header, data, faults)
            conn.send_bytes(dump(reply))
        elif op == "decode":
            if mapped is None or mapped[0] < header["nbytes"]:
                mapped = (header["nbytes"], mmap.mmap(frames_fd, header["nbytes"]))
            conn.send_bytes(dump(_decode(clip, header, mapped[1])))
        elif op == "close":
            if clip is not None and clip.decoder is not None:
                clip.decoder.close()
            clip = None
        elif op == "warm":  # import a decoder now, not on the first clip
            conn.send_bytes(dump({"ok": {"problem": _load(header["backend"])}}))
        elif op == "probe":
            conn.send_bytes(dump({"pid": os.getpid(), "modules": sorted(sys.modules)}))


def _open(header: dict[str, Any], data: bytes, faults: bool) -> tuple[_Clip | None, dict[str, Any]]:
    fault = None
    if faults and data.startswith(_FAULT_PREFIX):
        directive, _, data = data.partition(b"\n")
        fault = directive[len(_FAULT_PREFIX):].decode("ascii", "replace")
    try:
        backend = _resolve(header["backend"])
    except _Unavailable as exc:
        return None, {"fatal": str(exc)}
    try:
        cfg = VideoConfig.from_mapping(header["cfg"])
        info, table, damaged = probe(data, cfg)
        decoder = _decoder(backend, data, table, info, damaged, cfg)
    except RequestError as err:
        return None, error_reply(err)
    except Exception as exc:  # a decoder bug, or an FFmpeg error probe did not map
        return None, _failure("could not open the video", exc)
    reply = {"ok": {"info": info.to_dict(), "table": table.to_dict(), "damaged": damaged, "backend": backend}}
    return _Clip(decoder, fault), reply


class _Unavailable(RuntimeError):
    """handler.video.decoder names a decoder that does not load here: the archive's problem, not a clip's."""


def _resolve(requested: str) -> str:
    """The decoder this process uses for `requested` (auto: torchcodec where it loads, else PyAV)."""
    if requested not in ("auto", "torchcodec"):
        return requested  # pyav, or probe (probe only)
    problem = _load("torchcodec")
    if problem is None:
        return "torchcodec"
    if requested == "torchcodec":
        raise _Unavailable(f"handler.video.decoder: torchcodec does not load in the decode process ({problem}); "
                           f"install torchcodec and the system's FFmpeg libraries (docs/video.md), or set "
                           f"handler.video.decoder: pyav")
    return "pyav"


def _load(backend: str) -> str | None:
    """Import `backend`'s library; None when it loads, else why not (torchcodec: torch, its FFmpeg)."""
    if backend != "torchcodec":
        return None
    from .torchcodec import torchcodec_available

    return torchcodec_available()


def _decoder(backend: str, data: bytes, table: FrameTable, info: VideoInfo, damaged: bool, cfg: VideoConfig) -> Any:
    if backend == "probe":
        return None
    if backend == "torchcodec":
        from .torchcodec import TorchCodecDecoder

        return TorchCodecDecoder(data, table, info.rotation, cfg.max_decoded_frames, device="cpu",
                                 threads=cfg.decode_threads, damaged=damaged, displayed=(info.width, info.height))
    from .pyav import PyAVDecoder

    return PyAVDecoder(data, table, info.rotation, cfg.max_decoded_frames, threads=cfg.decode_threads,
                       damaged=damaged)


def _decode(clip: _Clip | None, header: dict[str, Any], mapped: mmap.mmap) -> dict[str, Any]:
    if clip is None or clip.decoder is None:
        return error_reply(InvalidInput("no clip is open for decoding in the decode process"))
    if clip.fault == "hang":
        while True:
            time.sleep(3600)
    if clip.fault == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    shape = tuple(header["shape"])
    out = np.frombuffer(mapped, dtype=np.uint8, count=int(np.prod(shape))).reshape(shape)
    try:
        done = clip.decoder.decode_into(list(header["indices"]), out)
    except RequestError as err:
        return error_reply(err)
    except Exception as exc:  # a decoder bug: the clip gets a 400, the process lives
        return _failure("could not decode the video", exc)
    return {"ok": {"indices": done, "decoded": clip.decoder.decoded}}


def _failure(what: str, exc: BaseException) -> dict[str, Any]:
    return {"error": ["InvalidInput", f"{what}: {type(exc).__name__}: {exc}"[:2000], None]}

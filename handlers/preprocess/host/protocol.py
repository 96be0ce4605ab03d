"""The wire protocol between the worker and a decode process: JSON messages over a socketpair.

Framing is multiprocessing.connection.Connection's (a length, then the bytes). JSON, not pickle: a
child runs a decoder on hostile bytes, and the worker must not unpickle what a compromised child
might send. Every read is bounded: the worker's socket has send and receive timeouts (`connect`),
and a reply is read with a size cap (`MAX_REPLY_BYTES`), so a child that stalls half-way or sends
too much fails its item instead of blocking or flooding the worker.

    worker -> child   {"op": "spec", "spec": DecodeSpec.to_dict()}        once, first
                      {"op": "decode", "slot": i, "capacity": n}, bytes   per item
                      {"op": "probe"}                                     tests ask what it loaded
    child -> worker   {"ready": pid}                                      once, after its imports
                      {"ok": Geometry} | {"error": [class, message, cause]}   per item
                      {"pid": pid, "modules": [...]}                      per probe

Torch-free: decode processes import it.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from ...errors import InvalidInput, PayloadTooLarge, RequestError, UnsupportedMediaType
from ..geometry import Geometry

__all__ = ["MAX_REPLY_BYTES", "MalformedReply", "ProtocolError", "connect", "dump", "error_reply",
           "ok_reply", "parse_reply", "result_of"]

MAX_REPLY_BYTES = 64 * 1024
"""A reply is one small JSON object (a geometry or an error message); anything longer is a broken child."""

_ERRORS: dict[str, type[RequestError]] = {
    cls.__name__: cls for cls in (RequestError, InvalidInput, PayloadTooLarge, UnsupportedMediaType)
}


class ProtocolError(RuntimeError):
    """A message out of order or of an unknown kind (a bug on the other end, not an item)."""


class MalformedReply(ValueError):
    """A child's reply that is not one of the protocol's replies: the child is treated as broken."""


def dump(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def connect(sock: socket.socket, timeout_s: float) -> Connection:
    """The worker's end of a child's socketpair, every read and write bounded by ~`timeout_s`."""
    bound = struct.pack("ll", int(timeout_s) + 1, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, bound)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, bound)
    return Connection(sock.detach())


# -- replies: written by the child, read by the worker ----------------------------------------------


def ok_reply(geometry: Geometry) -> dict[str, Any]:
    return {"ok": asdict(geometry)}


def error_reply(err: RequestError) -> dict[str, Any]:
    """An item's RequestError, with its cause as text (as RequestError.detach() keeps it)."""
    cause = err.__cause__ or err.__context__
    return {"error": [type(err).__name__, err.message,
                      f"{type(cause).__name__}: {cause}" if cause is not None else None]}


def parse_reply(raw: bytes) -> dict[str, Any]:
    """A reply's JSON object; raises MalformedReply for anything else."""
    try:
        reply = json.loads(raw)
    except ValueError:
        raise MalformedReply("it sent a malformed reply") from None
    if not isinstance(reply, dict):
        raise MalformedReply("it sent a malformed reply")
    return reply


def result_of(reply: dict[str, Any]) -> Geometry | RequestError:
    """An item's outcome from its reply; raises MalformedReply when the reply is not well formed."""
    try:
        return _result(reply)
    except (KeyError, TypeError, ValueError):
        raise MalformedReply("it sent a malformed reply") from None


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

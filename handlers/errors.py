"""Per-request errors: what a client did wrong, as a 4xx with a JSON body.

A `RequestError` raised anywhere in the request path (inputs, decode, preprocess, task) fails only the
item it belongs to. The handler turns it into `{"code", "type", "message"}` and sets that item's HTTP
status through `context.set_response_status(code, idx=...)`; its neighbours in the batch carry on.
"""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A client error for one item of a batch. Subclasses fix `code` and `type`."""

    code: int = 400
    type: str = "invalid_input"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_response(self) -> dict[str, Any]:
        return {"code": self.code, "type": self.type, "message": self.message}

    def detach(self) -> RequestError:
        """Drop the traceback and chained exceptions; returns self.

        Call it where an error is caught and kept as a per-item result. A traceback's frames link
        to their callers (f_back), so a kept error would hold the whole call stack, including the
        handler frame whose list holds the error: a reference cycle that keeps the batch's
        request bytes, decoded images and tensors alive until a full garbage collection, which a
        busy worker rarely runs (measured: benchmarks/handler_memory.py cycles).
        """
        cause = self.__cause__ or self.__context__
        if cause is not None and not hasattr(self, "cause"):
            self.cause = f"{type(cause).__name__}: {cause}"  # kept for logs, without the frames
        self.__traceback__ = None
        self.__cause__ = None
        self.__context__ = None
        return self


class InvalidInput(RequestError):
    """Malformed request: empty body, bad base64, wrong JSON key, undecodable or truncated image."""

    code = 400
    type = "invalid_input"


class Forbidden(RequestError):
    """The request asks for something this model is configured to refuse (e.g. a URL destination)."""

    code = 403
    type = "forbidden"


class RequestTimeout(RequestError):
    code = 408
    type = "timeout"


class PayloadTooLarge(RequestError):
    """Too many bytes or too many pixels (decompression bombs land here)."""

    code = 413
    type = "too_large"


class UnsupportedMediaType(RequestError):
    """Bytes that are not an image format this model accepts."""

    code = 415
    type = "unsupported_media_type"


class UpstreamTimeout(RequestError):
    code = 504
    type = "upstream_timeout"


class ConfigError(ValueError):
    """A bad model-config.yaml `handler:` section or archive option; fails model load or the build."""


class ModelLoadError(RuntimeError):
    """The model artifact could not be loaded on this worker's device; the message says why."""

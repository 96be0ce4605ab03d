"""Request rows -> encoded image bytes, one image per request.

TorchServe hands the handler one row per request: a dict of parameter name -> value. A raw body
arrives as `body` (bytes), a JSON body as `body` (already parsed when the content type is
application/json), a multipart form as one entry per field. Accepted:

- raw bytes (`Content-Type: application/octet-stream` or an image type);
- one multipart field holding the image (any field name);
- JSON `{"data": "<base64>"}` or `{"b64": "<base64>"}` (keys configurable; a `data:` URI prefix is
  allowed);
- JSON `{"url": "https://..."}`: returned as a `UrlInput`, fetched later for the whole batch at
  once by `handlers.fetch` (when `handler.url.enabled`).

Anything else raises a RequestError for that request only.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import InputConfig
from .errors import InvalidInput, PayloadTooLarge
from .fetch import UrlConfig

if TYPE_CHECKING:
    from ts.context import Context

URL_KEY = "url"


@dataclass(frozen=True)
class UrlInput:
    """An image to download (see handlers.fetch); what `read_image_bytes` returns for {"url": ...}."""

    url: str

# Field names tried, in order, when a multipart form carries several fields.
_PREFERRED_FIELDS = ("body", "data", "image", "file")
_DATA_URI = re.compile(rb"^data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.IGNORECASE)


def read_image_bytes(
    row: Any, cfg: InputConfig, content_types: Mapping[str, str] | None = None, url_cfg: UrlConfig | None = None
) -> bytes | UrlInput:
    """The encoded image of one request row (or the URL to fetch it from); raises a RequestError
    (InvalidInput, PayloadTooLarge) on bad input."""
    name, value = _pick_field(row)
    content_type = (content_types or {}).get(name, "") if name else ""
    if isinstance(value, Mapping) and URL_KEY in value:
        return _url_input(value, cfg, url_cfg)
    data = _to_bytes(value, cfg, content_type)
    if not data:
        raise InvalidInput("empty request: no image bytes in the body")
    if len(data) > cfg.max_bytes:
        raise PayloadTooLarge(
            f"image is {len(data)} bytes; this model accepts at most {cfg.max_bytes} "
            f"(handler.inputs.max_bytes)"
        )
    return data


def parameter_content_types(context: Context, idx: int) -> dict[str, str]:
    """Per-parameter content types TorchServe recorded for request `idx` ({} if unknown)."""
    try:
        headers = context.get_all_request_header(idx) or {}
    except (AttributeError, IndexError, KeyError, TypeError):
        return {}
    return {
        key: value.get("content-type", "")
        for key, value in headers.items()
        if isinstance(value, Mapping)
    }


def _pick_field(row: Any) -> tuple[str | None, Any]:
    if not isinstance(row, Mapping):
        return None, row
    if not row:
        raise InvalidInput("empty request: no body and no form fields")
    if len(row) == 1:
        (name, value), = row.items()
        return name, value
    for name in _PREFERRED_FIELDS:
        if name in row:
            return name, row[name]
    fields = ", ".join(sorted(map(str, row)))
    raise InvalidInput(
        f"the request has {len(row)} form fields ({fields}); send one image per request, "
        f"e.g. in a field named 'data'"
    )


def _to_bytes(value: Any, cfg: InputConfig, content_type: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if content_type.startswith("application/json"):
            # TorchServe forwards the raw bytes when the JSON did not parse.
            raise InvalidInput(f"the body is declared application/json but is not valid JSON ({len(data)} bytes)")
        return data
    if isinstance(value, Mapping):
        return _from_json_object(value, cfg)
    if isinstance(value, str):
        # A text body: only meaningful as base64 image data.
        return _b64decode(value.encode("ascii", "replace"), "the text body")
    if value is None:
        raise InvalidInput("empty request: no image bytes in the body")
    raise InvalidInput(
        f"expected image bytes or a JSON object like {{\"data\": \"<base64>\"}}, "
        f"got a JSON {type(value).__name__}"
    )


def _url_input(obj: Mapping[str, Any], cfg: InputConfig, url_cfg: UrlConfig | None) -> UrlInput:
    if url_cfg is None or not url_cfg.enabled:
        raise InvalidInput("this model does not accept image URLs (handler.url.enabled is false); send the bytes")
    others = [k for k in cfg.json_keys if k in obj]
    if others:
        raise InvalidInput(f"JSON body has both 'url' and {', '.join(repr(k) for k in others)}; send exactly one image")
    url = obj[URL_KEY]
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput(f"JSON key 'url' must be a non-empty string, got {type(url).__name__}")
    return UrlInput(url.strip())


def _from_json_object(obj: Mapping[str, Any], cfg: InputConfig) -> bytes:
    keys = [k for k in cfg.json_keys if k in obj]
    if not keys:
        found = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
        accepted = ", ".join(repr(k) for k in (*cfg.json_keys, URL_KEY))
        raise InvalidInput(f"JSON body has no image key: expected one of {accepted}, found {found}")
    if len(keys) > 1:
        raise InvalidInput(f"JSON body has several image keys ({', '.join(keys)}); send exactly one")
    value = obj[keys[0]]
    if not isinstance(value, str):
        raise InvalidInput(f"JSON key {keys[0]!r} must be a base64 string, got {type(value).__name__}")
    # base64 inflates by 4/3: refuse before decoding what could only decode to too many bytes.
    if len(value) > (cfg.max_bytes * 4) // 3 + 4 + 256:
        raise PayloadTooLarge(
            f"base64 in {keys[0]!r} decodes to more than {cfg.max_bytes} bytes "
            f"(handler.inputs.max_bytes)"
        )
    return _b64decode(value.encode("ascii", "replace"), f"JSON key {keys[0]!r}")


def _b64decode(text: bytes, where: str) -> bytes:
    text = _DATA_URI.sub(b"", text.strip(), count=1)
    if not text:
        raise InvalidInput(f"{where} is empty")
    compact = re.sub(rb"\s+", b"", text)  # line-wrapped base64 (MIME style) is common
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        try:  # URL-safe alphabet, as some clients send it
            return base64.b64decode(compact, altchars=b"-_", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidInput(f"{where} is not valid base64 ({exc})") from None

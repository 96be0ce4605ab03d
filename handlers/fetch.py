"""URLs as input: concurrent, bounded downloads that cannot be pointed at the private network.

A request may carry `{"url": "https://..."}` instead of image (or, for a video archive, clip) bytes. Fetching a caller-chosen URL
from inside a data centre is the classic server-side request forgery (SSRF), so every hop is
checked:

- the scheme must be allowed (`https`, `http` by default) and the host must match
  `allowed_hosts` (glob patterns; empty = any host);
- the host is resolved once, and EVERY resolved address must be public: loopback, private,
  link-local (incl. the 169.254.169.254 cloud metadata service), multicast, reserved, CGNAT,
  unspecified and IPv4-mapped forms of those are refused unless listed in `allowed_networks`;
- the connection goes to exactly the address that was checked (no second DNS lookup, so DNS
  rebinding cannot swap it), with the original host name in `Host` and, for HTTPS, in SNI and
  certificate verification;
- redirects are followed by hand, each hop checked the same way, at most `max_redirects`;
- connect, read and total timeouts; the body is read in chunks and abandoned past `max_bytes`;
  a content type outside the caller's media is refused: `IMAGE` (the default: image/*) or `VIDEO`
  (video/*, for handlers/video/serve.py), each also taking application/octet-stream and a response
  without a content type.

Each failure is a RequestError for that item only: 400 malformed or upstream error, 403 refused,
408 timeout, 413 too large, 415 not an image / not a video, 504 total deadline passed.
"""

from __future__ import annotations

import fnmatch
import http.client
import ipaddress
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from .errors import (
    ConfigError,
    Forbidden,
    InvalidInput,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    UnsupportedMediaType,
    UpstreamTimeout,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024
_USER_AGENT = "torchserve-gpu-handlers"
# Not covered by ipaddress's is_private in every Python version.
_ALWAYS_REFUSED = (
    ("100.64.0.0/10", "a carrier-grade NAT (shared) address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("198.18.0.0/15", "a benchmarking address"),
)


@dataclass(frozen=True)
class MediaTypes:
    """The content types a caller accepts from a URL, and how errors name them."""

    noun: str
    """What the caller expects, for 415 messages: "an image"."""
    prefixes: tuple[str, ...]
    """Accepted type families ("image/")."""
    exact: tuple[str, ...] = ("application/octet-stream", "binary/octet-stream")
    """Accepted types besides the families: untyped binary."""
    accept: str = "*/*"
    """The request's Accept header."""

    def allows(self, content_type: str) -> bool:
        return content_type.startswith(self.prefixes) or content_type in self.exact


IMAGE = MediaTypes("an image", ("image/",), accept="image/*")
"""Image URLs (the image tasks' path)."""
VIDEO = MediaTypes("a video", ("video/",), exact=("application/octet-stream", "binary/octet-stream", "application/mp4"),
                   accept="video/*")
"""Video clip URLs (video archives, handlers/video/serve.py); application/mp4 is MP4's other registered type."""


@dataclass(frozen=True)
class UrlConfig:
    """`handler.url`: which URLs (images, or clips for a video archive) a model may fetch, and how."""

    enabled: bool = True
    allowed_schemes: tuple[str, ...] = ("https", "http")
    allowed_hosts: tuple[str, ...] = ()
    """Glob patterns matched against the URL's host, e.g. '*.example.com'; empty = any host."""
    allowed_networks: tuple[str, ...] = ()
    """CIDRs allowed even though private (e.g. an internal image store); empty = public only."""
    max_bytes: int = 32 * 1024 * 1024
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    total_timeout: float = 20.0
    max_redirects: int = 3
    max_concurrency: int = 16

    def validate(self, path: str) -> None:
        schemes = {s.lower() for s in self.allowed_schemes}
        if not schemes or not schemes <= {"http", "https"}:
            raise ConfigError(f"{path}.allowed_schemes: only http and https can be fetched, got {list(self.allowed_schemes)}")
        for cidr in self.allowed_networks:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ConfigError(f"{path}.allowed_networks: {cidr!r} is not a network like 10.0.0.0/8") from None
        for name in ("max_bytes", "max_concurrency"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("connect_timeout", "read_timeout", "total_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{path}.{name}: must be > 0 seconds, got {getattr(self, name)}")
        if self.max_redirects < 0:
            raise ConfigError(f"{path}.max_redirects: must be >= 0, got {self.max_redirects}")


def resolve(host: str, port: int) -> list[IPAddress]:
    """All addresses `host` resolves to (tests replace this to simulate DNS)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidInput(f"cannot resolve host {host!r}: {exc.strerror or exc}") from None
    return list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))


def refusal_reason(address: IPAddress, cfg: UrlConfig) -> str | None:
    """Why `address` may not be fetched from (None when it may)."""
    candidates: list[IPAddress] = []
    if isinstance(address, ipaddress.IPv6Address):  # IPv4 hidden in IPv6 first: name the real target
        for embedded in (address.ipv4_mapped, address.sixtofour):
            if embedded is not None:
                candidates.append(embedded)
        if address.teredo is not None:
            candidates.extend(address.teredo)
    candidates.append(address)
    for net in cfg.allowed_networks:
        if address in ipaddress.ip_network(net, strict=False):
            return None
    for ip in candidates:
        for cidr, what in _ALWAYS_REFUSED:
            if ip.version == 4 and ip in ipaddress.ip_network(cidr):
                return what
        for attr, what in (
            ("is_loopback", "a loopback address"),
            ("is_link_local", "a link-local address (cloud metadata services live here)"),
            ("is_multicast", "a multicast address"),
            ("is_unspecified", "an unspecified address"),
            ("is_reserved", "a reserved address"),
            ("is_private", "a private address"),
        ):
            if getattr(ip, attr):
                return what
        if not ip.is_global:
            return "not a public address"
    return None


def fetch_url(url: str, cfg: UrlConfig, media: MediaTypes = IMAGE) -> bytes:
    """Download one URL of `media` (default: an image) under `cfg`'s rules; raises a RequestError for that item."""
    deadline = time.monotonic() + cfg.total_timeout
    current = url
    for _hop in range(cfg.max_redirects + 1):
        status, headers, body = _request(current, cfg, deadline, media)
        if status in _REDIRECTS:
            location = headers.get("location")
            if not location:
                raise InvalidInput(f"{_short(current)} answered {status} without a Location")
            current = urljoin(current, location)
            continue
        if not 200 <= status < 300:
            raise InvalidInput(f"fetching {_short(current)} failed: the server answered HTTP {status}")
        return body
    raise InvalidInput(f"{_short(url)}: more than {cfg.max_redirects} redirects (handler.url.max_redirects)")


def fetch_all(urls: list[str], cfg: UrlConfig, pool: ThreadPoolExecutor | None = None,
              media: MediaTypes = IMAGE) -> list[bytes | RequestError]:
    """Fetch every URL concurrently; one result (bytes or the item's RequestError) per URL, in order.

    Pass a long-lived `pool` from a server: creating threads for every batch costs time and lets
    the allocator spread freed memory over more per-thread arenas.
    """
    def one(url: str) -> bytes | RequestError:
        try:
            return fetch_url(url, cfg, media)
        except RequestError as err:
            return err.detach()

    if len(urls) <= 1:
        return [one(u) for u in urls]
    if pool is not None:
        return list(pool.map(one, urls))
    with ThreadPoolExecutor(min(len(urls), cfg.max_concurrency), thread_name_prefix="fetch") as own:
        return list(own.map(one, urls))


# --- one hop ------------------------------------------------------------------------------------


def _request(url: str, cfg: UrlConfig, deadline: float, media: MediaTypes) -> tuple[int, dict[str, str], bytes]:
    scheme, host, port, target = _parse(url, cfg)
    address = _checked_address(host, port, cfg)
    conn = _connection(scheme, host, port, address, cfg)
    sock: socket.socket | None = None
    try:
        try:
            conn.connect()
        except socket.timeout:
            raise RequestTimeout(f"connecting to {host} ({address}) timed out after {cfg.connect_timeout:g}s") from None
        except OSError as exc:
            raise InvalidInput(f"cannot connect to {host} ({address}): {exc.strerror or exc}") from None
        sock = conn.sock  # kept: http.client drops conn.sock once a "Connection: close" response arrives
        sock.settimeout(_remaining(deadline, cfg.read_timeout, url))
        try:
            conn.request("GET", target, headers={"User-Agent": _USER_AGENT, "Accept": media.accept,
                                                "Connection": "close"})
            response = conn.getresponse()
        except socket.timeout:
            raise RequestTimeout(f"{host} did not answer within {cfg.read_timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise InvalidInput(f"fetching {_short(url)} failed: {exc}") from None
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.status in _REDIRECTS or not 200 <= response.status < 300:
            return response.status, headers, b""
        _check_headers(url, headers, cfg, media)
        return response.status, headers, _read_body(response, sock, url, cfg, deadline)
    finally:
        conn.close()
        if sock is not None:
            sock.close()


def _parse(url: str, cfg: UrlConfig) -> tuple[str, str, int, str]:
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("the 'url' value must be a non-empty string")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"malformed URL {_short(url)}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in {s.lower() for s in cfg.allowed_schemes}:
        raise Forbidden(f"URL scheme {scheme or '(none)'!r} is not allowed (allowed: {', '.join(cfg.allowed_schemes)})")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("URLs with user:password@ credentials are not accepted")
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise InvalidInput(f"malformed URL {_short(url)}: no host")
    if cfg.allowed_hosts and not any(fnmatch.fnmatchcase(host, p.lower()) for p in cfg.allowed_hosts):
        raise Forbidden(f"host {host!r} is not in handler.url.allowed_hosts")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _checked_address(host: str, port: int, cfg: UrlConfig) -> IPAddress:
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        addresses = resolve(host, port)
    if not addresses:
        raise InvalidInput(f"host {host!r} resolves to no address")
    for address in addresses:  # all of them: a round-robin answer must not hide a private one
        reason = refusal_reason(address, cfg)
        if reason is not None:
            raise Forbidden(f"host {host!r} resolves to {address}, {reason}; refused")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to a pre-checked address; the Host header keeps the original name."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = str(address)

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """As above, with TLS verified against the original host name (SNI + certificate)."""

    def __init__(self, host: str, port: int, address: IPAddress, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = str(address)
        self._ssl_context = context

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        try:
            self.sock = self._ssl_context.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


def _connection(scheme: str, host: str, port: int, address: IPAddress, cfg: UrlConfig) -> http.client.HTTPConnection:
    if scheme == "https":
        return _PinnedHTTPSConnection(host, port, address, cfg.connect_timeout, ssl.create_default_context())
    return _PinnedHTTPConnection(host, port, address, cfg.connect_timeout)


def _check_headers(url: str, headers: dict[str, str], cfg: UrlConfig, media: MediaTypes) -> None:
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type and not media.allows(content_type):
        raise UnsupportedMediaType(f"{_short(url)} is {content_type}, not {media.noun}")
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > cfg.max_bytes:
        raise PayloadTooLarge(f"{_short(url)} is {length} bytes; at most {cfg.max_bytes} (handler.url.max_bytes)")


def _read_body(response: http.client.HTTPResponse, sock: socket.socket, url: str, cfg: UrlConfig, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        sock.settimeout(_remaining(deadline, cfg.read_timeout, url))
        try:
            chunk = response.read1(_CHUNK)
        except socket.timeout:
            if time.monotonic() >= deadline:
                raise UpstreamTimeout(f"{_short(url)}: download exceeded {cfg.total_timeout:g}s") from None
            raise RequestTimeout(f"{_short(url)}: no data for {cfg.read_timeout:g}s") from None
        except (OSError, http.client.HTTPException) as exc:
            raise InvalidInput(f"fetching {_short(url)} failed mid-body: {exc}") from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > cfg.max_bytes:  # stop reading: never buffer more than the limit
            raise PayloadTooLarge(f"{_short(url)} is larger than {cfg.max_bytes} bytes (handler.url.max_bytes)")
        chunks.append(chunk)


def _remaining(deadline: float, read_timeout: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise UpstreamTimeout(f"{_short(url)}: download exceeded the total time limit")
    return min(read_timeout, left)


def _short(url: str, limit: int = 120) -> str:
    return url if len(url) <= limit else url[: limit - 3] + "..."

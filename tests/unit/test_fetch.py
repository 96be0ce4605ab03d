"""URL inputs: a local HTTP server on 127.0.0.1, the SSRF guard, limits and per-item errors."""

from __future__ import annotations

import ipaddress
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import handlers.fetch as fetch
from handlers.config import HandlerConfig
from handlers.errors import ConfigError, Forbidden, InvalidInput, PayloadTooLarge, RequestTimeout, UnsupportedMediaType
from handlers.fetch import IMAGE, VIDEO, UrlConfig, fetch_all, fetch_url, refusal_reason
from tests.helpers import ORIGIN_JPEG as JPEG
from tests.helpers import OriginHandler, image_origin


@pytest.fixture(scope="module")
def origin():
    with image_origin() as url:
        yield url


# The test server lives on loopback, which the default config refuses: allow exactly that host.
ALLOW = UrlConfig(allowed_networks=("127.0.0.1/32",), connect_timeout=1.0, read_timeout=1.0,
                  total_timeout=5.0, max_bytes=2**20)


def test_fetches_an_image(origin):
    assert fetch_url(f"{origin}/img.jpg", ALLOW) == JPEG
    assert fetch_url(f"{origin}/img-no-type", ALLOW) == JPEG


def test_default_config_refuses_loopback_before_connecting(origin):
    before = len(OriginHandler.seen)
    with pytest.raises(Forbidden, match="127.0.0.1, a loopback address; refused"):
        fetch_url(f"{origin}/img.jpg", UrlConfig())
    assert len(OriginHandler.seen) == before  # nothing reached the server


def test_redirects_are_followed_and_checked(origin, monkeypatch):
    assert fetch_url(f"{origin}/redirect-chain", ALLOW) == JPEG
    with pytest.raises(InvalidInput, match="more than 1 redirects"):
        fetch_url(f"{origin}/redirect-chain", UrlConfig(**{**ALLOW.__dict__, "max_redirects": 1}))
    with pytest.raises(InvalidInput, match="more than 3 redirects"):
        fetch_url(f"{origin}/loop", ALLOW)
    # a public-looking name that resolves into the private network, reached by a redirect
    monkeypatch.setattr(fetch, "resolve", lambda host, port: [ipaddress.ip_address("10.0.0.5")])
    with pytest.raises(Forbidden, match="'internal.test' resolves to 10.0.0.5, a private address"):
        fetch_url(f"{origin}/to-private", ALLOW)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "169.254.169.254", "::1", "::ffff:127.0.0.1", "fd00::1"])
def test_dns_pointing_inside_is_refused_without_a_connection(address, monkeypatch):
    calls = []

    def fake_resolve(host, port):
        calls.append(host)
        return [ipaddress.ip_address(address)]

    monkeypatch.setattr(fetch, "resolve", fake_resolve)
    monkeypatch.setattr(fetch.socket, "create_connection", lambda *a, **k: pytest.fail("must not connect"))
    with pytest.raises(Forbidden, match="refused"):
        fetch_url("http://innocent.test/cat.jpg", UrlConfig())
    assert calls == ["innocent.test"]


def test_one_private_address_among_many_is_enough_to_refuse(monkeypatch):
    monkeypatch.setattr(fetch, "resolve", lambda h, p: [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("192.168.0.7")])
    with pytest.raises(Forbidden, match="192.168.0.7"):
        fetch_url("https://mixed.test/x.jpg", UrlConfig())


@pytest.mark.parametrize("address,fragment", [
    ("127.0.0.1", "loopback"), ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "carrier-grade NAT"), ("224.0.0.1", "multicast"),
    ("0.0.0.0", "unspecified"), ("240.0.0.1", "reserved"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("fc00::1", "private"), ("::ffff:169.254.169.254", "link-local"), ("2002:7f00:1::", "loopback"),
    ("198.18.0.1", "benchmarking"),
])
def test_refused_address_classes(address, fragment):
    reason = refusal_reason(ipaddress.ip_address(address), UrlConfig())
    assert reason is not None and fragment in reason


def test_public_addresses_and_explicit_allowances():
    assert refusal_reason(ipaddress.ip_address("8.8.8.8"), UrlConfig()) is None
    assert refusal_reason(ipaddress.ip_address("2001:4860:4860::8888"), UrlConfig()) is None
    internal = UrlConfig(allowed_networks=("10.20.0.0/16",))
    assert refusal_reason(ipaddress.ip_address("10.20.3.4"), internal) is None
    assert refusal_reason(ipaddress.ip_address("10.21.3.4"), internal) is not None


@pytest.mark.parametrize("url,error,fragment", [
    ("ftp://127.0.0.1/a.jpg", Forbidden, "scheme 'ftp' is not allowed"),
    ("file:///etc/passwd", Forbidden, "scheme 'file' is not allowed"),
    ("http://user:pw@127.0.0.1/a.jpg", InvalidInput, "credentials"),
    ("http://127.0.0.1:99999/a.jpg", InvalidInput, "malformed URL"),
    ("http:///nohost.jpg", InvalidInput, "no host"),
    ("   ", InvalidInput, "non-empty"),
])
def test_malformed_or_disallowed_urls(url, error, fragment):
    with pytest.raises(error, match=fragment):
        fetch_url(url, ALLOW)


def test_allowed_hosts_patterns(origin):
    cfg = UrlConfig(**{**ALLOW.__dict__, "allowed_hosts": ("*.images.test",)})
    with pytest.raises(Forbidden, match="not in handler.url.allowed_hosts"):
        fetch_url(f"{origin}/img.jpg", cfg)
    cfg = UrlConfig(**{**ALLOW.__dict__, "allowed_hosts": ("127.0.0.*",)})
    assert fetch_url(f"{origin}/img.jpg", cfg) == JPEG


def test_size_limits(origin):
    with pytest.raises(PayloadTooLarge, match="10000000000 bytes"):
        fetch_url(f"{origin}/declared-huge", ALLOW)
    started = time.monotonic()
    with pytest.raises(PayloadTooLarge, match="larger than 1048576"):
        fetch_url(f"{origin}/stream-huge", ALLOW)
    assert time.monotonic() - started < 3


def test_content_type_timeouts_and_upstream_errors(origin):
    with pytest.raises(UnsupportedMediaType, match="text/html, not an image"):
        fetch_url(f"{origin}/html", ALLOW)
    with pytest.raises(InvalidInput, match="answered HTTP 404"):
        fetch_url(f"{origin}/missing", ALLOW)
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        fetch_url(f"{origin}/slow", ALLOW)
    assert time.monotonic() - started < 2.3


def test_fetch_all_keeps_order_and_isolates_failures(origin):
    urls = [f"{origin}/img.jpg", f"{origin}/missing", "ftp://x/y", f"{origin}/redirect"]
    results = fetch_all(urls, ALLOW)
    assert results[0] == JPEG and results[3] == JPEG
    assert isinstance(results[1], InvalidInput) and isinstance(results[2], Forbidden)


@pytest.mark.parametrize("section,fragment", [
    ({"url": {"max_redirects": -1}}, "handler.url.max_redirects: must be >= 0"),
    ({"url": {"allowed_schemes": ["gopher"]}}, "handler.url.allowed_schemes"),
    ({"url": {"allowed_networks": ["not-a-net"]}}, "handler.url.allowed_networks: 'not-a-net'"),
    ({"url": {"read_timeout": 0}}, "handler.url.read_timeout: must be > 0"),
    ({"url": {"allow_everything": True}}, "handler.url: unknown key 'allow_everything'"),
])
def test_url_config_validation(section, fragment):
    with pytest.raises(ConfigError, match=fragment):
        HandlerConfig.from_mapping(section)


def test_handler_serves_urls_and_refuses_by_default(origin, model_dir):
    from handlers.image_classifier import ImageClassifier
    from handlers.testing import FakeContext, json_request, raw_request, run_handler

    def make(url_section):
        ctx = FakeContext(model_dir, serialized_file="model.pt", batch_size=4,
                          handler_config={"url": url_section} if url_section is not None else {})
        handler = ImageClassifier()
        handler.initialize(ctx)
        return handler, ctx

    handler, ctx = make({"allowed_networks": ["127.0.0.1/32"]})
    responses = run_handler(handler, ctx, [
        json_request({"url": f"{origin}/img.jpg"}), raw_request(JPEG), json_request({"url": f"{origin}/html"}),
        json_request({"url": f"{origin}/img.jpg", "data": "AAAA"}),
    ])
    assert [r.status for r in responses] == [200, 200, 415, 400]
    assert responses[0].body == responses[1].body
    assert ctx.metrics.values("FetchTime")

    handler, ctx = make(None)  # defaults: loopback refused
    (r,) = run_handler(handler, ctx, [json_request({"url": f"{origin}/img.jpg"})])
    assert r.status == 403 and r.body["type"] == "forbidden" and "loopback" in r.body["message"]

    handler, ctx = make({"enabled": False})
    (r,) = run_handler(handler, ctx, [json_request({"url": f"{origin}/img.jpg"})])
    assert r.status == 400 and "does not accept image URLs" in r.body["message"]


# --- media types: the caller says what it accepts (images by default, clips for video archives) -----------

CLIP = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8  # the bytes only travel; nothing decodes them


class MediaOrigin(BaseHTTPRequestHandler):
    """/<type with '/' as '_'> answers CLIP with that Content-Type ('none': without one); records Accept."""

    accepts: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).accepts.append(self.headers.get("Accept", ""))
        content_type = self.path.strip("/").replace("_", "/")
        self.send_response(200)
        if content_type != "none":
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(CLIP)))
        self.end_headers()
        self.wfile.write(CLIP)


@pytest.fixture(scope="module")
def media_origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), MediaOrigin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.parametrize("content_type", ["video_mp4", "video_webm", "video_quicktime", "application_mp4",
                                          "application_octet-stream", "none"])
def test_video_urls_are_fetched_with_video_types(media_origin, content_type):
    MediaOrigin.accepts.clear()
    assert fetch_url(f"{media_origin}/{content_type}", ALLOW, VIDEO) == CLIP
    assert MediaOrigin.accepts == ["video/*"]


def test_each_media_refuses_the_others_types_in_its_own_words(media_origin):
    with pytest.raises(UnsupportedMediaType, match=r"/image_jpeg is image/jpeg, not a video$") as err:
        fetch_url(f"{media_origin}/image_jpeg", ALLOW, VIDEO)
    assert err.value.code == 415
    with pytest.raises(UnsupportedMediaType, match="is text/html, not a video"):
        fetch_url(f"{media_origin}/text_html", ALLOW, VIDEO)
    # the image path is unchanged: the default media, image/* asked for, video refused as "not an image"
    MediaOrigin.accepts.clear()
    with pytest.raises(UnsupportedMediaType, match=r"/video_mp4 is video/mp4, not an image$"):
        fetch_url(f"{media_origin}/video_mp4", ALLOW)
    with pytest.raises(UnsupportedMediaType, match="is application/mp4, not an image"):
        fetch_url(f"{media_origin}/application_mp4", ALLOW, IMAGE)
    assert fetch_url(f"{media_origin}/image_png", ALLOW) == CLIP
    assert MediaOrigin.accepts == ["image/*"] * 3


def test_fetch_all_passes_the_media_on(media_origin):
    got = fetch_all([f"{media_origin}/video_mp4", f"{media_origin}/image_png"], ALLOW, media=VIDEO)
    assert got[0] == CLIP
    assert isinstance(got[1], UnsupportedMediaType) and "not a video" in str(got[1])

"""URL inputs through a real torchserve, fetched from a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from archiver_scripts import samples

PHOTO = samples.encode(samples.photos()["chelsea"], "JPEG", quality=90)


class _Origin(BaseHTTPRequestHandler):
    hits: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path == "/cat.jpg":
            body, ctype, status = PHOTO, "image/jpeg", 200
        elif self.path == "/go":
            self.send_response(302)
            self.send_header("Location", "/cat.jpg")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        elif self.path == "/page":
            body, ctype, status = b"<html></html>", "text/html", 200
        else:
            body, ctype, status = b"", "text/plain", 404
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def predict(server, model, body):
    return requests.post(f"{server.inference_url}/predictions/{model}", json=body, timeout=60)


def test_url_input_matches_raw_bytes(server, origin):
    raw = requests.post(f"{server.inference_url}/predictions/tiny_url", data=PHOTO,
                        headers={"Content-Type": "application/octet-stream"}, timeout=60)
    by_url = predict(server, "tiny_url", {"url": f"{origin}/cat.jpg"})
    redirected = predict(server, "tiny_url", {"url": f"{origin}/go"})
    assert raw.status_code == by_url.status_code == redirected.status_code == 200
    assert raw.json() == by_url.json() == redirected.json()


def test_default_config_refuses_loopback_urls(server, origin):
    before = len(_Origin.hits)
    r = predict(server, "tiny", {"url": f"{origin}/cat.jpg"})
    assert r.status_code == 403 and r.json()["type"] == "forbidden"
    assert "loopback" in r.json()["message"]
    assert len(_Origin.hits) == before  # the worker never connected


def test_cloud_metadata_address_is_refused_even_when_loopback_is_allowed(server):
    r = predict(server, "tiny_url", {"url": "http://169.254.169.254/latest/meta-data/"})
    assert r.status_code == 403 and "link-local" in r.json()["message"]


def test_url_batch_mixes_successes_and_failures(server, origin):
    bodies = [
        ({"url": f"{origin}/cat.jpg"}, 200),
        ({"url": f"{origin}/missing.jpg"}, 400),
        ({"url": f"{origin}/page"}, 415),
        ({"url": "ftp://127.0.0.1/cat.jpg"}, 403),
        ({"url": f"{origin}/go"}, 200),
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: predict(server, "tiny_url", b[0]), bodies))
    assert [r.status_code for r in responses] == [status for _, status in bodies]
    assert all(r.json()["message"] for r in responses if r.status_code != 200)

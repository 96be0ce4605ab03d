"""A real Prometheus on loopback scrapes a real torchserve serving our archive, with deploy/prometheus/rules.yml
loaded. After traffic with good, bad and URL inputs, every recording rule and every dashboard query must
return data (the DCGM/GPU ones excepted: no GPU and no DCGM exporter here), and every rule must evaluate
without error.

Measured TorchServe 0.12 exposition (metrics_mode=prometheus) this relies on, abridged:
    ts_inference_requests_total{model_name="tiny",model_version="default",hostname="vm",} 10.0   (counter)
    ts_inference_latency_microseconds{...} 321551.846  ts_queue_latency_microseconds{...}          (counters)
    Requests2XX{Level="Host",Hostname="vm",} 12.0  Requests4XX{...} 6.0   (no model label; 5XX after a 5xx)
    PreprocessTime{ModelName="tiny",Level="Model",Hostname="vm",} 0.154   (gauge, ms, last batch)
    RequestErrors{ModelName="tiny",...} 5.0  ImagesProcessed{...} 5.0     (counters)
    WorkerLoadTime{WorkerName="W-9000-tiny_1.0",Level="Host",Hostname="vm",} 4855.0
"""

from __future__ import annotations

import http.server
import json
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from archiver_scripts import samples
from archiver_scripts.server import LOOPBACK, TorchServe, free_port
from tests import models

from .conftest import DASHBOARD_JSON, RULES

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Need a GPU and NVIDIA's DCGM exporter; covered by the promtool unit tests with DCGM-shaped series.
GPU_ONLY = ("gpu:",)
DEADLINE_S = 75


def _photo() -> bytes:
    return samples.encode(samples.mosaic(96, 64), "JPEG")


class _Origin(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def _query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        payload = json.loads(r.read())
    assert payload["status"] == "success", payload
    return payload["data"]["result"]


def _post(url: str, data: bytes, content_type: str = "application/octet-stream") -> int:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _queries() -> dict[str, str]:
    rules = yaml.safe_load(RULES.read_text())
    out = {f"rule {r['record']}": r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    board = json.loads(DASHBOARD_JSON.read_text())
    for panel in board["panels"]:
        for t in panel.get("targets", []):
            out[f"panel {panel['title']!r} {t['refId']}"] = t["expr"].replace("$model", ".*")
    return {k: v for k, v in out.items() if not v.startswith(GPU_ONLY)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory, prometheus_bin):
    root = tmp_path_factory.mktemp("obs")
    store = root / "store"
    store.mkdir()
    models.build_tiny_archive("tiny", store, root, batch_size=4, max_batch_delay=5,
                              config=["url.allowed_networks=[127.0.0.1/32]", "url.read_timeout=2"])
    ts = TorchServe(store, models=["tiny.mar"], workdir=root / "ts", env={"OMP_NUM_THREADS": "1"})
    ts.start()
    prom = log = None
    origin = http.server.ThreadingHTTPServer((LOOPBACK, 0), _Origin)
    _Origin.body = _photo()
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    try:
        ts.wait_ready(["tiny"], timeout=120)
        port = free_port()
        config = root / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "torchserve",
                                "static_configs": [{"targets": [ts.metrics_url.split("//")[1]]}]}],
        }))
        log = open(root / "prometheus.log", "wb")
        prom = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--storage.tsdb.path={root / 'tsdb'}",
             f"--web.listen-address={LOOPBACK}:{port}"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        yield ts, f"http://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{origin.server_address[1]}", root
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=10)
            except subprocess.TimeoutExpired:
                prom.kill()
        if log is not None:
            log.close()
        origin.shutdown()
        ts.stop()


def test_every_rule_and_panel_query_returns_data(stack):
    ts, prom, origin, root = stack
    photo = _photo()
    predict = f"{ts.inference_url}/predictions/tiny"
    pending = _queries()
    results: dict[str, list] = {}
    statuses: set[int] = set()
    deadline = time.monotonic() + DEADLINE_S
    while pending and time.monotonic() < deadline:
        statuses.add(_post(predict, photo))
        statuses.add(_post(predict, b"not an image"))
        statuses.add(_post(predict, json.dumps({"url": f"{origin}/cat.jpg"}).encode(), "application/json"))
        for name, expr in list(pending.items()):
            try:
                found = _query(prom, expr)
            except OSError:  # Prometheus still starting
                break
            if found:
                results[name] = found
                del pending[name]
        time.sleep(0.5)
    log = (root / "prometheus.log").read_text(errors="replace")[-3000:]
    assert not pending, f"no data after {DEADLINE_S}s for: {sorted(pending)}\nprometheus log tail:\n{log}"
    assert {200, 415} <= statuses, statuses

    # the numbers mean what the rules say: a mix of good and bad items, and 4xx among the responses
    ratio = {r["metric"]["model_name"]: float(r["value"][1]) for r in _query(prom, "model:tsgpu_item_error_ratio:rate1m")}
    assert 0 < ratio["tiny"] < 1, ratio
    codes = {r["metric"]["code"] for r in _query(prom, "code:ts_requests:ratio_rate1m")}
    assert {"2xx", "4xx"} <= codes, codes
    stages = {r["metric"]["stage"] for r in _query(prom, 'model_stage:tsgpu_stage_time_ms:avg1m{model_name="tiny"}')}
    assert stages == {"fetch", "preprocess", "inference", "handler", "worker"}, stages

    with urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=5) as r:
        groups = json.loads(r.read())["data"]["groups"]
    broken = [(rule["name"], rule.get("lastError")) for g in groups for rule in g["rules"] if rule["health"] != "ok"]
    assert not broken, broken
    assert sum(len(g["rules"]) for g in groups) == sum(
        len(g["rules"]) for g in yaml.safe_load(RULES.read_text())["groups"])

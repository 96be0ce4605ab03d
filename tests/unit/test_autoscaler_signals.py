"""The autoscaler when it cannot see the load (metrics_mode=log), its decision log, and `--check`.

Fakes only (no TorchServe): a scrape function returning what TorchServe's metrics address answers
(measured, 0.12.0: 200 with an empty body in metrics_mode=log; the ts_* families declared by
`# HELP`/`# TYPE` lines from the start in metrics_mode=prometheus), and a fake management API.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from autoscaler.check import report, run_checks
from autoscaler.controller import Controller
from autoscaler.exporter import Registry
from autoscaler.main import main
from autoscaler.policy import parse_policy
from autoscaler.torchserve import (
    COUNTERS,
    KeyFile,
    ManagementClient,
    ModelInfo,
    ModelNotFound,
    Scrape,
    WorkerInfo,
    metric_families,
    scrape_metrics,
)

LOG_MODE = Scrape({}, frozenset())  # what scrape_metrics makes of TorchServe's empty answer in log mode
# TorchServe 0.12 in prometheus mode before any request (abridged, measured): families declared, no samples
PROMETHEUS_IDLE = """# HELP ts_inference_requests_total Torchserve prometheus counter metric with unit: Count
# TYPE ts_inference_requests_total counter
# HELP ts_inference_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds
# TYPE ts_inference_latency_microseconds counter
# HELP QueueTime Torchserve prometheus gauge metric with unit: Milliseconds
# TYPE QueueTime gauge
# HELP ts_queue_latency_microseconds Torchserve prometheus counter metric with unit: Microseconds
# TYPE ts_queue_latency_microseconds counter
"""
ALL_SERIES = frozenset(COUNTERS)


def policy(**models: dict):
    spec = {"min_workers": 1, "max_workers": 3, "target_queue_ms": 100, "upscale_delay_s": 2,
            "downscale_delay_s": 3, "look_back_s": 3}
    return parse_policy({"interval_s": 1, "models": {n: {**spec, **m} for n, m in models.items()}})


class Management:
    """A management API: `workers` set per model (all READY), `pending` requests per model."""

    url = "fake://management"

    def __init__(self, workers: dict[str, int], pending: dict[str, int] | None = None) -> None:
        self.workers, self.pending, self.calls = dict(workers), dict(pending or {}), []

    def describe(self, name: str) -> ModelInfo:
        if name not in self.workers:
            raise ModelNotFound(f"model {name!r} is not registered")
        n = self.workers[name]
        workers = tuple(WorkerInfo(str(i), "READY", i, 0, False) for i in range(n))
        return ModelInfo(name, n, n, 1, self.pending.get(name, 0), workers)

    def scale(self, name: str, n: int, wait: bool = True) -> str:
        self.calls.append((name, n))
        self.workers[name] = n
        return "ok"


class Loaded:
    """Counters of models under load: `rate` requests per tick, each queued `queue_ms`."""

    def __init__(self, families: frozenset[str] | None = ALL_SERIES, **loads: tuple[float, float]) -> None:
        self.families, self.loads = families, loads
        self.totals = {name: dict.fromkeys(COUNTERS, 0.0) for name in loads}

    def __call__(self, url: str) -> Scrape:
        for name, (rate, queue_ms) in self.loads.items():
            c = self.totals[name]
            c["ts_inference_requests_total"] += rate
            c["ts_queue_latency_microseconds"] += rate * queue_ms * 1000
            c["ts_inference_latency_microseconds"] += rate * (queue_ms + 50) * 1000
        return Scrape(self.totals, self.families)


def ticks(ctl: Controller, clock: list[float], n: int, dt: float = 1.0) -> None:
    for _ in range(n):
        clock[0] += dt
        ctl.tick()


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


# -- blind: metrics_mode=log --------------------------------------------------------------------------

def test_log_mode_makes_every_model_blind_with_an_error_naming_the_fix(caplog):
    """Before: counters read as 0, the loaded model at 3 workers was scaled down as idle, and nothing said why."""
    mgmt = Management({"hi": 3, "lo": 1}, pending={"hi": 7})
    reg = Registry()
    t = [0.0]
    ctl = Controller(policy(hi={}, lo={}), mgmt, "http://127.0.0.1:8082", registry=reg, clock=lambda: t[0],
                     scrape=lambda url: LOG_MODE)
    with caplog.at_level(logging.INFO, logger="tsgpu.autoscale"):
        ticks(ctl, t, 20)  # well past downscale_delay_s: an idle model at 3 would have stepped down
    assert mgmt.calls == []  # held: the zeros are missing data, not an idle model
    assert reg.get("tsgpu_autoscale_blind", model="hi") == 1 and reg.get("tsgpu_autoscale_blind", model="lo") == 1
    [error] = errors(caplog)  # once at the first tick (the start), not every tick
    assert "blind for models hi, lo" in error and "metrics_mode=prometheus in config.properties" in error
    assert "ts_inference_requests_total" in error  # the series it lacks
    assert "hi=7" in error  # the pending requests it cannot weigh
    assert "reason=blind" in caplog.text


def test_the_blind_error_is_repeated_when_requests_queue_but_not_every_tick(caplog):
    mgmt = Management({"hi": 1})
    t = [0.0]
    ctl = Controller(policy(hi={}), mgmt, "m", clock=lambda: t[0], scrape=lambda url: LOG_MODE)
    with caplog.at_level(logging.INFO, logger="tsgpu.autoscale"):
        ticks(ctl, t, 3)  # idle: the error at the start
        for pending in (5, 0, 6, 0, 7, 9):  # load arrives, the queue comes and goes
            mgmt.pending["hi"] = pending
            ticks(ctl, t, 1)
    first, loaded = errors(caplog)
    assert "pending" not in first and "requests pending now, which it cannot weigh: hi=5" in loaded
    assert mgmt.calls == []


def test_the_blind_error_repeats_every_repeat_s_and_clears_when_the_series_appear(caplog):
    scrape = Loaded(families=frozenset(), hi=(0.0, 0.0))
    reg = Registry()
    t = [0.0]
    ctl = Controller(policy(hi={}), Management({"hi": 1}), "m", registry=reg, clock=lambda: t[0], scrape=scrape)
    ctl.blind.repeat_s = 10
    with caplog.at_level(logging.INFO, logger="tsgpu.autoscale"):
        ticks(ctl, t, 25)
        assert len(errors(caplog)) == 3  # at 1 s, 11 s, 21 s
        scrape.families = ALL_SERIES  # torchserve restarted with metrics_mode=prometheus
        ticks(ctl, t, 2)
    assert reg.get("tsgpu_autoscale_blind", model="hi") == 0 and len(errors(caplog)) == 3
    assert "carry its series again" in caplog.text


def test_a_blind_model_is_still_kept_inside_its_policy_range():
    mgmt = Management({"hi": 5, "lo": 0})
    t = [0.0]
    ctl = Controller(policy(hi={}, lo={}), mgmt, "m", clock=lambda: t[0], scrape=lambda url: LOG_MODE)
    ticks(ctl, t, 2)
    assert sorted(mgmt.calls) == [("hi", 3), ("lo", 1)]  # above_max / below_min need no load


def test_prometheus_mode_before_any_request_is_not_blind_and_scales_as_before(caplog):
    assert metric_families(PROMETHEUS_IDLE) >= ALL_SERIES
    scrape = Loaded(hi=(50.0, 1000.0))  # far over its 100 ms target
    reg = Registry()
    t = [0.0]
    mgmt = Management({"hi": 1, "idle": 1})  # `idle` has never had a request: no samples, nothing pending
    ctl = Controller(policy(hi={}, idle={}), mgmt, "m", registry=reg, clock=lambda: t[0], scrape=scrape)
    with caplog.at_level(logging.INFO, logger="tsgpu.autoscale"):
        ticks(ctl, t, 6)
    assert mgmt.workers["hi"] > 1 and errors(caplog) == []
    assert reg.get("tsgpu_autoscale_blind", model="hi") == 0 and reg.get("tsgpu_autoscale_blind", model="idle") == 0


def test_pending_requests_the_metrics_never_counted_make_a_model_blind_on_the_second_tick(caplog):
    """The metrics of another torchserve than the managed one: hi's queue is there, its requests are not."""
    reg = Registry()
    t = [0.0]
    mgmt = Management({"hi": 1, "lo": 1}, pending={"hi": 4})
    ctl = Controller(policy(hi={}, lo={}), mgmt, "m", registry=reg, clock=lambda: t[0],
                     scrape=Loaded(lo=(1.0, 1.0)))
    with caplog.at_level(logging.INFO, logger="tsgpu.autoscale"):
        ticks(ctl, t, 1)
        assert reg.get("tsgpu_autoscale_blind", model="hi") == 0  # one tick could be a request between the reads
        ticks(ctl, t, 1)
    assert reg.get("tsgpu_autoscale_blind", model="hi") == 1 and reg.get("tsgpu_autoscale_blind", model="lo") == 0
    [error] = errors(caplog)
    assert "blind for model hi:" in error and "never counted" in error and "--metrics" in error


def test_an_unregistered_model_drops_its_blind_gauge():
    mgmt = Management({"hi": 1})
    reg = Registry()
    t = [0.0]
    ctl = Controller(policy(hi={}), mgmt, "m", registry=reg, clock=lambda: t[0], scrape=lambda url: LOG_MODE)
    ticks(ctl, t, 1)
    del mgmt.workers["hi"]
    ticks(ctl, t, 1)
    assert reg.get("tsgpu_autoscale_blind", model="hi") is None and "tsgpu_autoscale_blind" not in reg.render()


# -- the decision log ---------------------------------------------------------------------------------

def test_each_tick_decision_is_at_debug_and_every_change_at_info(caplog):
    """Before: a hold was logged once; the following ticks of a held decision under load said nothing."""
    t = [0.0]
    mgmt = Management({"hi": 1})
    ctl = Controller(policy(hi={"upscale_delay_s": 5}), mgmt, "m", clock=lambda: t[0],
                     scrape=Loaded(hi=(20.0, 500.0)))
    with caplog.at_level(logging.DEBUG, logger="tsgpu.autoscale"):
        ticks(ctl, t, 8)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "model=hi workers" in r.getMessage()]
    assert len(lines) == 8  # one per tick
    reasons = [(level, message.split("reason=")[1].split()[0]) for level, message in lines]
    # no_data (first tick), hold while over target for upscale_delay_s, then the scale-up
    assert reasons[0] == (logging.INFO, "no_data") and reasons[1] == (logging.INFO, "hold")
    assert all(r == (logging.DEBUG, "hold") for r in reasons[2:6]), reasons
    assert reasons[6] == (logging.INFO, "scale_up") and mgmt.calls == [("hi", 2)]
    assert all("queue_ms=500.0" in message for _, message in lines[1:7])  # the load it held under


# -- scrape -------------------------------------------------------------------------------------------

class Answer:
    """An HTTP server answering every GET with `body` (TorchServe's metrics address, for scrape_metrics)."""

    def __init__(self, body: str) -> None:
        text = body.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"


def test_scrape_tells_log_mode_from_an_idle_prometheus_mode():
    for body, families in [("", frozenset()), (PROMETHEUS_IDLE, ALL_SERIES)]:
        answer = Answer(body)
        try:
            scraped = scrape_metrics(answer.url)
        finally:
            answer.server.shutdown()
        assert scraped == {} and ALL_SERIES & scraped.families == families


# -- --check ------------------------------------------------------------------------------------------

POLICY = "models:\n  hi: {max_workers: 2, target_queue_ms: 50}\n  lo: {max_workers: 2, target_queue_ms: 500}\n"


class FakeServe:
    """Management API (token key `key`, two models per page) and metrics address on one port."""

    def __init__(self, models: dict[str, int], metrics: str = PROMETHEUS_IDLE, key: str | None = "k1") -> None:
        fake = self
        self.models, self.metrics, self.key = dict(models), metrics, key  # models: name -> pending

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, code: int, body: object) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlsplit(self.path)
                if url.path == "/metrics":
                    return self._answer(200, fake.metrics)
                if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    return self._answer(400, {"code": 400, "type": "InvalidKeyException",
                                              "message": "Token Authorization failed. Token either incorrect, "
                                                         "expired, or not provided correctly"})
                if url.path == "/models":
                    return self._answer(200, fake.page(urllib.parse.parse_qs(url.query)))
                name = url.path.rsplit("/", 1)[1]
                if name not in fake.models:
                    return self._answer(404, {"code": 404, "message": f"Model not found: {name}"})
                return self._answer(200, [{"minWorkers": 1, "maxWorkers": 1, "batchSize": 1,
                                           "workers": [{"id": "9000", "status": "READY"}],
                                           "jobQueueStatus": {"pendingRequests": fake.models[name]}}])

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def page(self, query: dict[str, list[str]]) -> dict:
        names = sorted(self.models)
        start = int(query.get("next_page_token", ["0"])[0])
        page = {"models": [{"modelName": n, "modelUrl": f"{n}.mar"} for n in names[start:start + 2]]}
        if start + 2 < len(names):
            page["nextPageToken"] = str(start + 2)
        return page


@pytest.fixture
def setup(tmp_path):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"management": {"key": "k1", "expiration time": "2999-01-01T00:00:00Z"},
                                    "inference": {"key": "i"}, "API": {"key": "api"}}))
    fake = FakeServe({"a": 0, "b": 0, "hi": 0, "lo": 0, "z": 0})
    yield fake, policy_file, key_file
    fake.server.shutdown()


def checked(policy_file: Path, management_url: str, metrics_url: str, key_file: Path | None) -> tuple[int, str]:
    out = io.StringIO()
    code = report(run_checks(policy_file, ManagementClient(management_url, KeyFile(key_file)), metrics_url), out)
    return code, out.getvalue()


def fails(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("FAIL")]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_check_passes_on_a_sound_setup(setup):
    fake, policy_file, key_file = setup
    code, text = checked(policy_file, fake.url, fake.url, key_file)
    assert code == 0 and fails(text) == [], text
    assert "5 models registered" in text  # every page of GET /models
    assert "ok    model hi: registered, 1 of 1 workers READY" in text and "7 of 7 checks passed" in text


def test_check_fails_on_log_mode_naming_the_fix(setup):
    fake, policy_file, key_file = setup
    fake.metrics = ""  # TorchServe's metrics address in metrics_mode=log
    code, text = checked(policy_file, fake.url, fake.url, key_file)
    [line] = fails(text)
    assert code == 1 and line.startswith("FAIL  metrics mode:")
    assert "metrics_mode=prometheus in config.properties" in line


@pytest.mark.parametrize("case, expected", [
    ("unregistered", ["FAIL  model lo: not registered", "(registered: a, b, hi, z)", "under models:"]),
    ("management down", ["FAIL  management", "unreachable", "--management"]),
    ("metrics down", ["FAIL  metrics", "unreachable", "--metrics"]),
    ("no key file", ["FAIL  key file", "not found", "--key-file"]),
    ("no key given", ["FAIL  management", "pass --key-file"]),
    ("key refused", ["FAIL  management", "refused the management key", "--key-file"]),
    ("bad policy", ["FAIL  policy", "models.hi.max_workers", "Policy keys"]),
    ("uncounted", ["FAIL  model hi", "3 requests pending", "never counted", "--metrics"]),
])
def test_check_fails_with_the_reason_and_the_fix(setup, case, expected):
    fake, policy_file, key_file = setup
    management = metrics = fake.url
    if case == "unregistered":
        del fake.models["lo"]
    elif case == "management down":
        management = closed_port_url()
    elif case == "metrics down":
        metrics = closed_port_url()
    elif case == "no key file":
        key_file.unlink()
    elif case == "no key given":
        key_file = None
    elif case == "key refused":
        fake.key = "rotated-by-someone-else"
    elif case == "bad policy":
        policy_file.write_text(POLICY.replace("max_workers: 2, target_queue_ms: 50", "max_workers: 0"))
    elif case == "uncounted":
        fake.models["hi"] = 3  # 3 queued, but the metrics (of another server?) never counted one
    code, text = checked(policy_file, management, metrics, key_file)
    failed = "\n".join(fails(text))
    assert code == 1 and all(part in failed for part in expected), text
    assert "FAILED" in text.splitlines()[-1]


def test_check_from_the_command_line_exits_1_and_serves_nothing(setup, capsys):
    fake, policy_file, key_file = setup
    fake.metrics = ""
    with socket.socket() as taken:  # --check does not bind the controller's metrics port
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--policy", str(policy_file), "--management", fake.url, "--metrics", fake.url,
                     "--key-file", str(key_file), "--listen", f"127.0.0.1:{port}", "--check"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL  metrics mode" in out and "metrics_mode=prometheus" in out
    fake.metrics = PROMETHEUS_IDLE
    assert main(["--policy", str(policy_file), "--management", fake.url, "--metrics", fake.url,
                 "--key-file", str(key_file), "--check"]) == 0

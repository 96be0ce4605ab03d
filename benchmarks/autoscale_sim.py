"""Replay a compressed diurnal trace for two tenants against a real torchserve, autoscaled vs static.

    .venv/bin/python benchmarks/autoscale_sim.py [--duration 90] [--slo-ms 300]

Two archives of the tiny test classifier share a 4-worker CPU budget: `hi` (priority 10) and `lo`
(priority 1). Open-loop arrivals (requests are sent on schedule, whatever the latency) follow a day
squeezed into `--duration` seconds: trough, morning ramp, peak, a burst on `hi`, evening trough.
The same trace runs twice on fresh servers: with `tsgpu autoscale` (min 1 / max 3 each), and with
static provisioning at peak (each tenant at its max, 3 + 3 workers). Printed per mode: worker-seconds
(sampled each second from the management API), p99 per tenant, errors, and the share of 5-second
intervals where `hi`'s p99 met `--slo-ms`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POLICY = {
    "interval_s": 1,
    "budgets": {"cpu": {"workers": 4}},
    "models": {
        "hi": {"priority": 10, "min_workers": 1, "max_workers": 3, "target_queue_ms": 30,
               "upscale_delay_s": 1, "downscale_delay_s": 6, "look_back_s": 4},
        "lo": {"priority": 1, "min_workers": 1, "max_workers": 3, "target_queue_ms": 500,
               "upscale_delay_s": 2, "downscale_delay_s": 6, "look_back_s": 4},
    },
}


def rate(tenant: str, x: float) -> float:
    """Requests per second at fraction x of the day (0..1)."""
    day = math.sin(math.pi * x) ** 2  # 0 at night, 1 at noon
    if tenant == "hi":
        burst = 25.0 if 0.70 <= x < 0.76 else 0.0
        return 1.0 + 24.0 * day + burst
    return 1.0 + 10.0 * math.sin(math.pi * min(1.0, x * 1.3)) ** 2  # batch work peaks earlier


def build_store(root: Path) -> Path:
    from archiver_scripts.archive import build_archive
    from tests import models

    store = root / "store"
    store.mkdir()
    script = models.save_torchscript(models.make_model(), root / "tiny.pt")
    labels = models.write_labels(root)
    for name, workers in (("hi", 1), ("lo", 1)):
        build_archive(name, script, store, labels=labels, batch_size=1, max_batch_delay=1, workers=workers,
                      log=lambda m: None)
    return store


def describe(url: str, name: str) -> dict:
    with urllib.request.urlopen(f"{url}/models/{name}", timeout=30) as r:
        return json.loads(r.read())[0]


def scale(url: str, name: str, n: int) -> None:
    req = urllib.request.Request(f"{url}/models/{name}?min_worker={n}&max_worker={n}&synchronous=true", method="PUT")
    urllib.request.urlopen(req, timeout=300).read()


def replay(ts, duration: float, body: bytes) -> tuple[list[tuple[str, float, float, int]], float]:
    """Send the trace; returns ([(tenant, t_sent, latency_ms, status)], worker-seconds)."""
    host, port = ts.inference_url.split("//")[1].split(":")
    results: list[tuple[str, float, float, int]] = []
    lock = threading.Lock()
    local = threading.local()
    stop = threading.Event()
    worker_seconds = [0.0]

    def send(tenant: str, t_sent: float) -> None:
        conn = getattr(local, "conn", None) or http.client.HTTPConnection(host, int(port), timeout=120)
        local.conn = conn
        t0 = time.perf_counter()
        try:
            conn.request("POST", f"/predictions/{tenant}", body=body, headers={"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            local.conn = None
            status = 0
        with lock:
            results.append((tenant, t_sent, (time.perf_counter() - t0) * 1000, status))

    def sample_workers() -> None:
        while not stop.wait(1.0):
            try:
                worker_seconds[0] += sum(len(describe(ts.management_url, m)["workers"]) for m in ("hi", "lo"))
            except OSError:
                pass

    sampler = threading.Thread(target=sample_workers, daemon=True)
    sampler.start()
    start = time.perf_counter()
    next_at = {"hi": 0.0, "lo": 0.0}
    with ThreadPoolExecutor(max_workers=48) as pool:
        while (now := time.perf_counter() - start) < duration:
            for tenant in ("hi", "lo"):
                if now >= next_at[tenant]:
                    pool.submit(send, tenant, now)
                    next_at[tenant] = now + 1.0 / rate(tenant, now / duration)
            time.sleep(0.002)
    stop.set()
    sampler.join()
    return results, worker_seconds[0]


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def summarize(mode: str, results, worker_seconds: float, slo_ms: float, duration: float) -> dict:
    row = {"mode": mode, "worker_seconds": round(worker_seconds, 1)}
    for tenant in ("hi", "lo"):
        mine = [r for r in results if r[0] == tenant]
        row[f"{tenant}_requests"] = len(mine)
        row[f"{tenant}_errors"] = sum(1 for r in mine if r[3] != 200)
        row[f"{tenant}_p99_ms"] = round(p99([r[2] for r in mine]), 1)
    buckets = [[r[2] for r in results if r[0] == "hi" and i * 5 <= r[1] < (i + 1) * 5] for i in range(int(duration // 5))]
    met = [p99(b) <= slo_ms for b in buckets if b]
    row["hi_intervals_within_slo"] = f"{sum(met)}/{len(met)}"
    return row


def run_mode(mode: str, store: Path, duration: float, body: bytes) -> tuple[list, float]:
    from archiver_scripts.server import TorchServe
    from autoscaler.controller import Controller
    from autoscaler.policy import parse_policy
    from autoscaler.torchserve import ManagementClient

    with TorchServe(store, models=["hi.mar", "lo.mar"], env={"OMP_NUM_THREADS": "1"}) as ts:
        ts.wait_ready(["hi", "lo"])
        stop = threading.Event()
        thread = None
        if mode == "autoscaled":
            ctl = Controller(parse_policy(POLICY), ManagementClient(ts.management_url), ts.metrics_url)
            thread = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
            thread.start()
        else:
            for name in ("hi", "lo"):
                scale(ts.management_url, name, POLICY["models"][name]["max_workers"])
        try:
            return replay(ts, duration, body)
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=60)
            ts.cleanup()


def main() -> int:
    import logging

    from archiver_scripts.samples import encode, mosaic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of compressed day per mode")
    parser.add_argument("--slo-ms", type=float, default=300.0, help="hi's p99 target per 5 s interval")
    parser.add_argument("--log", action="store_true", help="show the controller's decisions")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.log else logging.WARNING, format="%(asctime)s %(message)s")
    body = encode(mosaic(96, 96), "JPEG")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tsgpu-autoscale-sim-") as tmp:
        store = build_store(Path(tmp))
        for mode in ("autoscaled", "static-peak"):
            results, worker_seconds = run_mode(mode, store, args.duration, body)
            rows.append(summarize(mode, results, worker_seconds, args.slo_ms, args.duration))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    saved = 1 - rows[0]["worker_seconds"] / rows[1]["worker_seconds"] if rows[1]["worker_seconds"] else float("nan")
    print(f"worker-seconds saved vs static peak provisioning: {saved:.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

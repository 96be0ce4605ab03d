"""Replay a compressed diurnal trace for two tenants against a real torchserve, autoscaled vs static.

    .venv/bin/python -m benchmarks.autoscale_sim [--duration 90] [--static 3,3 --static 1,1] [--device-ms 0]
        [--trace day|night-batch] [--hi-utilization 0.45] [--lo-utilization 0.85] [--lo-min 1] [--ideal SERVICE_MS]

Two archives of the tiny test classifier share a 4-worker CPU budget: `hi` (priority 10, SLO
`--slo-ms`) and `lo` (priority 1, SLO `--lo-slo-ms`). Open-loop arrivals (sent on schedule, whatever
the latency) follow a day squeezed into `--duration` seconds: trough, morning ramp, peak, a burst on
`hi`, evening trough (`--trace day`); `--trace night-batch` keeps `hi`'s day and moves `lo`'s peak
to the night. `--ideal` prints the bound an ideal scaler reaches on the trace, without a server. The same trace runs on a fresh server per mode: with the autoscaler (min 1 /
max 3 each, `POLICY`), and with each `--static HI,LO` worker count held for the whole run.
`--lo-min 0` runs the autoscaled mode with `lo` at `min_workers: 0` and `scale_from_zero: true`
(repeat it, `--lo-min 0 --lo-min 1`, for one autoscaled mode per value in the same run).

Printed per mode: worker-seconds (workers set, READY or starting, sampled each second; in all and
`lo`'s own, and the seconds `lo` had 0 workers), p99 per tenant, errors (any non-200 or transport
error; those answered 503 also on their own), and the share of 5-second intervals (by scheduled
send time) in which each tenant's p99 met its SLO. An error counts in the p99 with its own latency
(a 503 is fast): read the error columns beside it. The client never retries. Latency is measured
from the *scheduled* send time, so a request that waited for a free client thread counts that wait
(no coordinated omission).

`--device-ms D` adds D ms of simulated accelerator time per batch: the worker sleeps, holding its
slot but not a CPU, as a GPU worker waits on its device. 0 (default) serves the tiny model on the
CPU only. Every worker runs 1 torch thread and 1 decode thread (`handler.threads: 1`): the handler's
default (the host's CPUs / the archive's minWorkers) would oversubscribe the CPUs once the
autoscaler adds workers.
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

POLICY = {
    "interval_s": 1,
    "budgets": {"cpu": {"workers": 4}},
    "models": {
        "hi": {"priority": 10, "min_workers": 1, "max_workers": 3, "target_queue_ms": 30,
               "target_pending_per_worker": 2, "upscale_delay_s": 1, "downscale_delay_s": 6, "look_back_s": 4},
        "lo": {"priority": 1, "min_workers": 1, "max_workers": 3, "target_queue_ms": 500,
               "upscale_delay_s": 2, "downscale_delay_s": 6, "look_back_s": 4},
    },
}


def rate_day(tenant: str, x: float) -> float:
    """`--trace day` (the first trace): both tenants busy in the daytime; x = fraction of the day (0..1)."""
    day = math.sin(math.pi * x) ** 2  # 0 at night, 1 at noon
    if tenant == "hi":
        burst = 25.0 if 0.70 <= x < 0.76 else 0.0
        return 1.0 + 24.0 * day + burst
    return 1.0 + 10.0 * math.sin(math.pi * min(1.0, x * 1.3)) ** 2  # batch work peaks earlier


def rate_night_batch(tenant: str, x: float) -> float:
    """`--trace night-batch`: interactive `hi` by day, batch `lo` by night. The day runs 06:00 -> 06:00.

    hi: the same curve and burst as `--trace day` (1/s at 02:00, 25/s at 14:00, +25/s for 86 minutes
    from 18:48, when its base is 16.7/s). lo: 1/s all day, its batch run from 21:00 to 05:00 peaking
    at 45/s at 01:00.
    """
    hour = (6.0 + 24.0 * x) % 24.0
    if tenant == "hi":
        burst = 25.0 if 18.8 <= hour < 20.24 else 0.0
        return 1.0 + 24.0 * math.sin(math.pi * (hour - 2.0) / 24.0) ** 2 + burst
    night = (hour - 21.0) % 24.0
    return 1.0 + (44.0 * math.sin(math.pi * night / 8.0) ** 2 if night < 8.0 else 0.0)


TRACES = {"day": rate_day, "night-batch": rate_night_batch}


DEVICE_HANDLER = '''"""The tiny classifier plus simulated accelerator time (benchmarks/autoscale_sim.py --device-ms)."""
import time

from handlers.image_classifier import ImageClassifier

DEVICE_MS = {device_ms!r}


class DeviceTimeClassifier(ImageClassifier):
    def forward(self, x):
        out = super().forward(x)
        time.sleep(DEVICE_MS / 1000.0)  # the worker waits, as on a GPU; the CPU is free meanwhile
        return out
'''


def ideal_saving(rate, static: tuple[int, int], service_s: float, utilization: tuple[float, float],
                 minimum: tuple[int, int] = (1, 1)) -> float:
    """Fraction of `static`'s worker-seconds an ideal scaler saves: at every instant exactly
    ceil(rate x service_s / utilization) workers per tenant (`minimum` at least, the static count at
    most), zero start time, no downscale delay. An upper bound for any reactive controller on this
    trace. With a minimum of 0 a tenant has 0 workers only while its rate is 0 (a worker that starts
    in no time on the first arrival); a rate above 0 always needs a worker."""
    steps = 10_000
    used = 0
    for i in range(steps):
        for tenant, cap, u, floor in zip(("hi", "lo"), static, utilization, minimum, strict=True):
            used += min(cap, max(floor, math.ceil(rate(tenant, i / steps) * service_s / (u or 1.0) - 1e-9)))
    return 1.0 - used / steps / sum(static)


def build_store(root: Path, device_ms: float = 0.0) -> Path:
    from archiver_scripts.archive import build_archive
    from tests import models

    store = root / "store"
    store.mkdir()
    script = models.save_torchscript(models.make_model(), root / "tiny.pt")
    labels = models.write_labels(root)
    extra: dict = {}
    if device_ms > 0:
        handler = root / "sim_device.py"
        handler.write_text(DEVICE_HANDLER.format(device_ms=device_ms))
        extra = {"handler_class": "sim_device:DeviceTimeClassifier", "extra_files": [handler]}
    for name in ("hi", "lo"):
        build_archive(name, script, store, labels=labels, batch_size=1, max_batch_delay=1, workers=1,
                      config=["threads=1", "preprocess.decode_threads=1"], log=lambda m: None, **extra)
    return store


def describe(url: str, name: str) -> dict:
    with urllib.request.urlopen(f"{url}/models/{name}", timeout=30) as r:
        return json.loads(r.read())[0]


def scale(url: str, name: str, n: int) -> None:
    req = urllib.request.Request(f"{url}/models/{name}?min_worker={n}&max_worker={n}&synchronous=true", method="PUT")
    urllib.request.urlopen(req, timeout=300).read()


def replay(ts, duration: float, body: bytes,
           rate=rate_day) -> tuple[list[tuple[str, float, float, int]], dict[str, float]]:
    """Send the trace; returns ([(tenant, t_sent, latency_ms, status)], worker-seconds per model)."""
    host, port = ts.inference_url.split("//")[1].split(":")
    results: list[tuple[str, float, float, int]] = []
    lock = threading.Lock()
    local = threading.local()
    stop = threading.Event()
    worker_seconds = {"hi": 0.0, "lo": 0.0, "lo_at_0": 0.0}

    def send(tenant: str, t_sent: float) -> None:
        conn = getattr(local, "conn", None) or http.client.HTTPConnection(host, int(port), timeout=120)
        local.conn = conn
        t0 = start + t_sent  # the scheduled time: a wait for a free client thread counts
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
                counts = {m: len(describe(ts.management_url, m)["workers"]) for m in ("hi", "lo")}
            except OSError:
                continue
            for m, n in counts.items():
                worker_seconds[m] += n
            worker_seconds["lo_at_0"] += counts["lo"] == 0

    sampler = threading.Thread(target=sample_workers, daemon=True)
    sampler.start()
    start = time.perf_counter()
    next_at = {"hi": 0.0, "lo": 0.0}
    # one client pool per tenant, each larger than any backlog here: a tenant's slow answers must not
    # hold back the other tenant's sends (a shared 64-thread pool did, before 2026-11-24 19:40)
    pools = {tenant: ThreadPoolExecutor(max_workers=CLIENT_THREADS) for tenant in ("hi", "lo")}
    try:
        while (now := time.perf_counter() - start) < duration:
            for tenant, pool in pools.items():
                if now >= next_at[tenant]:
                    pool.submit(send, tenant, now)
                    next_at[tenant] = now + 1.0 / rate(tenant, now / duration)
            time.sleep(0.002)
    finally:
        for pool in pools.values():
            pool.shutdown(wait=True)
    stop.set()
    sampler.join()
    return results, worker_seconds


CLIENT_THREADS = 256


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def summarize(mode: str, results, worker_seconds: dict[str, float], slo_ms: dict[str, float], duration: float) -> dict:
    row = {"mode": mode, "worker_s": round(worker_seconds["hi"] + worker_seconds["lo"], 1),
           "lo_worker_s": round(worker_seconds["lo"], 1), "lo_s_at_0": round(worker_seconds["lo_at_0"], 1)}
    for tenant in ("hi", "lo"):
        mine = [r for r in results if r[0] == tenant]
        row[f"{tenant}_req"] = len(mine)
        row[f"{tenant}_err"] = sum(1 for r in mine if r[3] != 200)
        row[f"{tenant}_503"] = sum(1 for r in mine if r[3] == 503)
        row[f"{tenant}_p99_ms"] = round(p99([r[2] for r in mine]), 1)
        buckets = [[r[2] for r in mine if i * 5 <= r[1] < (i + 1) * 5] for i in range(int(duration // 5))]
        met = [p99(b) <= slo_ms[tenant] for b in buckets if b]
        row[f"{tenant}_in_slo"] = f"{sum(met)}/{len(met)}"
        row[f"{tenant}_worst_ms"] = round(max((p99(b) for b in buckets if b), default=float("nan")), 1)
        print(f"{mode} {tenant} p99 ms per 5 s: " + " ".join(f"{p99(b):.0f}" for b in buckets if b), file=sys.stderr)
    return row


def run_mode(mode: str, store: Path, duration: float, body: bytes, static: tuple[int, int] | None,
             policy: dict, rate=rate_day) -> tuple[list, dict[str, float]]:
    from archiver_scripts.server import TorchServe
    from autoscaler.controller import Controller
    from autoscaler.policy import parse_policy
    from autoscaler.torchserve import ManagementClient

    with TorchServe(store, models=["hi.mar", "lo.mar"], env={"OMP_NUM_THREADS": "1"}) as ts:
        ts.wait_ready(["hi", "lo"])
        stop = threading.Event()
        thread = None
        if static is None:
            ctl = Controller(parse_policy(policy), ManagementClient(ts.management_url), ts.metrics_url)
            thread = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
            thread.start()
        else:
            for name, n in zip(("hi", "lo"), static, strict=True):
                scale(ts.management_url, name, n)
            ts.wait_ready(["hi", "lo"])
        try:
            return replay(ts, duration, body, rate)
        finally:
            stop.set()
            if thread is not None:
                thread.join(timeout=60)
            ts.cleanup()


def main() -> int:
    import copy
    import datetime
    import logging
    import os
    import platform

    from archiver_scripts.samples import encode, mosaic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of compressed day per mode")
    parser.add_argument("--slo-ms", type=float, default=300.0, help="hi's p99 target per 5 s interval")
    parser.add_argument("--lo-slo-ms", type=float, default=2000.0, help="lo's p99 target per 5 s interval")
    parser.add_argument("--static", action="append", metavar="HI,LO",
                        help="static worker counts to compare with (repeatable; default: 3,3 = each at max_workers)")
    parser.add_argument("--device-ms", type=float, default=0.0, help="simulated accelerator ms per batch (0: CPU only)")
    parser.add_argument("--hi-min-workers", type=int, default=1, help="hi's min_workers in the policy (pre-warming)")
    parser.add_argument("--lo-min", type=int, action="append", metavar="N",
                        help="lo's min_workers in the autoscaled policy (default 1); 0 adds scale_from_zero: true "
                             "(503s while lo has no worker). Repeatable: one autoscaled mode per value")
    parser.add_argument("--trace", choices=sorted(TRACES), default="day",
                        help="day: both tenants busy by day (the first trace); night-batch: lo's batch runs at night")
    parser.add_argument("--hi-utilization", type=float, default=0.45,
                        help="hi's target_utilization (0: off, queue and pending targets only, as in the first runs)")
    parser.add_argument("--lo-utilization", type=float, default=0.85, help="lo's target_utilization (0: off)")
    parser.add_argument("--no-autoscaled", action="store_true", help="run the static modes only")
    parser.add_argument("--log", action="store_true", help="show the controller's decisions")
    parser.add_argument("--ideal", type=float, metavar="SERVICE_MS",
                        help="print the saving an ideal scaler would reach against each --static (at SERVICE_MS "
                             "per request, with and without the target_utilization headroom) and exit")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]  # the host's load before this run (a quiet host: well under 1)
    logging.basicConfig(level=logging.INFO if args.log else logging.WARNING, format="%(asctime)s %(message)s")
    policy = copy.deepcopy(POLICY)
    policy["models"]["hi"]["min_workers"] = args.hi_min_workers
    for name, utilization in (("hi", args.hi_utilization), ("lo", args.lo_utilization)):
        if utilization > 0:
            policy["models"][name]["target_utilization"] = utilization
    lo_mins = args.lo_min or [1]
    statics = [tuple(int(v) for v in spec.split(",")) for spec in (args.static or ["3,3"])]
    if args.ideal:
        for static in statics:
            for lo_min in lo_mins:
                for label, u in (("no headroom", (1.0, 1.0)), ("target_utilization", (args.hi_utilization, args.lo_utilization))):
                    saving = ideal_saving(TRACES[args.trace], static, args.ideal / 1000.0, u, (args.hi_min_workers, lo_min))
                    print(f"trace {args.trace}, static {static[0]}+{static[1]}, ideal scaler, lo min {lo_min}, "
                          f"{label} {u}: {saving:.0%} fewer")
        return 0
    policies = {}
    for lo_min in lo_mins:
        p = policies[_autoscaled_mode(lo_min)] = copy.deepcopy(policy)
        p["models"]["lo"]["min_workers"] = lo_min
        if lo_min == 0:
            p["models"]["lo"]["scale_from_zero"] = True
    modes = ([] if args.no_autoscaled else [(name, None) for name in policies]) + \
        [(f"static {h}+{lo}", (h, lo)) for h, lo in statics]
    body = encode(mosaic(96, 96), "JPEG")
    slo = {"hi": args.slo_ms, "lo": args.lo_slo_ms}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tsgpu-autoscale-sim-") as tmp:
        store = build_store(Path(tmp), args.device_ms)
        for mode, static in modes:
            results, worker_seconds = run_mode(mode, store, args.duration, body, static, policies.get(mode, policy),
                                               TRACES[args.trace])
            rows.append(summarize(mode, results, worker_seconds, slo, args.duration))
            print(f"{mode}: done", file=sys.stderr, flush=True)
    stamp = datetime.datetime.now().isoformat(timespec="minutes")
    print(f"# {stamp}, {platform.node()}, {os.cpu_count()} CPUs, trace {args.trace}, duration {args.duration:g}s "
          f"({86400 / args.duration:.0f}x compressed), device_ms {args.device_ms:g}, hi min_workers {args.hi_min_workers}, "
          f"lo min_workers {'/'.join(map(str, lo_mins))}, "
          f"target_utilization hi {args.hi_utilization:g} / lo {args.lo_utilization:g} (0: off), "
          f"SLO p99 hi {args.slo_ms:g} ms / lo {args.lo_slo_ms:g} ms per 5 s, 1-min load at start {load_at_start:.2f}")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")
    for auto in (r for r in rows if r["mode"] in policies):
        for row in rows:
            if row["mode"].startswith("static") and row["worker_s"]:
                print(f"{auto['mode']} vs {row['mode']}: {1 - auto['worker_s'] / row['worker_s']:.0%} fewer worker-seconds")
    return 0


def _autoscaled_mode(lo_min: int) -> str:
    return "autoscaled" if lo_min == 1 else f"autoscaled lo min {lo_min}"


if __name__ == "__main__":
    sys.exit(main())

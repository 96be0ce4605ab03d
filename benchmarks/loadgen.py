"""A small closed-loop HTTP load generator for loopback benchmarks (no dependencies).

`concurrency` client threads each keep one keep-alive connection and send POSTs back to back,
cycling through the given bodies, for `duration` seconds (after `warmup` seconds whose results are
discarded). Latency is measured per request from send to full response.
"""

from __future__ import annotations

import http.client
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    statuses: Counter
    transport_errors: int

    @property
    def qps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        return ordered[index]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies_ms) if self.latencies_ms else float("nan")

    @property
    def errors(self) -> int:
        return self.transport_errors + sum(n for code, n in self.statuses.items() if code >= 400)


def run_load(
    url: str,
    bodies: list[bytes],
    concurrency: int = 16,
    duration: float = 30.0,
    warmup: float = 5.0,
    content_type: str = "application/octet-stream",
    timeout: float = 60.0,
) -> LoadResult:
    """POST `bodies` round-robin to `url` from `concurrency` threads; loopback URLs only."""
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"benchmarks only talk to loopback, got {url}")
    path = parts.path or "/"
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    transport_errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    def client(worker: int) -> None:
        nonlocal transport_errors
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        i = worker
        local_lat: list[float] = []
        local_status: Counter = Counter()
        local_errors = 0
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            body = bodies[i % len(bodies)]
            i += concurrency
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": content_type})
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
                status = None
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                if status is None:
                    local_errors += 1
                else:
                    local_status[status] += 1
                    local_lat.append((t1 - t0) * 1000)
        conn.close()
        with lock:
            latencies.extend(local_lat)
            statuses.update(local_status)
            transport_errors += local_errors

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=warmup + duration + timeout + 30)
    return LoadResult(
        requests=len(latencies) + transport_errors,
        seconds=duration,
        latencies_ms=latencies,
        statuses=statuses,
        transport_errors=transport_errors,
    )

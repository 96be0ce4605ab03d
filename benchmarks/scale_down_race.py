"""What TorchServe 0.12 answers when a worker is stopped while it runs a request.

One tiny model with 2 workers, `--clients` connections sending continuously, `--cycles` times a
scale-down 2 -> 1 and back up 1 -> 2 through the management API (synchronous). Prints the status
counts and the body of every non-200 answer. Results, with machine and date: docs/autoscaling.md
(Robustness).

    python -m benchmarks.scale_down_race [--cycles 15] [--clients 4]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from archiver_scripts.samples import encode, mosaic
from archiver_scripts.server import TorchServe
from tests import models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=15, help="scale-downs (each followed by a scale-up)")
    parser.add_argument("--clients", type=int, default=4, help="connections sending continuously")
    args = parser.parse_args(argv)
    body = encode(mosaic(96, 96), "JPEG")
    stats: collections.Counter = collections.Counter()
    failures: list[tuple[int, bytes]] = []
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="tsgpu-race-") as tmp:
        work = Path(tmp)
        (work / "store").mkdir()
        (work / "build").mkdir()
        models.build_tiny_archive("m", work / "store", work / "build", batch_size=1, max_batch_delay=1, workers=2)
        with TorchServe(work / "store", models=["m.mar"], workdir=work / "ts", env={"OMP_NUM_THREADS": "1"}) as ts:
            ts.wait_ready(["m"], timeout=180)
            host, port = ts.inference_url.split("//")[1].split(":")

            def client() -> None:
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                while not stop.is_set():
                    conn.request("POST", "/predictions/m", body=body, headers={"Content-Type": "application/octet-stream"})
                    response = conn.getresponse()
                    data = response.read()
                    stats[response.status] += 1
                    if response.status != 200:
                        failures.append((response.status, data[:200]))

            threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
            for t in threads:
                t.start()
            for cycle in range(args.cycles):
                for n in (1, 2):
                    url = f"{ts.management_url}/models/m?min_worker={n}&max_worker={n}&synchronous=true"
                    urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=60).read()
                    time.sleep(0.5)
                print(f"cycle {cycle + 1}/{args.cycles}: {dict(stats)}", flush=True)
            stop.set()
            for t in threads:
                t.join(timeout=30)
    print(f"statuses: {dict(stats)}")
    for status, data in failures:
        print(f"  {status}: {data!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

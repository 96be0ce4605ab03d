"""Load and soak: a real torchserve with our archive, a mix of good, bad and URL inputs, bounded time.

Reports QPS, responses by status and error type, worker restarts (worker PIDs before/after), and
the workers' RSS after warm-up and at the end. Targets: no 5xx, no restart, RSS growth < 5%.
URL inputs are served by a local HTTP server on 127.0.0.1, which the archive's handler config
explicitly allows (`handler.url.allowed_networks: [127.0.0.1/32]`); nothing leaves the host.

    python -m benchmarks.soak [--duration 600] [--concurrency 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from archiver_scripts.archive import build_archive
from archiver_scripts.server import TorchServe
from benchmarks.common import image_server, soak_images


def make_mix(origin: str, good: list[bytes], rng: random.Random) -> list[tuple[str, bytes, str]]:
    """(kind, body, content type) for every request shape of the mix."""
    mix: list[tuple[str, bytes, str]] = []
    for data in good:
        mix.append(("good-raw", data, "application/octet-stream"))
        mix.append(("good-b64", json.dumps({"data": base64.b64encode(data).decode()}).encode(), "application/json"))
    for i in range(len(good)):
        mix.append(("good-url", json.dumps({"url": f"{origin}/img{i}.jpg"}).encode(), "application/json"))
    noise = bytes(rng.getrandbits(8) for _ in range(5000))
    mix += [
        ("bad-empty", b"", "application/octet-stream"),
        ("bad-text", b"definitely not an image", "application/octet-stream"),
        ("bad-random", noise, "application/octet-stream"),
        ("bad-truncated", good[-1][: len(good[-1]) // 3], "application/octet-stream"),
        ("bad-json-key", json.dumps({"image": "AAAA"}).encode(), "application/json"),
        ("bad-base64", json.dumps({"data": "%%%"}).encode(), "application/json"),
        ("bad-url-404", json.dumps({"url": f"{origin}/missing.jpg"}).encode(), "application/json"),
        ("bad-url-html", json.dumps({"url": f"{origin}/page.html"}).encode(), "application/json"),
        ("bad-url-refused", json.dumps({"url": "http://169.254.169.254/latest/meta-data"}).encode(), "application/json"),
    ]
    return mix


def worker_rss(server: TorchServe) -> dict[int, int]:
    out = {}
    for pid in server.worker_pids():
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return out


def drive(url: str, mix, seconds: float, concurrency: int, seed: int) -> tuple[Counter, Counter, int]:
    statuses: Counter = Counter()
    by_kind: Counter = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    host, port = url.split("//")[1].split("/")[0].split(":")
    path = "/" + url.split("//")[1].split("/", 1)[1]

    def client(k: int) -> None:
        rng = random.Random(seed + k)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        local_s, local_k = Counter(), Counter()
        while time.monotonic() < stop_at:
            kind, body, ctype = rng.choice(mix)
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                payload = resp.read()
                status = resp.status
                err_type = json.loads(payload).get("type", "") if status >= 400 and payload.startswith(b"{") else ""
            except (OSError, http.client.HTTPException, ValueError):
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                status, err_type = -1, "transport"
            local_s[status] += 1
            local_k[(kind, status, err_type)] += 1
        with lock:
            statuses.update(local_s)
            by_kind.update(local_k)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, by_kind, sum(statuses.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="measured seconds (after warm-up)")
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra server environment")
    args = parser.parse_args(argv)
    rng = random.Random(0)

    with tempfile.TemporaryDirectory(prefix="tsgpu-soak-") as tmp:
        work = Path(tmp)
        import torch
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
        program = torch.export.export(model, (torch.randn(2, 3, 224, 224),),
                                      dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=16)}})
        torch.export.save(program, str(work / "mnv3.pt2"))
        good = soak_images()
        origin_server = image_server({f"img{i}.jpg": d for i, d in enumerate(good)} | {"page.html": b"<html></html>"})
        origin = f"http://127.0.0.1:{origin_server.server_address[1]}"
        mix = make_mix(origin, good, rng)
        store = work / "store"
        build_archive("soak", work / "mnv3.pt2", store, batch_size=8, max_batch_delay=10, workers=args.workers,
                      config=["url.allowed_networks=[127.0.0.1/32]", "url.read_timeout=5"], log=lambda m: None)
        env = dict(item.split("=", 1) for item in args.env)
        server = TorchServe(store, models=["soak.mar"], workdir=work / "ts", env=env)
        with server:
            server.wait_ready(["soak"], timeout=300)
            url = f"{server.inference_url}/predictions/soak"
            print(f"warm-up {args.warmup:.0f}s ...", flush=True)
            drive(url, mix, args.warmup, args.concurrency, seed=1)
            pids_start = sorted(server.worker_pids())
            rss_start = worker_rss(server)
            print(f"soak {args.duration:.0f}s with {args.concurrency} clients; workers {pids_start}, "
                  f"RSS {[round(v / 2**20) for v in rss_start.values()]} MiB", flush=True)
            started = time.monotonic()
            samples_rss: list[tuple[float, list[int]]] = []
            done = threading.Event()

            def sample() -> None:  # RSS every 30 s: a plateau and a leak look different
                while not done.wait(30):
                    samples_rss.append((time.monotonic() - started, [round(v / 2**20) for v in worker_rss(server).values()]))
                    print(f"  t={samples_rss[-1][0]:.0f}s worker RSS {samples_rss[-1][1]} MiB", flush=True)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            statuses, by_kind, total = drive(url, mix, args.duration, args.concurrency, seed=2)
            done.set()
            elapsed = time.monotonic() - started
            pids_end = sorted(server.worker_pids())
            rss_end = worker_rss(server)
        origin_server.shutdown()

    growth = {pid: (rss_end[pid] - rss_start[pid]) / rss_start[pid] * 100 for pid in rss_start if pid in rss_end}
    five_xx = sum(n for s, n in statuses.items() if s >= 500 or s < 0)
    restarts = len(set(pids_start) ^ set(pids_end)) // 2 if pids_start != pids_end else 0
    print(f"\nrequests {total} in {elapsed:.0f}s = {total / elapsed:.1f} QPS")
    print("statuses:", dict(sorted(statuses.items())))
    print("by kind (kind, status, error type):")
    for (kind, status, err), n in sorted(by_kind.items()):
        print(f"  {kind:<16} {status} {err or '-':<24} {n}")
    print(f"worker PIDs start {pids_start} end {pids_end}: {'no restart' if pids_start == pids_end else 'RESTARTED'}")
    for pid in rss_start:
        end = rss_end.get(pid)
        print(f"worker {pid} RSS {rss_start[pid] / 2**20:.1f} -> {end / 2**20 if end else float('nan'):.1f} MiB "
              f"({growth.get(pid, float('nan')):+.2f}%)")
    ok = five_xx == 0 and pids_start == pids_end and growth and max(growth.values()) < 5.0
    print(f"targets (no 5xx, no restart, RSS growth < 5%): {'MET' if ok else 'NOT MET'}")
    if args.json:
        args.json.write_text(json.dumps({
            "requests": total, "seconds": elapsed, "qps": total / elapsed, "statuses": statuses,
            "by_kind": [[*k, n] for k, n in by_kind.items()], "pids_start": pids_start, "pids_end": pids_end,
            "rss_start": rss_start, "rss_end": rss_end, "rss_growth_pct": growth, "five_xx": five_xx,
            "restarts": restarts, "env": args.env,
        }, indent=2, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""One pipelined worker vs two plain ones: QPS, latency and the workers' memory, through torchserve.

The archive of benchmarks/serving.py (TorchScript MobileNetV3-small with random weights, 1080p JPEGs,
batchSize 8, maxBatchDelay 10 ms; built by the shared helpers in benchmarks/common.py) served by a real stock
`torchserve` on loopback in three configurations, one after another:

    (a) 2 workers, the plain path (no micro-batches, decode threads)
    (b) 1 worker,  the plain path
    (c) 1 worker,  handler.pipeline.micro_batch M and handler.pipeline.decode_processes D

Each gets the same closed-loop load (benchmarks/loadgen.py). While the load is measured, a sampler
reads the memory of every worker process and of the worker's own child processes (decode processes)
once per `--sample-interval` seconds: the frontend's Java process is found in the server's process
tree, its children are the workers, their descendants are counted with them. Reported per
configuration: the sum of RSS over those processes (max and mean over the samples), the same for PSS
(proportional set size: pages shared between processes - the decode processes' shared-memory
segments, copy-on-write pages of a forked child - counted once in total rather than once per
process), and the Java frontend's RSS on its own (the same code in every configuration, not a
worker). The verdict uses the max of the summed RSS. The same sampler reads the handler's stage
gauges (DecodeTime, ForwardTime, HandlerTime, DeviceIdleTime, StageOverlap: the last batch's value)
from TorchServe's metrics endpoint, and the host's CPU is split into the server's, the client's and
everyone else's ("other": a host that was not quiet shows here).

Handler threads are left to the handler (`handler.threads` unset): it gives each worker its share of
the host's CPUs (CPUs / minWorkers) and, with the pipeline on, splits that share between torch and
decoding (handlers/pipeline.py plan_threads).

    python -m benchmarks.serving_pipeline [--duration 30] [--micro-batch 4] [--decode-processes 2] [--json out.json]

`--micro-batch 2,4` runs (c) once per value and takes the fastest for the ratios (every row is printed;
choose with `--only c --micro-batch 2,4,8`, then measure the chosen value on its own). `--c-config
threads=2` adds a handler key to (c) only; `--only ab` runs a subset; `--keep-logs DIR` keeps the logs.
On a GPU host the script also reads each worker's GPU memory from `nvidia-smi` (unverified: no GPU here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from archiver_scripts.archive import build_archive
from archiver_scripts.cpu_time import tree_cpu_seconds
from archiver_scripts.server import TorchServe
from benchmarks.common import BATCH_DELAY_MS, BATCH_SIZE, add_workload_arguments, make_images, make_model
from benchmarks.loadgen import run_load

STAGE_GAUGES = ("DecodeTime", "ForwardTime", "PostprocessTime", "HandlerTime", "DeviceIdleTime", "StageOverlap")
QPS_TARGET, RSS_TARGET = 0.9, 0.6  # (c)/(a): at least 0.9x the QPS at no more than 0.6x the worker RSS
MIB = 2**20


@dataclass
class Config:
    key: str  # "a", "b", "c" (c with several micro-batch values: "c-m2", "c-m4")
    label: str
    workers: int
    overrides: list[str] = field(default_factory=list)  # handler section keys, tsgpu archive --config

    @property
    def archive(self) -> str:
        return f"bench_{self.key.replace('-', '_')}"


# -- memory of the worker processes ----------------------------------------------------------------


def _smaps_rollup(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in bytes from /proc/PID/smaps_rollup (Linux); None when it cannot be read."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0]) * 1024
    return (values["Rss"], values["Pss"]) if len(values) == 2 else None


def _rss_pss(proc: psutil.Process) -> tuple[int, int]:
    rolled = _smaps_rollup(proc.pid)
    if rolled is not None:
        return rolled
    rss = proc.memory_info().rss  # no smaps_rollup: PSS unknown, count RSS for both
    return rss, rss


def frontend_process(server: TorchServe) -> psutil.Process | None:
    """The Java frontend in the server's process tree (the `torchserve` script starts it)."""
    root = psutil.Process(server.process.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            if proc.name().startswith("java"):
                return proc
        except psutil.Error:
            continue
    return None


@dataclass
class MemorySample:
    workers: int
    children: int  # processes below the workers (decode processes)
    rss: int  # sum over workers and their descendants
    pss: int
    frontend_rss: int
    per_worker_rss: list[int]


def sample_memory(frontend: psutil.Process) -> MemorySample | None:
    try:
        frontend_rss = frontend.memory_info().rss
        workers = frontend.children()
    except psutil.Error:
        return None
    rss = pss = children = 0
    per_worker = []
    for worker in workers:
        try:
            tree = [worker, *worker.children(recursive=True)]
        except psutil.Error:
            continue
        worker_rss = 0
        for proc in tree:
            try:
                r, p = _rss_pss(proc)
            except psutil.Error:
                continue  # exited between listing and reading
            rss, pss, worker_rss = rss + r, pss + p, worker_rss + r
        children += len(tree) - 1
        per_worker.append(worker_rss)
    return MemorySample(len(per_worker), children, rss, pss, frontend_rss, per_worker)


def gpu_memory_by_pid() -> dict[int, int] | None:
    """Bytes of GPU memory per process from nvidia-smi; None without one. (Unverified here: no GPU.)"""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    usage: dict[int, int] = {}
    for line in out.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and mib.strip().isdigit():
            usage[int(pid)] = usage.get(int(pid), 0) + int(mib) * MIB
    return usage


def stage_gauges(metrics_url: str) -> dict[str, float]:
    """The handler's per-stage gauges from TorchServe's Prometheus endpoint: each holds the value of
    the last batch of some worker (averaged over the workers' label sets when there are several)."""
    try:
        with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5) as r:
            text = r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return {}
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in STAGE_GAUGES:
            try:
                values.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
            except ValueError:
                pass
    return {name: statistics.fmean(v) for name, v in values.items()}


class Sampler(threading.Thread):
    """Samples the workers' memory (and GPU memory where nvidia-smi exists) and the handler's stage
    gauges from `start_at` to `stop_at`."""

    def __init__(self, frontend: psutil.Process, start_at: float, stop_at: float, interval: float,
                 metrics_url: str = "") -> None:
        super().__init__(daemon=True)
        self.frontend, self.start_at, self.stop_at, self.interval = frontend, start_at, stop_at, interval
        self.metrics_url = metrics_url
        self.samples: list[MemorySample] = []
        self.gpu: list[dict[int, int]] = []
        self.stages: list[dict[str, float]] = []

    def run(self) -> None:
        time.sleep(max(0.0, self.start_at - time.perf_counter()))
        while time.perf_counter() < self.stop_at:
            sample = sample_memory(self.frontend)
            if sample is not None and sample.workers:
                self.samples.append(sample)
                gpu = gpu_memory_by_pid()
                if gpu is not None:
                    worker_pids = {p.pid for p in self._workers()}
                    self.gpu.append({pid: b for pid, b in gpu.items() if pid in worker_pids})
            if self.metrics_url:
                gauges = stage_gauges(self.metrics_url)
                if gauges:
                    self.stages.append(gauges)
            time.sleep(self.interval)

    def _workers(self) -> list[psutil.Process]:
        try:
            return self.frontend.children()
        except psutil.Error:
            return []


# -- CPU: was the host quiet? ------------------------------------------------------------------------


class CpuWindow:
    """Host CPU busy time split into this server, this client process and everything else."""

    def __init__(self, server: TorchServe) -> None:
        self.server = psutil.Process(server.process.pid)
        self.me = psutil.Process()

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._host0 = self._host_busy()
        self._server0, self._me0 = tree_cpu_seconds(self.server), self._own()

    def stop(self) -> dict[str, float]:
        wall = time.perf_counter() - self._t0
        host = self._host_busy() - self._host0
        server = tree_cpu_seconds(self.server) - self._server0
        me = self._own() - self._me0
        return {
            "host_busy_cores": round(host / wall, 2),
            "server_cores": round(server / wall, 2),
            "client_cores": round(me / wall, 2),
            "other_cores": round(max(0.0, host - server - me) / wall, 2),
        }

    def _own(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system

    @staticmethod
    def _host_busy() -> float:
        t = psutil.cpu_times()
        extra = sum(getattr(t, name, 0.0) for name in ("irq", "softirq", "steal"))
        return t.user + t.nice + t.system + extra


# -- one configuration ---------------------------------------------------------------------------


def measure(config: Config, store: Path, workdir: Path, images: list[bytes], args: argparse.Namespace) -> dict:
    print(f"\n[{config.key}] {config.label}: starting torchserve ...", flush=True)
    server = TorchServe(store, models=[f"{config.archive}.mar"], workdir=workdir / config.key)
    with server:
        server.wait_ready([config.archive], timeout=300)
        frontend = frontend_process(server)
        if frontend is None:
            raise RuntimeError(f"no Java frontend in torchserve's process tree\n{server.log_tail()}")
        url = f"{server.inference_url}/predictions/{config.archive}"
        now = time.perf_counter()
        sampler = Sampler(frontend, now + args.warmup, now + args.warmup + args.duration, args.sample_interval,
                          server.metrics_url)
        sampler.start()
        cpu = CpuWindow(server)
        timer = threading.Timer(args.warmup, cpu.start)
        timer.start()
        result = run_load(url, images, concurrency=args.concurrency, duration=args.duration, warmup=args.warmup)
        timer.join()
        cpu_split = cpu.stop()
        sampler.join()
        if args.keep_logs:
            shutil.copytree(server.log_dir, args.keep_logs / config.key, dirs_exist_ok=True)
    if not sampler.samples:
        raise RuntimeError(f"[{config.key}] no memory sample taken during the measured window")
    row = summarise(config, result, sampler, cpu_split)
    print(f"[{config.key}] {row['qps']} QPS, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {row['errors']} errors; "
          f"workers+children RSS max {row['rss_max_mib']} MiB (mean {row['rss_mean_mib']}), "
          f"PSS max {row['pss_max_mib']} MiB; {row['processes']}; host {cpu_split}", flush=True)
    return row


def summarise(config: Config, result, sampler: Sampler, cpu_split: dict[str, float]) -> dict:
    samples = sampler.samples
    rss = [s.rss for s in samples]
    pss = [s.pss for s in samples]
    row = {
        "config": config.key, "label": config.label, "workers": config.workers, "overrides": config.overrides,
        "qps": round(result.qps, 1), "p50_ms": round(result.p50, 1), "p99_ms": round(result.p99, 1),
        "requests": result.requests, "errors": result.errors,
        "statuses": {str(k): v for k, v in sorted(result.statuses.items())},
        "rss_max_mib": round(max(rss) / MIB, 1), "rss_mean_mib": round(statistics.fmean(rss) / MIB, 1),
        "pss_max_mib": round(max(pss) / MIB, 1), "pss_mean_mib": round(statistics.fmean(pss) / MIB, 1),
        "per_worker_rss_max_mib": [
            round(max(s.per_worker_rss[i] for s in samples if len(s.per_worker_rss) > i) / MIB, 1)
            for i in range(max(s.workers for s in samples))],
        "frontend_rss_max_mib": round(max(s.frontend_rss for s in samples) / MIB, 1),
        "processes": (f"{max(s.workers for s in samples)} worker(s) + "
                      f"{max(s.children for s in samples)} child process(es)"),
        "memory_samples": len(samples),
        "cpu": cpu_split,
    }
    if sampler.stages:  # sampled gauges: a mean of per-batch values, not of every batch
        row["stage_ms_per_batch_sampled"] = {
            name: round(statistics.fmean(s[name] for s in sampler.stages if name in s), 2)
            for name in STAGE_GAUGES if any(name in s for s in sampler.stages)}
    if sampler.gpu:
        pids = sorted({pid for sample in sampler.gpu for pid in sample})
        row["gpu_mib_per_worker_max"] = {
            str(pid): round(max(s.get(pid, 0) for s in sampler.gpu) / MIB, 1) for pid in pids}
    return row


# -- the run -----------------------------------------------------------------------------------------


def parse_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"{flag} {text!r}: use comma-separated positive integers, e.g. 2,4")
    return values


def configs(micro_batches: list[int], decode_processes: int, only: list[str], extra: list[str]) -> list[Config]:
    plain = [Config("a", "2 workers, today's path", 2), Config("b", "1 worker, today's path", 1)]
    piped = [
        Config("c" if len(micro_batches) == 1 else f"c-m{m}",
               f"1 worker, micro_batch {m}, decode_processes {decode_processes}"
               + "".join(f", {e}" for e in extra), 1,
               [f"pipeline.micro_batch={m}", f"pipeline.decode_processes={decode_processes}", *extra])
        for m in micro_batches
    ]
    return [c for c in [*plain, *piped] if c.key[0] in only]


def ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    by = {r["config"]: r for r in rows}
    out = {}
    a = by.get("a")
    piped = [r for r in rows if r["config"].startswith("c")]
    best_c = max(piped, key=lambda r: r["qps"]) if piped else None
    for name, row in (("c/a", best_c), ("b/a", by.get("b"))):
        if a is None or row is None or not a["qps"]:
            continue
        out[name] = {
            "of": row["config"],
            "qps": round(row["qps"] / a["qps"], 2),
            "rss_max": round(row["rss_max_mib"] / a["rss_max_mib"], 2),
            "rss_mean": round(row["rss_mean_mib"] / a["rss_mean_mib"], 2),
            "pss_max": round(row["pss_max_mib"] / a["pss_max_mib"], 2),
            "p99": round(row["p99_ms"] / a["p99_ms"], 2) if a["p99_ms"] else float("nan"),
        }
    return out


def print_table(rows: list[dict], ratio: dict[str, dict[str, float]]) -> None:
    print("\n| config | QPS | p50 ms | p99 ms | errors | workers+children RSS max / mean MiB | PSS max MiB "
          "| processes | frontend RSS MiB | host CPU: server / client / other cores |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---:|---|")
    for r in rows:
        c = r["cpu"]
        print(f"| ({r['config']}) {r['label']} | {r['qps']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} "
              f"| {r['rss_max_mib']} / {r['rss_mean_mib']} | {r['pss_max_mib']} | {r['processes']} "
              f"| {r['frontend_rss_max_mib']} | {c['server_cores']} / {c['client_cores']} / {c['other_cores']} |")
        if "stage_ms_per_batch_sampled" in r:
            print(f"|   stage gauges, mean of samples (ms per batch; StageOverlap %): "
                  f"{r['stage_ms_per_batch_sampled']} |")
        if "gpu_mib_per_worker_max" in r:
            print(f"|   GPU MiB per worker (max): {r['gpu_mib_per_worker_max']} |")
    print()
    for name, q in ratio.items():
        print(f"{name} ({q['of']}): QPS x{q['qps']:.2f}, "
              f"worker RSS x{q['rss_max']:.2f} (max; mean x{q['rss_mean']:.2f}), "
              f"PSS x{q['pss_max']:.2f}, p99 x{q['p99']:.2f}")
    if "c/a" in ratio:
        q = ratio["c/a"]
        met = q["qps"] >= QPS_TARGET and q["rss_max"] <= RSS_TARGET and all(r["errors"] == 0 for r in rows)
        print(f"target (c)/(a): QPS >= {QPS_TARGET}x and worker RSS (max) <= {RSS_TARGET}x, zero errors: "
              f"{'MET' if met else 'NOT MET'} (QPS x{q['qps']:.2f}, RSS x{q['rss_max']:.2f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--micro-batch", default="4", help="handler.pipeline.micro_batch for (c); a list runs each")
    parser.add_argument("--decode-processes", type=int, default=2, help="handler.pipeline.decode_processes for (c)")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("--c-config", action="append", default=[], metavar="KEY=VALUE",
                        help="another handler key for (c) only, as tsgpu archive --config (e.g. threads=2)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="TorchServe batchSize of every configuration (the same for all)")
    parser.add_argument("--only", default="abc", help="which configurations to run, e.g. ab")
    parser.add_argument("--keep-logs", type=Path, help="copy each server's log directory here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    micro_batches = parse_list(args.micro_batch, "--micro-batch")
    if args.decode_processes < 0:
        raise SystemExit(f"--decode-processes {args.decode_processes}: must be >= 0")
    runs = configs(micro_batches, args.decode_processes, list(args.only), args.c_config)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="tsgpu-bench-pipe-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        print("building MobileNetV3-small (TorchScript), test images and the archives ...", flush=True)
        model, labels = make_model(work)
        images = make_images(args.images, args.quality)
        for config in runs:
            build_archive(config.archive, model, store, labels=labels, batch_size=args.batch_size,
                          max_batch_delay=BATCH_DELAY_MS, workers=config.workers, config=config.overrides,
                          force=True, log=lambda m: None)
        mean_kb = sum(map(len, images)) / len(images) / 1024
        print(f"{len(images)} JPEGs 1920x1080 (quality {args.quality}, mean {mean_kb:.0f} KiB); "
              f"batchSize {args.batch_size}, "
              f"maxBatchDelay {BATCH_DELAY_MS} ms; {args.concurrency} clients, {args.warmup:.0f}+{args.duration:.0f} s "
              f"per run; load average before: {', '.join(f'{v:.2f}' for v in load_before)}", flush=True)
        rows = [measure(config, store, work, images, args) for config in runs]

    ratio = ratios(rows)
    print_table(rows, ratio)
    if args.json:
        summary = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {psutil.cpu_count()} CPUs, "
                       f"{psutil.virtual_memory().total / 2**30:.0f} GiB, "
                       f"{platform.python_implementation()} {platform.python_version()}",
            "load_average_before": [round(v, 2) for v in load_before],
            "args": {k: str(v) for k, v in vars(args).items()},
            "rows": rows,
            "ratios": ratio,
            "targets": {"qps_c_over_a_min": QPS_TARGET, "rss_c_over_a_max": RSS_TARGET},
        }
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

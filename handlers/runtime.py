"""Where a worker runs: its device and its share of the host's CPUs.

TorchServe starts several worker processes per model. With torch's default of one intra-op thread per
core, each of them spreads over every core and they fight for the CPU (on a 2-core host the stock
handler measured 11 QPS with defaults and 51 QPS with OMP_NUM_THREADS=1). So each worker takes
`cores // workers` threads, where cores honours CPU affinity and a cgroup CPU quota.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import tracemalloc

logger = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may use: affinity mask, narrowed by a cgroup v2/v1 quota if one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def _cgroup_cpu_quota() -> float | None:
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1q, v1p = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
        if v1q.is_file() and v1p.is_file():
            quota_us = int(v1q.read_text())
            return None if quota_us <= 0 else quota_us / int(v1p.read_text())
    except (OSError, ValueError):
        return None
    return None


def workers_per_model(model_yaml_config: Mapping[str, Any] | None) -> int:
    """Workers TorchServe will run for this model, from model-config.yaml (default 1 if unset).

    The frontend's default_workers_per_model is not visible to the worker; archives built by
    `tsgpu archive` always write minWorkers/maxWorkers, and `handler.threads` overrides all of this.
    """
    cfg = model_yaml_config or {}
    for key in ("maxWorkers", "minWorkers"):
        value = cfg.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def cpu_threads_per_worker(configured: int, model_yaml_config: Mapping[str, Any] | None) -> int:
    """Threads one worker should use: `configured` if > 0, else its share of the available CPUs."""
    if configured > 0:
        return configured
    return max(1, available_cpus() // workers_per_model(model_yaml_config))


def apply_torch_threads(threads: int) -> None:
    """Size torch's intra-op pool for this worker process (called from initialize, never at import)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    logger.info("torch intra-op threads: %d (available CPUs: %d)", threads, available_cpus())


def select_device(gpu_id: Any) -> torch.device:
    """The worker's device: cuda:<gpu_id> when TorchServe assigned a GPU and CUDA works, else CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        device = torch.device("cuda", int(gpu_id))
        # Libraries that take no device argument (AOTInductor, CV-CUDA, DALI) use the current device.
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class MemoryTrimmer:
    """Give freed heap memory back to the OS every `interval` seconds (glibc's malloc_trim).

    Decoding images of varying sizes leaves glibc holding freed memory in its arenas; trimming
    returns it. (It does not stop the RSS growth seen in torchserve soak runs: docs/benchmarks.md.)
    A no-op where malloc_trim does not exist (musl, macOS).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last = time.monotonic()
        self._trim = _malloc_trim() if interval > 0 else None

    def maybe_trim(self) -> bool:
        if self._trim is None or time.monotonic() - self._last < self.interval:
            return False
        self._trim(0)
        self._last = time.monotonic()
        return True


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


class HeapReport:
    """Diagnostics: with TSGPU_HEAP_REPORT=/path and PYTHONTRACEMALLOC=1 in the server's environment,
    write the Python allocation sites that grew since the first report, every `interval` seconds.
    Off (and free) unless the variable is set; meant for soak investigations, not production."""

    def __init__(self, interval: float = 60.0) -> None:
        self.path = os.environ.get("TSGPU_HEAP_REPORT")
        self.interval = interval
        self._last = time.monotonic()
        self._baseline: tracemalloc.Snapshot | None = None

    def maybe_report(self) -> None:
        if not self.path or time.monotonic() - self._last < self.interval:
            return
        import tracemalloc

        if not tracemalloc.is_tracing():
            return
        self._last = time.monotonic()
        snapshot = tracemalloc.take_snapshot()
        if self._baseline is None:
            self._baseline = snapshot
            return
        lines = [str(stat) for stat in snapshot.compare_to(self._baseline, "lineno")[:25]]
        traced, peak = tracemalloc.get_traced_memory()
        with open(f"{self.path}.{os.getpid()}", "a") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} traced {traced / 2**20:.1f} MiB (peak {peak / 2**20:.1f})\n")
            out.write("\n".join(lines) + "\n")

"""CPU budget per worker."""

from __future__ import annotations

import handlers.runtime as runtime


def test_workers_from_model_config():
    assert runtime.workers_per_model({"minWorkers": 2, "maxWorkers": 4}) == 4
    assert runtime.workers_per_model({"minWorkers": 3}) == 3
    assert runtime.workers_per_model({}) == 1
    assert runtime.workers_per_model(None) == 1


def test_threads_split_cores_between_workers(monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 16)
    assert runtime.cpu_threads_per_worker(0, {"maxWorkers": 4}) == 4
    assert runtime.cpu_threads_per_worker(0, {"maxWorkers": 32}) == 1
    assert runtime.cpu_threads_per_worker(3, {"maxWorkers": 4}) == 3  # explicit setting wins


def test_available_cpus_is_positive():
    assert runtime.available_cpus() >= 1


def test_select_device_without_gpu_id_is_cpu():
    assert runtime.select_device(None).type == "cpu"


def test_memory_trimmer_respects_its_interval(monkeypatch):
    calls = []
    trimmer = runtime.MemoryTrimmer(10.0)
    trimmer._trim = calls.append  # glibc's malloc_trim is called with 0
    clock = [100.0]
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock[0])
    trimmer._last = 100.0
    assert trimmer.maybe_trim() is False
    clock[0] = 111.0
    assert trimmer.maybe_trim() is True and calls == [0]
    assert trimmer.maybe_trim() is False
    assert runtime.MemoryTrimmer(0).maybe_trim() is False


def test_malloc_trim_is_found_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        import pytest

        pytest.skip("not a glibc system")
    assert runtime._malloc_trim() is not None

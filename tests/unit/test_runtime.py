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

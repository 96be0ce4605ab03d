"""The pipeline on, through a real torchserve: micro-batches + decode processes answer like the plain
path, a decoder that crashes or hangs costs only its item, and a worker's shutdown leaves no decode
process and no shared-memory segment behind.

One server, two archives of the same model: `plain` (today's path) and `piped`
(`pipeline.micro_batch=2`, `pipeline.decode_processes=2`). The server runs with
`TSGPU_TEST_DECODE_FAULTS` set, so items starting with `TSGPU-FAULT:...` crash or hang the decode
process that takes them (handlers/preprocess/host/pool.py).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from archiver_scripts import samples
from archiver_scripts.server import TorchServe
from tests import models

PIPELINE = ["pipeline.micro_batch=2", "pipeline.decode_processes=2", "pipeline.decode_timeout_s=3"]


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


@pytest.fixture(scope="module")
def shm_before() -> set[str]:
    return _shm()


@pytest.fixture(scope="module")
def pipe_server(tmp_path_factory, shm_before):
    build = tmp_path_factory.mktemp("pipe-build")
    store = tmp_path_factory.mktemp("pipe-store")
    faults = tmp_path_factory.mktemp("pipe-faults")
    common = dict(batch_size=4, max_batch_delay=300, config=["classifier.top_k=3"])
    models.build_tiny_archive("plain", store, build, **common)
    models.build_tiny_archive("piped", store, build, **{**common, "config": common["config"] + PIPELINE})
    with TorchServe(store, models=["plain.mar", "piped.mar"], workdir=tmp_path_factory.mktemp("ts-pipe"),
                    env={"OMP_NUM_THREADS": "1", "TSGPU_TEST_DECODE_FAULTS": str(faults)}) as ts:
        ts.wait_ready(["plain", "piped"], timeout=240)
        yield ts


def _images() -> list[bytes]:
    photos = [samples.encode(a, "JPEG", quality=90) for a in samples.photos().values()][:4]
    return photos + [
        samples.encode(samples.mosaic(1920, 1080), "JPEG", quality=85),
        samples.encode(samples.mosaic(300, 500, offset=3), "PNG"),
        b"not an image",
        photos[0][: len(photos[0]) // 3],
    ]


def _post_all(server: TorchServe, model: str, items: list[bytes]) -> list[tuple[int, dict]]:
    """All items at once (they share batches), answers in item order."""
    def post(data: bytes) -> tuple[int, dict]:
        r = requests.post(f"{server.inference_url}/predictions/{model}", data=data, timeout=120,
                          headers={"Content-Type": "application/octet-stream"})
        return r.status_code, r.json()

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(post, items))


def test_pipelined_model_answers_like_the_plain_one(pipe_server):
    items = _images()
    plain, piped = _post_all(pipe_server, "plain", items), _post_all(pipe_server, "piped", items)
    assert [s for s, _ in piped] == [s for s, _ in plain] == [200] * 6 + [415, 400]
    for (_, a), (_, b) in zip(plain, piped, strict=True):
        if "predictions" not in a:
            assert a == b
            continue
        # Batches form differently under concurrency: equal up to batch-size-dependent rounding.
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        for p, q in zip(a["predictions"], b["predictions"], strict=True):
            assert p["probability"] == pytest.approx(q["probability"], abs=1e-5)


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_decoder_that_dies_costs_only_its_item(pipe_server, fault):
    good = _images()[:3]
    bad = f"TSGPU-FAULT:{fault}\n".encode() + good[0]
    started = time.monotonic()
    answers = _post_all(pipe_server, "piped", [good[0], bad, good[1], good[2]])
    assert time.monotonic() - started < 60
    assert [s for s, _ in answers] == [200, 400, 200, 200], answers
    body = answers[1][1]
    assert body["code"] == 400 and ("crash" in body["message"] or "timeout" in body["message"]), body
    # The pool replaced its process: the next batch is fine.
    assert [s for s, _ in _post_all(pipe_server, "piped", good)] == [200, 200, 200]


def test_worker_shutdown_leaves_no_decode_process_or_shared_memory(pipe_server, shm_before):
    info = requests.get(f"{pipe_server.management_url}/models/piped", timeout=10).json()[0]
    [pid] = [w["pid"] for w in info["workers"]]
    children = psutil.Process(int(pid)).children(recursive=True)
    assert len(children) >= 2, children  # the decode processes
    assert _shm() - shm_before == set()  # nothing named while serving either
    r = requests.put(f"{pipe_server.management_url}/models/piped?min_worker=0&max_worker=0&synchronous=true", timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 20
    while any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert _shm() - shm_before == set()

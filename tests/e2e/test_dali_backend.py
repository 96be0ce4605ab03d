"""End to end with `handler.preprocess.backend: dali`: an archive served by a stock torchserve whose
workers run DALI (as a CPU pipeline here; on a GPU worker the same archive runs it `mixed`)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from archiver_scripts import samples
from archiver_scripts.archive import build_archive
from archiver_scripts.server import TorchServe
from tests import models
from tests.helpers import bad_and_odd_items, dali_or_skip
from tests.reference import reference_batch

TIMEOUT = 60


@pytest.fixture(scope="module")
def dali_server(tmp_path_factory):
    dali_or_skip()
    build = tmp_path_factory.mktemp("dali-build")
    store = tmp_path_factory.mktemp("dali-store")
    script = models.save_torchscript(models.make_model(), build / "tiny.pt")
    labels = models.write_labels(build)
    build_archive("tiny_dali", script, store, labels=labels, batch_size=8, max_batch_delay=200,
                  config=["preprocess.backend=dali", "classifier.top_k=3"], log=lambda m: None)
    ts = TorchServe(store, models=["tiny_dali.mar"], workdir=tmp_path_factory.mktemp("ts-dali"),
                    env={"OMP_NUM_THREADS": "1"})
    ts.start()
    try:
        ts.wait_ready(["tiny_dali"], timeout=240)
        yield ts
    finally:
        ts.stop()


def post(server, data: bytes):
    return requests.post(f"{server.inference_url}/predictions/tiny_dali", data=data, timeout=TIMEOUT,
                         headers={"Content-Type": "application/octet-stream"})


def test_worker_runs_the_dali_backend(dali_server):
    log = (dali_server.log_dir / "model_log.log").read_text()
    assert re.search(r"ready: .*preprocess=dali", log), "the worker did not report preprocess=dali"


def test_dali_predictions_match_the_reference_and_bad_items_fail_alone(dali_server):
    items = bad_and_odd_items()
    with ThreadPoolExecutor(len(items)) as pool:  # concurrent: they share DALI batches
        responses = dict(zip(items, pool.map(lambda d: post(dali_server, d), items.values()), strict=True))
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {"good": 200, "truncated": 400, "cmyk_jpeg": 200, "gif": 200, "text": 415,
                        "png": 200, "good_again": 200, "truncated_tail": 400}
    model = models.make_model()
    good = [n for n, s in statuses.items() if s == 200]
    with torch.no_grad():
        probs = torch.softmax(model(reference_batch([items[n] for n in good])), dim=1)
    for k, name in enumerate(good):
        top = responses[name].json()["predictions"][0]
        assert top["index"] == int(probs[k].argmax()), name
        assert top["probability"] == pytest.approx(float(probs[k].max()), abs=0.02), name
    # and the worker is still serving
    photo = samples.encode(samples.photos()["rocket"], "JPEG")
    assert post(dali_server, photo).status_code == 200

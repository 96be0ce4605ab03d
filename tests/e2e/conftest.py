"""A real, stock torchserve on loopback serving archives built by `tsgpu archive` in the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from archiver_scripts.archive import build_archive
from archiver_scripts.server import TorchServe
from tests import models


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def e2e_store(tmp_path_factory) -> Path:
    """Model store with the test classifier archived three ways."""
    build = tmp_path_factory.mktemp("e2e-build")
    store = tmp_path_factory.mktemp("e2e-store")
    model = models.make_model()
    script = models.save_torchscript(model, build / "tiny.pt")
    weights = models.save_state_dict(model, build / "tiny_weights.pt")
    model_py = models.write_model_py(build)
    labels = models.write_labels(build)
    quiet = lambda message: None  # noqa: E731
    build_archive("tiny", script, store, labels=labels, batch_size=8, max_batch_delay=20,
                  config=["classifier.top_k=3"], log=quiet)
    # long batch delay: concurrent requests are sure to share a batch
    build_archive("tiny_batch", script, store, labels=labels, batch_size=8, max_batch_delay=3000,
                  config=["classifier.top_k=3"], log=quiet)
    build_archive("tiny_eager", weights, store, model_class=f"{model_py}:TinyClassifier",
                  labels=labels, batch_size=4, log=quiet)
    # URL inputs from the loopback test origin: allowed explicitly for this model only
    build_archive("tiny_url", script, store, labels=labels, batch_size=8, max_batch_delay=20,
                  config=["url.allowed_networks=[127.0.0.1/32]", "url.read_timeout=2"], log=quiet)
    return store


@pytest.fixture(scope="session")
def server(e2e_store, tmp_path_factory):
    ts = TorchServe(e2e_store, models=["tiny.mar", "tiny_batch.mar", "tiny_eager.mar", "tiny_url.mar"],
                    workdir=tmp_path_factory.mktemp("ts"), env={"OMP_NUM_THREADS": "1"})
    ts.start()
    try:
        ts.wait_ready(["tiny", "tiny_batch", "tiny_eager", "tiny_url"], timeout=240)
        yield ts
    finally:
        ts.stop()

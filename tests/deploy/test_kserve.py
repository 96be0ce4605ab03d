"""`tsgpu kserve`: the layout KServe's TorchServe runtime reads, served by a real torchserve on loopback
with the generated config.properties and TorchServe's `kserve` (v1) envelope."""

from __future__ import annotations

import base64
import json
import zipfile

import pytest
import requests
import yaml

from archiver_scripts import samples
from archiver_scripts.archive import build_archive
from archiver_scripts.cli import main as tsgpu
from archiver_scripts.server import TorchServe, read_properties
from tests import models

from . import crd_schema

BAD = base64.b64encode(b"not an image").decode()


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    root = tmp_path_factory.mktemp("kserve")
    store = root / "store"
    store.mkdir()
    script = models.save_torchscript(models.make_model(), root / "tiny.pt")
    build_archive("tiny", script, store, labels=models.write_labels(root), batch_size=8, max_batch_delay=5,
                  config=["classifier.top_k=3"], log=lambda m: None)
    out = root / "out"
    assert tsgpu(["kserve", "--model-store", str(store), "--output", str(out), "--gpus", "1"]) == 0
    return out


def test_layout_matches_the_runtime(layout):
    assert sorted(p.name for p in (layout / "model-store").iterdir()) == ["tiny.mar"]
    zipfile.ZipFile(layout / "model-store" / "tiny.mar").testzip()
    props = read_properties(layout / "config" / "config.properties")
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["service_envelope"] == "kserve"
    snapshot = json.loads(props["model_snapshot"])
    entry = snapshot["models"]["tiny"]["1.0"]
    assert entry["marName"] == "tiny.mar" and entry["batchSize"] == 1 and snapshot["modelCount"] == 1
    isvc = yaml.safe_load((layout / "inferenceservice.yaml").read_text())
    crd_schema.validate(isvc)
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_refuses_an_empty_store(tmp_path, capsys):
    assert tsgpu(["kserve", "--model-store", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "no .mar files" in capsys.readouterr().err


@pytest.fixture(scope="module")
def served(layout, tmp_path_factory):
    ts = TorchServe(layout / "model-store", workdir=tmp_path_factory.mktemp("ks-ts"),
                    base_config=layout / "config" / "config.properties", env={"OMP_NUM_THREADS": "1"})
    del ts.properties["load_models"]  # the generated model_snapshot loads the models, as in KServe
    ts.start()
    try:
        ts.wait_ready(["tiny"], timeout=120)
        yield ts
    finally:
        ts.stop()


def _predict(ts, instances):
    return requests.post(f"{ts.inference_url}/v1/models/tiny:predict", json={"instances": instances}, timeout=60)


def _photo() -> str:
    return base64.b64encode(samples.encode(samples.mosaic(64, 48), "JPEG")).decode()


def test_v1_single_instance(served):
    r = _predict(served, [{"data": _photo()}])
    assert r.status_code == 200, r.text
    (item,) = r.json()["predictions"]
    # under an envelope the handler returns objects, so each prediction is JSON, not JSON text
    assert len(item["predictions"]) == 3


def test_v1_single_bad_instance_keeps_its_status(served):
    r = _predict(served, [{"data": BAD}])
    assert r.status_code == 415  # every instance failed with one code: the request carries it
    assert r.json()["predictions"][0]["type"] == "unsupported_media_type"


def test_v1_several_instances_keep_their_own_results_and_errors(served):
    r = _predict(served, [{"data": _photo()}, {"data": BAD}, {"data": _photo()}])
    assert r.status_code == 200, r.text
    good, bad, again = r.json()["predictions"]
    assert len(good["predictions"]) == 3 and good == again
    assert bad["code"] == 415 and bad["type"] == "unsupported_media_type"

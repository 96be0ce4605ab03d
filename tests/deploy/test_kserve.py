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
    models.build_tiny_archive("tiny", store, root, batch_size=8, max_batch_delay=5, config=["classifier.top_k=3"])
    out = root / "out"
    assert tsgpu(["kserve", "--model-store", str(store), "--output", str(out), "--gpus", "1"]) == 0
    return out


def test_layout_matches_the_runtime(layout):
    assert sorted(p.name for p in (layout / "model-store").iterdir()) == ["tiny.mar"]
    zipfile.ZipFile(layout / "model-store" / "tiny.mar").testzip()
    props = read_properties(layout / "config" / "config.properties")
    # behind the runtime image's kserve_wrapper, which serves 8080 (REST) and 8081 (gRPC) itself
    assert props["inference_address"] == props["management_address"] == "http://127.0.0.1:8085"
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
    with ts:
        ts.wait_ready(["tiny"], timeout=120)
        yield ts


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


# -- KServe v2 (open inference protocol) through TorchServe's kservev2 envelope ------------------


@pytest.fixture(scope="module")
def served_v2(layout, tmp_path_factory):
    out = tmp_path_factory.mktemp("kserve-v2")
    store = layout / "model-store"
    assert tsgpu(["kserve", "--model-store", str(store), "--output", str(out), "--protocol", "v2"]) == 0
    ts = TorchServe(out / "model-store", workdir=tmp_path_factory.mktemp("ks2-ts"),
                    base_config=out / "config" / "config.properties", env={"OMP_NUM_THREADS": "1"})
    del ts.properties["load_models"]
    with ts:
        ts.wait_ready(["tiny"], timeout=120)
        yield ts


def _input(name: str, b64: str) -> dict:
    return {"name": name, "shape": [1], "datatype": "BYTES", "data": [b64]}


def _infer_v2(ts, inputs):
    body = {"id": "req-1", "inputs": inputs}
    return requests.post(f"{ts.inference_url}/v2/models/tiny/infer", json=body, timeout=60)


def test_v2_layout_sets_the_v2_envelope(served_v2):
    assert served_v2.properties["service_envelope"] == "kservev2"


def test_v2_one_input_per_image_keeps_results_and_errors_per_input(served_v2):
    inputs = [_input("input-0", _photo()), _input("input-1", BAD), _input("input-2", _photo())]
    r = _infer_v2(served_v2, inputs)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == "tiny"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert list(outputs) == ["input-0", "input-1", "input-2"]
    assert all(o["datatype"] == "BYTES" and o["shape"] == [1] for o in outputs.values())
    # data[0] is our JSON as an object (the handler returns objects under an envelope)
    good, bad, again = (outputs[n]["data"][0] for n in ("input-0", "input-1", "input-2"))
    assert len(good["predictions"]) == 3 and good == again
    assert bad["code"] == 415 and bad["type"] == "unsupported_media_type"


def test_v2_single_bad_input_keeps_its_status(served_v2):
    r = _infer_v2(served_v2, [_input("input-0", BAD)])
    assert r.status_code == 415
    assert r.json()["outputs"][0]["data"][0]["code"] == 415


def test_v2_non_bytes_input_is_refused_per_input(served_v2):
    pixels = {"name": "input-1", "shape": [1, 2, 2], "datatype": "UINT8", "data": [1, 2, 3, 4]}
    r = _infer_v2(served_v2, [_input("input-0", _photo()), pixels])
    assert r.status_code == 200, r.text
    good, bad = (o["data"][0] for o in r.json()["outputs"])
    assert len(good["predictions"]) == 3 and bad["code"] == 400 and "list" in bad["message"]


def test_v2_reads_only_the_first_element_of_an_input(served_v2):
    # TorchServe's kservev2 envelope takes data[0] of a BYTES input and drops the rest, silently:
    # send one image per input (docs/deploy.md)
    two = {"name": "input-0", "shape": [2], "datatype": "BYTES", "data": [_photo(), BAD]}
    r = _infer_v2(served_v2, [two])
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert len(output["data"]) == 1 and len(output["data"][0]["predictions"]) == 3

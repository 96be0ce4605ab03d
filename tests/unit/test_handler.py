"""ImageClassifier through FakeContext: every model format, top-k against the reference, per-item errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from archiver_scripts import samples
from handlers.errors import ConfigError, ModelLoadError
from handlers.image_classifier import ImageClassifier
from handlers.testing import FakeContext, b64, json_request, multipart_request, raw_request, run_handler
from tests import models
from tests.reference import reference_batch


@pytest.fixture(scope="module")
def jpegs():
    out = {name: samples.encode(arr, "JPEG", quality=90) for name, arr in samples.photos().items()}
    out["1080p"] = samples.encode(samples.mosaic(1920, 1080), "JPEG", quality=90)
    return out


def make_handler(model_dir, serialized_file, handler_config=None, batch_size=4):
    ctx = FakeContext(model_dir, serialized_file=serialized_file, handler_config=handler_config or {},
                      batch_size=batch_size, model_yaml_config={"minWorkers": 1, "maxWorkers": 1})
    handler = ImageClassifier()
    handler.initialize(ctx)
    return handler, ctx


def expected_topk(reference_model, items, k):
    with torch.no_grad():
        probs = torch.softmax(reference_model(reference_batch(items)), dim=1)
    p, i = probs.topk(k, dim=1)
    return p, i


FORMATS = [
    ("model.pt", {}, "torchscript"),
    ("model_ep.pt2", {}, "exported_program"),
    ("weights.pt", {"model": {"model_class": "model.py:TinyClassifier"}}, "eager"),
]


@pytest.mark.parametrize("serialized,handler_config,fmt", FORMATS)
def test_topk_matches_reference_for_every_format(model_dir, reference_model, jpegs, serialized, handler_config, fmt):
    config = {**handler_config, "preprocess": {"jpeg_draft": False}, "classifier": {"top_k": 3}}
    handler, ctx = make_handler(model_dir, serialized, config)
    assert handler.backbone.format == fmt
    items = list(jpegs.values())
    responses = run_handler(handler, ctx, [raw_request(d) for d in items])
    p, i = expected_topk(reference_model, items, 3)
    for n, response in enumerate(responses):
        assert response.status == 200 and response.content_type == "application/json"
        preds = response.body["predictions"]
        assert [x["index"] for x in preds] == i[n].tolist()
        assert [x["label"] for x in preds] == [f"class_{j}" for j in i[n].tolist()]
        assert [x["probability"] for x in preds] == pytest.approx(p[n].tolist(), abs=1e-4)
    # the model's outputs are not degenerate: the photos get different answers
    assert len({r.body["predictions"][0]["index"] for r in responses}) > 1


def test_default_fast_path_agrees_with_reference(model_dir, reference_model, jpegs):
    handler, ctx = make_handler(model_dir, "model.pt", {"classifier": {"top_k": 1}})
    items = list(jpegs.values())
    responses = run_handler(handler, ctx, [raw_request(d) for d in items])
    p, i = expected_topk(reference_model, items, 1)
    for n, r in enumerate(responses):
        assert r.body["predictions"][0]["index"] == i[n, 0].item()
        assert r.body["predictions"][0]["probability"] == pytest.approx(p[n, 0].item(), abs=0.05)


@pytest.mark.slow
def test_aoti_package(model_dir, reference_model, jpegs, tmp_path):
    ep = torch.export.load(str(model_dir / "model_ep.pt2"))
    directory = tmp_path / "aoti"
    shutil.copytree(model_dir, directory)
    torch._inductor.aoti_compile_and_package(ep, package_path=str(directory / "model_aoti.pt2"))
    handler, ctx = make_handler(directory, "model_aoti.pt2", {"preprocess": {"jpeg_draft": False}})
    assert handler.backbone.format == "aoti"
    items = [jpegs["chelsea"], jpegs["coffee"], jpegs["1080p"]]
    responses = run_handler(handler, ctx, [raw_request(d) for d in items])
    p, i = expected_topk(reference_model, items, 5)
    for n, r in enumerate(responses):
        assert [x["index"] for x in r.body["predictions"]] == i[n].tolist()


def test_mixed_batch_each_request_gets_its_own_status(model_dir, jpegs):
    handler, ctx = make_handler(model_dir, "model.pt", batch_size=8)
    good = jpegs["chelsea"]
    requests = [
        raw_request(good),
        raw_request(b""),
        json_request({"data": "%%%not-base64%%%"}),
        json_request({"data": b64(good)}),
        json_request({"url_wrong_key": b64(good)}),
        raw_request(b"GIF89a truncated"),  # too short to even identify: 415
        multipart_request({"data": good}),
        raw_request(good[:2000]),
    ]
    responses = run_handler(handler, ctx, requests)
    assert [r.status for r in responses] == [200, 400, 400, 200, 400, 415, 200, 400]
    for r in responses:
        if r.status != 200:
            assert set(r.body) == {"code", "type", "message"} and r.body["code"] == r.status
            assert r.body["message"]
    # the good ones agree with each other whichever way they came in
    assert responses[0].body == responses[3].body == responses[6].body
    counters = {c.name: c.value for c in ctx.metrics.calls if c.kind == "counter"}
    assert counters == {"RequestErrors": 5, "ImagesProcessed": 3}
    assert ctx.metrics.values("PreprocessTime") and ctx.metrics.values("InferenceTime")


def test_all_bad_batch_never_reaches_the_model(model_dir):
    handler, ctx = make_handler(model_dir, "model.pt")
    responses = run_handler(handler, ctx, [raw_request(b""), raw_request(b"nope")])
    assert [r.status for r in responses] == [400, 415]
    assert ctx.metrics.values("InferenceTime") == []


def test_unknown_config_key_fails_model_load(model_dir):
    with pytest.raises(ConfigError, match="handler.classifier: unknown key 'topk'"):
        make_handler(model_dir, "model.pt", {"classifier": {"topk": 3}})


def test_state_dict_without_model_class_fails_clearly(model_dir):
    with pytest.raises(ConfigError, match="model_class"):
        make_handler(model_dir, "weights.pt")


def test_format_mismatch_fails_clearly(model_dir):
    with pytest.raises(ConfigError, match="'torchscript' but model_ep.pt2 is a exported_program"):
        make_handler(model_dir, "model_ep.pt2", {"model": {"format": "torchscript"}})


def test_missing_model_file(model_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        make_handler(model_dir, "nope.pt")


def test_threads_follow_workers(model_dir, monkeypatch):
    import handlers.runtime as runtime

    monkeypatch.setattr(runtime, "available_cpus", lambda: 8)
    before = torch.get_num_threads()
    try:
        ctx = FakeContext(model_dir, serialized_file="model.pt", handler_config={},
                          model_yaml_config={"minWorkers": 4, "maxWorkers": 4})
        handler = ImageClassifier()
        handler.initialize(ctx)
        assert torch.get_num_threads() == 2
        assert handler.preprocessor.threads == 2
    finally:
        torch.set_num_threads(before)


def test_top_k_larger_than_classes_is_clamped(model_dir, jpegs):
    handler, ctx = make_handler(model_dir, "model.pt", {"classifier": {"top_k": 50}})
    (r,) = run_handler(handler, ctx, [raw_request(jpegs["coffee"])])
    assert len(r.body["predictions"]) == models.NUM_CLASSES
    assert sum(x["probability"] for x in r.body["predictions"]) == pytest.approx(1.0, abs=1e-3)


def test_import_has_no_process_wide_side_effects():
    import subprocess
    import sys

    code = (
        "import torch; t = torch.get_num_threads(); p = torch.get_float32_matmul_precision();"
        "from PIL import Image; px = Image.MAX_IMAGE_PIXELS;"
        "import handlers.image_classifier, handlers.preprocess.cpu;"
        "assert torch.get_num_threads() == t and torch.get_float32_matmul_precision() == p;"
        "assert Image.MAX_IMAGE_PIXELS == px; print('clean')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "clean" in out.stdout


@pytest.mark.parametrize("backend", ["cpu", "torchvision", "dali"])
def test_failed_items_leave_no_reference_cycles_holding_the_batch(model_dir, jpegs, backend):
    """A kept per-item error must not hold its traceback: its frames link back to the handler's
    frame, whose lists hold the error, so the batch's bytes and tensors would wait for a full GC.
    (DALI rebuilds its pipeline for the truncated JPEG here: that must not leave tensors either.)"""
    import gc

    if backend == "dali":
        from tests.helpers import dali_or_skip

        dali_or_skip()

    handler, ctx = make_handler(model_dir, "model_ep.pt2", {"preprocess": {"backend": backend}})
    good = jpegs["coffee"]
    requests = [raw_request(good), raw_request(b"not an image"), raw_request(good[: len(good) // 2]),
                json_request({"data": "%%%"}), raw_request(b"")]
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            statuses = [r.status for r in run_handler(handler, ctx, requests)]
            assert statuses == [200, 415, 400, 400, 400]
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, (BaseException, torch.Tensor))
                  or type(o).__name__ in ("frame", "traceback")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == [], f"{len(leaked)} objects only the cyclic GC frees, e.g. {leaked[:5]}"


def test_kserve_envelope_keeps_per_instance_results_and_errors(model_dir, jpegs):
    """Under TorchServe's KServe v1 envelope one request carries N instances: the handler answers
    objects (the envelope serialises them once) and keeps each instance's error in its own body."""
    from ts.torch_handler.request_envelope.kserve import KServeEnvelope

    context = FakeContext(model_dir, serialized_file="model.pt", batch_size=4,
                          handler_config={"classifier": {"top_k": 2}})
    handler = ImageClassifier()
    handler.initialize(context)
    photo = jpegs["chelsea"]
    rows = context.start_batch([json_request({"instances": [{"data": b64(photo)}, {"data": "bm90IGFuIGltYWdl"},
                                                             {"data": b64(photo)}]})])
    (response,) = KServeEnvelope(handler.handle).handle(rows, context)
    good, bad, again = response["predictions"]
    assert len(good["predictions"]) == 2 and good == again
    assert bad == {"code": 415, "type": "unsupported_media_type", "message": bad["message"]}
    assert context.get_response_status(0)[0] == 200
    rows = context.start_batch([json_request({"instances": [{"data": "bm90IGFuIGltYWdl"}]})])
    (response,) = KServeEnvelope(handler.handle).handle(rows, context)
    assert response["predictions"][0]["code"] == 415 and context.get_response_status(0)[0] == 415

    # TorchServe's classic module-level entry point puts one more frame between envelope and handler
    def handle(data, ctx):
        return handler.handle(data, ctx)

    rows = context.start_batch([json_request({"instances": [{"data": b64(photo)}, {"data": b64(photo)}]})])
    (response,) = KServeEnvelope(handle).handle(rows, context)
    assert [len(p["predictions"]) for p in response["predictions"]] == [2, 2]
    # without an envelope every request gets its own JSON text and status, as before
    responses = run_handler(handler, context, [raw_request(photo), raw_request(b"nope")])
    assert [r.status for r in responses] == [200, 415]


def test_models_calling_torchvision_ops_load_without_importing_torchvision(tmp_path):
    """A TorchScript detector with NMS inside calls torchvision::nms: the loader registers
    torchvision's C operators (a shared library, milliseconds) without importing torchvision's
    Python package, which would add seconds to every worker start."""
    import subprocess
    import sys

    import torchvision

    class WithNms(torch.nn.Module):
        def forward(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            return torchvision.ops.nms(boxes, scores, 0.5)

    path = tmp_path / "nms.pt"
    torch.jit.save(torch.jit.script(WithNms()), str(path))
    code = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from handlers.backbone import load_backbone\n"
        "from handlers.config import ModelConfig\n"
        f"b = load_backbone(Path({str(tmp_path)!r}), 'nms.pt', ModelConfig(freeze=False), torch.device('cpu'))\n"
        "boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.], [20., 20., 30., 30.]])\n"
        "keep = b.module(boxes, torch.tensor([0.9, 0.8, 0.7]))\n"
        "assert keep.tolist() == [0, 2], keep\n"
        "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]

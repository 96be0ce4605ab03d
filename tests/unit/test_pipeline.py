"""handler.pipeline.micro_batch: the pipelined handle answers exactly as the unpipelined one.

Same statuses, same bodies, same order, over batches that mix good images with every kind of bad
item (read errors, decode errors, non-images), on the cpu, torchvision and dali backends, for the
classifier and for the detector (whose boxes depend on per-item geometry). Plus: an exception in any
stage fails that batch only (and never hangs), thread sizing, and the GPU streams (marked `gpu`).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from archiver_scripts import samples
from handlers.image_classifier import ImageClassifier
from handlers.pipeline import plan_threads
from handlers.stages import DECODE, FORWARD, POSTPROCESS, READ
from handlers.testing import FakeContext, json_request, raw_request, run_handler
from tests.helpers import DETECTION_CASES, eager, encode_case, image_origin, model_dir_with, start_detector

BATCH = 8


@pytest.fixture(scope="module")
def mixed_requests():
    """12 requests: 8 photos of different sizes and formats, and 4 bad items in between."""
    photos = [samples.encode(a, "JPEG", quality=90) for a in samples.photos().values()]
    good = photos[:5] + [
        samples.encode(samples.mosaic(1920, 1080), "JPEG", quality=85),
        samples.encode(samples.mosaic(300, 500, offset=3), "PNG"),
        samples.encode(samples.mosaic(64, 48, offset=5), "JPEG", quality=95),
    ]
    bad = [
        raw_request(b"not an image at all"),                     # 415 from the decoder
        raw_request(good[5][: len(good[5]) // 3]),                # truncated JPEG: 400
        json_request({"wrong_key": "x"}),                         # read error: 400
        raw_request(b""),                                         # empty: 400
    ]
    requests = [raw_request(g) for g in good]
    for position, request in zip((1, 4, 6, 9), bad, strict=True):
        requests.insert(position, request)
    return requests


def classifier(model_dir, backend: str, micro_batch: int, batch_size: int = BATCH, threads: int = 0,
               gpu_id: int | None = None, **pipeline):
    config = {"preprocess": {"backend": backend}, "classifier": {"top_k": 5}, "threads": threads,
              "pipeline": {"micro_batch": micro_batch, **pipeline}}
    ctx = FakeContext(model_dir, serialized_file="model.pt", handler_config=config, batch_size=batch_size,
                      model_yaml_config={"minWorkers": 1, "maxWorkers": 1}, gpu_id=gpu_id)
    handler = ImageClassifier()
    handler.initialize(ctx)
    return handler, ctx


def answers(handler, ctx, requests) -> list[tuple[int, object]]:
    return [(r.status, r.body) for r in run_handler(handler, ctx, requests)]


def in_batches(handler, ctx, requests, size):
    out = []
    for start in range(0, len(requests), size):
        out += answers(handler, ctx, requests[start:start + size])
    return out


@pytest.mark.parametrize("backend", ["cpu", "torchvision", "dali"])
def test_pipelined_classifier_answers_exactly_as_unpipelined(model_dir, mixed_requests, backend):
    """Batches of 8 through micro-batches of m == batches of m through the unpipelined path, bit for
    bit (same torch threads: the thread count may change a kernel's summation order)."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    plain, ctx_plain = classifier(model_dir, backend, 0, threads=1)
    for micro in (1, 3):
        expected = []  # TorchServe's batches of 8, each cut into the pipeline's micro-batches
        for start in range(0, len(mixed_requests), BATCH):
            expected += in_batches(plain, ctx_plain, mixed_requests[start:start + BATCH], micro)
        assert sorted({s for s, _ in expected}) == [200, 400, 415]  # the batch really mixes outcomes
        piped, ctx = classifier(model_dir, backend, micro, threads=1)
        assert piped._pipeline is not None
        got = in_batches(piped, ctx, mixed_requests, BATCH)
        assert [s for s, _ in got] == [s for s, _ in expected], (backend, micro)
        assert got == expected, (backend, micro)


def test_whole_batch_against_micro_batches_is_exact_or_within_1e5(model_dir, mixed_requests):
    """The model sees 3 rows instead of 8: the same per-item answers; probabilities (rounded to 6
    places by the classifier) equal, or within 1e-5 where a batch-size-dependent kernel rounds."""
    plain, ctx_plain = classifier(model_dir, "cpu", 0, batch_size=16)
    piped, ctx = classifier(model_dir, "cpu", 3, batch_size=16)
    expected, got = answers(plain, ctx_plain, mixed_requests), answers(piped, ctx, mixed_requests)
    for (s1, b1), (s2, b2) in zip(expected, got, strict=True):
        assert s1 == s2
        if s1 != 200:
            assert b1 == b2
            continue
        assert [p["index"] for p in b1["predictions"]] == [p["index"] for p in b2["predictions"]]
        for p1, p2 in zip(b1["predictions"], b2["predictions"], strict=True):
            assert p1["probability"] == pytest.approx(p2["probability"], abs=1e-5)


def test_pipelined_detector_boxes_are_those_of_the_unpipelined_path(tmp_path, case_images):
    directory = model_dir_with(tmp_path)
    requests = [raw_request(b) for b in case_images]
    requests.insert(2, raw_request(b"garbage"))
    results = {}
    for micro in (0, 2):
        config = {"model": eager("RedBoxXyxy"), "preprocess": {"backend": "cpu"},
                  "pipeline": {"micro_batch": micro}}
        handler, ctx = start_detector(directory, config, batch_size=len(requests))
        results[micro] = answers(handler, ctx, requests)
    assert results[2] == results[0]
    assert [s for s, _ in results[0]].count(200) == len(case_images)


@pytest.fixture(scope="module")
def case_images():
    return [encode_case(w, h, box, o) for _, w, h, box, o in DETECTION_CASES]


def test_every_stage_is_timed_once_per_batch_over_its_micro_batches(model_dir, mixed_requests):
    handler, ctx = classifier(model_dir, "cpu", 2, batch_size=16)
    ctx.metrics.calls.clear()
    run_handler(handler, ctx, mixed_requests)
    for stage in (READ, DECODE, FORWARD, POSTPROCESS):
        assert len(ctx.metrics.values(stage)) == 1, stage  # summed over the 6 micro-batches
    [overlap] = ctx.metrics.values("StageOverlap")
    assert 0 <= overlap < 100
    [handler_ms] = ctx.metrics.values("HandlerTime")
    assert ctx.metrics.values(DECODE)[0] < handler_ms


class _Flaky(ImageClassifier):
    """Fails the forward of the batch's second micro-batch once, or the preprocess once."""

    fail_forward_at = -1
    fail_decode_at = -1

    def __init__(self):
        super().__init__()
        self.calls = {"forward": 0, "decode": 0}

    def forward(self, x):
        self.calls["forward"] += 1
        if self.calls["forward"] == self.fail_forward_at:
            raise RuntimeError("forward failed on purpose")
        return super().forward(x)

    def initialize(self, context):
        super().initialize(context)
        run = self.preprocessor.run

        def flaky_run(encoded):
            self.calls["decode"] += 1
            if self.calls["decode"] == self.fail_decode_at:
                raise RuntimeError("decode failed on purpose")
            return run(encoded)

        self.preprocessor.run = flaky_run


@pytest.mark.parametrize("stage", ["forward", "decode"])
def test_an_exception_in_a_stage_fails_that_batch_only_and_never_hangs(model_dir, mixed_requests, stage):
    config = {"preprocess": {"backend": "cpu"}, "pipeline": {"micro_batch": 2}}
    ctx = FakeContext(model_dir, serialized_file="model.pt", handler_config=config, batch_size=BATCH,
                      model_yaml_config={"minWorkers": 1, "maxWorkers": 1})
    handler = _Flaky()
    handler.initialize(ctx)  # warm-up calls forward once (unpipelined)
    offset = handler.calls[stage]
    setattr(handler, f"fail_{stage}_at", offset + 2)
    batch = mixed_requests[:BATCH]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"{stage} failed on purpose"):
        run_handler(handler, ctx, batch)
    assert time.monotonic() - started < 30
    # The stage threads are free again and the next batch is answered in full.
    after = answers(handler, ctx, batch)
    assert [s for s, _ in after] == [200, 415, 200, 200, 400, 200, 400, 200]
    assert threading.active_count() < 50


def test_small_batches_take_the_unpipelined_path(model_dir, mixed_requests):
    handler, ctx = classifier(model_dir, "cpu", 4)
    called = []
    handler._pipeline.run = lambda *a: called.append(a)  # would break the answer if used
    got = answers(handler, ctx, mixed_requests[:4])
    assert not called and len(got) == 4


@pytest.mark.parametrize("share,micro,procs,threads,decode,expected", [
    (2, 0, 0, 0, 0, (2, 2)),    # today: stages take turns, each uses the share
    (2, 4, 0, 0, 0, (1, 1)),    # pipelined: torch and decode threads split the share
    (8, 4, 0, 0, 0, (4, 4)),
    (2, 4, 2, 0, 0, (1, 1)),    # decode processes take their CPUs, torch keeps at least one
    (8, 4, 2, 0, 0, (6, 2)),
    (4, 4, 0, 3, 0, (3, 1)),    # the user's handler.threads wins
    (4, 4, 0, 0, 3, (2, 3)),    # and their decode_threads
])
def test_plan_threads_fits_the_share(share, micro, procs, threads, decode, expected):
    assert plan_threads(share, micro, procs, threads, decode) == expected


def test_config_keys_are_validated():
    from handlers.config import HandlerConfig
    from handlers.errors import ConfigError

    for bad in ({"micro_batch": -1}, {"decode_processes": -2}, {"decode_timeout_s": 0}, {"micro": 2}):
        with pytest.raises(ConfigError, match="handler.pipeline"):
            HandlerConfig.from_mapping({"pipeline": bad})


@pytest.mark.gpu
def test_gpu_streams_order_upload_forward_postprocess(model_dir, mixed_requests):
    """On CUDA: upload, forward and postprocess on three streams, ordered by events only."""
    for backend in ("cpu", "torchvision"):
        plain, ctx_plain = classifier(model_dir, backend, 0, gpu_id=0)
        piped, ctx = classifier(model_dir, backend, 2, gpu_id=0)
        assert piped.device.type == "cuda"
        streams = {piped._pipeline._upload_stream, piped._pipeline._post_stream, torch.cuda.current_stream()}
        assert len(streams) == 3
        expected = []
        for start in range(0, len(mixed_requests), BATCH):
            expected += in_batches(plain, ctx_plain, mixed_requests[start:start + BATCH], 2)
        for _ in range(5):  # repeated: a missing wait shows up as a wrong answer only sometimes
            assert in_batches(piped, ctx, mixed_requests, BATCH) == expected, backend


def test_response_json_is_valid(model_dir, mixed_requests):
    handler, ctx = classifier(model_dir, "cpu", 2)
    bodies = handler.handle(ctx.start_batch(mixed_requests[:BATCH]), ctx)
    assert [json.loads(body).get("code", 200) for body in bodies] == [200, 415, 200, 200, 400, 200, 400, 200]


@pytest.fixture(scope="module")
def origin():
    with image_origin() as url:
        yield url


def test_url_items_of_a_batch_download_together_not_per_micro_batch(model_dir, origin):
    """4 URLs that each take 2.5 s, micro-batches of 1: about 2.5 s, not 4 x 2.5 s."""
    config = {"preprocess": {"backend": "cpu"}, "pipeline": {"micro_batch": 1},
              "url": {"allowed_networks": ["127.0.0.1/32"], "read_timeout": 5.0, "total_timeout": 10.0}}
    ctx = FakeContext(model_dir, serialized_file="model.pt", handler_config=config, batch_size=4,
                      model_yaml_config={"minWorkers": 1, "maxWorkers": 1})
    handler = ImageClassifier()
    handler.initialize(ctx)
    assert handler._pipeline is not None
    started = time.monotonic()
    got = answers(handler, ctx, [json_request({"url": f"{origin}/slow?{i}"}) for i in range(4)])
    elapsed = time.monotonic() - started
    assert [s for s, _ in got] == [200] * 4
    assert elapsed < 7.0, elapsed

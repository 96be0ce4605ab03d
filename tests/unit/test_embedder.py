"""ImageEmbedder: known vectors, L2 normalisation, float16/float32 base64, bad shapes, bad items.

The model (`tests.segmentation_models.RegionMeans`) returns the channel means of each quadrant of
its input; the test computes the same numbers from the reference preprocessing
(`tests.reference.reference_tensor`, torchvision on PIL), so the handler's vector has one right
answer. PNG inputs keep JPEG draft decoding out of it; the remaining difference is the preprocess
backend's own tolerance against the reference, averaged over a quadrant.
"""

from __future__ import annotations

import base64

import numpy as np
import pytest

from archiver_scripts import samples
from handlers.errors import ModelLoadError
from handlers.tasks.embedder import ImageEmbedder
from handlers.testing import FakeContext, raw_request, run_handler
from tests.reference import reference_tensor
from tests.segmentation_models import CornerPatch, RegionMeans, save_exported

ATOL = 2e-3  # quadrant means of normalised pixels (values of order 1)


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("embedder")
    save_exported(RegionMeans(grid=2), directory / "quadrants.pt2", (224, 224))
    save_exported(RegionMeans(grid=1, keep_dims=True), directory / "pooled.pt2", (224, 224))
    return directory


@pytest.fixture(scope="module")
def images():
    photos = samples.photos()
    return [samples.encode(photos["chelsea"], "PNG"), samples.encode(photos["coffee"][:, :300], "PNG")]


def expected_vectors(images) -> np.ndarray:
    rows = []
    for data in images:
        x = reference_tensor(data).numpy()  # [3, 224, 224]
        quadrants = x.reshape(3, 2, 112, 2, 112).mean(axis=(2, 4))  # [3, 2, 2], as AdaptiveAvgPool2d(2)
        rows.append(quadrants.reshape(-1))
    return np.stack(rows)


def make_handler(directory, model_file, embedder=None, batch_size=4):
    ctx = FakeContext(directory, serialized_file=model_file, batch_size=batch_size,
                      handler_config={"embedder": embedder or {}})
    handler = ImageEmbedder()
    handler.initialize(ctx)
    return handler, ctx


def test_list_vectors_match_reference_and_are_unit_length(emb_dir, images):
    raw = expected_vectors(images)
    handler, ctx = make_handler(emb_dir, "quadrants.pt2")
    responses = run_handler(handler, ctx, [raw_request(d) for d in images])
    for response, want in zip(responses, raw, strict=True):
        assert response.status == 200 and set(response.body) == {"embedding", "dim"}
        got = np.asarray(response.body["embedding"])
        assert response.body["dim"] == 12 and got.shape == (12,)
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-6)
        np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=ATOL)

    plain, plain_ctx = make_handler(emb_dir, "quadrants.pt2", {"normalize": False})
    for response, want in zip(run_handler(plain, plain_ctx, [raw_request(d) for d in images]), raw, strict=True):
        np.testing.assert_allclose(response.body["embedding"], want, atol=ATOL)
        # the list holds the float32 values exactly: parsing them as float32 changes nothing
        values = response.body["embedding"]
        assert np.asarray(values, dtype=np.float32).astype(np.float64).tolist() == values


def test_base64_float16_and_float32(emb_dir, images):
    want = expected_vectors(images)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    lists, lctx = make_handler(emb_dir, "quadrants.pt2")
    as_list = [r.body["embedding"] for r in run_handler(lists, lctx, [raw_request(d) for d in images])]
    for dtype, code in (("float16", "<f2"), ("float32", "<f4")):
        handler, ctx = make_handler(emb_dir, "quadrants.pt2", {"encoding": "base64", "dtype": dtype})
        responses = run_handler(handler, ctx, [raw_request(d) for d in images])
        for response, expected, listed in zip(responses, want, as_list, strict=True):
            body = response.body
            assert response.status == 200 and set(body) == {"embedding_b64", "dtype", "dim"}
            assert body["dtype"] == dtype and body["dim"] == 12
            raw = base64.b64decode(body["embedding_b64"])
            assert len(raw) == 12 * (2 if dtype == "float16" else 4)
            got = np.frombuffer(raw, code)
            if dtype == "float16":  # fp16 keeps 11 significant bits: relative 2**-11 of values <= 1
                np.testing.assert_allclose(got, expected, atol=ATOL + 2**-11)
                np.testing.assert_allclose(got, np.asarray(listed, dtype=np.float16), atol=2**-11)
            else:
                assert got.tolist() == listed  # the same float32 bits as the list encoding


def test_pooled_feature_map_and_mixed_batch(emb_dir, images):
    handler, ctx = make_handler(emb_dir, "pooled.pt2", {"dtype": "float16"})
    ok, bad, ok2 = run_handler(handler, ctx, [raw_request(images[0]), raw_request(b"\x89PNG\r\n\x1a\n broken"),
                                              raw_request(images[1])])
    assert 400 <= bad.status < 500 and bad.body["code"] == bad.status and "type" in bad.body
    expected = expected_vectors(images).reshape(2, 3, 4).mean(axis=2)  # whole-image channel means
    for response, want in zip((ok, ok2), expected, strict=True):
        assert response.status == 200 and response.body["dim"] == 3
        got = np.asarray(response.body["embedding"])
        np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=ATOL + 2**-11)
        assert np.asarray(got, dtype=np.float16).astype(np.float64).tolist() == got.tolist()  # fp16 values


def test_wrong_output_shape_fails_load(tmp_path):
    save_exported(CornerPatch(), tmp_path / "bad.pt2", (224, 224))
    with pytest.raises(ModelLoadError, match=r"\(1, 3, 2, 2\).*Identity"):
        make_handler(tmp_path, "bad.pt2", batch_size=1)


@pytest.mark.gpu
def test_vectors_on_cuda_match_reference(emb_dir, images):
    want = expected_vectors(images)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    ctx = FakeContext(emb_dir, serialized_file="quadrants.pt2", batch_size=4, gpu_id=0,
                      handler_config={"preprocess": {"backend": "cpu"}})  # the reference's numerics
    handler = ImageEmbedder()
    handler.initialize(ctx)
    assert handler.device.type == "cuda"
    for response, expected in zip(run_handler(handler, ctx, [raw_request(d) for d in images]), want, strict=True):
        np.testing.assert_allclose(response.body["embedding"], expected, atol=ATOL)

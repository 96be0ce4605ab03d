"""Replay the fuzzer's corpus (fuzz/fuzz_decode.py --save-corpus): each input keeps its clean outcome."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from handlers.errors import RequestError
from handlers.preprocess import PreprocessSpec
from handlers.preprocess.cpu import CpuPreprocessor

CORPUS = Path(__file__).resolve().parent.parent / "fuzz_corpus"
INDEX = json.loads((CORPUS / "index.json").read_text())


@pytest.fixture(scope="module")
def cpu_backend():
    # the same limit the fuzzer ran with
    backend = CpuPreprocessor(PreprocessSpec(max_image_pixels=20_000_000), threads=1)
    yield backend
    backend.close()


def test_corpus_covers_every_outcome():
    outcomes = {v["cpu"] for v in INDEX.values()}
    assert {"ok", "400 invalid_input", "413 too_large", "415 unsupported_media_type"} <= outcomes


@pytest.mark.parametrize("name", sorted(INDEX))
def test_corpus_input_keeps_its_clean_outcome(cpu_backend, name):
    batch = cpu_backend.run([(CORPUS / name).read_bytes()])
    err = batch.errors[0]
    if err is None:
        outcome = "ok"
        assert torch.isfinite(batch.tensor).all()
    else:
        assert isinstance(err, RequestError) and err.message
        outcome = f"{err.code} {err.type}"
    assert outcome == INDEX[name]["cpu"]


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_corpus_through_accelerated_backends_keeps_every_outcome(backend):
    """The whole corpus as one batch through each backend that runs on a CPU: each item gets the
    outcome the CPU backend gives it alone (bad ones their own 4xx, the rest succeed)."""
    from tests.helpers import make

    names = sorted(INDEX)
    pre = make(backend, max_image_pixels=20_000_000, max_batch=16)
    batch = pre.run([(CORPUS / name).read_bytes() for name in names])
    outcomes = ["ok" if e is None else f"{e.code} {e.type}" for e in batch.errors]
    assert outcomes == [INDEX[name]["cpu"] for name in names]
    assert len(batch.rows) == outcomes.count("ok") and torch.isfinite(batch.tensor).all()
    if backend == "dali":  # several corrupt JPEGs DALI fails, some without naming the sample
        assert 1 <= pre.rebuilds <= pre.MAX_REBUILDS and pre.failed_batches == 0
